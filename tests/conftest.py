"""Pytest configuration: one printed seed per run, GPU skips, CI strict mode, hypothesis profiles.

Randomness: one seed per run, drawn fresh unless given (``--seed N`` or ``DIVKERNELS_TEST_SEED=N``)
and printed in the header. Each test's ``generator`` and the global torch RNG are seeded from the
run seed and the test's id, so a failing test replays alone with the same seed.

CI strict mode (``DIVKERNELS_REQUIRE_BUILDS=1``, set by ``.ci/run``): a test that skips for any reason
other than the ``gpu`` marker fails, so a broken host build, Triton install or missing extra cannot
pass as a wall of skips. Users without a compiler still get skips.

Hypothesis: profile ``ci`` (derandomized, set with ``HYPOTHESIS_PROFILE=ci``) in CI; the default
``dev`` profile draws from the run seed.
"""

from __future__ import annotations

import inspect
import os
import secrets
import zlib

import pytest
import torch
from hypothesis import settings

# Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter. Triton
# reads this when a kernel is defined, so it is set before any test imports divkernels' kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _decode_bf16_dot_operands() -> None:
    """Triton's interpreter (3.9) hands bf16 ``tl.dot`` operands to NumPy as their raw uint16 bits
    (NumPy has no bf16), so the product is garbage; decode them to fp32 first. Products of bf16 values
    are exact in fp32, so this is what the tensor cores compute (fp32 accumulate)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "decodes_bf16", False):
        return

    def decoded(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data.reshape(handle.data.shape), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, decoded(a), decoded(b), d, input_precision, max_num_imprecise_acc)

    create_dot.decodes_bf16 = True
    interpreter.InterpreterBuilder.create_dot = create_dot


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter (3.9) patches ``triton.language`` (``inspect.getmembers`` over ``tl``,
    ``tl.tensor``, ``tl.math``: ~1 ms) again on every device-function call, ``tl.sum`` included, although
    the launch has already patched the same modules and the nested patch is never undone (the launch's
    own restore puts the originals back). Inside a launch, skip a patch whose modules are already
    patched: what the kernels compute is unchanged, and the diversity-op tests run in 121 s instead
    of 177 (CI time). A Triton without ``_patch_lang`` is left as it is."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "once_per_launch", False):
        return
    patched: set[int] = set()  # ids of the language modules the running launch has patched

    class _Scope:  # what the launch restores at its end: its own patch, and the record of it
        def __init__(self, scope=None) -> None:
            self.scope = scope

        def restore(self) -> None:
            if self.scope is not None:
                self.scope.restore()
                patched.clear()

    def once(fn):
        langs = {id(value) for value in fn.__globals__.values()
                 if inspect.ismodule(value) and value in (interpreter.tl, interpreter.tl.core)}
        if patched and langs <= patched:
            return _Scope()  # already patched by this launch: nothing to do, nothing to undo
        scope = original(fn)
        patched.update(langs)
        return _Scope(scope)

    once.once_per_launch = True
    interpreter._patch_lang = once


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _decode_bf16_dot_operands()
    _patch_language_once_per_launch()
# Kernel outputs start as NaN, so an element a kernel fails to write fails the comparison.
os.environ.setdefault("DIVKERNELS_POISON_OUTPUTS", "1")

ENV_SEED = "DIVKERNELS_TEST_SEED"
ENV_STRICT = "DIVKERNELS_REQUIRE_BUILDS"

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def strict_mode() -> bool:
    """True in CI: skips other than ``gpu`` are failures."""
    return os.environ.get(ENV_STRICT, "0") not in ("", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--seed", type=int, default=None,
                     help=f"seed of this run's random inputs (default: ${ENV_SEED}, else fresh)")


@pytest.hookimpl(tryfirst=True)  # before hypothesis's plugin reads its seed option
def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--seed")
    if seed is None:
        seed = int(os.environ.get(ENV_SEED, secrets.randbelow(2**31)))
    config.divkernels_seed = seed
    # hypothesis's own seed follows the run seed unless given (the ci profile derandomizes anyway)
    if getattr(config.option, "hypothesis_seed", "absent") is None:
        config.option.hypothesis_seed = seed


def pytest_report_header(config: pytest.Config) -> list[str]:
    strict = "on (non-gpu skips fail)" if strict_mode() else "off"
    return [f"divkernels: seed={config.divkernels_seed} (replay: --seed {config.divkernels_seed} or "
            f"{ENV_SEED}={config.divkernels_seed}); CI strict mode {strict}; "
            f"hypothesis profile {settings.get_current_profile_name()}"]


def test_seed(request: pytest.FixtureRequest) -> int:
    """The run seed mixed with the test's id: different per test, the same on every replay."""
    return (request.config.divkernels_seed + zlib.crc32(request.node.nodeid.encode())) % 2**31


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def _seed_global_rng(request: pytest.FixtureRequest) -> None:
    """Tests that draw from torch's global RNG replay too."""
    torch.manual_seed(test_seed(request))


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the run seed and the test's id."""
    return torch.Generator().manual_seed(test_seed(request))


# Backend-parametrized fixtures, and the marker their kernel backends' cases carry (set at collection,
# so that ``-m triton`` / ``-m cuda_ext`` selects them; a marker added inside a fixture comes too late).
BACKEND_FIXTURES = ("kernel_backend", "loss_backend")
BACKEND_MARKERS = {"triton": "triton", "cuda": "cuda_ext"}


def backend_marker(item: pytest.Item) -> str | None:
    """``triton`` / ``cuda_ext`` for a case of a backend-parametrized fixture that runs that backend."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for fixture in BACKEND_FIXTURES:
        if fixture in params:
            return BACKEND_MARKERS.get(params[fixture])
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    cpu_only = pytest.mark.skip(reason="checks what runs without a CUDA device (the interpreter, the host build)")
    for item in items:
        marker = backend_marker(item)
        if marker is not None:
            item.add_marker(getattr(pytest.mark, marker))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "cpu_only" in item.keywords and torch.cuda.is_available():
            item.add_marker(cpu_only)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and strict_mode() and "gpu" not in item.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI strict mode ({ENV_STRICT}=1), which allows only gpu-marked skips: "
                           f"{reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module that skips at import (``importorskip``) fails in CI strict mode too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and strict_mode():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped at collection in CI strict mode ({ENV_STRICT}=1): {reason}"


@pytest.fixture(params=["reference", "triton", "cuda"])
def loss_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every backend of ``group_preference_loss``, for hand-derived cases: on CPU Triton runs under
    the interpreter and CUDA through its host build (``DIVKERNELS_CUDA_HOST_EMULATION``)."""
    from helpers import use_backend

    name = request.param
    use_backend(name, torch.device("cuda" if torch.cuda.is_available() else "cpu"), monkeypatch)
    return name
