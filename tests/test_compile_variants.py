"""Bounded compiles: over a training run whose group sizes, batch sizes and pair counts vary, each
Triton kernel compiles one variant per padded tile (16, 32, 64, 128), so at most 4 per configuration and
dtype, for every embedding width (divkernels/ops/common.py, "Bounded compiles"). A launch that only some
dtypes make (the float32 sweep's float64 fix-up) is a configuration of its own.

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
# Launch arguments that follow from the tile (G = 128 splits the fused loss's forward in two, runs the
# backward in column chunks, ...): they never make a tile compile twice.
TILE_ARGS = {"BLOCK_G", "BLOCK_D", "BLOCK_K", "BLOCK_B", "num_warps", "maxnreg", "STEPS", "PAIR_ROWS",
             "DIVERSITY_STORED"}
KERNELS = {"_similarity_forward_kernel", "_similarity_backward_kernel", "_logdet_forward_kernel",
           "_deviation_forward_kernel", "_partition_kernel", "_advantages_kernel", "_group_loss_forward_kernel",
           "_group_loss_backward_kernel", "_group_loss_finalize_kernel"}


def run_step(batch: int, group: int, dim: int, dtype: torch.dtype, generator: torch.Generator) -> None:
    """One training step's diversity ops and fused loss (forward and backward) at (B, G, D)."""
    emb, mask = random_groups(batch, group, dim, generator, dtype=dtype)
    emb = emb.requires_grad_(True)
    rewards = random_logps(batch, group, generator, torch.float32)
    dk.pairwise_similarity(emb, mask, backend="triton").nan_to_num().sum().backward()
    logdet, gains = dk.logdet_diversity(emb, mask, return_gains=True, backend="triton")
    (logdet.sum() + gains.nan_to_num().sum()).backward()
    dk.deviation(emb, mask, backend="triton").sum().backward()
    dk.partition_diversity(emb.detach(), mask, tau=0.5, backend="triton")
    dk.group_advantages(rewards, emb.detach(), mask, diversity="darling", backend="triton")
    policy = random_logps(batch, group, generator, torch.float32).requires_grad_(True)
    out = dk.group_preference_loss(policy, rewards, emb, policy.detach() - 0.1, mask, loss="dpo",
                                   diversity="logdet_gain", pairs="all", diversity_alpha=0.1, backend="triton",
                                   check_inputs=False)
    out.loss.backward()


def variants(dim: int, dtype: torch.dtype) -> dict[str, list[int]]:
    """``{kernel and its configuration: the padded tile of each compiled variant}`` over the steps of STEPS."""
    recorder = resources.LaunchRecorder()
    generator = torch.Generator().manual_seed(0)
    with recorder.recording():
        for batch, group in STEPS:
            run_step(batch, group, dim, dtype, generator)
    tiles: dict[str, list[int]] = collections.defaultdict(list)
    for launch in recorder.launches:  # one entry per distinct specialization
        config = {key: value for key, value in launch["kwargs"].items() if key not in TILE_ARGS}
        tiles[json.dumps([launch["name"], config], sort_keys=True)].append(launch["kwargs"].get("BLOCK_G"))
    return dict(tiles)


# D a multiple of 16, as encoder widths are, and one that is not (the batch stride G * D of emb then
# changes its divisibility with G)
@pytest.mark.parametrize(("dim", "dtype"), [(64, torch.float32), (64, torch.bfloat16), (24, torch.float32)],
                         ids=["fp32", "bf16", "fp32-D24"])
def test_varied_group_sizes_compile_one_variant_per_tile(dim: int, dtype: torch.dtype) -> None:
    found = variants(dim, dtype)
    assert {json.loads(key)[0] for key in found} >= KERNELS
    assert {tile for tiles in found.values() for tile in tiles} >= {16, 32, 64, 128}
    twice = {key: tiles for key, tiles in found.items() if len(tiles) != len(set(tiles))}
    assert not twice, twice  # no tile compiled twice for one configuration
    assert max(len(tiles) for tiles in found.values()) <= 4
    # B and P are not specialized: the finalize kernel (B only) compiles once per configuration
    finalize = [len(tiles) for key, tiles in found.items() if json.loads(key)[0] == "_group_loss_finalize_kernel"]
    assert finalize == [1], finalize
