"""Every Triton kernel compiles for sm_80 and sm_90 and fits the chip, checked without a GPU.

The interpreter runs kernels as NumPy code, so it accepts code that the Triton compiler rejects
and says nothing about shared memory. Here the ops run under the interpreter on small inputs that
reach every kernel and constexpr branch (G up to 128, every dtype, loss, diversity and pair mode),
each distinct launch (kernel, argument types, constexprs, warps) is recorded, and a subprocess
without ``TRITON_INTERPRET`` compiles each one to a cubin for sm_80 and sm_90
(``tests/triton_compile_worker.py``; Triton ships ptxas). Each must compile and fit the arch's
shared memory per block; register spills are printed (a speed matter, to be judged on a GPU).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_groups, random_logps, random_pair_index

import divkernels as dk
from divkernels.backend import triton_interpreter_enabled

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_interpreter_enabled(), reason="records launches through the Triton interpreter"),
]
# Largest dynamic shared memory per block (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
WORKER = Path(__file__).resolve().parent / "triton_compile_worker.py"
ENV_EXTRA_TRITON = "DIVKERNELS_EXTRA_TRITON"
# (loss, diversity, pairs): every value of each at least once, some together (not all 36 products:
# each distinct combination is one more compile of the largest kernel).
BRANCH_CONFIGS = [("dpo", "none", "all"), ("ipo", "deviation", "best_worst"), ("orpo", "logdet_gain", "divpo"),
                  ("simpo", "deviation", "all"), ("dpo", "logdet_gain", "best_worst"), ("simpo", "none", "divpo")]


def _encode(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if type(value).__name__ == "dtype" and type(value).__module__.startswith("triton"):
        return {"tl_dtype": value.name}
    return value


def record_launches(calls) -> list[dict]:
    """Run ``calls()`` under the interpreter; the distinct launches it made."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launch = {"module": self.fn.__module__, "name": self.fn.__name__, "args": [_encode(a) for a in args],
                  "kwargs": {key: _encode(value) for key, value in kwargs.items()}}
        # ints differ between launches (sizes, strides) without changing the compiled code: key on types
        key_args = [a if not isinstance(a, int) or isinstance(a, bool) else "int" for a in launch["args"]]
        key_kwargs = {k: v if not isinstance(v, int) or isinstance(v, bool) or k.isupper() or k.startswith("num_")
                      else "int" for k, v in launch["kwargs"].items()}
        launches.setdefault(json.dumps([launch["name"], key_args, key_kwargs], sort_keys=True), launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        calls()
    finally:
        InterpretedFunction.run = original
    return list(launches.values())


def every_kernel_path() -> None:
    """Small calls that reach every kernel and constexpr branch of the Triton backend.

    Every branch (similarity kernel; each loss, diversity and pair mode; advantages mode; explicit
    pairs; float64) at G = 16 in fp32; the largest tile (G = 128) and the smallest (G = 2) in each
    emb dtype, with the heaviest configuration (logdet gains, DivPO pairs, backward through emb).
    """
    generator = torch.Generator().manual_seed(0)

    def run(group: int, dtype: torch.dtype, every_branch: bool) -> None:
        emb, mask = random_groups(2, group, 24, generator, dtype=dtype)
        emb.requires_grad_(True)
        rewards = random_logps(2, group, generator, torch.float32)
        for kernel in ("cosine", "dot", "rbf") if every_branch else ("cosine",):
            dk.pairwise_similarity(emb, mask, kernel=kernel, backend="triton").sum().backward()
            logdet, gains = dk.logdet_diversity(emb, mask, kernel=kernel, return_gains=True, backend="triton")
            (logdet.sum() + gains.nan_to_num().sum()).backward()
        dk.deviation(emb, mask, backend="triton").sum().backward()
        dk.partition_diversity(emb, mask, tau=0.1, backend="triton")
        for diversity in ("none", "darling", "dqo", "deviation") if every_branch else ("dqo", "darling"):
            dk.group_advantages(rewards, emb.detach(), mask, diversity=diversity, backend="triton")
        if every_branch:  # labels instead of emb; darling's two-phase min-max rewards; direct links only
            labels = torch.randint(0, 3, mask.shape, generator=generator)
            dk.partition_diversity(partition=labels, mask=mask, transitive=False, backend="triton")
            dk.group_advantages(rewards, None, mask, diversity="darling", partition=labels, darling_reward="minmax",
                                backend="triton")
        configs = BRANCH_CONFIGS if every_branch else [("dpo", "logdet_gain", "divpo"), ("orpo", "deviation", "all")]
        for loss, diversity, pairs in configs:
            policy = random_logps(2, group, generator, torch.float32).requires_grad_(True)
            ref = None if loss in ("orpo", "simpo") else policy.detach() - 0.1
            out = dk.group_preference_loss(policy, rewards, emb, ref, mask, loss=loss, diversity=diversity, pairs=pairs,
                                           diversity_alpha=0.1, backend="triton", check_inputs=False)
            out.loss.backward()
        if every_branch:
            valid = mask if mask is not None else torch.ones(2, group, dtype=torch.bool)
            dk.group_preference_loss(policy.detach(), rewards, None, None, mask, loss="ipo",
                                     pair_index=random_pair_index(valid, 3, generator), backend="triton",
                                     check_inputs=False)

    run(16, torch.float32, every_branch=True)
    run(16, torch.float64, every_branch=False)
    for group, dtype in itertools.product((2, 128), (torch.float32, torch.bfloat16, torch.float16)):
        run(group, dtype, every_branch=False)


def compile_launches(launches: list[dict], folder: Path, extra_triton: str | None) -> list[dict]:
    """Compile the launches in parallel worker processes (no TRITON_INTERPRET); their JSON reports."""
    folder.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "triton-cache")
    if extra_triton:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_triton, env.get("PYTHONPATH")]))
    count = max(1, min(4, os.cpu_count() or 1))
    workers = []
    for index in range(count):
        path = folder / f"launches-{index}.json"
        path.write_text(json.dumps(launches[index::count]))
        workers.append(subprocess.Popen([sys.executable, str(WORKER), str(path)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env))
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=1500)
        assert worker.returncode == 0, err[-4000:]
        reports += [json.loads(line) for line in out.splitlines()]
    return reports


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    launches = record_launches(every_kernel_path)
    names = {launch["name"] for launch in launches}
    assert {"_group_loss_forward_kernel", "_group_loss_finalize_kernel", "_group_loss_backward_kernel",
            "_similarity_forward_kernel", "_similarity_backward_kernel", "_logdet_forward_kernel",
            "_deviation_forward_kernel", "_partition_kernel", "_advantages_kernel"} <= names, names
    for launch in launches:  # every tile on sm_90; the largest also on sm_80, whose shared memory is smaller
        launch["archs"] = [80, 90] if launch["kwargs"].get("BLOCK_G", 0) >= 64 else [90]
    # the installed Triton, and any other versions installed with `pip install --target DIR triton==X`
    # and listed in DIVKERNELS_EXTRA_TRITON (CI adds 3.6, the version of the GPU machines' image)
    import triton

    tritons = [None, *filter(None, os.environ.get(ENV_EXTRA_TRITON, "").split(os.pathsep))]
    reports = []
    for index, extra in enumerate(tritons):
        compiled = compile_launches(launches, tmp_path / f"triton-{index}", extra)
        # the worker must have imported the Triton it was given, not the installed one
        expected = Path(extra).resolve() if extra else Path(triton.__file__).resolve().parent.parent
        wrong = {r["triton_path"] for r in compiled if not Path(r["triton_path"]).is_relative_to(expected)}
        assert not wrong, f"asked for the Triton in {expected}, the worker imported {wrong}"
        reports += compiled
    assert len(reports) == len(tritons) * sum(len(launch["archs"]) for launch in launches)
    spills = sorted({(r["triton"], r["kernel"], r["arch"], r.get("num_warps"), r["stack"])
                     for r in reports if r.get("stack")})
    print("kernels with a local-memory stack (spills; reported, not a failure):", spills)
    problems = []
    for report in reports:
        where = (f"{report['kernel']} (launch {report['launch']}, sm_{report['arch']}, "
                 f"{report.get('num_warps')} warps, triton {report['triton']})")
        if "error" in report:
            problems.append(f"{where}: {report['error']}")
        elif report["shared_bytes"] > SHARED_LIMIT[report["arch"]]:
            problems.append(f"{where}: {report['shared_bytes']} bytes of shared memory")
    assert not problems, "\n".join(problems)
