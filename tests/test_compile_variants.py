"""Bounded compiles: over a training run whose group sizes, batch sizes and pair counts vary, each
Triton kernel compiles at most three variants per padded tile (16, 32, 64, 128): by whether G and the
batch stride G * G of a [B, G, G] argument are divisible by 16, so at most 12 per configuration and
dtype, where unspecialized sizes would give one per tile (divkernels/ops/common.py, "Bounded compiles").

The launches are recorded under the interpreter and keyed as Triton's binder keys them on a GPU:
constexprs by value, int arguments by (== 1, % 16 == 0) unless the kernel leaves them unspecialized,
tensors by dtype and 16-byte alignment (``resources.LaunchRecorder``). Each key is one compile.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
from helpers import random_groups, random_logps

import divkernels as dk
from divkernels.backend import triton_interpreter_enabled
from divkernels.benchmarks import resources

pytestmark = [
    pytest.mark.triton,
    pytest.mark.cpu_only,
    pytest.mark.skipif(not triton_interpreter_enabled(), reason="records launches through the Triton interpreter"),
]
# (B, G) of the steps: every tile, sizes on both sides of 16-divisibility, B = 1 and more
STEPS = [(1, 3), (2, 16), (3, 7), (1, 2), (2, 20), (1, 32), (3, 33), (2, 47), (1, 64), (2, 48), (1, 65), (2, 100),
         (1, 128)]
TILE_ARGS = {"BLOCK_G", "BLOCK_D", "BLOCK_K", "BLOCK_B", "num_warps", "maxnreg"}


def run_step(batch: int, group: int, dim: int, dtype: torch.dtype, generator: torch.Generator) -> None:
    """One training step's diversity ops and fused loss (forward and backward) at (B, G, D)."""
    emb, mask = random_groups(batch, group, dim, generator, dtype=dtype)
    emb = emb.requires_grad_(True)
    rewards = random_logps(batch, group, generator, torch.float32)
    dk.pairwise_similarity(emb, mask, backend="triton").nan_to_num().sum().backward()
    logdet, gains = dk.logdet_diversity(emb, mask, return_gains=True, backend="triton")
    (logdet.sum() + gains.nan_to_num().sum()).backward()
    dk.group_advantages(rewards, emb.detach(), mask, diversity="darling", backend="triton")
    policy = random_logps(batch, group, generator, torch.float32).requires_grad_(True)
    out = dk.group_preference_loss(policy, rewards, emb, policy.detach() - 0.1, mask, loss="dpo",
                                   diversity="logdet_gain", pairs="all", diversity_alpha=0.1, backend="triton",
                                   check_inputs=False)
    out.loss.backward()


def variants_per_tile(dim: int, dtype: torch.dtype) -> dict[str, int]:
    """``{kernel, its non-tile constexprs and its tile: compiled variants}`` over the steps of STEPS."""
    recorder = resources.LaunchRecorder()
    generator = torch.Generator().manual_seed(0)
    with recorder.recording():
        for batch, group in STEPS:
            run_step(batch, group, dim, dtype, generator)
    counts: collections.Counter[str] = collections.Counter()
    for launch in recorder.launches:  # one entry per distinct specialization
        config = {key: value for key, value in launch["kwargs"].items() if key not in TILE_ARGS}
        counts[json.dumps([launch["name"], config, launch["kwargs"].get("BLOCK_G")], sort_keys=True)] += 1
    return dict(counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varied_group_sizes_compile_at_most_three_variants_per_tile(dtype: torch.dtype) -> None:
    counts = variants_per_tile(64, dtype)  # D a multiple of 16, as encoder widths are
    kernels = {json.loads(key)[0] for key in counts}
    assert {"_similarity_forward_kernel", "_logdet_forward_kernel", "_advantages_kernel",
            "_group_loss_forward_kernel", "_group_loss_backward_kernel", "_group_loss_finalize_kernel"} <= kernels
    assert {json.loads(key)[2] for key in counts} >= {16, 32, 64, 128}
    over = {key: count for key, count in counts.items() if count > 3}
    assert not over, over
    # B and P are not specialized: the finalize kernel (B only) compiles once per configuration
    finalize = [count for key, count in counts.items() if json.loads(key)[0] == "_group_loss_finalize_kernel"]
    assert finalize and max(finalize) == 1, finalize


def test_other_widths_compile_at_most_four_variants_per_tile() -> None:
    """At a D that is no multiple of 16 the batch stride G * D of ``emb`` changes its divisibility with G
    too (G odd, even, divisible by 16)."""
    counts = variants_per_tile(24, torch.float32)
    over = {key: count for key, count in counts.items() if count > 4}
    assert not over, over
