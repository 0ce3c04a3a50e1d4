"""The CUDA extension's math (csrc/) against the reference.

On a GPU these run the real kernels. Without one, ``DIVKERNELS_CUDA_HOST_EMULATION=1`` (set
here) makes ``backend="cuda"`` run on CPU tensors through the host build of the same
``csrc/group_math.h`` code (``csrc/cpu/group_math_cpu.cpp``, JIT-compiled on first use): every
step the kernels run per group (Gram, cosine, deviation, Cholesky, logdet, K^-1, pair selection,
weights, pair losses, gradients, metric sums, the similarity backward) is checked here; what the
host build cannot check is the GPU schedule itself (threads, shared memory, synchronization),
which the ``gpu`` tests and compute-sanitizer cover on a GPU.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from helpers import (
    accumulation_rtol,
    assert_matches,
    assert_rounded,
    condition_number,
    random_logps,
    random_loss_inputs,
    random_pair_index,
)
from helpers import compare_loss as compare_group_loss

import divkernels as dk
from divkernels import _cuda
from divkernels.backend import BackendUnavailableError, backend_unavailable_reason
from divkernels.loss_config import CUDA_INPUTS, KERNEL_PARAMS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
pytestmark = pytest.mark.cuda_ext
LOSS_CONFIGS = [{"loss": loss, "diversity": diversity, "pairs": pairs}
                for loss, diversity, pairs in itertools.product(("dpo", "ipo", "orpo", "simpo"),
                                                                ("none", "deviation", "logdet_gain"),
                                                                ("all", "best_worst", "divpo"))]


@pytest.fixture(autouse=True, scope="module")
def cuda_backend() -> Iterator[None]:
    """The real extension on a GPU; its host build on CPU (skips if it cannot be built here)."""
    with pytest.MonkeyPatch.context() as patch:
        if DEVICE.type == "cpu":
            patch.setenv(_cuda.ENV_HOST_EMULATION, "1")
        reason = backend_unavailable_reason("cuda", DEVICE)
        if reason is not None:
            pytest.skip(f"backend='cuda' cannot run here: {reason}")
        yield


def loss_inputs(batch: int, group: int, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float64,
                emb_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return random_loss_inputs(batch, group, dim, generator, dtype, DEVICE, emb_dtype)


def compare_loss(inputs: dict[str, torch.Tensor], options: dict[str, object], rtol: float, generator: torch.Generator,
                 atol: float = 0.0, against: str = "reference") -> None:
    compare_group_loss(inputs, options, rtol, generator, atol, backend="cuda", against=against)


@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda c: "-".join(c.values()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dim", [37, 72], ids=["D37-scalar-loads", "D72-16-byte-loads"])
def test_fused_loss_matches_reference(config: dict[str, str], dtype: torch.dtype, dim: int,
                                      generator: torch.Generator) -> None:
    # D = 37: rows not 16-byte aligned, element loads; D = 72: 16-byte loads, partial last chunk.
    inputs = loss_inputs(4, 8, dim, generator, dtype)
    options = {**config, "diversity_alpha": 0.5, "beta": 0.3, "orpo_lambda": 0.2, "simpo_gamma": 0.4, "eps": 1e-3}
    # Metrics such as the mean similarity of random embeddings are ~0: their fp32 rounding
    # (~1e-8 on a cosine scale of 1) gets an absolute floor instead of a relative bound.
    compare_loss(inputs, options, RTOL[dtype] * 10, generator, atol=1e-6 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("group", [2, 3, 8, 17, 64, 128])
def test_group_sizes(group: int, generator: torch.Generator) -> None:
    inputs = loss_inputs(3, group, 20, generator)
    for config in ({"loss": "dpo", "diversity": "deviation", "pairs": "all"},
                   {"loss": "orpo", "diversity": "logdet_gain", "pairs": "divpo"},
                   {"loss": "simpo", "diversity": "none", "pairs": "best_worst"}):
        compare_loss(inputs, {**config, "diversity_alpha": 0.25, "eps": 1e-2}, 1e-8, generator)


def test_variants(generator: torch.Generator) -> None:
    """Explicit pairs, DivPO scores, no reference model, no emb, raw/floored deviation weights."""
    inputs = loss_inputs(3, 6, 10, generator)
    valid = inputs["mask"].cpu()
    pair_index = random_pair_index(valid, 4, generator).to(DEVICE)
    scores = torch.randn(3, 6, generator=generator, dtype=torch.float64).to(DEVICE)
    for options in ({"pair_index": pair_index, "diversity": "deviation"},
                    {"pair_index": pair_index, "loss": "orpo", "diversity": "logdet_gain"},
                    {"pairs": "divpo", "divpo_scores": scores, "quality_quantile": 0.25},
                    {"deviation_norm": "none", "min_deviation": 0.75, "diversity": "deviation"},
                    {"diversity": "logdet_gain", "diversity_alpha": 0.0}):
        compare_loss(inputs, options, 1e-9, generator)
    compare_loss({**inputs, "ref_logps": None}, {"diversity": "deviation"}, 1e-9, generator)
    compare_loss({**inputs, "emb": None}, {}, 1e-9, generator)


def test_degenerate_groups(generator: torch.Generator) -> None:
    """Duplicated responses (singular S), n > D, G = 2, all-equal rewards (no pairs)."""
    duplicates = torch.randn(2, 1, 6, generator=generator, dtype=torch.float64).expand(2, 5, 6).contiguous()
    low_rank = torch.randn(2, 17, 3, generator=generator, dtype=torch.float64)
    pair = torch.randn(4, 2, 5, generator=generator, dtype=torch.float64)
    # At exact duplicates the gradient w.r.t. emb is 0 in exact arithmetic; both sides are noise
    # amplified by |K^-1| ~ 1/eps there.
    for emb, atol in ((duplicates, 1e-8), (low_rank, 0.0), (pair, 0.0)):
        batch, group = emb.shape[:2]
        for rewards in (torch.randn(batch, group, generator=generator, dtype=torch.float64),
                        torch.ones(batch, group, dtype=torch.float64)):
            inputs = {"emb": emb.to(DEVICE), "mask": None, "rewards": rewards.to(DEVICE),
                      "policy_logps": random_logps(batch, group, generator).to(DEVICE),
                      "ref_logps": random_logps(batch, group, generator).to(DEVICE)}
            compare_loss(inputs, {"diversity": "logdet_gain", "diversity_alpha": 0.5, "eps": 1e-3}, 1e-7, generator,
                         atol)
    out = dk.group_preference_loss(inputs["policy_logps"], inputs["rewards"], inputs["emb"], backend="cuda")
    assert out.metrics["pairs"].item() == 0 and out.loss.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_emb_in_every_precision(dtype: torch.dtype, generator: torch.Generator) -> None:
    """Non-contiguous emb is read through its strides; bf16/fp16 emb accumulates in fp32. The oracle
    is the float64 reference on the same (rounded) values: only the kernel's fp32 accumulation and
    the final rounding of d emb to emb's dtype differ (helpers.accumulation_rtol, assert_rounded)."""
    inputs = loss_inputs(3, 8, 24, generator, torch.float64, emb_dtype=dtype)
    wide = torch.zeros(8, 3, 48, dtype=dtype, device=DEVICE)
    wide[..., ::2] = inputs["emb"].transpose(0, 1)
    strided = wide[..., ::2].transpose(0, 1)
    assert not strided.is_contiguous()
    options = {"diversity": "deviation", "diversity_alpha": 0.5, "eps": 0.5}
    rtol = accumulation_rtol(torch.float32, 24 + 8, condition_number(strided, inputs["mask"], 0.5) ** 2)
    got_leaf, want_leaf = strided.detach().requires_grad_(), strided.detach().double().requires_grad_()
    got = dk.group_preference_loss(inputs["policy_logps"], inputs["rewards"], got_leaf, inputs["ref_logps"],
                                   inputs["mask"], backend="cuda", **options)
    want = dk.group_preference_loss(inputs["policy_logps"], inputs["rewards"], want_leaf, inputs["ref_logps"],
                                    inputs["mask"], backend="reference", **options)
    assert_matches(got.loss, want.loss, rtol)
    for name, value in want.metrics.items():
        assert_matches(got.metrics[name], value, rtol, rtol)
    got.loss.backward()
    want.loss.backward()
    assert got_leaf.grad.dtype == dtype
    assert_rounded(got_leaf.grad, want_leaf.grad, rtol)


