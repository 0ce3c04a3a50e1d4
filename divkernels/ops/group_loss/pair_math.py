"""The pair math of the fused loss, shared by its kernels: the pair losses of DPO / IPO / ORPO /
SimPO and their slopes, the pair selections (best-worst, DivPO's pools, explicit rows), the DDPO
weights, and the stats columns as kernel constants (``loss_config.STAT``: the kernels name a column,
never a raw offset). Each function follows its counterpart in :mod:`divkernels.reference`."""

from __future__ import annotations

from divkernels import reference
from divkernels.loss_config import CHECK_STATS, STAT, STATS, WEIGHT_MODES, scalar_slot
from divkernels.ops.common import tl, triton

LN2 = tl.constexpr(reference.LN2)
DIVPO_TIE_RTOL = tl.constexpr(reference.DIVPO_TIE_RTOL)
DIVPO_COUNT_SLACK = tl.constexpr(reference.DIVPO_COUNT_SLACK)
DEVIATION_TIE = tl.constexpr(reference.DEVIATION_TIE)
# MODE.weights of weights given by the caller (the host's partition weights arrive as given ones too)
WEIGHTS_GIVEN = tl.constexpr(WEIGHT_MODES.index("given"))
# Slots of the pair math's reals in the kernels' float64 scalar table (loss_config.SCALARS)
BETA = tl.constexpr(scalar_slot("beta"))
ORPO_LAMBDA = tl.constexpr(scalar_slot("orpo_lambda"))
SIMPO_GAMMA = tl.constexpr(scalar_slot("simpo_gamma"))
QUALITY_QUANTILE = tl.constexpr(scalar_slot("quality_quantile"))


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
def scalar(params_ptr, SLOT: tl.constexpr, ACC: tl.constexpr):
    """The real parameter at ``SLOT`` of the float64 scalar table, narrowed to ``ACC`` once (as exact
    as ``ACC`` allows: 0.1 reaches a float64 kernel as 0.1)."""
    return tl.load(params_ptr + SLOT).to(ACC)


@triton.jit
def loss_coefficients(params_ptr, ACC: tl.constexpr):
    """``(beta, orpo_lambda, simpo_gamma)``: the pair losses' reals, read once per program and handed
    to :func:`response_terms` and :func:`pair_loss_terms` as one tuple."""
    return scalar(params_ptr, BETA, ACC), scalar(params_ptr, ORPO_LAMBDA, ACC), scalar(params_ptr, SIMPO_GAMMA, ACC)


@triton.jit
def response_terms(policy, ref, length, coefficients, MODE: tl.constexpr):
    """Per response of one group: ``(key, slope, implicit)``; the pair logit is built from the keys
    (:func:`pair_loss_terms`). ``slope_k = du_kj / d pi_k`` (``du_ik / d pi_k`` is its negative);
    ``implicit`` is what TRL logs as rewards/chosen and rewards/rejected. IPO divides each
    log-ratio by its completion length (TRL's DPOTrainer; ``length`` is 1 without token counts)."""
    beta, orpo_lambda, _ = coefficients
    if MODE.loss == 0 or MODE.loss == 1 or MODE.loss == 4:  # the log-ratio losses (listwise DPO: as DPO)
        margin = policy - ref
        if MODE.loss == 1:
            key = margin / length
            slope = 1.0 / length
        else:
            key = margin
            slope = tl.full(policy.shape, beta, policy.dtype)
        implicit = beta * margin
    elif MODE.loss == 2:
        key = policy - log1mexp(policy)  # ORPO's log-odds
        slope = -1.0 / expm1(policy)
        implicit = orpo_lambda * policy
    else:
        key = policy
        slope = tl.full(policy.shape, beta, policy.dtype)
        implicit = beta * policy
    return key, slope, implicit


@triton.jit
def listwise_terms(u, counts):
    """Listwise DPO's ``(l_ij, dl/du_ij)`` of a chunk of rows (``reference.listwise_losses``): row i's term
    ``l_i = log(1 + sum_j C_ij e^(-u_ij))`` spread over its pairs (``l_i / sum_j C_ij`` each, so that the
    weighted pair sum is ``w_i l_i``), and ``dl_i / du_ij = -e^(-u_ij - l_i)`` per unit of ``C_ij``."""
    paired = counts > 0.0
    shift = tl.maximum(tl.max(tl.where(paired, -u, -float("inf")), axis=1), 0.0)
    tail = tl.sum(tl.where(paired, counts * tl.exp(tl.where(paired, -u - shift[:, None], 0.0)), 0.0), axis=1)
    row = shift + tl.log(tl.exp(-shift) + tail)
    loss = row[:, None] / tl.maximum(tl.sum(counts, axis=1), 1.0)[:, None]
    dloss = -tl.exp(tl.where(paired, -u - row[:, None], 0.0))
    return loss, dloss


@triton.jit
def pair_loss_terms(key_i, key, weight_i, policy_i, counts, coefficients, MODE: tl.constexpr):
    """Per pair (i chosen in a chunk of rows, j rejected): ``(l_ij, dl/du_ij, odds_ij)``, ``[rows, BLOCK_G]``.

    ``key_i``, ``weight_i``, ``policy_i``: the chunk's rows; ``key``: every response's. DORPO puts
    the chosen weight inside the log-sigmoid, ``l = -lambda log sigmoid(w_i u_ij)``, and leaves its
    NLL term to the batch reduction; ORPO's ``"pair"`` weighting keeps the NLL ``-pi_i`` in each
    pair's loss. ``odds`` is ORPO's (weighted) log-odds difference, for its metrics; 0 otherwise.
    """
    beta, orpo_lambda, simpo_gamma = coefficients
    odds = tl.zeros([key_i.shape[0], key.shape[0]], dtype=key.dtype)
    if MODE.loss == 0:
        u = beta * (key_i[:, None] - key[None, :])
        loss = softplus(-u)
        dloss = -sigmoid(-u)
    elif MODE.loss == 4:  # listwise DPO: a row's pairs share one normalizer (the chunk holds whole rows)
        loss, dloss = listwise_terms(beta * (key_i[:, None] - key[None, :]), counts)
    elif MODE.loss == 1:
        u = key_i[:, None] - key[None, :] - 0.5 / beta
        loss = u * u
        dloss = 2.0 * u
    elif MODE.loss == 2:
        u = key_i[:, None] - key[None, :]
        if MODE.orpo_dorpo:
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
def divpo_pools(reward, valid, params_ptr, RANKED: tl.constexpr, BLOCK_G: tl.constexpr):
    """DivPO's ``(top, bottom)`` pools, ``[BLOCK_G]`` bool each (``reference.divpo_pools``).

    Ranked: the ``k`` highest and lowest rewards, ``k = min(max(floor(q n + slack), 1), floor(n / 2))``;
    threshold (ours): rewards at or above the linearly interpolated ``1 - q`` quantile, and the
    rest. Order statistics come from ranks (ascending, ties broken by index).
    """
    quality_quantile = scalar(params_ptr, QUALITY_QUANTILE, reward.dtype)
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
