"""The fused forward kernel (step 1 of :mod:`divkernels.ops.group_loss`): one program per group, a
short body of named stages (diversity, load responses, select pairs, weights, pair sweep, write
stats), each a ``triton.jit`` function Triton inlines into the one kernel."""

from __future__ import annotations

from divkernels.loss_config import scalar_slot
from divkernels.ops.common import any_bad, is_finite, tl, triton
from divkernels.ops.deviation import deviation_from_row_sums, deviation_from_similarity
from divkernels.ops.group_loss.diversity import group_diversity, stored_row_sums
from divkernels.ops.group_loss.pair_math import (
    COL_BAD_DIVPO_SCORES,
    COL_BAD_NLL_LOGPS,
    COL_BAD_NLL_TOKENS,
    COL_BAD_PAIR_INDEX,
    COL_BAD_POLICY_LOGPS,
    COL_BAD_REF_LOGPS,
    COL_BAD_REWARDS,
    COL_BAD_TOKEN_COUNTS,
    COL_BAD_WEIGHTS,
    COL_CHOSEN_REWARD,
    COL_CORRECT,
    COL_DEVIATION,
    COL_EMB_NONFINITE,
    COL_FACTORIZATION_FAILED,
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
    COL_ORPO_NONNEGATIVE,
    COL_PAIRS,
    COL_REJECTED_REWARD,
    COL_TOO_FEW_RESPONSES,
    COL_VALID,
    COL_WEIGHT_SUM,
    COL_WEIGHTED_LOSS,
    WEIGHTS_GIVEN,
    at_rows,
    best_worst_pair,
    ddpo_weights,
    divpo_pair,
    divpo_pools,
    explicit_counts,
    loss_coefficients,
    normalize_to_mean_one,
    pair_loss_terms,
    response_terms,
    rows_of,
    scalar,
    softplus,
)
from divkernels.ops.tiles import (
    load_valid_rows,
    square_at,
)

MIN_DEVIATION = tl.constexpr(scalar_slot("min_deviation"))  # the floor of deviation weights, in the scalar table