def test_float64_logps_with_float32_emb(generator: torch.Generator) -> None:
    """Float64 log-probs make the op accumulate in float64; emb is upcast for the extension. The
    reference forms S in emb's float32 there, so the two agree to float32 rounding."""
    inputs = loss_inputs(3, 6, 16, generator, torch.float64, emb_dtype=torch.float32)
    compare_loss(inputs, {"diversity": "logdet_gain", "diversity_alpha": 0.5, "eps": 1e-3}, RTOL[torch.float32],
                 generator)


def test_matches_triton(generator: torch.Generator) -> None:
    if backend_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here")
    inputs = loss_inputs(3, 8, 16, generator)
    compare_loss(inputs, {"loss": "dpo", "diversity": "logdet_gain", "diversity_alpha": 0.5, "beta": 0.25,
                          "eps": 2.0**-10}, 1e-8, generator, against="triton")


def test_nan_emb_and_unfactorable_groups_raise() -> None:
    emb = torch.randn(3, 4, 5, dtype=torch.float64, device=DEVICE)
    emb[1, 2, 0] = torch.nan
    rewards = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    policy = -torch.rand(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"emb has NaN or inf.* in valid responses of groups \[1\]"):
        dk.group_preference_loss(policy, rewards, emb, diversity="deviation", backend="cuda")
    out = dk.group_preference_loss(policy, rewards, emb, diversity="logdet_gain", backend="cuda", check_inputs=False)
    assert torch.isnan(out.logdet[1]) and torch.isfinite(out.logdet[[0, 2]]).all()


