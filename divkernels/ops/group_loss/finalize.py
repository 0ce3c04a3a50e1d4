"""Step 2 of the fused loss: one program sums the per-group partial sums over the batch and writes
the loss, every metric (one float32 vector) and the totals the backward needs. With a float32
logdet it first redoes, with a float64 sweep, the groups whose float32 sweep failed (logdet NaN):
the float64 fix-up, which keeps the float64
tile out of the forward kernel's registers."""

from __future__ import annotations

import functools

import torch

from divkernels.loss_config import METRIC, LossConfig
from divkernels.ops.common import as_acc, new_output, next_power_of_2, tl, triton, triton_dtype
from divkernels.ops.fixup import sweep_failed
from divkernels.ops.group_loss.forward_kernel import group_forward
from divkernels.ops.group_loss.pair_math import (
    COL_CHOSEN_REWARD,
    COL_CORRECT,
    COL_DEVIATION,
    COL_HAS_SIMILARITY,
    COL_LOG_ODDS_CHOSEN,
    COL_LOG_ODDS_RATIO,
    COL_LOGDET,
    COL_LOGPS_CHOSEN,
    COL_LOGPS_REJECTED,
    COL_MEAN_SIMILARITY,
    COL_NLL_LOGPS,
    COL_NLL_TOKENS,
    COL_NO_PAIRS,
    COL_PAIRS,
    COL_REJECTED_REWARD,
    COL_VALID,
    COL_WEIGHT_SUM,
    COL_WEIGHTED_LOSS,
    pick,
)


@triton.jit(do_not_specialize=["B"])  # sizes that vary over a run: common.py
def _group_loss_finalize_kernel(stats_ptr, totals_ptr, loss_ptr, metrics_ptr, B, batch_div: tl.float64,
                                diversity_alpha: tl.float64, cpo_alpha: tl.float64, NUM_STATS: tl.constexpr,
                                BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, DORPO: tl.constexpr,
                                HAS_CPO: tl.constexpr, ACC: tl.constexpr):
    """Step 2, one program: :func:`finalize_batch`."""
    batch_div = as_acc(batch_div, ACC)
    diversity_alpha = as_acc(diversity_alpha, ACC)
    cpo_alpha = as_acc(cpo_alpha, ACC)
    finalize_batch(stats_ptr, totals_ptr, loss_ptr, metrics_ptr, B, batch_div, diversity_alpha, cpo_alpha, NUM_STATS,
                   BLOCK_S, BLOCK_B, DORPO, HAS_CPO, ACC)