@triton.jit
def load_responses(b, policy_ptr, ref_ptr, rewards_ptr, lengths_ptr, valid, G, HAS_REF: tl.constexpr,
                   HAS_LENGTHS: tl.constexpr, BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    """``(policy, ref, reward, length)`` of group ``b``, ``[BLOCK_G]``. Loaded after the diversity
    stage so that they do not hold registers through it. Padded log-probs get a finite stand-in
    (< 0 keeps log(1 - e^pi) finite); they meet no pair."""
    offs = tl.arange(0, BLOCK_G)
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
    return policy, ref, reward, length


@triton.jit
def select_pairs(b, reward, valid, dev, sim, sim_ptr, scores_ptr, G, params_ptr, MODE: tl.constexpr,
                 HAS_SCORES: tl.constexpr, DIVERSITY_STORED: tl.constexpr, BLOCK_G: tl.constexpr,
                 PAIR_ROWS: tl.constexpr, ACC: tl.constexpr):
    """The one pair ``(chosen, rejected, exists)`` of best-worst and DivPO, and DivPO's chosen-pool
    scores (the data check reads them); "all" and explicit pairs are counted in :func:`pair_sweep`."""
    offs = tl.arange(0, BLOCK_G)
    chosen = tl.sum(tl.zeros([BLOCK_G], dtype=tl.int32), axis=0)
    rejected = chosen
    exists = chosen > 0
    top_score = dev
    if MODE.pairs == 1:
        chosen, rejected, exists = best_worst_pair(reward, valid, BLOCK_G)
    elif MODE.pairs == 2:
        top, bottom = divpo_pools(reward, valid, params_ptr, MODE.divpo_ranked, BLOCK_G)
        if HAS_SCORES:
            top_score = tl.load(scores_ptr + b * G + offs, mask=valid, other=0.0).to(ACC)
            bottom_score = top_score
        elif MODE.divpo_ranked and DIVERSITY_STORED:
            top_sums, _ = stored_row_sums(square_at(sim_ptr, b, G), top, valid, G, BLOCK_G, PAIR_ROWS, ACC)
            top_score = deviation_from_row_sums(top_sums, top)
            bottom_sums, _ = stored_row_sums(square_at(sim_ptr, b, G), bottom, valid, G, BLOCK_G, PAIR_ROWS, ACC)
            bottom_score = deviation_from_row_sums(bottom_sums, bottom)
        elif MODE.divpo_ranked:
            # deviation within each pool: a pool is the "valid" set of its own deviation
            top_score = deviation_from_similarity(sim, top)
            bottom_score = deviation_from_similarity(sim, bottom)
        else:
            top_score = dev
            bottom_score = dev
        chosen, rejected, exists = divpo_pair(reward, top, bottom, top_score, bottom_score, BLOCK_G)
    return chosen, rejected, exists, top_score


@triton.jit
def diversity_weights(b, weights_ptr, dev, residual, valid, G, params_ptr, MODE: tl.constexpr, BLOCK_G: tl.constexpr,
                      ACC: tl.constexpr):
    """The diversity weight of each chosen response, ``[BLOCK_G]`` (constants for the gradient)."""
    offs = tl.arange(0, BLOCK_G)
    if MODE.weights == 0:
        weight = tl.full([BLOCK_G], 1.0, ACC)
    elif MODE.weights == 1:
        if MODE.deviation_norm == 0:
            weight = ddpo_weights(dev, valid)
        elif MODE.deviation_norm == 1:
            weight = normalize_to_mean_one(dev, valid)
        else:
            weight = dev
        weight = tl.maximum(weight, scalar(params_ptr, MIN_DEVIATION, ACC))
    elif MODE.weights == 2:
        weight = normalize_to_mean_one(residual, valid)
    else:
        weight = tl.load(weights_ptr + b * G + offs, mask=valid, other=0.0).to(ACC)
    return weight


@triton.jit
def pair_sweep(b, pair_index_ptr, P, valid, reward, policy, key, implicit, weight, chosen, rejected, exists,
               coefficients, MODE: tl.constexpr, BLOCK_G: tl.constexpr, PAIR_ROWS: tl.constexpr, ACC: tl.constexpr):
    """Pair losses, their gradient w.r.t. the pair logits and the metric partial sums, ``PAIR_ROWS``
    chosen rows at a time: a ``[PAIR_ROWS, BLOCK_G]`` slice of each pair tile is live, not the whole
    G x G tile (at G = 128 the whole tiles do not fit the registers). ``C_ij`` = how often
    (i chosen, j rejected) is a pair: one pair for best-worst and DivPO, every rewarded order for
    "all", group ``b``'s rows of ``pair_index`` for explicit pairs.
    Returns ``(sums, row_grad, col_grad, chosen_count, rejected_count, bad_pairs)``, ``sums`` =
    ``(loss, correct, log_odds_ratio, log_odds_chosen)``."""
    offs = tl.arange(0, BLOCK_G)
    zero = tl.zeros([BLOCK_G], dtype=ACC)
    loss_sum = tl.sum(zero, axis=0)
    correct = loss_sum
    log_odds_ratio = loss_sum
    log_odds_chosen = loss_sum
    bad_pairs = tl.sum(tl.zeros([BLOCK_G], dtype=tl.int32), axis=0)  # the same count from every chunk
    row_grad, col_grad, chosen_count, rejected_count = zero, zero, zero, zero
    for start in range(0, BLOCK_G, PAIR_ROWS):
        rows = start + tl.arange(0, PAIR_ROWS)
        if MODE.pairs == 0:
            valid_i = rows_of(valid.to(tl.int32), rows, BLOCK_G, PAIR_ROWS) > 0
            reward_i = rows_of(reward, rows, BLOCK_G, PAIR_ROWS)
            counts = tl.where(valid_i[:, None] & valid[None, :] & (reward_i[:, None] > reward[None, :]), 1.0, 0.0)
        elif MODE.pairs == 3:
            counts, bad_pairs = explicit_counts(pair_index_ptr + b * P * 2, P, rows, valid, BLOCK_G, ACC)
        else:
            one_pair = tl.where((rows[:, None] == chosen) & (offs[None, :] == rejected), 1.0, 0.0)
            counts = tl.where(exists, one_pair, 0.0)
        weight_i = rows_of(weight, rows, BLOCK_G, PAIR_ROWS)
        loss, dloss, odds = pair_loss_terms(rows_of(key, rows, BLOCK_G, PAIR_ROWS), key, weight_i,
                                            rows_of(policy, rows, BLOCK_G, PAIR_ROWS), counts, coefficients, MODE)
        if MODE.loss == 2 and MODE.orpo_dorpo:
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
    sums = (loss_sum, correct, log_odds_ratio, log_odds_chosen)
    return sums, row_grad, col_grad, chosen_count, rejected_count, bad_pairs


@triton.jit
def write_stats(stats, valid, sums, diversity, chosen_count, rejected_count, implicit, weighted_count, policy,
                nll_logps, nll_tokens, ACC: tl.constexpr):
    """Group ``b``'s partial sums (``loss_config.STATS``) at ``stats``; ``sums`` from :func:`pair_sweep`,
    ``diversity`` = ``(dev, logdet, mean_similarity, has_similarity, emb_nonfinite)``."""
    loss_sum, correct, log_odds_ratio, log_odds_chosen = sums
    dev, logdet, mean_similarity, has_similarity, emb_nonfinite = diversity
    num_pairs = tl.sum(chosen_count, axis=0)
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


@triton.jit
def write_checks(stats, valid, policy, reward, ref, top_score, weight, length, nll_logps, nll_tokens, logdet,
                 bad_pairs, MODE: tl.constexpr, HAS_REF: tl.constexpr, HAS_SCORES: tl.constexpr,
                 NEED_TWO: tl.constexpr, ACC: tl.constexpr):
    """The data checks of ``check_inputs=True``: 1 where the group fails one (``loss_config.CHECK_STATS``)."""
    tl.store(stats + COL_BAD_POLICY_LOGPS, any_bad(valid & ~is_finite(policy)))
    tl.store(stats + COL_BAD_REWARDS, any_bad(valid & ~is_finite(reward)))
    if HAS_REF:
        tl.store(stats + COL_BAD_REF_LOGPS, any_bad(valid & ~is_finite(ref)))
    else:
        tl.store(stats + COL_BAD_REF_LOGPS, 0.0)
    if HAS_SCORES and MODE.pairs == 2:
        tl.store(stats + COL_BAD_DIVPO_SCORES, any_bad(valid & ~is_finite(top_score)))
    else:
        tl.store(stats + COL_BAD_DIVPO_SCORES, 0.0)
    if MODE.weights == WEIGHTS_GIVEN:
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
    if MODE.loss == 2:
        tl.store(stats + COL_ORPO_NONNEGATIVE, any_bad(valid & (policy >= 0.0)))
    else:
        tl.store(stats + COL_ORPO_NONNEGATIVE, 0.0)
    if MODE.pairs == 3:
        tl.store(stats + COL_BAD_PAIR_INDEX, tl.where(bad_pairs > 0, 1.0, 0.0))
    else:
        tl.store(stats + COL_BAD_PAIR_INDEX, 0.0)
    tl.store(stats + COL_FACTORIZATION_FAILED, tl.where(logdet == logdet, 0.0, 1.0))


@triton.jit
def group_forward(
    b, emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr, scores_ptr, weights_ptr, lengths_ptr,
    nll_logps_ptr, nll_tokens_ptr,
    stats_ptr, grad_policy_ptr, chosen_counts_ptr, rejected_counts_ptr, sim_ptr, norms_ptr, inverse_ptr,
    logdet_ptr, params_ptr, G, D, P, stride_b, stride_g, stride_d, MODE: tl.constexpr, HAS_EMB: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, HAS_SCORES: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_NLL_LOGPS: tl.constexpr, HAS_NLL_TOKENS: tl.constexpr, NUM_STATS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, CHECK: tl.constexpr, NEED_TWO: tl.constexpr,
    PAIR_ROWS: tl.constexpr, SWEEP_FP64: tl.constexpr, DIVERSITY_STORED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Group ``b``'s forward (step 1 of :mod:`divkernels.ops.group_loss`). ``MODE``: the config's ints
    and flags (``LossConfig.kernel_mode``); ``params_ptr``: its reals (``LossConfig.triton_scalars``,
    float64). ``SWEEP_FP64``: sweep ``K`` in float64, the float64 fix-up of a group whose float32 sweep
    failed (its logdet is NaN). ``DIVERSITY_STORED``: the second launch of a split forward
    (``launch.split_forward``); the similarity forward has written ``S`` and norms (the logdet
    forward, when ``MODE.need_logdet``, also ``K^-1`` and ``logdet_ptr [B]``), which are read here
    instead of computed."""
    offs = tl.arange(0, BLOCK_G)
    valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
    dev, residual, logdet, mean_similarity, has_similarity, emb_nonfinite, sim = group_diversity(
        b, emb_ptr, sim_ptr, norms_ptr, inverse_ptr, logdet_ptr, valid, G, D, stride_b, stride_g, stride_d, params_ptr,
        MODE, HAS_EMB, BLOCK_G, BLOCK_D, ACC, PRECISION, PAIR_ROWS, SWEEP_FP64, DIVERSITY_STORED, ALIGNED)
    policy, ref, reward, length = load_responses(b, policy_ptr, ref_ptr, rewards_ptr, lengths_ptr, valid, G, HAS_REF,
                                                 HAS_LENGTHS, BLOCK_G, ACC)
    chosen, rejected, exists, top_score = select_pairs(b, reward, valid, dev, sim, sim_ptr, scores_ptr, G, params_ptr,
                                                       MODE, HAS_SCORES, DIVERSITY_STORED, BLOCK_G, PAIR_ROWS, ACC)
    weight = diversity_weights(b, weights_ptr, dev, residual, valid, G, params_ptr, MODE, BLOCK_G, ACC)
    coefficients = loss_coefficients(params_ptr, ACC)
    key, slope, implicit = response_terms(policy, ref, length, coefficients, MODE)
    sums, row_grad, col_grad, chosen_count, rejected_count, bad_pairs = pair_sweep(
        b, pair_index_ptr, P, valid, reward, policy, key, implicit, weight, chosen, rejected, exists, coefficients,
        MODE, BLOCK_G, PAIR_ROWS, ACC)
    grad = slope * (row_grad - col_grad)
    weighted_count = chosen_count * weight  # sum_j C_ij w_i
    if MODE.loss == 2 and not MODE.orpo_dorpo:
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
    stats = stats_ptr + b * NUM_STATS
    write_stats(stats, valid, sums, (dev, logdet, mean_similarity, has_similarity, emb_nonfinite), chosen_count,
                rejected_count, implicit, weighted_count, policy, nll_logps, nll_tokens, ACC)
    if CHECK:
        write_checks(stats, valid, policy, reward, ref, top_score, weight, length, nll_logps, nll_tokens, logdet,
                     bad_pairs, MODE, HAS_REF, HAS_SCORES, NEED_TWO, ACC)


# The forward's arguments after the group index, in group_forward's order (the finalize kernel's
# fix-up passes the same ones).
@triton.jit(do_not_specialize=["G", "P", "stride_b"])  # sizes that vary over a run: common.py
def _group_loss_forward_kernel(
    emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr, scores_ptr, weights_ptr, lengths_ptr,
    nll_logps_ptr, nll_tokens_ptr, stats_ptr, grad_policy_ptr, chosen_counts_ptr, rejected_counts_ptr, sim_ptr,
    norms_ptr, inverse_ptr, logdet_ptr, params_ptr, G, D, P, stride_b, stride_g, stride_d, MODE: tl.constexpr,
    HAS_EMB: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, HAS_SCORES: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_NLL_LOGPS: tl.constexpr, HAS_NLL_TOKENS: tl.constexpr, NUM_STATS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, CHECK: tl.constexpr,
    NEED_TWO: tl.constexpr, PAIR_ROWS: tl.constexpr, DIVERSITY_STORED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Step 1 (1b of a split forward): one program per group, ``K`` swept in the accumulation dtype
    (a float32 sweep that fails leaves NaN, which the finalize kernel's fix-up replaces)."""
    group_forward(
        tl.program_id(0).to(tl.int64), emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, pair_index_ptr,
        scores_ptr, weights_ptr, lengths_ptr, nll_logps_ptr, nll_tokens_ptr, stats_ptr, grad_policy_ptr,
        chosen_counts_ptr, rejected_counts_ptr, sim_ptr, norms_ptr, inverse_ptr, logdet_ptr, params_ptr, G, D, P,
        stride_b, stride_g, stride_d, MODE, HAS_EMB, HAS_MASK, HAS_REF, HAS_SCORES, HAS_LENGTHS, HAS_NLL_LOGPS,
        HAS_NLL_TOKENS, NUM_STATS, BLOCK_G, BLOCK_D, ACC, PRECISION, CHECK, NEED_TWO, PAIR_ROWS, False,
        DIVERSITY_STORED, ALIGNED)