def test_backend_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    emb = torch.randn(1, 129, 4, device=DEVICE)
    rewards = torch.randn(1, 129, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="G=129 exceeds"):
        dk.group_preference_loss(-torch.rand(1, 129, device=DEVICE), rewards, emb, backend="cuda")
    module = _cuda.extension(DEVICE)
    policy = -torch.rand(2, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="rewards must be"):
        module.group_loss_forward(**launch_arguments(policy=policy, rewards=policy.double()))
    with pytest.raises(RuntimeError, match="G <= 128"):
        module.group_loss_forward(**launch_arguments(policy=-torch.rand(2, 130, device=DEVICE),
                                                     rewards=torch.rand(2, 130, device=DEVICE)))
    with pytest.raises(RuntimeError, match="weights mode 3"):
        module.group_loss_forward(**launch_arguments(policy=policy, rewards=policy, weights=3))
    with pytest.raises(TypeError, match=r"\(inputs: .*params: .*poison: "):  # named arguments
        module.group_loss_forward(policy)
    if DEVICE.type == "cpu":
        monkeypatch.setenv(_cuda.ENV_HOST_EMULATION, "0")
        with pytest.raises(BackendUnavailableError, match="needs a CUDA device.*DIVKERNELS_CUDA_HOST_EMULATION"):
            dk.group_preference_loss(policy, rewards[:, :4].expand(2, 4), backend="cuda")


def test_groups_beyond_shared_memory_run_on_triton(monkeypatch: pytest.MonkeyPatch,
                                                   generator: torch.Generator) -> None:
    """float64 at G = 128 needs more shared memory per block than any GPU grants (the host build holds
    to an H100's 227 KiB): backend="cuda" runs such calls on the Triton kernels, without the extension;
    float32 at G = 128 and float64 at G = 64 stay on the extension."""
    from divkernels.backends import cuda as cuda_backend
    from divkernels.ops import group_loss

    extension = _cuda.extension(DEVICE)
    assert extension.shared_bytes(128, 8) > cuda_backend.shared_limit(DEVICE)
    assert cuda_backend.fits(128, torch.float32, DEVICE) and cuda_backend.fits(64, torch.float64, DEVICE)
    assert not cuda_backend.fits(128, torch.float64, DEVICE)
    calls = []
    original = group_loss.FORWARDS["cuda"]
    monkeypatch.setitem(group_loss.FORWARDS, "cuda", lambda *args: calls.append(1) or original(*args))
    inputs = loss_inputs(2, 128, 16, generator, torch.float64)
    compare_loss(inputs, {"loss": "dpo", "diversity": "logdet_gain", "diversity_alpha": 0.5}, 1e-8, generator)
    assert not calls
    compare_loss(loss_inputs(2, 64, 16, generator, torch.float64), {"loss": "dpo"}, 1e-10, generator)
    assert calls