@triton.jit(do_not_specialize=["B", "G", "P", "stride_b"])  # sizes that vary over a run: common.py
def _group_loss_fixup_finalize_kernel(
    stats_ptr, totals_ptr, loss_ptr, metrics_ptr, B, batch_div: tl.float64, diversity_alpha: tl.float64,
    cpo_alpha: tl.float64, emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr, scores_ptr, weights_ptr,
    lengths_ptr, nll_logps_ptr, nll_tokens_ptr, grad_policy_ptr, chosen_counts_ptr, rejected_counts_ptr, sim_ptr,
    norms_ptr, inverse_ptr, params_ptr, G, D, P, stride_b, stride_g, stride_d, NUM_STATS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, DORPO: tl.constexpr, HAS_CPO: tl.constexpr, ACC: tl.constexpr,
    MODE: tl.constexpr, HAS_EMB: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, HAS_SCORES: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_NLL_LOGPS: tl.constexpr, HAS_NLL_TOKENS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, CHECK: tl.constexpr, NEED_TWO: tl.constexpr,
    PAIR_ROWS: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Step 2 when the forward swept ``K`` in float32 (Triton, with a logdet). First the float64
    fix-up (:mod:`divkernels.ops.fixup`): every group whose float32 sweep failed (its logdet is NaN,
    the forward's device-side flag) runs the group forward again with a float64 sweep and overwrites
    its outputs. Then :func:`finalize_batch`. Running the fix-up in this launch keeps the float64 tile
    out of the forward kernel's registers and the fused loss at four launches. Such groups are rare
    (``K`` near singular in float32), and this one program redoes them one after another. Up to
    G = 64: the split forward (G = 128) fixes its logdet launch's groups itself, before its second
    launch reads them."""
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        logdets = tl.load(stats_ptr + rows * NUM_STATS + COL_LOGDET, mask=rows < B, other=0.0)
        if sweep_failed(tl.sum(logdets, axis=0)):  # NaN in a sum: one of the block's groups failed
            for b in range(start, tl.minimum(start + BLOCK_B, B)):
                if sweep_failed(tl.load(stats_ptr + b * NUM_STATS + COL_LOGDET)):
                    group_forward(
                        tl.cast(b, tl.int64), emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr,
                        scores_ptr, weights_ptr, lengths_ptr, nll_logps_ptr, nll_tokens_ptr, stats_ptr,
                        grad_policy_ptr, chosen_counts_ptr, rejected_counts_ptr, sim_ptr, norms_ptr, inverse_ptr,
                        stats_ptr, params_ptr, G, D, P, stride_b, stride_g, stride_d, MODE, HAS_EMB, HAS_MASK,
                        HAS_REF, HAS_SCORES, HAS_LENGTHS, HAS_NLL_LOGPS, HAS_NLL_TOKENS, NUM_STATS, BLOCK_G,
                        BLOCK_D, ACC, PRECISION, CHECK, NEED_TWO, PAIR_ROWS, True, False,
                        ALIGNED)  # the whole group again (stats_ptr: the unread logdet_ptr)
    tl.debug_barrier()  # the rewritten stats rows (written by other threads) are summed next
    finalize_batch(stats_ptr, totals_ptr, loss_ptr, metrics_ptr, B, as_acc(batch_div, ACC),
                   as_acc(diversity_alpha, ACC), as_acc(cpo_alpha, ACC), NUM_STATS, BLOCK_S, BLOCK_B, DORPO, HAS_CPO,
                   ACC)


@triton.jit
def finalize_batch(stats_ptr, totals_ptr, loss_ptr, metrics_ptr, B, batch_div, diversity_alpha, cpo_alpha,
                   NUM_STATS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, DORPO: tl.constexpr,
                   HAS_CPO: tl.constexpr, ACC: tl.constexpr):
    """Batch totals of the ``[B, NUM_STATS]`` partial sums; the loss
    ``weighted_loss / P + c NLL - alpha * logdet / B`` (``c``: DORPO's mean weight or CPO's alpha,
    ``NLL = -nll_logps / nll_tokens``) and the metrics in the order of ``loss_config.METRICS``."""
    offs = tl.arange(0, BLOCK_S)
    total = tl.zeros([BLOCK_S], dtype=ACC)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        tile = tl.load(stats_ptr + rows[:, None] * NUM_STATS + offs[None, :],
                       mask=(rows[:, None] < B) & (offs[None, :] < NUM_STATS), other=0.0)
        total += tl.sum(tile.to(ACC), axis=0)
    tl.store(totals_ptr + offs, total, mask=offs < NUM_STATS)
    pairs = pick(total, COL_PAIRS, BLOCK_S)
    per_pair = tl.maximum(pairs, 1.0)
    nll = -pick(total, COL_NLL_LOGPS, BLOCK_S) / tl.maximum(pick(total, COL_NLL_TOKENS, BLOCK_S), 1e-30)
    loss = pick(total, COL_WEIGHTED_LOSS, BLOCK_S) / per_pair
    if DORPO:
        loss += pick(total, COL_WEIGHT_SUM, BLOCK_S) / per_pair * nll
    if HAS_CPO:
        loss += cpo_alpha * nll
    loss -= diversity_alpha * pick(total, COL_LOGDET, BLOCK_S) / batch_div
    tl.store(loss_ptr, loss)
    chosen = pick(total, COL_CHOSEN_REWARD, BLOCK_S) / per_pair
    rejected = pick(total, COL_REJECTED_REWARD, BLOCK_S) / per_pair
    # in the order of loss_config.METRICS
    values = (loss, pairs, pick(total, COL_NO_PAIRS, BLOCK_S), chosen, rejected, chosen - rejected,
              pick(total, COL_CORRECT, BLOCK_S) / per_pair,
              pick(total, COL_LOGPS_CHOSEN, BLOCK_S) / per_pair,
              pick(total, COL_LOGPS_REJECTED, BLOCK_S) / per_pair,
              nll,
              pick(total, COL_LOG_ODDS_RATIO, BLOCK_S) / per_pair,
              pick(total, COL_LOG_ODDS_CHOSEN, BLOCK_S) / per_pair,
              pick(total, COL_MEAN_SIMILARITY, BLOCK_S) / tl.maximum(pick(total, COL_HAS_SIMILARITY, BLOCK_S), 1.0),
              pick(total, COL_DEVIATION, BLOCK_S) / tl.maximum(pick(total, COL_VALID, BLOCK_S), 1.0),
              pick(total, COL_LOGDET, BLOCK_S) / batch_div)
    for index in tl.static_range(15):
        tl.store(metrics_ptr + index, values[index].to(tl.float32))



def finalize(stats: torch.Tensor, batch: int, config: LossConfig, loss_dtype: torch.dtype, poison: bool,
             fixup: tuple[tuple, dict] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2: ``(totals [NUM_STATS], loss [], metrics [len(METRICS)] float32)`` in one launch.
    ``fixup``: ``ForwardOutputs.fixup``, when the Triton forward's float32 sweeps need the float64 fix-up."""
    num_stats = stats.shape[1]
    device = stats.device
    totals = new_output((num_stats,), stats.dtype, device, poison)
    loss = new_output((), loss_dtype, device, poison)
    metrics = new_output((len(METRIC),), torch.float32, device, poison)
    head = (stats, totals, loss, metrics, batch, float(max(batch, 1)), config.diversity_alpha, config.cpo_alpha)
    constants = _finalize_constants(config, num_stats, stats.dtype)
    if fixup is None:
        _group_loss_finalize_kernel[(1,)](*head, **constants)
    else:
        args, fixup_constants = fixup
        _group_loss_fixup_finalize_kernel[(1,)](*head, *args, **constants, **fixup_constants)
    return totals, loss, metrics


@functools.lru_cache(maxsize=64)
def _finalize_constants(config: LossConfig, num_stats: int, acc: torch.dtype) -> dict[str, object]:
    return dict(NUM_STATS=num_stats, BLOCK_S=next_power_of_2(num_stats), BLOCK_B=64, DORPO=config.dorpo,
                HAS_CPO=config.cpo_alpha > 0, ACC=triton_dtype(acc))

