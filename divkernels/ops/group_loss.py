"""Group-wise preference loss with diversity weights: DPO/IPO/ORPO/SimPO x DDPO/DORPO/DivPO/DQO.

The fused op, four launches for a forward and backward (the autograd engine's ``ones_like``
included; five from G = 65, a 128 tile, on with embeddings) and no host sync with ``check_inputs=False``:

1. forward, one program per group: stream ``emb[b]`` once for the Gram matrix, form cosine ``S``
   and deviation, sweep ``K = S + eps I`` for logdet and ``K^{-1}`` (when ``logdet_gain`` weights
   or the regularizer need them), select the pairs (all / best-worst / DivPO / explicit rows of
   ``pair_index``), weight them, and write the group's partial sums (loss, metrics, data checks),
   the gradient of its pair losses w.r.t. the log-probs and its pair counts. At a 128 tile this is
   two launches (:func:`split_forward`): the similarity or logdet op's forward kernel writes ``S``,
   norms (``K^-1``, logdet), and the group kernel reads them back;
2. finalize, one program: sum the partial sums over the batch and write the loss, every metric
   (one float32 vector; the metrics are views of it) and the totals the backward needs. With a
   float32 logdet it first redoes, with a float64 sweep, the groups whose float32 sweep failed
   (logdet NaN), so the float64 tile stays out of step 1's registers;
3. backward, one program per (group, slice of D): scale the saved per-response gradient by the
   upstream gradient (and the NLL term's), write the gradients of the policy, reference and NLL
   log-probs in their dtypes, and, when ``emb`` needs one, the regularizer's
   ``dL/dS = -alpha / B * g * K^{-1}`` through the shared similarity backward (reading ``emb`` once).

With ``C_ij`` the pair counts, ``w_i`` the (constant) weights and ``u_ij`` the pair logit
(``beta (z_i - z_j)`` for DPO with ``z = pi - ref``, ...), the pair part of the loss is
``sum C w l(u) / #pairs``, so ``d/d pi_k = slope_k (sum_j M_kj - sum_i M_ik) / #pairs`` with
``M = C w dl/du`` and ``slope = du_ij / d pi_i`` (``beta``, ``1 / T_i`` for IPO,
``d log_odds / d pi = 1 / (1 - e^pi)``, ...). The CUDA extension implements step 1 with the same
outputs (:mod:`divkernels.backends.cuda`); steps 2 and 3 are shared. Saved for backward:
``O(B G)`` gradients, plus ``S``, ``K^{-1}`` and norms (``O(B G^2)``) only when ``emb`` needs a
gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from divkernels import reference
from divkernels.backend import backend_unavailable_reason, resolve_backend
from divkernels.backends import cuda as cuda_backend
from divkernels.loss_config import CHECK_STATS, METRIC, STAT, STATS, ForwardOutputs, LossConfig, LossTensors
from divkernels.ops import logdet as logdet_op
from divkernels.ops import similarity as similarity_op
from divkernels.ops.common import (
    MIN_BLOCK,
    accumulation_dtype,
    any_bad,
    as_acc,
    backward_warps,
    column_block,
    contiguous,
    dot_precision,
    embedding_block,
    group_block,
    is_finite,
    new_output,
    next_power_of_2,
    num_warps_for,
    poison_outputs,
    rows_aligned,
    square_shape,
    tl,
    triton,
    triton_dtype,
)
from divkernels.ops.deviation import deviation, deviation_from_row_sums, deviation_from_similarity
from divkernels.ops.logdet import SIM_BEFORE_SWEEP, check_factorization, diagonal, logdet_and_inverse
from divkernels.ops.similarity import (
    emb_backward,
    gram_matrix,
    group_start,
    load_valid_rows,
    similarity_from_gram,
    square_at,
    square_stride,
    store_square,
    unusable_norms,
)
from divkernels.types import LossOutput, MetricVector
from divkernels.validation import (
    NONFINITE_MESSAGE,
    POSITIVE_MESSAGE,
    DataChecks,
    GroupLossArguments,
    check_group_loss_arguments,
    emb_message,
    too_few_message,
)

LN2 = tl.constexpr(reference.LN2)
DIVPO_TIE_RTOL = tl.constexpr(reference.DIVPO_TIE_RTOL)
DIVPO_COUNT_SLACK = tl.constexpr(reference.DIVPO_COUNT_SLACK)
DEVIATION_TIE = tl.constexpr(reference.DEVIATION_TIE)


# The columns of the per-group stats as kernel constants (loss_config.STAT): the kernels name them, never
# a raw offset.
(
    COL_WEIGHTED_LOSS, COL_PAIRS, COL_CHOSEN_REWARD, COL_REJECTED_REWARD, COL_CORRECT, COL_NO_PAIRS, COL_DEVIATION,
    COL_MEAN_SIMILARITY, COL_HAS_SIMILARITY, COL_LOGDET, COL_VALID, COL_EMB_NONFINITE, COL_WEIGHT_SUM, COL_NLL_LOGPS,
    COL_NLL_TOKENS, COL_LOGPS_CHOSEN, COL_LOGPS_REJECTED, COL_LOG_ODDS_RATIO, COL_LOG_ODDS_CHOSEN,
    COL_BAD_POLICY_LOGPS, COL_BAD_REWARDS, COL_BAD_REF_LOGPS, COL_BAD_DIVPO_SCORES, COL_BAD_WEIGHTS,
    COL_BAD_TOKEN_COUNTS, COL_BAD_NLL_LOGPS, COL_BAD_NLL_TOKENS, COL_TOO_FEW_RESPONSES, COL_ORPO_NONNEGATIVE,
    COL_BAD_PAIR_INDEX, COL_FACTORIZATION_FAILED,
) = (tl.constexpr(STAT[name]) for name in STATS + CHECK_STATS)


@triton.jit
def softplus(x):
    """``log(1 + e^x)`` without overflow; ``-log sigmoid(u) = softplus(-u)``."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def expm1(x):
    """``e^x - 1`` accurate near 0 from exp and log alone (Kahan): ``(u - 1) x / log u``."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / tl.log(u)))


@triton.jit
def log1mexp(x):
    """``log(1 - e^x)`` for ``x < 0`` (Maechler 2012), as ``reference.log1mexp``."""
    return tl.where(x > -LN2, tl.log(-expm1(x)), tl.log(1.0 - tl.exp(x)))


@triton.jit
def response_terms(policy, ref, length, beta, orpo_lambda, LOSS: tl.constexpr):
    """Per response of one group: ``(key, slope, implicit)``; the pair logit is built from the keys
    (:func:`pair_loss_terms`). ``slope_k = du_kj / d pi_k`` (``du_ik / d pi_k`` is its negative);
    ``implicit`` is what TRL logs as rewards/chosen and rewards/rejected. IPO divides each
    log-ratio by its completion length (TRL's DPOTrainer; ``length`` is 1 without token counts)."""
    if LOSS == 0 or LOSS == 1:
        margin = policy - ref
        if LOSS == 0:
            key = margin
            slope = tl.full(policy.shape, beta, policy.dtype)
        else:
            key = margin / length
            slope = 1.0 / length
        implicit = beta * margin
    elif LOSS == 2:
        key = policy - log1mexp(policy)  # ORPO's log-odds
        slope = -1.0 / expm1(policy)
        implicit = orpo_lambda * policy
    else:
        key = policy
        slope = tl.full(policy.shape, beta, policy.dtype)
        implicit = beta * policy
    return key, slope, implicit


@triton.jit
def pair_loss_terms(key_i, key, weight_i, policy_i, beta, orpo_lambda, simpo_gamma, LOSS: tl.constexpr,
                    ORPO_DORPO: tl.constexpr):
    """Per pair (i chosen in a chunk of rows, j rejected): ``(l_ij, dl/du_ij, odds_ij)``, ``[rows, BLOCK_G]``.

    ``key_i``, ``weight_i``, ``policy_i``: the chunk's rows; ``key``: every response's. DORPO puts
    the chosen weight inside the log-sigmoid, ``l = -lambda log sigmoid(w_i u_ij)``, and leaves its
    NLL term to the batch reduction; ORPO's ``"pair"`` weighting keeps the NLL ``-pi_i`` in each
    pair's loss. ``odds`` is ORPO's (weighted) log-odds difference, for its metrics; 0 otherwise.
    """
    odds = tl.zeros([key_i.shape[0], key.shape[0]], dtype=key.dtype)
    if LOSS == 0:
        u = beta * (key_i[:, None] - key[None, :])
        loss = softplus(-u)
        dloss = -sigmoid(-u)
    elif LOSS == 1:
        u = key_i[:, None] - key[None, :] - 0.5 / beta
        loss = u * u
        dloss = 2.0 * u
    elif LOSS == 2:
        u = key_i[:, None] - key[None, :]
        if ORPO_DORPO:
            odds = weight_i[:, None] * u
            loss = orpo_lambda * softplus(-odds)
            dloss = -orpo_lambda * weight_i[:, None] * sigmoid(-odds)
        else:
            odds = u
            loss = orpo_lambda * softplus(-u) - policy_i[:, None]
            dloss = -orpo_lambda * sigmoid(-u)
    else:
        u = beta * (key_i[:, None] - key[None, :]) - simpo_gamma
        loss = softplus(-u)
        dloss = -sigmoid(-u)
    return loss, dloss, odds


@triton.jit
def rows_of(vector, rows, BLOCK_G: tl.constexpr, PAIR_ROWS: tl.constexpr):
    """``vector[rows]`` (``[PAIR_ROWS]``) of a ``[BLOCK_G]`` vector, selected in registers."""
    if PAIR_ROWS == BLOCK_G:
        return vector
    offs = tl.arange(0, BLOCK_G)
    return tl.sum(tl.where(rows[:, None] == offs[None, :], vector[None, :], 0), axis=1)


@triton.jit
def at_rows(part, rows, BLOCK_G: tl.constexpr, PAIR_ROWS: tl.constexpr):
    """The ``[BLOCK_G]`` vector holding ``part`` (``[PAIR_ROWS]``) at ``rows`` and 0 elsewhere."""
    if PAIR_ROWS == BLOCK_G:
        return part
    offs = tl.arange(0, BLOCK_G)
    return tl.sum(tl.where(rows[:, None] == offs[None, :], part[:, None], 0), axis=0)


@triton.jit
def first_near_extreme(score, pool, sign, BLOCK_G: tl.constexpr):
    """First index in ``pool`` whose ``sign * score`` is within ``DIVPO_TIE_RTOL`` of the pool's
    maximum (``reference._first_near_extreme``): near-ties are ties, whatever the rounding."""
    offs = tl.arange(0, BLOCK_G)
    signed = tl.where(pool, sign * score, -float("inf"))
    best = tl.max(signed, axis=0)
    near = pool & (signed >= best - DIVPO_TIE_RTOL * tl.maximum(tl.abs(best), 1.0))
    return tl.min(tl.where(near, offs, BLOCK_G), axis=0)


@triton.jit
def divpo_pools(reward, valid, quality_quantile, RANKED: tl.constexpr, BLOCK_G: tl.constexpr):
    """DivPO's ``(top, bottom)`` pools, ``[BLOCK_G]`` bool each (``reference.divpo_pools``).

    Ranked: the ``k`` highest and lowest rewards, ``k = min(max(floor(q n + slack), 1), floor(n / 2))``;
    threshold (ours): rewards at or above the linearly interpolated ``1 - q`` quantile, and the
    rest. Order statistics come from ranks (ascending, ties broken by index).
    """
    offs = tl.arange(0, BLOCK_G)
    rows = offs[:, None]
    cols = offs[None, :]
    n = tl.sum(valid.to(reward.dtype), axis=0)
    before = (reward[None, :] < reward[:, None]) | ((reward[None, :] == reward[:, None]) & (cols < rows))
    rank = tl.sum(tl.where(before & valid[None, :], 1.0, 0.0), axis=1)
    if RANKED:
        size = tl.minimum(tl.maximum(tl.floor(quality_quantile * n + DIVPO_COUNT_SLACK), 1.0), tl.floor(n / 2.0))
        return valid & (rank >= n - size), valid & (rank < size)
    position = (1.0 - quality_quantile) * tl.maximum(n - 1.0, 0.0)
    lower = tl.floor(position)
    upper = tl.ceil(position)
    low_value = tl.sum(tl.where(valid & (rank == lower), reward, 0.0), axis=0)
    high_value = tl.sum(tl.where(valid & (rank == upper), reward, 0.0), axis=0)
    threshold = low_value + (position - lower) * tl.where(upper > lower, high_value - low_value, 0.0)
    return valid & (reward >= threshold), valid & (reward < threshold)


@triton.jit
def divpo_pair(reward, top, bottom, top_score, bottom_score, BLOCK_G: tl.constexpr):
    """DivPO's one pair ``(chosen, rejected, exists)`` (``reference.pair_counts_divpo``): the most
    diverse of ``top`` against the least diverse of ``bottom``, if the chosen reward is higher."""
    offs = tl.arange(0, BLOCK_G)
    chosen = first_near_extreme(top_score, top, 1.0, BLOCK_G)
    rejected = first_near_extreme(bottom_score, bottom, -1.0, BLOCK_G)
    exists = (tl.sum(top.to(tl.int32), axis=0) > 0) & (tl.sum(bottom.to(tl.int32), axis=0) > 0)
    chosen_reward = tl.sum(tl.where(offs == chosen, reward, 0.0), axis=0)
    rejected_reward = tl.sum(tl.where(offs == rejected, reward, 0.0), axis=0)
    return chosen, rejected, exists & (chosen_reward > rejected_reward)


@triton.jit
def best_worst_pair(reward, valid, BLOCK_G: tl.constexpr):
    """``(argmax r, argmin r, exists)`` over valid responses, first index on ties; none if all r are equal."""
    best_value = tl.max(tl.where(valid, reward, -float("inf")), axis=0)
    worst_value = tl.min(tl.where(valid, reward, float("inf")), axis=0)
    best = tl.argmax(tl.where(valid, reward, -float("inf")), axis=0, tie_break_left=True)
    worst = tl.argmin(tl.where(valid, reward, float("inf")), axis=0, tie_break_left=True)
    return best, worst, best_value > worst_value


@triton.jit
def ddpo_weights(dev, valid):
    """DDPO/DORPO weights of one encoder (``reference.ddpo_weights``): ``(d - d_min) / (mean d - d_min)``,
    1 when the group's deviations spread by at most ``DEVIATION_TIE``."""
    n = tl.sum(valid.to(dev.dtype), axis=0)
    low = tl.min(tl.where(valid, dev, float("inf")), axis=0)
    high = tl.max(tl.where(valid, dev, -float("inf")), axis=0)
    mean = tl.sum(tl.where(valid, dev, 0.0), axis=0) / tl.maximum(n, 1.0)
    spread = high - low > DEVIATION_TIE
    return tl.where(spread, (dev - low) / tl.where(spread, mean - low, 1.0), 1.0)


@triton.jit
def normalize_to_mean_one(raw, valid):
    """``raw / mean_valid(raw)``; 1 where the group's mean is not positive."""
    n = tl.sum(valid.to(raw.dtype), axis=0)
    mean = tl.sum(tl.where(valid, raw, 0.0), axis=0) / tl.maximum(n, 1.0)
    return tl.where(mean > 0.0, raw / tl.where(mean > 0.0, mean, 1.0), 1.0)


@triton.jit
def group_similarity(b, emb_ptr, valid, D, stride_b, stride_g, stride_d, BLOCK_G: tl.constexpr,
                     BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr):
    """Group ``b``'s cosine ``S`` (``[BLOCK_G, BLOCK_G]``), norms and deviation (``[BLOCK_G]``), and
    its :func:`similarity_metrics`: ``(S, norms, dev, mean_similarity, has_similarity, emb_nonfinite)``."""
    offs = tl.arange(0, BLOCK_G)
    gram = gram_matrix(group_start(emb_ptr, b, stride_b, ALIGNED), stride_g, stride_d, valid, D, BLOCK_G, BLOCK_D,
                       ACC, PRECISION)
    sim, norms = similarity_from_gram(gram, valid, 0.0, 0, BLOCK_G)
    others = valid[:, None] & valid[None, :] & (offs[:, None] != offs[None, :])
    off_diagonal = tl.sum(tl.sum(tl.where(others, sim, 0.0), axis=1), axis=0)
    mean_similarity, has_similarity, emb_nonfinite = similarity_metrics(valid, norms, off_diagonal, ACC)
    return sim, norms, deviation_from_similarity(sim, valid), mean_similarity, has_similarity, emb_nonfinite


@triton.jit
def similarity_metrics(valid, norms, off_diagonal, ACC: tl.constexpr):
    """One group's ``(mean S over valid pairs i != j, 1 if it has such a pair, non-finite valid rows)``
    from the sum of ``S`` over those pairs (``off_diagonal``) and the rows' norms."""
    n = tl.sum(valid.to(ACC), axis=0)
    other_count = n * (n - 1.0)  # valid ordered pairs i != j
    mean_similarity = off_diagonal / tl.maximum(other_count, 1.0)
    has_similarity = tl.where(other_count > 0.0, 1.0, 0.0)
    emb_nonfinite = tl.sum(tl.where(valid & unusable_norms(norms, ACC), 1.0, 0.0), axis=0)
    return mean_similarity, has_similarity, emb_nonfinite


@triton.jit
def stored_row_sums(sim_ptr, columns, valid, G, BLOCK_G: tl.constexpr, PAIR_ROWS: tl.constexpr,
                    ACC: tl.constexpr):
    """From one group's ``S`` in memory (``[G, G]``, rows ``square_stride(G)`` apart), ``PAIR_ROWS`` rows at a time:
    ``(row_sums, off_diagonal)``, ``row_sums[i] = sum_{j in columns} S_ij`` (``[BLOCK_G]``) and the sum of
    ``S_ij`` over valid pairs ``i != j``."""
    offs = tl.arange(0, BLOCK_G)
    row_sums = tl.zeros([BLOCK_G], dtype=ACC)
    off_diagonal = tl.sum(row_sums, axis=0)
    for start in range(0, BLOCK_G, PAIR_ROWS):
        rows = start + tl.arange(0, PAIR_ROWS)
        tile = tl.load(sim_ptr + rows[:, None] * square_stride(G) + offs[None, :],
                       mask=(rows[:, None] < G) & (offs[None, :] < G), other=0.0).to(ACC)
        row_sums += at_rows(tl.sum(tl.where(columns[None, :], tile, 0.0), axis=1), rows, BLOCK_G, PAIR_ROWS)
        valid_i = rows_of(valid.to(tl.int32), rows, BLOCK_G, PAIR_ROWS) > 0
        others = valid_i[:, None] & valid[None, :] & (rows[:, None] != offs[None, :])
        off_diagonal += tl.sum(tl.sum(tl.where(others, tile, 0.0), axis=1), axis=0)
    return row_sums, off_diagonal


@triton.jit
def group_forward(
    b, emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr, scores_ptr, weights_ptr, lengths_ptr,
    nll_logps_ptr, nll_tokens_ptr,
    stats_ptr, grad_policy_ptr, chosen_counts_ptr, rejected_counts_ptr, sim_ptr, norms_ptr, inverse_ptr,
    logdet_ptr, G, D, P, stride_b, stride_g, stride_d,
    beta, orpo_lambda, simpo_gamma, min_deviation, eps, quality_quantile,
    LOSS: tl.constexpr, PAIRS: tl.constexpr, WEIGHTS: tl.constexpr, NORM: tl.constexpr, ORPO_DORPO: tl.constexpr,
    DIVPO_RANKED: tl.constexpr, HAS_EMB: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_SCORES: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_NLL_LOGPS: tl.constexpr, HAS_NLL_TOKENS: tl.constexpr,
    NEED_LOGDET: tl.constexpr, STORE_STATE: tl.constexpr, NUM_STATS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    CHECK: tl.constexpr, NEED_TWO: tl.constexpr, PAIR_ROWS: tl.constexpr, SWEEP_FP64: tl.constexpr,
    DIVERSITY_STORED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Group ``b``'s forward (step 1 of the module docstring). ``SWEEP_FP64``: sweep ``K`` in float64,
    the finalize kernel's fix-up of a group whose float32 sweep failed (its logdet is NaN).
    ``DIVERSITY_STORED``: the second launch of a split forward (:func:`split_forward`); the similarity
    forward has written ``S`` and norms (the logdet forward, when ``NEED_LOGDET``, also ``K^-1`` and
    ``logdet_ptr [B]``), which are read here instead of computed."""
    offs = tl.arange(0, BLOCK_G)
    valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)

    # -- diversity of the group
    dev = tl.zeros([BLOCK_G], dtype=ACC)
    residual = tl.full([BLOCK_G], 1.0, ACC)
    logdet = tl.sum(dev, axis=0)
    mean_similarity = logdet
    has_similarity = logdet
    emb_nonfinite = logdet
    if HAS_EMB and DIVERSITY_STORED:
        # from the split forward's first launch (split_forward); S read back a block of rows at a time
        row_sums, off_diagonal = stored_row_sums(square_at(sim_ptr, b, G), valid, valid, G, BLOCK_G, PAIR_ROWS, ACC)
        dev = deviation_from_row_sums(row_sums, valid)
        norms = tl.load(norms_ptr + b * G + offs, mask=offs < G, other=1.0)
        mean_similarity, has_similarity, emb_nonfinite = similarity_metrics(valid, norms, off_diagonal, ACC)
        if NEED_LOGDET:
            logdet = tl.load(logdet_ptr + b)
            residual = 1.0 / tl.load(square_at(inverse_ptr, b, G) + offs * (square_stride(G) + 1), mask=offs < G,
                                     other=1.0)
    elif HAS_EMB:
        sim, norms, dev, mean_similarity, has_similarity, emb_nonfinite = group_similarity(
            b, emb_ptr, valid, D, stride_b, stride_g, stride_d, BLOCK_G, BLOCK_D, ACC, PRECISION, ALIGNED)
        # S stored before the sweep from SIM_BEFORE_SWEEP on, unless DivPO's ranked pools read it after
        late = BLOCK_G < SIM_BEFORE_SWEEP or (PAIRS == 2 and DIVPO_RANKED)
        if STORE_STATE and not late:
            store_square(square_at(sim_ptr, b, G), sim, G, BLOCK_G)
        if NEED_LOGDET:
            logdet, inverse = logdet_and_inverse(sim, valid, eps, G, BLOCK_G, SWEEP_FP64)
            residual = 1.0 / diagonal(inverse, BLOCK_G)
            if STORE_STATE:
                store_square(square_at(inverse_ptr, b, G), inverse, G, BLOCK_G)
        if STORE_STATE and late:
            store_square(square_at(sim_ptr, b, G), sim, G, BLOCK_G)
        if STORE_STATE:
            tl.store(norms_ptr + b * G + offs, norms, mask=offs < G)

    # The per-response inputs, loaded after the diversity section so that they do not hold registers
    # through it. Padded log-probs get a finite stand-in (< 0 keeps log(1 - e^pi) finite); they meet
    # no pair.
    policy = tl.load(policy_ptr + b * G + offs, mask=valid, other=-1.0).to(ACC)
    if HAS_REF:
        ref = tl.load(ref_ptr + b * G + offs, mask=valid, other=-1.0).to(ACC)
    else:
        ref = tl.zeros([BLOCK_G], dtype=ACC)
    reward = tl.load(rewards_ptr + b * G + offs, mask=valid, other=0.0).to(ACC)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b * G + offs, mask=valid, other=1.0).to(ACC)
    else:
        length = tl.full([BLOCK_G], 1.0, ACC)

    # -- pairs: C_ij = how often (i chosen, j rejected) is a pair; one pair (chosen, rejected, exists)
    # for best-worst and DivPO, every rewarded order for "all", the rows of pair_index for explicit
    if PAIRS == 1:
        chosen, rejected, exists = best_worst_pair(reward, valid, BLOCK_G)
    elif PAIRS == 2:
        top, bottom = divpo_pools(reward, valid, quality_quantile, DIVPO_RANKED, BLOCK_G)
        if HAS_SCORES:
            top_score = tl.load(scores_ptr + b * G + offs, mask=valid, other=0.0).to(ACC)
            bottom_score = top_score
        elif DIVPO_RANKED and DIVERSITY_STORED:
            top_sums, _ = stored_row_sums(square_at(sim_ptr, b, G), top, valid, G, BLOCK_G, PAIR_ROWS, ACC)
            top_score = deviation_from_row_sums(top_sums, top)
            bottom_sums, _ = stored_row_sums(square_at(sim_ptr, b, G), bottom, valid, G, BLOCK_G, PAIR_ROWS, ACC)
            bottom_score = deviation_from_row_sums(bottom_sums, bottom)
        elif DIVPO_RANKED:
            # deviation within each pool: a pool is the "valid" set of its own deviation
            top_score = deviation_from_similarity(sim, top)
            bottom_score = deviation_from_similarity(sim, bottom)
        else:
            top_score = dev
            bottom_score = dev
        chosen, rejected, exists = divpo_pair(reward, top, bottom, top_score, bottom_score, BLOCK_G)
    elif PAIRS == 3:
        bad_pairs = tl.sum(tl.zeros([BLOCK_G], dtype=tl.int32), axis=0)  # the same count from every chunk

    # -- diversity weight of each chosen response (constants for the gradient)
    if WEIGHTS == 0:
        weight = tl.full([BLOCK_G], 1.0, ACC)
    elif WEIGHTS == 1:
        if NORM == 0:
            weight = ddpo_weights(dev, valid)
        elif NORM == 1:
            weight = normalize_to_mean_one(dev, valid)
        else:
            weight = dev
        weight = tl.maximum(weight, min_deviation)
    elif WEIGHTS == 2:
        weight = normalize_to_mean_one(residual, valid)
    else:
        weight = tl.load(weights_ptr + b * G + offs, mask=valid, other=0.0).to(ACC)

    # -- pair losses, their gradient w.r.t. the log-probs, and the metric partial sums, PAIR_ROWS
    # chosen rows at a time: a [PAIR_ROWS, BLOCK_G] slice of each pair tile is live, not the whole
    # G x G tile (at G = 128 the whole tiles do not fit the registers)
    key, slope, implicit = response_terms(policy, ref, length, beta, orpo_lambda, LOSS)
    zero = tl.zeros([BLOCK_G], dtype=ACC)
    loss_sum = tl.sum(zero, axis=0)
    correct = loss_sum
    log_odds_ratio = loss_sum
    log_odds_chosen = loss_sum
    row_grad, col_grad, chosen_count, rejected_count = zero, zero, zero, zero
    for start in range(0, BLOCK_G, PAIR_ROWS):
        rows = start + tl.arange(0, PAIR_ROWS)
        if PAIRS == 0:
            valid_i = rows_of(valid.to(tl.int32), rows, BLOCK_G, PAIR_ROWS) > 0
            reward_i = rows_of(reward, rows, BLOCK_G, PAIR_ROWS)
            counts = tl.where(valid_i[:, None] & valid[None, :] & (reward_i[:, None] > reward[None, :]), 1.0, 0.0)
        elif PAIRS == 3:
            counts, bad_pairs = explicit_counts(pair_index_ptr + b * P * 2, P, rows, valid, BLOCK_G, ACC)
        else:
            one_pair = tl.where((rows[:, None] == chosen) & (offs[None, :] == rejected), 1.0, 0.0)
            counts = tl.where(exists, one_pair, 0.0)
        weight_i = rows_of(weight, rows, BLOCK_G, PAIR_ROWS)
        loss, dloss, odds = pair_loss_terms(rows_of(key, rows, BLOCK_G, PAIR_ROWS), key, weight_i,
                                            rows_of(policy, rows, BLOCK_G, PAIR_ROWS), beta, orpo_lambda,
                                            simpo_gamma, LOSS, ORPO_DORPO)
        if LOSS == 2 and ORPO_DORPO:
            outer = counts  # the weight is inside DORPO's log-sigmoid
        else:
            outer = counts * weight_i[:, None]
        paired = counts > 0.0
        loss_sum += tl.sum(tl.sum(tl.where(paired, outer * loss, 0.0), axis=1), axis=0)
        per_pair = tl.where(paired, outer * dloss, 0.0)
        row_grad += at_rows(tl.sum(per_pair, axis=1), rows, BLOCK_G, PAIR_ROWS)
        col_grad += tl.sum(per_pair, axis=0)
        chosen_count += at_rows(tl.sum(counts, axis=1), rows, BLOCK_G, PAIR_ROWS)
        rejected_count += tl.sum(counts, axis=0)
        implicit_i = rows_of(implicit, rows, BLOCK_G, PAIR_ROWS)
        correct += tl.sum(tl.sum(tl.where(implicit_i[:, None] > implicit[None, :], counts, 0.0), axis=1), axis=0)
        log_odds_ratio += tl.sum(tl.sum(tl.where(paired, -counts * softplus(-odds), 0.0), axis=1), axis=0)
        log_odds_chosen += tl.sum(tl.sum(tl.where(paired, counts * odds, 0.0), axis=1), axis=0)
    grad = slope * (row_grad - col_grad)
    weighted_count = chosen_count * weight  # sum_j C_ij w_i
    if LOSS == 2 and not ORPO_DORPO:
        grad -= weighted_count  # the per-pair NLL -pi_i
    tl.store(grad_policy_ptr + b * G + offs, tl.where(valid, grad, 0.0), mask=offs < G)
    # pair counts of each response: the backward's NLL gradient and the callers' per-pair statistics
    tl.store(chosen_counts_ptr + b * G + offs, tl.where(valid, chosen_count, 0.0), mask=offs < G)
    tl.store(rejected_counts_ptr + b * G + offs, tl.where(valid, rejected_count, 0.0), mask=offs < G)
    # the NLL term's sums over the chosen sequences (defaults: the policy log-probs, one token each)
    if HAS_NLL_LOGPS:
        nll_logps = tl.load(nll_logps_ptr + b * G + offs, mask=valid, other=0.0).to(ACC)
    else:
        nll_logps = policy
    if HAS_NLL_TOKENS:
        nll_tokens = tl.load(nll_tokens_ptr + b * G + offs, mask=valid, other=0.0).to(ACC)
    else:
        nll_tokens = tl.full([BLOCK_G], 1.0, ACC)

    num_pairs = tl.sum(chosen_count, axis=0)
    stats = stats_ptr + b * NUM_STATS
    tl.store(stats + COL_WEIGHTED_LOSS, loss_sum)
    tl.store(stats + COL_PAIRS, num_pairs)
    tl.store(stats + COL_CHOSEN_REWARD, tl.sum(chosen_count * implicit, axis=0))
    tl.store(stats + COL_REJECTED_REWARD, tl.sum(rejected_count * implicit, axis=0))
    tl.store(stats + COL_CORRECT, correct)
    tl.store(stats + COL_NO_PAIRS, tl.where(num_pairs == 0.0, 1.0, 0.0))
    tl.store(stats + COL_DEVIATION, tl.sum(dev, axis=0))
    tl.store(stats + COL_MEAN_SIMILARITY, mean_similarity)
    tl.store(stats + COL_HAS_SIMILARITY, has_similarity)
    tl.store(stats + COL_LOGDET, logdet)
    tl.store(stats + COL_VALID, tl.sum(valid.to(ACC), axis=0))
    tl.store(stats + COL_EMB_NONFINITE, emb_nonfinite)
    tl.store(stats + COL_WEIGHT_SUM, tl.sum(tl.where(valid, weighted_count, 0.0), axis=0))
    tl.store(stats + COL_NLL_LOGPS, tl.sum(tl.where(valid, chosen_count * nll_logps, 0.0), axis=0))
    tl.store(stats + COL_NLL_TOKENS, tl.sum(tl.where(valid, chosen_count * nll_tokens, 0.0), axis=0))
    tl.store(stats + COL_LOGPS_CHOSEN, tl.sum(tl.where(valid, chosen_count * policy, 0.0), axis=0))
    tl.store(stats + COL_LOGPS_REJECTED, tl.sum(tl.where(valid, rejected_count * policy, 0.0), axis=0))
    tl.store(stats + COL_LOG_ODDS_RATIO, log_odds_ratio)
    tl.store(stats + COL_LOG_ODDS_CHOSEN, log_odds_chosen)
    if CHECK:  # the data checks of check_inputs=True: 1 where group b fails one (CHECK_STATS)
        tl.store(stats + COL_BAD_POLICY_LOGPS, any_bad(valid & ~is_finite(policy)))
        tl.store(stats + COL_BAD_REWARDS, any_bad(valid & ~is_finite(reward)))
        if HAS_REF:
            tl.store(stats + COL_BAD_REF_LOGPS, any_bad(valid & ~is_finite(ref)))
        else:
            tl.store(stats + COL_BAD_REF_LOGPS, 0.0)
        if HAS_SCORES and PAIRS == 2:
            tl.store(stats + COL_BAD_DIVPO_SCORES, any_bad(valid & ~is_finite(top_score)))
        else:
            tl.store(stats + COL_BAD_DIVPO_SCORES, 0.0)
        if WEIGHTS == 3:
            tl.store(stats + COL_BAD_WEIGHTS, any_bad(valid & ~is_finite(weight)))
        else:
            tl.store(stats + COL_BAD_WEIGHTS, 0.0)
        tl.store(stats + COL_BAD_TOKEN_COUNTS, any_bad(valid & ~(is_finite(length) & (length > 0.0))))
        tl.store(stats + COL_BAD_NLL_LOGPS, any_bad(valid & ~is_finite(nll_logps)))
        tl.store(stats + COL_BAD_NLL_TOKENS, any_bad(valid & ~(is_finite(nll_tokens) & (nll_tokens > 0.0))))
        if NEED_TWO:
            tl.store(stats + COL_TOO_FEW_RESPONSES, tl.where(tl.sum(valid.to(ACC), axis=0) < 2.0, 1.0, 0.0))
        else:
            tl.store(stats + COL_TOO_FEW_RESPONSES, 0.0)
        if LOSS == 2:
            tl.store(stats + COL_ORPO_NONNEGATIVE, any_bad(valid & (policy >= 0.0)))
        else:
            tl.store(stats + COL_ORPO_NONNEGATIVE, 0.0)
        if PAIRS == 3:
            tl.store(stats + COL_BAD_PAIR_INDEX, tl.where(bad_pairs > 0, 1.0, 0.0))
        else:
            tl.store(stats + COL_BAD_PAIR_INDEX, 0.0)
        tl.store(stats + COL_FACTORIZATION_FAILED, tl.where(logdet == logdet, 0.0, 1.0))


# The forward's arguments after the group index, in group_forward's order (the finalize kernel's
# fix-up passes the same ones).
@triton.jit(do_not_specialize=["G", "P", "stride_b"])  # sizes that vary over a run: common.py
def _group_loss_forward_kernel(
    emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr, scores_ptr, weights_ptr, lengths_ptr,
    nll_logps_ptr, nll_tokens_ptr, stats_ptr, grad_policy_ptr, chosen_counts_ptr, rejected_counts_ptr, sim_ptr,
    norms_ptr, inverse_ptr, logdet_ptr, G, D, P, stride_b, stride_g, stride_d, beta: tl.float64,
    orpo_lambda: tl.float64, simpo_gamma: tl.float64, min_deviation: tl.float64, eps: tl.float64,
    quality_quantile: tl.float64, LOSS: tl.constexpr, PAIRS: tl.constexpr, WEIGHTS: tl.constexpr, NORM: tl.constexpr,
    ORPO_DORPO: tl.constexpr, DIVPO_RANKED: tl.constexpr, HAS_EMB: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_REF: tl.constexpr, HAS_SCORES: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_NLL_LOGPS: tl.constexpr,
    HAS_NLL_TOKENS: tl.constexpr, NEED_LOGDET: tl.constexpr, STORE_STATE: tl.constexpr, NUM_STATS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, CHECK: tl.constexpr,
    NEED_TWO: tl.constexpr, PAIR_ROWS: tl.constexpr, DIVERSITY_STORED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Step 1 (1b of a split forward): one program per group, ``K`` swept in the accumulation dtype
    (a float32 sweep that fails leaves NaN, which the finalize kernel's fix-up replaces)."""
    beta = as_acc(beta, ACC)
    orpo_lambda = as_acc(orpo_lambda, ACC)
    simpo_gamma = as_acc(simpo_gamma, ACC)
    min_deviation = as_acc(min_deviation, ACC)
    eps = as_acc(eps, ACC)
    quality_quantile = as_acc(quality_quantile, ACC)
    group_forward(
        tl.program_id(0).to(tl.int64), emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr,
        scores_ptr, weights_ptr, lengths_ptr, nll_logps_ptr, nll_tokens_ptr, stats_ptr, grad_policy_ptr,
        chosen_counts_ptr, rejected_counts_ptr, sim_ptr, norms_ptr, inverse_ptr, logdet_ptr, G, D, P, stride_b,
        stride_g, stride_d, beta, orpo_lambda, simpo_gamma, min_deviation, eps, quality_quantile, LOSS, PAIRS,
        WEIGHTS, NORM, ORPO_DORPO, DIVPO_RANKED, HAS_EMB, HAS_MASK, HAS_REF, HAS_SCORES, HAS_LENGTHS, HAS_NLL_LOGPS,
        HAS_NLL_TOKENS, NEED_LOGDET, STORE_STATE, NUM_STATS, BLOCK_G, BLOCK_D, ACC, PRECISION, CHECK, NEED_TWO,
        PAIR_ROWS, False, DIVERSITY_STORED, ALIGNED)


@triton.jit
def explicit_pair(pair_index_ptr, p, valid, BLOCK_G: tl.constexpr):
    """Row ``p`` of one group's ``pair_index [P, 2]``: ``(chosen, rejected, good, padding)``; ``good``:
    two different valid responses; ``(-1, -1)`` rows are padding."""
    offs = tl.arange(0, BLOCK_G)
    # in the index's own dtype: an int64 index >= 2^31 narrowed to int32 could wrap onto a valid response
    chosen = tl.load(pair_index_ptr + 2 * p)
    rejected = tl.load(pair_index_ptr + 2 * p + 1)
    chosen_valid = tl.sum(tl.where((offs == chosen) & valid, 1, 0), axis=0) > 0
    rejected_valid = tl.sum(tl.where((offs == rejected) & valid, 1, 0), axis=0) > 0
    return chosen, rejected, chosen_valid & rejected_valid & (chosen != rejected), (chosen < 0) & (rejected < 0)


@triton.jit
def explicit_counts(pair_index_ptr, P, rows, valid, BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    """``(C[rows, :], bad)``: how often each (chosen in ``rows``, rejected) is a good row of
    ``pair_index``, and how many rows name no two different valid responses (out of range, padded,
    equal, or half negative; the same for every ``rows``)."""
    offs = tl.arange(0, BLOCK_G)
    counts = tl.zeros([rows.shape[0], BLOCK_G], dtype=ACC)
    bad = tl.sum(tl.zeros([BLOCK_G], dtype=tl.int32), axis=0)
    for p in range(0, P):
        chosen, rejected, good, padding = explicit_pair(pair_index_ptr, p, valid, BLOCK_G)
        counts += tl.where((rows[:, None] == chosen) & (offs[None, :] == rejected) & good, 1.0, 0.0)
        bad += tl.where(padding | good, 0, 1)
    return counts, bad


@triton.jit
def pick(vector, index, BLOCK: tl.constexpr):
    """Element ``index`` of a ``[BLOCK]`` vector."""
    return tl.sum(tl.where(tl.arange(0, BLOCK) == index, vector, 0.0), axis=0)


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
    norms_ptr, inverse_ptr, G, D, P, stride_b, stride_g, stride_d, beta: tl.float64, orpo_lambda: tl.float64,
    simpo_gamma: tl.float64, min_deviation: tl.float64, eps: tl.float64, quality_quantile: tl.float64,
    NUM_STATS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, DORPO: tl.constexpr, HAS_CPO: tl.constexpr,
    ACC: tl.constexpr, LOSS: tl.constexpr, PAIRS: tl.constexpr, WEIGHTS: tl.constexpr, NORM: tl.constexpr,
    DIVPO_RANKED: tl.constexpr, HAS_EMB: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_SCORES: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_NLL_LOGPS: tl.constexpr, HAS_NLL_TOKENS: tl.constexpr,
    STORE_STATE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    CHECK: tl.constexpr, NEED_TWO: tl.constexpr, PAIR_ROWS: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Step 2 when the forward swept ``K`` in float32 (Triton, with a logdet). First, every group
    whose float32 sweep failed runs the group forward again with a float64 sweep and overwrites its
    outputs; such a group's logdet is NaN, the forward's device-side flag. Then
    :func:`finalize_batch`. This keeps the float64 tile out of the forward kernel's registers and
    the fused loss at four launches. Such groups are rare (``K`` near singular in float32), and this
    one program redoes them one after another. Up to G = 64: the split forward (G = 128) fixes its
    logdet launch's groups itself, before its second launch reads them."""
    batch_div = as_acc(batch_div, ACC)
    diversity_alpha = as_acc(diversity_alpha, ACC)
    cpo_alpha = as_acc(cpo_alpha, ACC)
    beta = as_acc(beta, ACC)
    orpo_lambda = as_acc(orpo_lambda, ACC)
    simpo_gamma = as_acc(simpo_gamma, ACC)
    min_deviation = as_acc(min_deviation, ACC)
    eps = as_acc(eps, ACC)
    quality_quantile = as_acc(quality_quantile, ACC)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        logdets = tl.load(stats_ptr + rows * NUM_STATS + COL_LOGDET, mask=rows < B, other=0.0)
        if tl.sum((logdets != logdets).to(tl.int32), axis=0) > 0:
            for b in range(start, tl.minimum(start + BLOCK_B, B)):
                logdet = tl.load(stats_ptr + b * NUM_STATS + COL_LOGDET)
                if logdet != logdet:
                    group_forward(
                        tl.cast(b, tl.int64), emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr,
                        scores_ptr, weights_ptr, lengths_ptr, nll_logps_ptr, nll_tokens_ptr, stats_ptr,
                        grad_policy_ptr, chosen_counts_ptr, rejected_counts_ptr, sim_ptr, norms_ptr, inverse_ptr,
                        stats_ptr, G, D, P, stride_b, stride_g, stride_d, beta, orpo_lambda, simpo_gamma,
                        min_deviation, eps, quality_quantile, LOSS, PAIRS, WEIGHTS, NORM, DORPO, DIVPO_RANKED,
                        HAS_EMB, HAS_MASK, HAS_REF, HAS_SCORES, HAS_LENGTHS, HAS_NLL_LOGPS, HAS_NLL_TOKENS, True,
                        STORE_STATE, NUM_STATS, BLOCK_G, BLOCK_D, ACC, PRECISION, CHECK, NEED_TWO, PAIR_ROWS, True,
                        False, ALIGNED)  # the whole group again (stats_ptr: the unread logdet_ptr)
    tl.debug_barrier()  # the rewritten stats rows (written by other threads) are summed next
    finalize_batch(stats_ptr, totals_ptr, loss_ptr, metrics_ptr, B, batch_div, diversity_alpha, cpo_alpha, NUM_STATS,
                   BLOCK_S, BLOCK_B, DORPO, HAS_CPO, ACC)


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


@triton.jit(do_not_specialize=["G", "stride_eb"])  # sizes that vary over a run: common.py
def _group_loss_backward_kernel(
    grad_loss_ptr, totals_ptr, grad_sum_ptr, chosen_counts_ptr, grad_policy_ptr, grad_ref_ptr, grad_nll_ptr,
    inverse_ptr, sim_ptr, norms_ptr, mask_ptr, emb_ptr, grad_emb_ptr,
    G, D, stride_eb, stride_eg, stride_ed, alpha_over_batch: tl.float64, cpo_alpha: tl.float64,
    DORPO: tl.constexpr, HAS_CPO: tl.constexpr, NLL_TO_POLICY: tl.constexpr, NEED_POLICY: tl.constexpr,
    NEED_REF: tl.constexpr, NEED_NLL: tl.constexpr, EMB_GRAD: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Gradients of group ``b`` from the upstream ``g`` (read on the device): log-probs in the
    programs of D slice 0, ``emb`` (the regularizer) slice by slice."""
    alpha_over_batch = as_acc(alpha_over_batch, ACC)
    cpo_alpha = as_acc(cpo_alpha, ACC)
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    g = tl.load(grad_loss_ptr).to(ACC)
    per_pair = tl.maximum(tl.load(totals_ptr + COL_PAIRS).to(ACC), 1.0)
    if tl.program_id(1) == 0:
        inside = offs < G
        grad = tl.load(grad_sum_ptr + b * G + offs, mask=inside, other=0.0).to(ACC) * (g / per_pair)
        if DORPO or HAS_CPO:
            # d (c NLL) / d nll_logps_k = -c chosen_k / sum_P nll_tokens
            if DORPO:
                coef = tl.load(totals_ptr + COL_WEIGHT_SUM).to(ACC) / per_pair
            else:
                coef = cpo_alpha
            tokens = tl.maximum(tl.load(totals_ptr + COL_NLL_TOKENS).to(ACC), 1e-30)
            chosen = tl.load(chosen_counts_ptr + b * G + offs, mask=inside, other=0.0).to(ACC)
            grad_nll = -chosen * (g * coef / tokens)
            if NLL_TO_POLICY:
                if NEED_POLICY:
                    tl.store(grad_policy_ptr + b * G + offs, (grad + grad_nll).to(grad_policy_ptr.dtype.element_ty),
                             mask=inside)
            else:
                if NEED_POLICY:
                    tl.store(grad_policy_ptr + b * G + offs, grad.to(grad_policy_ptr.dtype.element_ty), mask=inside)
                if NEED_NLL:
                    tl.store(grad_nll_ptr + b * G + offs, grad_nll.to(grad_nll_ptr.dtype.element_ty), mask=inside)
        else:
            if NEED_POLICY:
                tl.store(grad_policy_ptr + b * G + offs, grad.to(grad_policy_ptr.dtype.element_ty), mask=inside)
        if NEED_REF:  # z = pi - ref: the reference's gradient is the pair part's, negated
            tl.store(grad_ref_ptr + b * G + offs, (-grad).to(grad_ref_ptr.dtype.element_ty), mask=inside)
    if EMB_GRAD:  # d (-alpha / B sum_b logdet_b) / dS = -alpha g / B K^-1 on valid pairs (mode 2, no gains)
        valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
        emb_backward(b, tl.program_id(1) * BLOCK_D, valid, inverse_ptr, inverse_ptr, inverse_ptr, -alpha_over_batch * g,
                     sim_ptr, norms_ptr, mask_ptr, emb_ptr, grad_emb_ptr, G, D, 0.0, 0, 0, 0, stride_eb, stride_eg,
                     stride_ed, 2, False, 0, HAS_MASK, BLOCK_G, BLOCK_K, BLOCK_D, ACC, PRECISION, ALIGNED)


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
    scalars = (config.beta, config.orpo_lambda, config.simpo_gamma, config.min_deviation, config.eps,
               config.quality_quantile)
    logdet = None
    if constants["DIVERSITY_STORED"]:  # the first launch of a split forward: the similarity or logdet forward
        sim, norms, inverse = buffers[3:]
        if not store_state:  # S, norms (and K^-1) into scratch, which the second launch reads and nothing keeps
            sim, norms = new_output(square_shape(batch, group), acc, device, poison), new_output((batch, group), acc,
                                                                                                 device, poison)
            inverse = new_output(square_shape(batch, group), acc, device, poison) if constants["NEED_LOGDET"] else None
            buffers = (*buffers[:3], sim, norms, inverse)
        if constants["NEED_LOGDET"]:
            # logdet [B], then gains [B, G] (unread) from the next 16-byte boundary: an aligned pointer whatever
            # B is (one compiled variant, common.py "Bounded compiles")
            head = -(-batch * acc.itemsize // 16) * 16 // acc.itemsize
            logdet_gains = new_output((head + batch * group,), acc, device, poison)
            logdet = logdet_gains[:batch]
            # and, in float32, its float64 fix-up launch (logdet.fixup_launches): the second launch then
            # reads a finished logdet and K^-1, and the plain finalize kernel follows (no whole-group fix-up)
            for fixup in logdet_op.fixup_launches(acc):
                logdet_op.launch_forward(emb, inputs.mask, config.eps, "cosine", None,
                                         (logdet, logdet_gains[head:].view(batch, group), inverse, sim, norms),
                                         fixup, acc)
        else:
            similarity_op.launch_forward(emb, inputs.mask, "cosine", None, sim, norms, acc)
    _group_loss_forward_kernel[(batch,)](*given, out.stats, *buffers, logdet, *sizes, *scalars, **constants)
    if constants["NEED_LOGDET"] and acc == torch.float32 and not constants["DIVERSITY_STORED"]:
        out.fixup = ((*given, *buffers, *sizes, *scalars),
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
        LOSS=config.loss_mode, PAIRS=config.pair_mode, WEIGHTS=config.weight_mode, NORM=config.norm_mode,
        ORPO_DORPO=config.dorpo, DIVPO_RANKED=config.ranked_pools, HAS_EMB=has_emb, HAS_MASK=has_mask,
        HAS_REF=has_ref, HAS_SCORES=has_scores, HAS_LENGTHS=has_lengths, HAS_NLL_LOGPS=has_nll_logps,
        HAS_NLL_TOKENS=has_nll_tokens, NEED_LOGDET=config.needs_logdet and has_emb, STORE_STATE=store_state,
        NUM_STATS=num_stats, BLOCK_G=block_g, BLOCK_D=embedding_block(block_g, dim, emb_dtype or acc),
        ACC=triton_dtype(acc),
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


@functools.lru_cache(maxsize=256)
def _fixup_constants(*forward_key: object) -> dict[str, object]:
    """The forward kernel's constants (``_forward_constants(*forward_key)``) that the fix-up's group
    forward takes; the rest are the finalize kernel's, or fixed (the fix-up runs only with a logdet)."""
    shared = {"ORPO_DORPO", "NEED_LOGDET", "NUM_STATS", "ACC", "DIVERSITY_STORED"}
    constants = {name: value for name, value in _forward_constants(*forward_key).items() if name not in shared}
    if constants["PRECISION"] == "ieee":  # float32 emb
        constants["BLOCK_D"] = fixup_fp32_block_d()
    return {**constants, **fixup_options(constants["BLOCK_G"])}


@functools.cache
def fixup_fp32_block_d() -> int:
    """Columns of float32 ``emb`` per step of the fix-up's Gram (the forward's: ``embedding_block``, 16
    at G = 64): the narrowest float32 ``tl.dot`` the installed Triton compiles for NVIDIA GPUs, 8 from
    Triton 3.7 on, 16 before. Next to the float64 tiles a [64, 16] float32 slice leaves the fix-up +
    finalize kernel 16 bytes of spill at G = 64 (DivPO, 255 registers, sm_90, Triton 3.9); 8 columns
    leave none (benchmarks/README.md). One column at a time (rank-1 updates) spilled 40 bytes there."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size

        fp32 = tl.float32
        return max(8, int(min_dot_size(GPUTarget("cuda", 90, 32))(fp32, fp32)[2]))
    except Exception:  # another backend or layout of Triton: the width every version accepts
        return MIN_BLOCK


def fixup_options(block_g: int) -> dict[str, int]:
    """Launch options of the fix-up + finalize kernel. It is one program (grid ``(1,)``) that redoes a
    failed group's whole forward with a float64 sweep, so blocks per SM do not matter, and its float64
    tiles are twice the forward's bytes: 4 warps up to G = 16 and 8 at G = 32-64, with ``maxnreg`` 255
    so that ptxas does not cap the registers for occupancy (with the forward's 1 / 4 warps, or with its
    own cap of 128 at 4 warps, it spilled 8-24 bytes there: benchmarks/README.md). It does not run at
    G = 128, where the split forward's logdet launch has its own float64 fix-up (:func:`triton_forward`);
    a whole group forward with a float64 128 x 128 tile in one program spilled 320-432 bytes there."""
    return {"num_warps": 4 if block_g <= 16 else 8, "maxnreg": 255}


@functools.lru_cache(maxsize=64)
def _finalize_constants(config: LossConfig, num_stats: int, acc: torch.dtype) -> dict[str, object]:
    return dict(NUM_STATS=num_stats, BLOCK_S=next_power_of_2(num_stats), BLOCK_B=64, DORPO=config.dorpo,
                HAS_CPO=config.cpo_alpha > 0, ACC=triton_dtype(acc))


@functools.lru_cache(maxsize=256)
def _backward_constants(config: LossConfig, group: int, dim: int, emb_dtype: torch.dtype | None, acc: torch.dtype,
                        needs: tuple[bool, ...], has_mask: bool, aligned: bool) -> dict[str, object]:
    """``needs``: policy, ref, nll gradients, NLL inside policy_logps, emb gradient in Triton; ``aligned``:
    ``common.rows_aligned(emb)``."""
    need_policy, need_ref, need_nll, nll_to_policy, emb_grad = needs
    block_g = group_block(group)
    return dict(DORPO=config.dorpo, HAS_CPO=config.cpo_alpha > 0, NLL_TO_POLICY=nll_to_policy,
                NEED_POLICY=need_policy, NEED_REF=need_ref, NEED_NLL=need_nll, EMB_GRAD=emb_grad,
                HAS_MASK=has_mask, BLOCK_G=block_g, BLOCK_K=column_block(block_g),
                BLOCK_D=embedding_block(block_g, dim, emb_dtype or acc),
                ACC=triton_dtype(acc),
                PRECISION=dot_precision(emb_dtype if emb_dtype is not None else acc), ALIGNED=aligned,
                num_warps=backward_warps(block_g))


def fused_forward(inputs: LossTensors, config: LossConfig, store_state: bool) -> tuple[ForwardOutputs, torch.Tensor,
                                                                                       torch.Tensor, torch.Tensor]:
    """Steps 1 and 2: ``(per-group outputs, totals, loss, metrics vector)`` in two launches."""
    policy, emb = inputs.policy, inputs.emb
    acc = accumulation_dtype(policy.dtype, *((emb.dtype,) if emb is not None else ()))
    out = FORWARDS[config.kernel_backend](inputs, config, store_state, acc)
    totals, loss, metrics = finalize(out.stats, policy.shape[0], config, reference.compute_dtype(policy.dtype),
                                     inputs.poison, out.fixup)
    return out, totals, loss, metrics


def fused_backward(grad_loss: torch.Tensor, saved: tuple[torch.Tensor | None, ...], config: LossConfig,
                   needs: tuple[bool, bool, bool], dtypes: tuple[torch.dtype | None, ...],
                   poison: bool) -> tuple[torch.Tensor | None, ...]:
    """Step 3, one launch (the CUDA backend adds its own emb backward): ``(d policy, d ref, d emb,
    d nll_logps)`` from the upstream ``grad_loss`` (read on the device) and the forward's
    ``saved = (grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse)``; None where not needed."""
    grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse = saved
    policy_dtype, ref_dtype, nll_dtype = dtypes
    batch, group = grad_sum.shape
    device = grad_sum.device
    need_policy, need_ref, need_nll = needs
    need_ref = need_ref and config.loss in ("dpo", "ipo")
    need_nll = need_nll and config.has_nll
    grads = {
        "policy": new_output((batch, group), policy_dtype, device, poison) if need_policy else None,
        "ref": new_output((batch, group), ref_dtype, device, poison) if need_ref else None,
        "nll": new_output((batch, group), nll_dtype, device, poison) if need_nll else None,
    }
    emb_in_triton = emb is not None and config.kernel_backend == "triton"
    grad_emb = new_output(emb.shape, emb.dtype, device, poison) if emb_in_triton else None
    dim = emb.shape[2] if emb is not None else 1
    constants = _backward_constants(config, group, dim, None if emb is None else emb.dtype, grad_sum.dtype,
                                    (need_policy, need_ref, need_nll, nll_dtype is None, emb_in_triton),
                                    mask is not None, emb is not None and rows_aligned(emb))
    chunks = -(-dim // constants["BLOCK_D"]) if emb_in_triton else 1  # ceil(D / BLOCK_D)
    _group_loss_backward_kernel[(batch, chunks)](
        grad_loss, totals, grad_sum, chosen_counts, grads["policy"], grads["ref"], grads["nll"],
        inverse, sim, norms, mask, emb, grad_emb, group, dim, *(emb.stride() if emb is not None else (0, 0, 0)),
        config.diversity_alpha / max(batch, 1), config.cpo_alpha, **constants)
    if emb is not None and not emb_in_triton:  # the CUDA extension's own emb backward
        grad_emb = cuda_backend.similarity_backward(sim, norms, inverse, emb, mask, grad_loss,
                                                    -config.diversity_alpha / max(batch, 1))
    return grads["policy"], grads["ref"], grad_emb, grads["nll"]


class GroupPreferenceLossFunction(torch.autograd.Function):
    """The loss, differentiable w.r.t. the policy, reference and NLL log-probs and emb (eager
    mode; under ``torch.compile`` the same steps run as the custom ops below). The
    non-differentiable outputs (metrics vector, per-group stats, totals, chosen / rejected counts)
    come back in ``inputs.aux``, outside autograd, which would only record them as constants."""

    @staticmethod
    def forward(ctx, policy: torch.Tensor, ref: torch.Tensor | None, emb: torch.Tensor | None,
                nll_logps: torch.Tensor | None, inputs: LossTensors, config: LossConfig) -> torch.Tensor:
        store_state = emb is not None and ctx.needs_input_grad[2] and config.diversity_alpha > 0
        out, totals, loss, metrics = fused_forward(inputs, config, store_state)
        ctx.save_for_backward(out.grad_policy, out.chosen_counts, totals, emb if store_state else None, inputs.mask,
                              out.sim, out.norms, out.inverse)
        ctx.config = config
        ctx.dtypes = (policy.dtype, None if ref is None else ref.dtype, None if nll_logps is None else nll_logps.dtype)
        ctx.poison = inputs.poison
        ctx.set_materialize_grads(False)
        inputs.aux = (metrics, out.stats, totals, out.chosen_counts, out.rejected_counts)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor | None):
        if grad_loss is None:
            return None, None, None, None, None, None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        return (*fused_backward(grad_loss, ctx.saved_tensors, ctx.config, needs, ctx.dtypes, ctx.poison), None, None)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: the same steps, opaque to torch.compile (no graph break, capturable by
# CUDA graphs with check_inputs=False). Optional outputs come back empty (0 elements).
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("divkernels::group_loss_forward", mutates_args=())
def group_loss_forward_op(policy: torch.Tensor, rewards: torch.Tensor, ref: torch.Tensor | None,
                          emb: torch.Tensor | None, mask: torch.Tensor | None, pair_index: torch.Tensor | None,
                          scores: torch.Tensor | None, weights: torch.Tensor | None, lengths: torch.Tensor | None,
                          nll_logps: torch.Tensor | None, nll_tokens: torch.Tensor | None, config: str,
                          store_state: bool, too_few_reason: str) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, metrics, stats, totals, chosen_counts, rejected_counts, grad_sum, sim, norms, inverse)``;
    ``config`` is :attr:`LossConfig.key`. With the config's in-kernel checks a failure raises here."""
    loss_config = LossConfig.from_key(config)
    inputs = LossTensors(policy, rewards, ref, emb, mask, pair_index, scores, weights, lengths, nll_logps,
                         nll_tokens, poison_outputs())
    out, totals, loss, metrics = fused_forward(inputs, loss_config, store_state)
    if loss_config.check_inputs:
        raise_kernel_checks(totals, out.stats, policy.shape[1], too_few_reason or None,
                            None if emb is None else emb.dtype)
    return (loss, metrics, out.stats, totals, out.chosen_counts, out.rejected_counts, out.grad_policy,
            *(policy.new_empty(0, dtype=out.stats.dtype) if state is None else state  # distinct: no aliasing
              for state in (out.sim, out.norms, out.inverse)))


@group_loss_forward_op.register_fake
def _(policy, rewards, ref, emb, mask, pair_index, scores, weights, lengths, nll_logps, nll_tokens, config,
      store_state, too_few_reason):
    loss_config = LossConfig.from_key(config)
    batch, group = policy.shape
    acc = accumulation_dtype(policy.dtype, *((emb.dtype,) if emb is not None else ()))
    num_stats = len(STATS) + (len(CHECK_STATS) if loss_config.check_inputs else 0)

    def new(*shape: int) -> torch.Tensor:
        return policy.new_empty(shape, dtype=acc)

    # the kernels' padded rows (common.square_shape) on Triton; the CUDA extension's [B, G, G]
    square = ((square_shape(batch, group) if loss_config.kernel_backend == "triton" else (batch, group, group))
              if store_state else (0,))
    return (policy.new_empty((), dtype=reference.compute_dtype(policy.dtype)),
            policy.new_empty((len(METRIC),), dtype=torch.float32), new(batch, num_stats), new(num_stats),
            new(batch, group), new(batch, group), new(batch, group), new(*square),
            new(*((batch, group) if store_state else (0,))),
            new(*(square if store_state and loss_config.needs_logdet else (0,))))


@torch.library.custom_op("divkernels::group_loss_backward", mutates_args=())
def group_loss_backward_op(grad_loss: torch.Tensor, grad_sum: torch.Tensor, chosen_counts: torch.Tensor,
                           totals: torch.Tensor, emb: torch.Tensor | None, mask: torch.Tensor | None,
                           sim: torch.Tensor | None, norms: torch.Tensor | None, inverse: torch.Tensor | None,
                           config: str, need_policy: bool, need_ref: bool, need_nll: bool,
                           policy_dtype: torch.dtype, ref_dtype: torch.dtype | None,
                           nll_dtype: torch.dtype | None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d policy, d ref, d emb, d nll_logps)``; empty where not needed."""
    grads = fused_backward(grad_loss, (grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse),
                           LossConfig.from_key(config), (need_policy, need_ref, need_nll),
                           (policy_dtype, ref_dtype, nll_dtype), poison_outputs())
    return tuple(grad_sum.new_empty(0) if grad is None else grad for grad in grads)


@group_loss_backward_op.register_fake
def _(grad_loss, grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse, config, need_policy, need_ref,
      need_nll, policy_dtype, ref_dtype, nll_dtype):
    loss_config = LossConfig.from_key(config)
    shape = grad_sum.shape
    need_ref = need_ref and loss_config.loss in ("dpo", "ipo")
    need_nll = need_nll and loss_config.has_nll
    return (grad_sum.new_empty(shape if need_policy else (0,), dtype=policy_dtype),
            grad_sum.new_empty(shape if need_ref else (0,), dtype=ref_dtype or grad_sum.dtype),
            grad_sum.new_empty(0) if emb is None else torch.empty_like(emb),
            grad_sum.new_empty(shape if need_nll else (0,), dtype=nll_dtype or grad_sum.dtype))


def _forward_op_setup(ctx, inputs: tuple, output: tuple) -> None:
    policy, _, ref, emb, mask, *_, nll_logps, _, config, store_state, _ = inputs
    _, _, _, totals, chosen_counts, _, grad_sum, sim, norms, inverse = output
    ctx.save_for_backward(grad_sum, chosen_counts, totals, emb if store_state else None, mask,
                          *(state if store_state else None for state in (sim, norms, inverse)))
    ctx.config = config
    ctx.dtypes = (policy.dtype, None if ref is None else ref.dtype, None if nll_logps is None else nll_logps.dtype)


def _forward_op_backward(ctx, grad_loss: torch.Tensor, *_unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = group_loss_backward_op(grad_loss, grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse,
                                   ctx.config, need[0], need[2], need[9], *ctx.dtypes)
    # an empty gradient is one the op did not need (or of an empty batch, where None means the same zeros)
    policy, ref, emb_grad, nll = (grad if grad.numel() else None for grad in grads)
    return policy, None, ref, emb_grad, None, None, None, None, None, nll, None, None, None, None


group_loss_forward_op.register_autograd(_forward_op_backward, setup_context=_forward_op_setup)


@torch._dynamo.assume_constant_result
def _config_for_compile(*fields: object) -> tuple[str, tuple[str, ...], bool]:
    """``(LossConfig key, metric names, needs logdet)``, made once while torch.compile traces."""
    config = LossConfig(*fields[:-1])
    return config.key, metric_names(config, fields[-1]), config.needs_logdet


def _within_cuda_limits(resolved: str, group: int, policy: torch.Tensor, emb: torch.Tensor | None,
                        device: torch.device) -> str:
    """``resolved``, or the Triton kernels (the reference without Triton) where the CUDA kernels cannot
    hold the group in shared memory (float64 at G > ~100: :func:`divkernels.backends.cuda.fits`)."""
    if resolved != "cuda":
        return resolved
    acc = accumulation_dtype(policy.dtype, *((emb.dtype,) if emb is not None else ()))
    if cuda_backend.fits(group, acc, device):
        return resolved
    return "triton" if backend_unavailable_reason("triton", device) is None else "reference"


def _compiled_group_preference_loss(args: GroupLossArguments, options: dict, check_inputs: bool) -> LossOutput:
    """:func:`group_preference_loss` while ``torch.compile`` traces it: the kernels run as the
    custom ops above, Triton's data checks inside its op (one sync there), the other checks as
    device-side asserts (no sync, no group list); pass ``check_inputs=False`` for CUDA graphs. The
    reference backend is traced as the PyTorch it is."""
    emb, extras, mask = args.emb, args.extras, args.mask
    batch, group = args.policy_logps.shape
    resolved = resolve_backend(options["backend"], op="group_preference_loss", device=args.device, group_size=group,
                               kernels=("triton", "cuda"), dim=None if emb is None else emb.shape[-1],
                               emb_dtype=None if emb is None else emb.dtype)
    resolved = _within_cuda_limits(resolved, group, args.policy_logps, emb, args.device)
    valid = reference.valid_mask(mask, batch, group, args.device)
    in_kernel_checks = check_inputs and resolved == "triton" and len(args.encoders) <= 1
    checks = DataChecks(check_inputs and not in_kernel_checks)  # device-side asserts while compiling
    if checks.enabled:
        _host_data_checks(checks, args, valid, options["loss"])
    if resolved == "reference":
        checks.emb(emb, valid)
        reference_options = {k: v for k, v in options.items() if k not in ("pairs", "backend")}
        output = reference.group_preference_loss(args.policy_logps, args.rewards, args.encoders or None,
                                                 args.ref_logps, valid, pairs=args.pairs,
                                                 pair_index=args.pair_index, **reference_options, **extras)
        if output.logdet is not None:
            check_factorization(checks, lambda: torch.isnan(output.logdet))
        checks.raise_if_failed()
        return output
    weights = _kernel_weights(args, resolved, valid, options)
    key, names, needs_logdet = _config_for_compile(
        *_config_fields(options, args, weights is not None, in_kernel_checks, resolved), emb is not None)
    store_state = (emb is not None and emb.requires_grad and torch.is_grad_enabled()
                   and options["diversity_alpha"] > 0)
    loss, vector, stats, _, chosen_counts, rejected_counts, *_ = group_loss_forward_op(
        args.policy_logps, args.rewards, args.ref_logps, emb, contiguous(mask), args.pair_index,
        extras["divpo_scores"], None if weights is None else weights.detach(), extras["token_counts"],
        extras["nll_logps"], extras["nll_tokens"], key, store_state, args.needs_emb_reason or "")
    logdet = _logdet_column(stats, emb) if needs_logdet else None
    output = LossOutput(loss, MetricVector(vector, METRIC, names), logdet, chosen_counts, rejected_counts)
    _check_kernel_outputs(checks, output, stats, emb, in_kernel_checks)
    checks.raise_if_failed()
    return output


def _config_fields(options: dict, args: GroupLossArguments, given_weights: bool, in_kernel_checks: bool,
                   resolved: str) -> tuple:
    """:class:`LossConfig`'s fields, in order, for one call."""
    return (options["loss"], options["diversity"], args.pairs, options["beta"], options["orpo_lambda"],
            options["simpo_gamma"], options["deviation_norm"], options["min_deviation"], options["diversity_alpha"],
            options["eps"], options["quality_quantile"], options["orpo_weighting"], options["divpo_pools"],
            given_weights, options["cpo_alpha"], in_kernel_checks, args.needs_emb_reason is not None, resolved)


def _kernel_weights(args: GroupLossArguments, resolved: str, valid: torch.Tensor | Callable[[], torch.Tensor],
                    options: dict) -> torch.Tensor | None:
    """The weights the kernels take as given: the caller's, or the DDPO weights combined over several
    encoders (the kernels weigh one encoder's deviation themselves); None otherwise."""
    if len(args.encoders) <= 1:
        return args.extras["weights"]
    kernel = "triton" if resolved == "triton" else "auto"
    devs = [deviation(e.detach(), args.mask, backend=kernel, check_inputs=False) for e in args.encoders]
    return reference.deviation_weights(devs, valid() if callable(valid) else valid, options["deviation_norm"],
                                       options["min_deviation"])


def _logdet_column(stats: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """``[B]`` logdet from the per-group stats, in ``emb``'s accumulation dtype (the stats are in the call's)."""
    logdet, dtype = stats.select(1, STAT["logdet"]), reference.compute_dtype(emb.dtype)
    return logdet if logdet.dtype == dtype else logdet.to(dtype)


def _check_kernel_outputs(checks: DataChecks, output: LossOutput, stats: torch.Tensor, emb: torch.Tensor | None,
                          in_kernel_checks: bool) -> None:
    """The checks of a kernel call the forward kernel did not resolve itself: NaN/inf in ``emb`` (from the
    kernel's norms) and a failed factorization (a NaN logdet)."""
    if in_kernel_checks:
        return
    if emb is not None:  # first: a non-finite emb is why its factorization failed
        checks.emb_flagged(lambda: stats[:, STAT["emb_nonfinite"]] > 0, emb.dtype)
    if output.logdet is not None:
        check_factorization(checks, lambda: torch.isnan(output.logdet))


@functools.lru_cache(maxsize=64)
def metric_names(config: LossConfig, has_emb: bool) -> tuple[str, ...]:
    """The metrics a call reports (views of the finalize kernel's vector)."""
    names = ["loss", "pairs", "groups_without_pairs", "rewards/chosen", "rewards/rejected", "rewards/margins",
             "rewards/accuracies", "logps/chosen", "logps/rejected"]
    if config.has_nll:
        names.append("nll_loss")
    if config.loss == "orpo":
        names += ["log_odds_ratio", "log_odds_chosen"]
    if has_emb:
        names += ["diversity/mean_similarity", "diversity/deviation"]
        if config.needs_logdet:
            names.append("diversity/logdet")
    return tuple(names)


# Messages of the data checks (loss_config.CHECK_STATS; the host checks say the same), naming the failing groups.
CHECK_MESSAGES = {
    **{f"bad_{name}": NONFINITE_MESSAGE.replace("{name}", name)
       for name in ("policy_logps", "rewards", "ref_logps", "divpo_scores", "weights", "nll_logps")},
    **{f"bad_{name}": POSITIVE_MESSAGE.replace("{name}", name) for name in ("token_counts", "nll_tokens")},
    "orpo_nonnegative": "loss='orpo' needs mean token log-probs < 0 in policy_logps; groups {groups} have values >= 0",
    "bad_pair_index": "pair_index rows of groups {groups} do not name two different valid responses in [0, {group}) "
                      "(use (-1, -1) for padding rows)",
}
# The order the checks are reported in: inputs first, then what the computation found.
CHECK_ORDER = ("bad_policy_logps", "bad_rewards", "bad_ref_logps", "bad_divpo_scores", "bad_weights",
               "bad_token_counts", "bad_nll_logps", "bad_nll_tokens", "too_few_responses", "orpo_nonnegative",
               "bad_pair_index", "emb_nonfinite", "factorization_failed")


def raise_kernel_checks(totals: torch.Tensor, stats: torch.Tensor, group: int, too_few_reason: str | None,
                        emb_dtype: torch.dtype | None) -> None:
    """The in-kernel data checks: one host sync reads the totals; a failure names its groups."""
    counts = totals.tolist()
    for name in CHECK_ORDER:
        if counts[STAT[name]] > 0:
            groups = stats[:, STAT[name]].nonzero().flatten()[:8].tolist()
            if name == "too_few_responses":
                raise ValueError(too_few_message(too_few_reason or "this call")(groups))
            if name == "factorization_failed":
                checks = DataChecks(True)
                check_factorization(checks, stats[:, STAT[name]] > 0)
                checks.raise_if_failed()
            if name == "emb_nonfinite":
                raise ValueError(emb_message(emb_dtype or torch.float32)(groups))
            raise ValueError(CHECK_MESSAGES[name].format(groups=groups, group=group))


def group_preference_loss(
    policy_logps: torch.Tensor,
    rewards: torch.Tensor,
    emb: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "dpo",
    diversity: str = "none",
    pairs: str = "all",
    pair_index: torch.Tensor | None = None,
    beta: float = 0.1,
    orpo_lambda: float = 0.1,
    simpo_gamma: float = 0.5,
    deviation_norm: str = "minmax",
    min_deviation: float = 0.0,
    orpo_weighting: str = "dorpo",
    diversity_alpha: float = 0.0,
    eps: float = reference.DQO_EPS,
    quality_quantile: float = 0.25,
    divpo_pools: str = "ranked",
    divpo_scores: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    nll_logps: torch.Tensor | None = None,
    nll_tokens: torch.Tensor | None = None,
    cpo_alpha: float = 0.0,
    check_inputs: bool = True,
    backend: str = "auto",
) -> LossOutput:
    """Preference loss over a batch of response groups, with diversity-weighted pairs.

    With ``(i, j)`` the (chosen, rejected) pairs inside each group, ``P`` their number, ``l`` the
    pair loss of ``loss`` and ``w_i`` the diversity weight of the chosen response (a constant):
    ``sum w_i l_ij / P + cpo_alpha * NLL - diversity_alpha * mean_b logdet_b``; for ``loss="orpo"``
    with the default ``orpo_weighting="dorpo"`` (DORPO, Chung et al. 2025, arXiv 2503.17126, the
    authors' ``models/dorpo_trainer.py``; with ``w = 1`` TRL's ORPO):
    ``mean_P(w_i) * NLL - lambda mean_P log sigmoid(w_i u_ij)``. ``NLL`` is the token-mean negative
    log-likelihood of the pairs' chosen sequences (``nll_logps`` / ``nll_tokens``; by default
    ``mean_P(-policy_logps)``). The formulas and the code they follow are in
    :func:`divkernels.reference.group_preference_loss`.

    Args:
        policy_logps: ``[B, G]`` sequence log-probs of the policy: summed token log-probs for dpo
            and ipo, mean token log-probs for orpo and simpo (the op does not renormalize).
        rewards: ``[B, G]`` quality scores that order the pairs; no grad.
        emb: ``[B, G, D]`` response embeddings, or a sequence of them from several encoders (DDPO
            weights then combine their deviations as the authors do, :func:`divkernels.reference.ddpo_weights`;
            the first serves everything else). Needed for diversity weights, DivPO selection by
            deviation and the logdet regularizer; gradients reach it through the regularizer.
        ref_logps: ``[B, G]`` reference-model log-probs for dpo/ipo; None means reference-free
            (0). orpo and simpo do not use it.
        mask: ``[B, G]`` bool, True for real responses; None means all real.
        loss: ``"dpo"`` (TRL's sigmoid), ``"ipo"``, ``"orpo"`` or ``"simpo"``.
        diversity: pair weight ``"none"`` (1), ``"deviation"`` (DDPO/DORPO) or ``"logdet_gain"``
            (``1 / (K^{-1})_ii`` normalized to mean 1, our DQO-style variant).
        pairs: ``"all"`` (every ``r_i > r_j``), ``"best_worst"``, ``"divpo"`` or ``"explicit"``.
        pair_index: ``[B, P, 2]`` integer (chosen, rejected) indices for explicit pairs;
            ``(-1, -1)`` rows are padding.
        beta: DPO/IPO/SimPO temperature. orpo_lambda: weight of ORPO's odds-ratio term (TRL's
            ORPO ``beta``). simpo_gamma: SimPO target margin.
        deviation_norm: ``"minmax"`` (DDPO/DORPO: ``(d - d_min) / (mean d - d_min)``, 1 for equal
            deviations), ``"mean"`` (ours: ``d / mean d``) or ``"none"`` (raw deviation).
        min_deviation: floor on deviation weights.
        orpo_weighting: ``"dorpo"`` (the authors' DORPO) or ``"pair"`` (ours: ``w_i`` multiplies each
            pair's whole ORPO loss, NLL included).
        diversity_alpha: weight of the ``-mean_b logdet_b`` regularizer (0 disables it).
        eps: ridge of ``K = S + eps I`` (DQO: 1).
        quality_quantile: DivPO's pool share ``q``: the top and bottom ``floor(q n)`` responses by
            reward (``divpo_pools="ranked"``, default 0.25 as the authors' ``rho=25``), or the
            chosen pool's share above a quantile threshold (``"threshold"``, ours).
        divpo_pools: ``"ranked"`` (DivPO; diversity measured within each pool) or ``"threshold"``
            (ours: rewards at or above the ``1 - q`` quantile against all the rest, deviation over
            the whole group).
        divpo_scores: ``[B, G]`` diversity scores for DivPO instead of deviation (e.g.
            ``-policy_logps``, DivPO's "model probability" criterion).
        weights: ``[B, G]`` weights of the chosen responses to use as given (constants), instead of
            computing them from ``diversity``.
        token_counts: ``[B, G]`` completion token counts, > 0; ``loss="ipo"`` divides each
            log-ratio by its count, as TRL's DPOTrainer does (``policy_logps`` stay summed).
        nll_logps: ``[B, G]`` summed log-probs of every predicted token of each sequence, prompt
            included (TRL's ORPO/CPO NLL is over prompt and completion); differentiable.
        nll_tokens: ``[B, G]`` the number of those tokens, > 0.
        cpo_alpha: weight of the NLL term for dpo/ipo/simpo (TRL's CPOTrainer ``cpo_alpha``).
        check_inputs: NaN/inf, group-size and pair-index checks (one host sync); False skips.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        :class:`LossOutput`: ``.loss`` scalar (float32, float64 for float64 logps),
        ``.metrics`` and ``.logdet`` (``[B]`` when computed).
    """
    options = dict(loss=loss, diversity=diversity, pairs=pairs, beta=beta, orpo_lambda=orpo_lambda,
                   simpo_gamma=simpo_gamma, deviation_norm=deviation_norm, min_deviation=min_deviation,
                   orpo_weighting=orpo_weighting, diversity_alpha=diversity_alpha, eps=eps,
                   quality_quantile=quality_quantile, divpo_pools=divpo_pools, cpo_alpha=cpo_alpha, backend=backend)
    extras = {"divpo_scores": divpo_scores, "weights": weights, "token_counts": token_counts,
              "nll_logps": nll_logps, "nll_tokens": nll_tokens}
    if torch.compiler.is_compiling():
        args = check_group_loss_arguments(policy_logps, rewards, emb, ref_logps, mask, pair_index=pair_index,
                                          **options, **extras)
        return _compiled_group_preference_loss(args, options, check_inputs)
    args, plan = _checked_arguments(policy_logps, rewards, emb, ref_logps, mask, pair_index, extras, options)
    policy_logps, rewards, ref_logps, mask = args.policy_logps, args.rewards, args.ref_logps, args.mask
    emb, extras = args.emb, args.extras
    batch, group = policy_logps.shape
    resolved = resolve_backend(backend, op="group_preference_loss", device=args.device, group_size=group,
                               kernels=("triton", "cuda"), dim=None if emb is None else emb.shape[-1],
                               emb_dtype=None if emb is None else emb.dtype)
    resolved = _within_cuda_limits(resolved, group, policy_logps, emb, args.device)
    # the Triton forward checks one embedding tensor itself (stat columns, one sync in raise_kernel_checks)
    in_kernel_checks = check_inputs and resolved == "triton" and len(args.encoders) <= 1
    checks = DataChecks(check_inputs and not in_kernel_checks)

    def valid() -> torch.Tensor:
        return reference.valid_mask(mask, batch, group, args.device)

    if checks.enabled:
        _host_data_checks(checks, args, valid(), loss)

    if resolved in ("triton", "cuda"):
        weights = _kernel_weights(args, resolved, valid, options)
        config = plan.configs.get((resolved, in_kernel_checks))
        if config is None:
            config = plan.configs[resolved, in_kernel_checks] = LossConfig(
                *_config_fields(options, args, weights is not None, in_kernel_checks, resolved))
        tensors = LossTensors(policy_logps, rewards, ref_logps, emb, contiguous(mask), args.pair_index,
                              extras["divpo_scores"], None if weights is None else weights.detach(),
                              extras["token_counts"], extras["nll_logps"], extras["nll_tokens"], poison_outputs())
        total = GroupPreferenceLossFunction.apply(policy_logps, ref_logps, emb, extras["nll_logps"], tensors, config)
        vector, stats, totals, chosen_counts, rejected_counts = tensors.aux
        metrics = MetricVector(vector, METRIC, metric_names(config, emb is not None))
        output = LossOutput(total, metrics, _logdet_column(stats, emb) if config.needs_logdet else None,
                            chosen_counts, rejected_counts)
        if in_kernel_checks:
            raise_kernel_checks(totals, stats, group, args.needs_emb_reason, None if emb is None else emb.dtype)
        _check_kernel_outputs(checks, output, stats, emb, in_kernel_checks)
    else:
        checks.emb(emb, valid)
        output = reference.group_preference_loss(
            policy_logps, rewards, args.encoders or None, ref_logps, valid(), loss=loss, diversity=diversity,
            pairs=args.pairs, pair_index=args.pair_index, beta=beta, orpo_lambda=orpo_lambda,
            simpo_gamma=simpo_gamma, deviation_norm=deviation_norm, min_deviation=min_deviation,
            orpo_weighting=orpo_weighting, diversity_alpha=diversity_alpha, eps=eps,
            quality_quantile=quality_quantile, divpo_pools=divpo_pools, cpo_alpha=cpo_alpha, **extras)
        if output.logdet is not None:
            check_factorization(checks, lambda: torch.isnan(output.logdet))
    checks.raise_if_failed()
    return output


@dataclass
class _Plan:
    """What the static checks found for one signature of a call (see :func:`_checked_arguments`)."""

    pairs: str
    needs_emb_reason: str | None
    device: torch.device
    configs: dict[tuple[str, bool], LossConfig] = field(default_factory=dict)


# Signature of a call (options and each tensor's shape, dtype and device) -> its _Plan.
_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 512


def _metadata(value: object) -> object:
    """What the static checks look at in one argument: a tensor's shape, dtype and device."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.shape, value.dtype, value.device
    if isinstance(value, (list, tuple)):
        return tuple(_metadata(item) for item in value)
    return type(value), id(value)


def _checked_arguments(policy_logps: object, rewards: object, emb: object, ref_logps: object, mask: object,
                       pair_index: object, extras: dict[str, object],
                       options: dict[str, object]) -> tuple[GroupLossArguments, _Plan]:
    """:func:`check_group_loss_arguments`, run once per signature: the static checks see only
    metadata, so a training loop that repeats a signature pays one dictionary lookup per step (a
    call that fails its checks raises and is never remembered)."""
    try:
        values = tuple(options.values())
        key = (values, tuple(map(type, values)), _metadata(policy_logps), _metadata(rewards), _metadata(emb),
               *(None if value is None else _metadata(value)
                 for value in (ref_logps, mask, pair_index, *extras.values())))
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable option: the checks explain it
        key, plan = None, None
    if plan is None:
        args = check_group_loss_arguments(policy_logps, rewards, emb, ref_logps, mask, pair_index=pair_index,
                                          **options, **extras)
        plan = _Plan(args.pairs, args.needs_emb_reason, args.device)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
        return args, plan
    encoders = [] if emb is None else list(emb) if isinstance(emb, (list, tuple)) else [emb]
    args = GroupLossArguments(policy_logps, rewards, encoders, ref_logps, mask, plan.pairs,
                              pair_index, extras, plan.needs_emb_reason, plan.device)
    return args, plan


def _host_data_checks(checks: DataChecks, args: GroupLossArguments, valid: torch.Tensor, loss: str) -> None:
    """The data checks of a call the forward kernel does not check itself (the reference, the CUDA
    extension, several encoders): per-group flags, resolved with one sync by ``checks``."""
    policy_logps, extras, group = args.policy_logps, args.extras, args.policy_logps.shape[1]
    for name, value in (("policy_logps", policy_logps), ("rewards", args.rewards), ("ref_logps", args.ref_logps),
                        *extras.items()):
        checks.finite(name, value, valid)
    for k, e in enumerate(args.encoders[1:], start=1):  # the first is checked with the kernel's norms
        checks.emb(e, valid, f"emb[{k}]")
    if args.needs_emb_reason is not None:
        checks.group_size(valid, args.needs_emb_reason)

    def message(name: str) -> Callable[[list[int]], str]:
        return lambda groups: CHECK_MESSAGES[name].format(groups=groups, group=group)

    if loss == "orpo":
        checks.require((valid & (policy_logps >= 0)).any(-1), message("orpo_nonnegative"))
    if args.pair_index is not None:
        checks.require(_bad_pair_rows(args.pair_index, valid), message("bad_pair_index"))
    for name in ("token_counts", "nll_tokens"):
        value = extras.get(name)
        if value is not None:
            checks.require((valid & ~(value > 0)).any(-1), message(f"bad_{name}"))


def _bad_pair_rows(pair_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]``: a row of the group's pairs names no two different valid responses (``(-1, -1)`` rows are padding)."""
    group = valid.shape[1]
    chosen, rejected = pair_index[..., 0], pair_index[..., 1]
    padding = (chosen < 0) & (rejected < 0)
    in_range = (chosen >= 0) & (chosen < group) & (rejected >= 0) & (rejected < group)
    chosen_valid = valid.gather(1, chosen.clamp(0, group - 1).long())
    rejected_valid = valid.gather(1, rejected.clamp(0, group - 1).long())
    good = in_range & chosen_valid & rejected_valid & (chosen != rejected)
    return (~padding & ~good).any(-1)
