"""Step 1 of the fused loss on the Triton backend (launch constants, the split forward at a 128
tile) and the forward of either kernel backend followed by step 2."""

from __future__ import annotations

import functools

import torch

from divkernels import reference
from divkernels.backends import cuda as cuda_backend
from divkernels.loss_config import CHECK_STATS, STATS, ForwardOutputs, LossConfig, LossTensors
from divkernels.ops import logdet as logdet_op
from divkernels.ops import similarity as similarity_op
from divkernels.ops.common import (
    accumulation_dtype,
    contiguous,
    dot_precision,
    embedding_block,
    group_block,
    new_output,
    num_warps_for,
    rows_aligned,
    square_shape,
    triton_dtype,
)
from divkernels.ops.fixup import fixup_gram, fixup_launches, fixup_options
from divkernels.ops.group_loss.finalize import finalize
from divkernels.ops.group_loss.forward_kernel import _group_loss_forward_kernel


def triton_forward(inputs: LossTensors, config: LossConfig, store_state: bool, acc: torch.dtype) -> ForwardOutputs:
    """Step 1 on the Triton backend: one launch, one program per group (two with embeddings at a 128
    tile: :func:`split_forward`)."""
    policy, emb = inputs.policy, inputs.emb
    batch, group = policy.shape
    dim = emb.shape[2] if emb is not None else 1
    device = policy.device
    num_stats = len(STATS) + (len(CHECK_STATS) if config.check_inputs else 0)
    poison = inputs.poison
    out = ForwardOutputs(*(new_output(shape, acc, device, poison)
                           for shape in ((batch, num_stats), (batch, group), (batch, group), (batch, group))))
    if store_state:
        out.sim = new_output(square_shape(batch, group), acc, device, poison)
        out.norms = new_output((batch, group), acc, device, poison)
        out.inverse = new_output(square_shape(batch, group), acc, device, poison) if config.needs_logdet else None

    pair_index = inputs.pair_index
    present = tuple(t is not None for t in (emb, inputs.mask, inputs.ref, inputs.scores, inputs.lengths,
                                            inputs.nll_logps, inputs.nll_tokens))
    aligned = emb is not None and rows_aligned(emb)
    constants = _forward_constants(config, group, dim, None if emb is None else emb.dtype, acc, present,
                                   store_state, num_stats, aligned)
    given = (emb, inputs.mask, policy.contiguous(), contiguous(inputs.ref), inputs.rewards.contiguous(),
             contiguous(pair_index), contiguous(inputs.scores), contiguous(inputs.weights), contiguous(inputs.lengths),
             contiguous(inputs.nll_logps), contiguous(inputs.nll_tokens))
    buffers = (out.grad_policy, out.chosen_counts, out.rejected_counts, out.sim, out.norms, out.inverse)
    strides = emb.stride() if emb is not None else (0, 0, 0)
    sizes = (group, dim, 0 if pair_index is None else pair_index.shape[1], *strides)
    params = scalar_table(config.triton_scalars, device)
    logdet = None
    if constants["DIVERSITY_STORED"]:  # the first launch of a split forward: the similarity or logdet forward
        sim, norms, inverse = buffers[3:]
        if not store_state:  # S, norms (and K^-1) into scratch, which the second launch reads and nothing keeps
            sim, norms = new_output(square_shape(batch, group), acc, device, poison), new_output((batch, group), acc,
                                                                                                 device, poison)
            need_logdet = constants["MODE"].need_logdet
            inverse = new_output(square_shape(batch, group), acc, device, poison) if need_logdet else None
            buffers = (*buffers[:3], sim, norms, inverse)
        if constants["MODE"].need_logdet:
            # logdet [B], then gains [B, G] (unread) from the next 16-byte boundary: an aligned pointer whatever
            # B is (one compiled variant, common.py "Bounded compiles")
            head = -(-batch * acc.itemsize // 16) * 16 // acc.itemsize
            logdet_gains = new_output((head + batch * group,), acc, device, poison)
            logdet = logdet_gains[:batch]
            # and, in float32, its float64 fix-up launch (ops/fixup.py): the second launch then reads a
            # finished logdet and K^-1, and the plain finalize kernel follows (no whole-group fix-up)
            for fixup in fixup_launches(acc):
                logdet_op.launch_forward(emb, inputs.mask, config.eps, "cosine", None,
                                         (logdet, logdet_gains[head:].view(batch, group), inverse, sim, norms),
                                         fixup, acc)
        else:
            similarity_op.launch_forward(emb, inputs.mask, "cosine", None, sim, norms, acc)
    _group_loss_forward_kernel[(batch,)](*given, out.stats, *buffers, logdet, params, *sizes, **constants)
    if constants["MODE"].need_logdet and len(fixup_launches(acc)) > 1 and not constants["DIVERSITY_STORED"]:
        out.fixup = ((*given, *buffers, params, *sizes),
                     _fixup_constants(config, group, dim, None if emb is None else emb.dtype, acc, present,
                                      store_state, num_stats, aligned))
    return out




# From this group tile on, a Triton forward with embeddings runs as two launches (split_forward).
SPLIT_FORWARD_FROM = 128


def split_forward(block_g: int) -> bool:
    """Whether the Triton forward (with embeddings) runs as two launches: the similarity op's forward
    kernel, or the logdet op's when ``K`` is swept (Gram, ``S``, the sweep; ``S``, norms, ``K^-1`` and
    logdet to memory), then the group forward with ``DIVERSITY_STORED``, which reads them back (``S`` a
    block of rows at a time) for deviation, the metrics, DivPO's pool deviations and ``1 / K^-1_ii``,
    and does the pairs.

    Why: at G = 128 one kernel did not fit the registers. With the sweep it spilled 72-144 bytes per
    thread at 32 warps (64 registers) and 80-136 at 16 (bf16, sm_90; the sweep alone spills 16 bytes
    under 32 warps' cap); without it, DivPO's rank and pool tiles next to ``S`` spilled 16-64 bytes at
    either. The similarity and logdet forwards hold their tile at 16 warps without a spill, and the
    second launch needs ~110 registers there (benchmarks/results/sm90_kernel_resources.csv). The
    cost: one launch (two with a float32 sweep: the logdet forward's own fix-up launch follows it, and
    the finalize kernel then redoes nothing), and ``S`` (and ``K^-1``) written and read once, ``G^2``
    floats each per group against ``G D`` values of ``emb`` read; they are written anyway when ``emb``
    needs a gradient."""
    return block_g >= SPLIT_FORWARD_FROM


@functools.lru_cache(maxsize=256)
def _forward_constants(config: LossConfig, group: int, dim: int, emb_dtype: torch.dtype | None, acc: torch.dtype,
                       present: tuple[bool, ...], store_state: bool, num_stats: int,
                       aligned: bool) -> dict[str, object]:
    """The forward kernel's compile-time arguments (cached: a training loop repeats them every step).
    ``present``: which of emb, mask, ref, scores, lengths, nll_logps, nll_tokens were given; ``aligned``:
    ``common.rows_aligned(emb)``."""
    has_emb, has_mask, has_ref, has_scores, has_lengths, has_nll_logps, has_nll_tokens = present
    block_g = group_block(group)
    split = has_emb and split_forward(block_g)
    return dict(
        MODE=config.kernel_mode(config.needs_logdet and has_emb, store_state), HAS_EMB=has_emb,
        HAS_MASK=has_mask, HAS_REF=has_ref, HAS_SCORES=has_scores, HAS_LENGTHS=has_lengths,
        HAS_NLL_LOGPS=has_nll_logps, HAS_NLL_TOKENS=has_nll_tokens, NUM_STATS=num_stats, BLOCK_G=block_g,
        BLOCK_D=embedding_block(block_g, dim, emb_dtype or acc), ACC=triton_dtype(acc),
        PRECISION=dot_precision(emb_dtype if emb_dtype is not None else acc),
        CHECK=config.check_inputs, NEED_TWO=config.needs_two, PAIR_ROWS=pair_rows(block_g),
        DIVERSITY_STORED=split, ALIGNED=aligned, num_warps=num_warps_for(block_g, heavy=not split))


def pair_rows(block_g: int) -> int:
    """Chosen rows per step of the forward's pair section (and of reading back a stored ``S``): the
    whole tile up to G = 32, then 32 rows. At G = 64 the whole tile took 160-197 registers (bf16/fp32)
    and spilled 56-104 bytes in float64; 32 rows take 121-143 and do not spill in any dtype, with
    ~15% fewer instructions (sm_90)."""
    return min(block_g, 32)


# Step 1 of each kernel backend, chosen here and nowhere else; steps 2 and 3 are shared.
FORWARDS = {"triton": triton_forward, "cuda": cuda_backend.forward}



def fused_forward(inputs: LossTensors, config: LossConfig, store_state: bool) -> tuple[ForwardOutputs, torch.Tensor,
                                                                                       torch.Tensor, torch.Tensor]:
    """Steps 1 and 2: ``(per-group outputs, totals, loss, metrics vector)`` in two launches."""
    policy, emb = inputs.policy, inputs.emb
    acc = accumulation_dtype(policy.dtype, *((emb.dtype,) if emb is not None else ()))
    out = FORWARDS[config.kernel_backend](inputs, config, store_state, acc)
    totals, loss, metrics = finalize(out.stats, policy.shape[0], config, reference.compute_dtype(policy.dtype),
                                     inputs.poison, out.fixup)
    return out, totals, loss, metrics


@functools.lru_cache(maxsize=256)
def _fixup_constants(*forward_key: object) -> dict[str, object]:
    """The forward kernel's constants (``_forward_constants(*forward_key)``) that the fix-up's group
    forward takes, with the float64 pass's Gram settings and launch options (:mod:`divkernels.ops.fixup`);
    the rest are the finalize kernel's, or fixed."""
    shared = {"NUM_STATS", "ACC", "DIVERSITY_STORED"}
    constants = {name: value for name, value in _forward_constants(*forward_key).items() if name not in shared}
    if constants["HAS_EMB"]:
        constants.update(fixup_gram())
    return {**constants, **fixup_options(constants["BLOCK_G"])}


@functools.lru_cache(maxsize=64)
def scalar_table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The kernels' float64 scalar table (``LossConfig.triton_scalars``) on ``device``, made once per
    config's values and device (a training loop repeats them every step: no copy per call)."""
    return torch.tensor(values, dtype=torch.float64, device=device)
