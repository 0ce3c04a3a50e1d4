"""Every Triton kernel compiles for sm_80 and sm_90, fits the chip and spills no more than listed (no GPU).

The interpreter runs kernels as NumPy code, so it accepts code that the Triton compiler rejects
and says nothing about registers or shared memory. Here the ops run under the interpreter on small
inputs that reach every kernel and constexpr branch (every loss, diversity and pair mode; the smallest
and largest tiles in bf16) and, with ``DIVKERNELS_COMPILE_SWEEP=full``, on every variant of the resource
table (``divkernels.benchmarks.resources``: every op at G = 2 ... 128 in bf16, fp16, fp32 and fp64,
D = 64); each distinct launch is recorded and compiled to a cubin for sm_90 (and sm_80 for the largest
tiles) in worker processes without ``TRITON_INTERPRET``, with the specialization a GPU launch gets
(Triton's own binder), under the installed Triton and every one listed in ``DIVKERNELS_EXTRA_TRITON``.
Each must compile and fit the arch's shared memory; with the Triton the resource table was measured with
(``SPILL_MEASURED``) none may spill where ``spill_allowed`` says it must not; every version's remaining
spills are printed.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_groups, random_logps, random_pair_index

import divkernels as dk
from divkernels.backend import triton_interpreter_enabled
from divkernels.benchmarks import resources
from divkernels.ops.common import group_block
from divkernels.ops.linear_logps import linear_token_logps

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_interpreter_enabled(), reason="records launches through the Triton interpreter"),
]
# Largest dynamic shared memory per block (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ENV_EXTRA_TRITON = "DIVKERNELS_EXTRA_TRITON"
# "full": also every variant of the resource table (all G and dtypes; 18 min on 2 cores with 3.6 and 3.8 as
# extras, by hand: benchmarks/README.md); otherwise the sample CI runs: the branch-covering launches below (every kernel
# and constexpr branch, the smallest and largest tiles in every dtype) and the table's fix-up variant.
ENV_SWEEP = "DIVKERNELS_COMPILE_SWEEP"
EXTRA_TRITON_DTYPES = ("bfloat16", "float32")
# The table sizes other Triton versions compile in the full sweep: those the branch-covering calls (G = 2,
# 16, 128) leave out, but the smallest tiles (4, 8), which compile as G = 2's do.
EXTRA_TRITON_GROUPS = (32, 64)
# Triton versions (major.minor) whose spills the resource table was measured with: their spill goals are
# asserted (a spill count belongs to one compiler version); other versions must compile and fit, and
# their spills are printed.
SPILL_MEASURED = ("3.9",)
# (loss, diversity, pairs): every value of each at least once, some together (not all 36 products:
# each distinct combination is one more compile of the largest kernel).
BRANCH_CONFIGS = [("dpo", "none", "all"), ("ipo", "deviation", "best_worst"), ("orpo", "logdet_gain", "divpo"),
                  ("simpo", "deviation", "all"), ("dpo", "logdet_gain", "best_worst"), ("simpo", "none", "divpo"),
                  ("dpo_listwise", "deviation", "all")]


FIXUP_KERNEL = "_group_loss_fixup_finalize_kernel"
FIXUP_VARIANT, FIXUP_DTYPES = ("loss[logdet_gain/divpo]", 64), ("bfloat16", "float32")
# The fused loss's launches (its split forward's first launch included), whose branch-covering variants
# are held to the table's spill rule too. The other ops' branch variants outside the table print their
# spills (at G = 128: DARLING's advantages 8 bytes on sm_90; on sm_80 partition, advantages and the
# loss's second launch 8-24), listed in benchmarks/README.md.
LOSS_KERNELS = {"_group_loss_forward_kernel", FIXUP_KERNEL, "_group_loss_finalize_kernel",
                "_group_loss_backward_kernel", "_logdet_forward_kernel", "_similarity_forward_kernel"}


# (kernel, tile): the most bytes it may spill on sm_90 under Triton 3.9, besides float64 at G = 128. Each
# tile compiles one variant for every G in it (divkernels/ops/common.py, "Bounded compiles"), so G's
# divisibility by 16 no longer aligns the [B, G] rows; where that leaves a kernel a few registers over the
# cap of its warps (128 at 16 warps; at 8 warps ptxas keeps 128 for two blocks per SM) it spills this much
# (logdet and DQO advantages: their float64 fix-up launches; benchmarks/README.md, "One compiled variant
# per tile", which compares the variants that specialized on G).
LISTED_SPILLS = {("_logdet_forward_kernel", 128): 32, ("_partition_kernel", 128): 32,
                 ("_advantages_kernel", 128): 40, ("_group_loss_forward_kernel", 64): 32}
# float64 (a test precision) at G <= 64: the fused loss forward's one-warp tile-16 variant
LISTED_FP64_SPILLS = {("_group_loss_forward_kernel", 16): 24}


def listed(kernel: str, tile: int, spill: int, float64: bool) -> bool:
    """Whether ``spill`` bytes of ``kernel`` at ``tile`` are within the listed ones."""
    name = kernel.split(":")[-1].removesuffix(resources.FIXUP_SUFFIX)
    limits = {**LISTED_SPILLS, **(LISTED_FP64_SPILLS if float64 else {})}
    return spill <= limits.get((name, tile), 0)


def spill_allowed(row: dict) -> bool:
    """Where spills remain (printed, listed in benchmarks/README.md): float64 at G = 128 (a test
    precision; a 128 x 128 float64 tile alone is 64 registers per thread at 16 warps) and the variants
    of ``LISTED_SPILLS``, up to their bytes. Nothing else spills, the float64 fix-up launches included
    (the logdet and DQO advantages kernels' second launch, the fused loss's fix-up + finalize kernel,
    compiled here at G = 16 in every loss branch and at G = 64 in the table's DivPO variant)."""
    float64 = row["dtype"] == "float64"
    return (row["G"] > 64 and float64) or listed(row["kernel"], group_block(row["G"]), row["spill_bytes"], float64)


def launch_spill_allowed(launch: dict, spill: int) -> bool:
    """``spill_allowed`` for a launch of the branch-covering calls, which has no table label: its tile
    (``BLOCK_G``) and accumulation dtype (``ACC``) from its launch arguments."""
    kwargs = launch["kwargs"]
    float64 = kwargs.get("ACC") == {"tl_dtype": "fp64"}
    tile = kwargs.get("BLOCK_G", 0)
    return (tile > 64 and float64) or listed(launch["name"], tile, spill, float64)


def fixup_block_d(extra: str) -> int:
    """``fixup.narrowest_fp32_dot()`` under the Triton in ``extra``."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra, str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", "from divkernels.ops import fixup; "
                             "print(fixup.narrowest_fp32_dot())"], env=env, capture_output=True, text=True,
                            check=True)
    return int(result.stdout.split()[-1])


def with_fixup_block_d(launch: dict, block_d: int) -> dict:
    """``launch`` as the installed divkernels would make it under another Triton: a float64 fix-up pass that
    builds a Gram (the fused loss's fix-up kernel, the advantages kernel's second launch) reads ``emb`` in
    slices that Triton's float32 ``tl.dot`` accepts (``fixup.fixup_gram``: 8 columns from 3.7, 16 before)."""
    kwargs = launch["kwargs"]
    fixup_gram = launch["name"] == FIXUP_KERNEL or (launch["name"] == "_advantages_kernel" and kwargs.get("FIXUP"))
    if not fixup_gram or kwargs.get("PRECISION") != "ieee":
        return launch
    return {**launch, "kwargs": {**kwargs, "BLOCK_D": block_d}}


# (estimator, k) of each pass@k branch of the advantages kernel; passk_analytic (the most work) first.
PASSK_PATHS = (("passk_analytic", 2), ("pkpo", 2), ("best_minus_second", None))


def every_kernel_path() -> None:
    """Small calls that reach every kernel and constexpr branch of the Triton backend.

    Every branch (similarity kernel; each loss, diversity and pair mode; advantages mode; explicit
    pairs; float64) at G = 16 in fp32; the largest tile (G = 128) and the smallest (G = 2) in each
    emb dtype, with the heaviest configuration (logdet gains, DivPO pairs, backward through emb).
    """
    generator = torch.Generator().manual_seed(0)

    def run(group: int, dtype: torch.dtype, every_branch: bool) -> None:
        # D = 24 (a partial tile, no divisibility specialization) at the small tiles; at G = 128, D = 64, the
        # specialization real embeddings (384, 768, 4096, ...) get: at D = 24 the partition, advantages and
        # logdet forwards spill 8-32 bytes there (listed in benchmarks/README.md)
        emb, mask = random_groups(2, group, 64 if group == 128 else 24, generator, dtype=dtype)
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
        for estimator, k in PASSK_PATHS if every_branch else PASSK_PATHS[:1]:  # the pass@k estimators
            dk.group_advantages(rewards, None, mask, estimator=estimator, k=k, backend="triton")
        if every_branch:  # labels instead of emb; darling's two-phase min-max rewards; direct links only
            labels = torch.randint(0, 3, mask.shape, generator=generator)
            dk.partition_diversity(partition=labels, mask=mask, transitive=False, backend="triton")
            dk.group_advantages(rewards, None, mask, diversity="darling", partition=labels, darling_reward="minmax",
                                backend="triton")
            links = torch.rand(2, group, group, generator=generator) < 0.3  # a judge's links
            dk.partition_diversity(equivalence=links, mask=mask, backend="triton")
            dk.group_advantages(rewards, None, mask, diversity="darling", equivalence=links, backend="triton")
        # (loss, diversity, pairs, alpha): also without a sweep at the largest tile (the split forward's
        # similarity launch); ORPO with the in-kernel data checks
        configs = [(*config, 0.1) for config in BRANCH_CONFIGS] if every_branch else [
            ("dpo", "logdet_gain", "divpo", 0.1), ("orpo", "deviation", "all", 0.1),
            ("simpo", "deviation", "divpo", 0.0)]
        for loss, diversity, pairs, alpha in configs:
            policy = random_logps(2, group, generator, torch.float32).requires_grad_(True)
            ref = None if loss in ("orpo", "simpo") else policy.detach() - 0.1
            out = dk.group_preference_loss(policy, rewards, emb, ref, mask, loss=loss, diversity=diversity, pairs=pairs,
                                           diversity_alpha=alpha, backend="triton", check_inputs=loss == "orpo")
            out.loss.backward()
        if every_branch:
            valid = mask if mask is not None else torch.ones(2, group, dtype=torch.bool)
            dk.group_preference_loss(policy.detach(), rewards, None, None, mask, loss="ipo",
                                     pair_index=random_pair_index(valid, 3, generator), backend="triton",
                                     check_inputs=False)

    run(16, torch.float32, every_branch=True)
    run(16, torch.float64, every_branch=False)
    # the sample (CI time): the smallest and largest tiles in bf16, the training dtype; the full sweep:
    # in fp32 and fp16 too
    full = os.environ.get(ENV_SWEEP, "") == "full"
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if full else (torch.bfloat16,)
    for group, dtype in itertools.product((2, 128), dtypes):
        run(group, dtype, every_branch=False)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path: Path) -> None:
    recorder = resources.LaunchRecorder()
    with recorder.recording():
        every_kernel_path()
    full = os.environ.get(ENV_SWEEP, "") == "full"
    # the sample: the fix-up + finalize kernel's table variant only (it compiles as slowly as the forward)
    recorded = (resources.record_variants(resources.GROUPS, resources.DTYPES) if full else
                resources.record_variants((FIXUP_VARIANT[1],), FIXUP_DTYPES, (FIXUP_VARIANT[0],)))
    names = {launch["name"] for launch in recorder.launches}
    assert {"_group_loss_forward_kernel", "_group_loss_finalize_kernel", FIXUP_KERNEL, "_group_loss_backward_kernel",
            "_similarity_forward_kernel", "_similarity_backward_kernel", "_logdet_forward_kernel",
            "_deviation_forward_kernel", "_partition_kernel", "_advantages_kernel"} <= names, names
    # The fused loss's fix-up + finalize kernel holds a whole group forward, so it compiles as slowly as
    # the forward: every loss branch at G = 16 here, and below the table's DivPO variant at G = 64 in bf16
    # and fp32 (its largest tile: at G = 128 the split forward fixes its sweeps itself; it spilled there
    # last). The resource table has every size.
    recorder.launches = [launch for launch in recorder.launches
                         if launch["name"] != FIXUP_KERNEL or launch["kwargs"]["BLOCK_G"] == 16]
    for launch in recorder.launches:  # every launch on sm_90; the largest tiles also on sm_80 (less shared memory)
        launch["archs"] = [80, 90] if launch["kwargs"].get("BLOCK_G", 0) >= 64 else [90]
    for launch in recorded["launches"]:
        launch["archs"] = [90]
    # the installed Triton (every table variant; it builds the committed table, so its spill goals are
    # asserted), and any other versions installed with `pip install --target DIR triton==X` and listed
    # in DIVKERNELS_EXTRA_TRITON (e.g. 3.6, the GPU machines' version; not in CI: every branch launch, at
    # G = 2, 16 and 128, and the table variants in the training dtypes, bf16 and fp32, at G = 32 and
    # 64, to bound CI time; their spills are printed)
    import triton

    tritons = [None, *filter(None, os.environ.get(ENV_EXTRA_TRITON, "").split(os.pathsep))]
    problems = []
    for index, extra in enumerate(tritons):
        dtypes = resources.DTYPES if extra is None else EXTRA_TRITON_DTYPES
        groups = resources.GROUPS if extra is None else EXTRA_TRITON_GROUPS
        if not full:
            dtypes, groups = FIXUP_DTYPES, (FIXUP_VARIANT[1],)
        # the fix-up + finalize kernel: as above (with the installed Triton only)
        table = {"launches": recorded["launches"],
                 "rows": [(label, number) for label, number in recorded["rows"]
                          if label["dtype"] in dtypes and label["G"] in groups
                          and (recorded["launches"][number]["name"] != FIXUP_KERNEL
                               or ((label["op"], label["G"]) == FIXUP_VARIANT and label["dtype"] in FIXUP_DTYPES))]}
        used = sorted({number for _, number in table["rows"]})
        launches = recorder.launches + [recorded["launches"][number] for number in used]
        if extra is not None:  # the launches that Triton gets: the fix-up's float32 Gram width is its own
            block_d = fixup_block_d(extra)  # a subprocess under that Triton: asked once
            launches = [with_fixup_block_d(launch, block_d) for launch in launches]
        reports = resources.compile_triton(launches, (90,), tmp_path / f"triton-{index}", extra)
        # the worker must have imported the Triton it was given, not the installed one
        expected = Path(extra).resolve() if extra else Path(triton.__file__).resolve().parent.parent
        wrong = {r["triton_path"] for r in reports if not Path(r["triton_path"]).is_relative_to(expected)}
        assert not wrong, f"asked for the Triton in {expected}, the worker imported {wrong}"
        assert len(reports) == sum(len(launch["archs"]) for launch in launches)
        version = reports[0]["triton"]
        measured = ".".join(version.split(".")[:2]) in SPILL_MEASURED
        for report in reports:
            where = (f"{report['kernel']} (launch {report['launch']}, sm_{report['arch']}, "
                     f"{report.get('num_warps')} warps, triton {version})")
            if "error" in report:
                problems.append(f"{where}: {report['error']}")
            elif report["shared_bytes"] > SHARED_LIMIT[report["arch"]]:
                problems.append(f"{where}: {report['shared_bytes']} bytes of shared memory")
        if any("error" in report for report in reports):
            continue
        # the branch-covering launches: configurations the table does not have (the loss without a sweep
        # at G = 128, with the in-kernel checks, every mode); the fused loss's must not spill on sm_90
        first = len(recorder.launches)
        branch_spills = [(report["kernel"], launches[report["launch"]]["kwargs"].get("BLOCK_G"), report["arch"],
                          report["stack"]) for report in reports if report["launch"] < first and report["stack"]]
        print(f"triton {version}: branch launches with a spill stack:", sorted(branch_spills))
        if measured:
            problems += [f"{report['kernel']} (launch {report['launch']}, sm_{report['arch']}, "
                         f"BLOCK_G={launches[report['launch']]['kwargs'].get('BLOCK_G')}) spills {report['stack']} "
                         f"bytes ({report['registers']} registers, triton {version})"
                         for report in reports if report["launch"] < first and report["stack"]
                         and report["arch"] == 90 and report["kernel"] in LOSS_KERNELS
                         and not launch_spill_allowed(launches[report["launch"]], report["stack"])]
        # back from positions in `launches` to the recorded table's launch numbers
        renumbered = [dict(r, launch=used[r["launch"] - first]) for r in reports if r["launch"] >= first]
        rows = resources.triton_rows(table, renumbered)
        assert {(row["G"], row["dtype"]) for row in rows} == set(itertools.product(groups, dtypes)), rows
        spilling = sorted((row["kernel"], row["G"], row["dtype"], row["spill_bytes"]) for row in rows
                          if row["spill_bytes"])
        print(f"triton {version}: variants with a spill stack:", spilling)
        if measured:
            problems += [f"{row['kernel']} G={row['G']} {row['dtype']} spills {row['spill_bytes']} bytes "
                         f"({row['registers']} registers, {row['num_warps']} warps, triton {version})"
                         for row in rows if row["spill_bytes"] and not spill_allowed(row)]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_linear_row_kernels_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    """The LM-head row kernels at a vocabulary larger than one tile (8192-wide tiles, 16 warps), bf16 and
    fp32 logits, with and without the statistics, forward and backward (with the entropy's gradient too):
    they compile for sm_90 with
    every Triton under test and keep their registers (no local-memory stack)."""
    recorder = resources.LaunchRecorder()
    generator = torch.Generator().manual_seed(0)
    vocab = 2 * 8192 + 5
    with recorder.recording():
        for dtype in (torch.bfloat16, torch.float32):
            hidden = torch.randn(2, 2, 8, generator=generator).to(dtype).requires_grad_(True)
            weight = torch.randn(vocab, 8, generator=generator).to(dtype).requires_grad_(True)
            targets = torch.randint(0, vocab, (2, 2), generator=generator)
            dk.linear_logps(hidden, weight, targets, backend="triton", check_inputs=False).sum().backward()
            linear_token_logps(hidden.detach(), weight.detach(), targets, stats=True, backend="triton",
                               check_inputs=False)
            logps, entropy = dk.linear_logps(hidden, weight, targets, backend="triton", check_inputs=False,
                                             return_entropy=True)  # the backward with the entropy's gradient
            (logps.sum() + entropy.sum()).backward()
    names = sorted({launch["name"] for launch in recorder.launches})
    assert names == ["_token_backward_kernel", "_token_forward_kernel"], names
    assert {launch["kwargs"]["num_warps"] for launch in recorder.launches} == {16}
    tritons = [None, *filter(None, os.environ.get(ENV_EXTRA_TRITON, "").split(os.pathsep))]
    problems = []
    for index, extra in enumerate(tritons):
        reports = resources.compile_triton(recorder.launches, (90,), tmp_path / f"linear-{index}", extra)
        assert len(reports) == len(recorder.launches)
        problems += [f"{r['kernel']} (launch {r['launch']}, triton {r['triton']}): "
                     f"{r.get('error') or str(r['stack']) + ' bytes of stack'}"
                     for r in reports if "error" in r or r["stack"]]
    assert not problems, "\n".join(problems)