def test_jit_failure_message_is_short_and_names_cuda_home() -> None:
    log = "\n".join(f"[{i}/4] nvcc ..." for i in range(1, 4)) + "\nFAILED: divkernels_C.so\n" \
        "/usr/bin/ld: cannot find -lcudart: No such file or directory\ncollect2: error: ld returned 1 exit status\n" \
        "ninja: build stopped: subcommand failed."
    message = _cuda._jit_failure(RuntimeError("Error building extension 'divkernels_C': " + log), "/usr/local")
    assert "CUDA_HOME=/usr/local" in message and "cannot find -lcudart" in message
    assert "[1/4]" not in message and message.count("\n") == 6
    assert "CUDA_HOME" not in _cuda._jit_failure(RuntimeError("nvcc: syntax error"), "/usr/local/cuda")


def test_poisoned_outputs_are_all_written(generator: torch.Generator) -> None:
    """conftest poisons outputs: the launch returns none of the NaN it started with."""
    assert os.environ.get("DIVKERNELS_POISON_OUTPUTS") == "1"
    inputs = loss_inputs(2, 5, 7, generator)
    for loss, orpo_dorpo in ((0, False), (2, True)):
        outputs = _cuda.extension(DEVICE).group_loss_forward(**launch_arguments(
            emb=inputs["emb"], mask=inputs["mask"], policy=inputs["policy_logps"], ref=inputs["ref_logps"],
            rewards=inputs["rewards"], loss=loss, weights=2, orpo_dorpo=orpo_dorpo, need_logdet=True,
            store_state=True, poison=True))
        assert len(outputs) == 7 and all(tensor is not None for tensor in outputs)
        for tensor in outputs:
            assert torch.isfinite(tensor).all()


def launch_arguments(**given: object) -> dict[str, object]:
    """Arguments of the extension's group_loss_forward (inputs in ``CUDA_INPUTS`` order, the packed
    ``KERNEL_PARAMS``, poison) from named ones: defaults, updated with ``given`` (``given_weights``: the
    weights tensor; ``weights``: the weight mode)."""
    defaults = {"emb": None, "mask": None, "ref": None, "counts": None, "scores": None, "given_weights": None,
                "lengths": None, "nll_logps": None, "nll_tokens": None,
                "loss": 0, "pairs": 0, "weights": 0, "deviation_norm": 0, "orpo_dorpo": True, "divpo_ranked": True,
                "need_logdet": False, "store_state": False, "beta": 0.1, "orpo_lambda": 0.1, "simpo_gamma": 0.5,
                "min_deviation": 0.0, "eps": 1.0, "quality_quantile": 0.25, "poison": False}
    values = {**defaults, **given}
    tensors = {**values, "weights": values["given_weights"]}
    return {"inputs": [tensors[name] for name in CUDA_INPUTS],
            "params": [float(values[param.name]) for param in KERNEL_PARAMS], "poison": values["poison"]}


# ----------------------------------------------------------------------------- GPU only


# The GPU sweep's sizes; the first, small enough for the host build and the interpreter, runs on CPU
# too, so that the test's own code is checked before a GPU sees it.
SWEEP_SIZES = [(2, 16, 24), *[pytest.param(*size, marks=pytest.mark.gpu)
                              for size in ((64, 16, 1024), (16, 64, 512), (4, 128, 256), (256, 2, 384))]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "group", "dim"), SWEEP_SIZES)
def test_gpu_sweep(batch: int, group: int, dim: int, dtype: torch.dtype, generator: torch.Generator) -> None:
    inputs = loss_inputs(batch, group, dim, generator, torch.float32, emb_dtype=dtype)
    for config in LOSS_CONFIGS[::4]:
        options = {**config, "diversity_alpha": 0.1, "eps": 1e-2}
        compare_loss(inputs, options, max(RTOL[dtype], 1e-3), generator)
        compare_loss(inputs, options, max(RTOL[dtype], 1e-3), generator, against="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool: str) -> None:
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    script = ("import torch, divkernels as dk\n"
              "e = torch.randn(3, 17, 40, device='cuda', requires_grad=True)\n"
              "m = torch.ones(3, 17, dtype=torch.bool, device='cuda'); m[1, 9:] = False\n"
              "p = -torch.rand(3, 17, device='cuda'); r = torch.randn(3, 17, device='cuda')\n"
              "o = dk.group_preference_loss(p, r, e, p * 0.9, m, diversity='logdet_gain', diversity_alpha=0.5,"
              " backend='cuda'); o.loss.backward(); torch.cuda.synchronize()\n")
    result = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=9", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
