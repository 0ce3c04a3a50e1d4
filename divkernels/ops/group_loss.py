"""Group-wise preference loss with diversity weights (SPEC 3): DPO/IPO/ORPO/SimPO x DDPO/DQO.

The fused op. Forward, one program per group, in one launch: stream ``emb[b]`` once for the Gram
matrix, form cosine ``S`` and deviation, sweep ``K = S + eps I`` for logdet and ``K^{-1}`` (when
``logdet_gain`` weights or the regularizer need them), select the pairs (all / best-worst / DivPO
/ explicit counts), weight them, and reduce the group's pair losses, their gradient w.r.t. the
log-probs and the metric partial sums. The batch total is one ``sum`` over ``[B, NUM_STATS]``.

With ``C_ij`` the pair counts, ``w_i`` the (constant) weights and ``u_ij`` the pair logit
(``beta (z_i - z_j)`` for DPO with ``z = pi - ref``, ...), the loss is
``sum C w l(u) / #pairs - alpha mean_b logdet_b``, so
``d/d pi_k = slope_k (sum_j M_kj - sum_i M_ik) / #pairs`` with ``M = C w dl/du`` and
``slope = du_ij / d pi_i`` (``beta``, 1, ``d log_odds / d pi = 1 / (1 - e^pi)``), plus ``-sum_j C_kj w_k``
for ORPO's NLL term. The kernel writes this per-response gradient unscaled; backward only
multiplies by ``grad_loss / #pairs``. The regularizer's gradient reaches ``emb`` through
``dL/dS = -alpha / B * K^{-1}`` and the shared similarity backward, which reads ``emb`` once more.
Saved for backward: ``O(B G)`` gradients, plus ``S``, ``K^{-1}`` and norms (``O(B G^2)``) only
when ``emb`` needs a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from divkernels import _cuda, reference
from divkernels.backend import resolve_backend
from divkernels.ops.common import (
    accumulation_dtype,
    contiguous_mask,
    dot_precision,
    embedding_block,
    group_block,
    new_output,
    num_warps_for,
    poison_outputs,
    tl,
    triton,
    triton_dtype,
)
from divkernels.ops.deviation import deviation, deviation_from_similarity
from divkernels.ops.logdet import check_factorization, diagonal, logdet_and_inverse
from divkernels.ops.similarity import (
    gram_matrix,
    load_square,
    load_valid_rows,
    similarity_backward,
    similarity_from_gram,
    store_square,
)
from divkernels.types import (
    DEVIATION_NORMS,
    DIVERSITIES,
    DIVPO_POOLS,
    LOSSES,
    ORPO_WEIGHTINGS,
    PAIR_MODES,
    LossOutput,
)
from divkernels.validation import (
    DataChecks,
    check_choice,
    check_emb,
    check_float_tensor,
    check_group_tensor,
    check_index_tensor,
    check_mask,
    check_same_device,
    check_scalar,
)

# Columns of the per-group partial sums the kernel writes.
STATS = ("weighted_loss", "pairs", "chosen_reward", "rejected_reward", "correct", "no_pairs", "deviation",
         "mean_similarity", "has_similarity", "logdet", "valid", "emb_nonfinite", "weight_sum", "nll_logps",
         "nll_tokens", "logps_chosen", "logps_rejected", "log_odds_ratio", "log_odds_chosen")
STAT = {name: index for index, name in enumerate(STATS)}
LN2 = tl.constexpr(reference.LN2)
DIVPO_TIE_RTOL = tl.constexpr(reference.DIVPO_TIE_RTOL)
DIVPO_COUNT_SLACK = tl.constexpr(reference.DIVPO_COUNT_SLACK)
DEVIATION_TIE = tl.constexpr(reference.DEVIATION_TIE)


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
def pair_loss_terms(policy, ref, weight, length, beta, orpo_lambda, simpo_gamma, LOSS: tl.constexpr,
                    ORPO_DORPO: tl.constexpr):
    """Per pair (i chosen, j rejected) of one group: ``(l_ij, dl/du_ij, slope_i, implicit reward_i, odds_ij)``.

    ``slope_k = du_kj / d pi_k`` (``du_ik / d pi_k`` is its negative); ``implicit`` is what TRL
    logs as rewards/chosen and rewards/rejected. IPO divides each log-ratio by its completion
    length (TRL's DPOTrainer; ``length`` is 1 without token counts). DORPO puts the chosen weight
    inside the log-sigmoid, ``l = -lambda log sigmoid(w_i u_ij)``, and leaves its NLL term to the
    batch reduction; ORPO's ``"pair"`` weighting keeps the NLL ``-pi_i`` in each pair's loss.
    ``odds`` is ORPO's (weighted) log-odds difference, for its metrics; 0 for the other losses.
    """
    odds = tl.zeros([policy.shape[0], policy.shape[0]], dtype=policy.dtype)
    if LOSS == 0 or LOSS == 1:
        margin = policy - ref
        if LOSS == 0:
            u = beta * (margin[:, None] - margin[None, :])
            loss = softplus(-u)
            dloss = -sigmoid(-u)
            slope = tl.full(policy.shape, beta, policy.dtype)
        else:
            per_token = margin / length
            u = per_token[:, None] - per_token[None, :] - 0.5 / beta
            loss = u * u
            dloss = 2.0 * u
            slope = 1.0 / length
        implicit = beta * margin
    elif LOSS == 2:
        log_odds = policy - log1mexp(policy)
        u = log_odds[:, None] - log_odds[None, :]
        if ORPO_DORPO:
            odds = weight[:, None] * u
            loss = orpo_lambda * softplus(-odds)
            dloss = -orpo_lambda * weight[:, None] * sigmoid(-odds)
        else:
            odds = u
            loss = orpo_lambda * softplus(-u) - policy[:, None]
            dloss = -orpo_lambda * sigmoid(-u)
        slope = -1.0 / expm1(policy)
        implicit = orpo_lambda * policy
    else:
        u = beta * (policy[:, None] - policy[None, :]) - simpo_gamma
        loss = softplus(-u)
        dloss = -sigmoid(-u)
        slope = tl.full(policy.shape, beta, policy.dtype)
        implicit = beta * policy
    return loss, dloss, slope, implicit, odds


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
    """DivPO's one pair as a ``[BLOCK_G, BLOCK_G]`` 0/1 tile (``reference.pair_counts_divpo``): the most
    diverse of ``top`` against the least diverse of ``bottom``, if the chosen reward is higher."""
    offs = tl.arange(0, BLOCK_G)
    chosen = first_near_extreme(top_score, top, 1.0, BLOCK_G)
    rejected = first_near_extreme(bottom_score, bottom, -1.0, BLOCK_G)
    exists = (tl.sum(top.to(tl.int32), axis=0) > 0) & (tl.sum(bottom.to(tl.int32), axis=0) > 0)
    chosen_reward = tl.sum(tl.where(offs == chosen, reward, 0.0), axis=0)
    rejected_reward = tl.sum(tl.where(offs == rejected, reward, 0.0), axis=0)
    exists = exists & (chosen_reward > rejected_reward)
    return tl.where(exists, tl.where((offs[:, None] == chosen) & (offs[None, :] == rejected), 1.0, 0.0), 0.0)


@triton.jit
def best_worst_pair(reward, valid, BLOCK_G: tl.constexpr):
    """(argmax r, argmin r) over valid responses, first index on ties; none if all r are equal."""
    offs = tl.arange(0, BLOCK_G)
    best_value = tl.max(tl.where(valid, reward, -float("inf")), axis=0)
    worst_value = tl.min(tl.where(valid, reward, float("inf")), axis=0)
    best = tl.argmax(tl.where(valid, reward, -float("inf")), axis=0, tie_break_left=True)
    worst = tl.argmin(tl.where(valid, reward, float("inf")), axis=0, tie_break_left=True)
    pair = tl.where((offs[:, None] == best) & (offs[None, :] == worst), 1.0, 0.0)
    return tl.where(best_value > worst_value, pair, 0.0)


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
def _group_loss_forward_kernel(
    emb_ptr, mask_ptr, policy_ptr, ref_ptr, rewards_ptr, counts_ptr, scores_ptr, weights_ptr, lengths_ptr,
    nll_logps_ptr, nll_tokens_ptr,
    stats_ptr, grad_policy_ptr, chosen_counts_ptr, rejected_counts_ptr, sim_ptr, norms_ptr, inverse_ptr,
    G, D, stride_b, stride_g, stride_d,
    beta, orpo_lambda, simpo_gamma, min_deviation, eps, quality_quantile,
    LOSS: tl.constexpr, PAIRS: tl.constexpr, WEIGHTS: tl.constexpr, NORM: tl.constexpr, ORPO_DORPO: tl.constexpr,
    DIVPO_RANKED: tl.constexpr, HAS_EMB: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_SCORES: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_NLL_LOGPS: tl.constexpr, HAS_NLL_TOKENS: tl.constexpr,
    NEED_LOGDET: tl.constexpr, STORE_STATE: tl.constexpr, NUM_STATS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    RETRY_FP64: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
    pair_valid = valid[:, None] & valid[None, :]
    # Padded log-probs get a finite stand-in (< 0 keeps log(1 - e^pi) finite); they meet no pair.
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

    # -- diversity of the group
    dev = tl.zeros([BLOCK_G], dtype=ACC)
    residual = tl.full([BLOCK_G], 1.0, ACC)
    logdet = tl.sum(dev, axis=0)
    mean_similarity = logdet
    has_similarity = logdet
    emb_nonfinite = logdet
    if HAS_EMB:
        gram = gram_matrix(emb_ptr + b * stride_b, stride_g, stride_d, valid, D, BLOCK_G, BLOCK_D, ACC, PRECISION)
        sim, norms = similarity_from_gram(gram, valid, 0.0, 0, BLOCK_G)
        dev = deviation_from_similarity(sim, valid)
        others = pair_valid & (offs[:, None] != offs[None, :])
        other_count = tl.sum(tl.sum(others.to(ACC), axis=1), axis=0)
        mean_similarity = tl.sum(tl.sum(tl.where(others, sim, 0.0), axis=1), axis=0) / tl.maximum(other_count, 1.0)
        has_similarity = tl.where(other_count > 0.0, 1.0, 0.0)
        finite = (norms == norms) & (norms < float("inf"))
        emb_nonfinite = tl.sum(tl.where(valid & ~finite, 1.0, 0.0), axis=0)
        if NEED_LOGDET:
            logdet, inverse = logdet_and_inverse(sim, valid, eps, G, BLOCK_G, RETRY_FP64)
            residual = 1.0 / diagonal(inverse, BLOCK_G)
            if STORE_STATE:
                store_square(inverse_ptr + b * G * G, inverse, G, BLOCK_G)
        if STORE_STATE:
            store_square(sim_ptr + b * G * G, sim, G, BLOCK_G)
            tl.store(norms_ptr + b * G + offs, norms, mask=offs < G)

    # -- pairs: C_ij = how often (i chosen, j rejected) is a pair
    if PAIRS == 0:
        counts = tl.where(pair_valid & (reward[:, None] > reward[None, :]), 1.0, 0.0)
    elif PAIRS == 1:
        counts = best_worst_pair(reward, valid, BLOCK_G)
    elif PAIRS == 2:
        top, bottom = divpo_pools(reward, valid, quality_quantile, DIVPO_RANKED, BLOCK_G)
        if HAS_SCORES:
            top_score = tl.load(scores_ptr + b * G + offs, mask=valid, other=0.0).to(ACC)
            bottom_score = top_score
        elif DIVPO_RANKED:
            # deviation within each pool: a pool is the "valid" set of its own deviation
            top_score = deviation_from_similarity(sim, top)
            bottom_score = deviation_from_similarity(sim, bottom)
        else:
            top_score = dev
            bottom_score = dev
        counts = divpo_pair(reward, top, bottom, top_score, bottom_score, BLOCK_G)
    else:
        counts = load_square(counts_ptr + b * G * G, G, BLOCK_G, ACC)

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

    # -- pair losses, their gradient w.r.t. the log-probs, and the metric partial sums
    loss, dloss, slope, implicit, odds = pair_loss_terms(policy, ref, weight, length, beta, orpo_lambda,
                                                         simpo_gamma, LOSS, ORPO_DORPO)
    weighted = counts * weight[:, None]
    if LOSS == 2 and ORPO_DORPO:
        outer = counts  # the weight is inside DORPO's log-sigmoid
    else:
        outer = weighted
    paired = counts > 0.0
    loss_sum = tl.sum(tl.sum(tl.where(paired, outer * loss, 0.0), axis=1), axis=0)
    per_pair = tl.where(paired, outer * dloss, 0.0)
    grad = slope * (tl.sum(per_pair, axis=1) - tl.sum(per_pair, axis=0))
    chosen_count = tl.sum(counts, axis=1)
    rejected_count = tl.sum(counts, axis=0)
    if LOSS == 2 and not ORPO_DORPO:
        grad -= tl.sum(weighted, axis=1)  # the per-pair NLL -pi_i
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

    num_pairs = tl.sum(tl.sum(counts, axis=1), axis=0)
    stats = stats_ptr + b * NUM_STATS
    tl.store(stats + 0, loss_sum)
    tl.store(stats + 1, num_pairs)
    tl.store(stats + 2, tl.sum(tl.sum(counts * implicit[:, None], axis=1), axis=0))
    tl.store(stats + 3, tl.sum(tl.sum(counts * implicit[None, :], axis=1), axis=0))
    correct = tl.where(implicit[:, None] > implicit[None, :], counts, 0.0)
    tl.store(stats + 4, tl.sum(tl.sum(correct, axis=1), axis=0))
    tl.store(stats + 5, tl.where(num_pairs == 0.0, 1.0, 0.0))
    tl.store(stats + 6, tl.sum(dev, axis=0))
    tl.store(stats + 7, mean_similarity)
    tl.store(stats + 8, has_similarity)
    tl.store(stats + 9, logdet)
    tl.store(stats + 10, tl.sum(valid.to(ACC), axis=0))
    tl.store(stats + 11, emb_nonfinite)
    tl.store(stats + 12, tl.sum(tl.sum(weighted, axis=1), axis=0))
    tl.store(stats + 13, tl.sum(tl.where(valid, chosen_count * nll_logps, 0.0), axis=0))
    tl.store(stats + 14, tl.sum(tl.where(valid, chosen_count * nll_tokens, 0.0), axis=0))
    tl.store(stats + 15, tl.sum(tl.where(valid, chosen_count * policy, 0.0), axis=0))
    tl.store(stats + 16, tl.sum(tl.where(valid, rejected_count * policy, 0.0), axis=0))
    tl.store(stats + 17, tl.sum(tl.sum(tl.where(paired, -counts * softplus(-odds), 0.0), axis=1), axis=0))
    tl.store(stats + 18, tl.sum(tl.sum(tl.where(paired, counts * odds, 0.0), axis=1), axis=0))


@dataclass(frozen=True)
class LossConfig:
    """The non-tensor arguments of the fused loss (hashable, passed through autograd)."""

    loss: str
    diversity: str
    pairs: str
    beta: float
    orpo_lambda: float
    simpo_gamma: float
    deviation_norm: str
    min_deviation: float
    diversity_alpha: float
    eps: float
    quality_quantile: float
    orpo_weighting: str = "dorpo"
    divpo_pools: str = "ranked"
    given_weights: bool = False
    cpo_alpha: float = 0.0
    kernel_backend: str = "triton"  # "triton" or "cuda"

    @property
    def needs_logdet(self) -> bool:
        return self.diversity == "logdet_gain" or self.diversity_alpha > 0

    @property
    def dorpo(self) -> bool:
        """DORPO's form: weight inside the log-sigmoid, NLL scaled by the batch mean of the weights."""
        return self.loss == "orpo" and self.orpo_weighting == "dorpo"

    @property
    def has_nll(self) -> bool:
        """The loss has the batch NLL term of the chosen sequences (DORPO / ORPO, or CPO's cpo_alpha)."""
        return self.dorpo or self.cpo_alpha > 0

    @property
    def weights_mode(self) -> int:
        """Weight mode of the kernels: the index in DIVERSITIES, or 3 for given weights."""
        return 3 if self.given_weights else DIVERSITIES.index(self.diversity)


@dataclass
class LossTensors:
    """The tensor inputs of the fused loss; the optional ones are None when not given."""

    policy: torch.Tensor
    rewards: torch.Tensor
    ref: torch.Tensor | None = None
    emb: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    nll_logps: torch.Tensor | None = None
    nll_tokens: torch.Tensor | None = None


def group_loss_forward(inputs: LossTensors, config: LossConfig, store_state: bool) -> tuple[torch.Tensor | None, ...]:
    """Launch the fused forward: ``(stats [B, NUM_STATS], d loss_sum / d policy [B, G], chosen counts [B, G],
    rejected counts [B, G], S, norms, K^-1)``; ``S``, norms and ``K^-1`` only with ``store_state``."""
    policy, emb = inputs.policy, inputs.emb
    batch, group = policy.shape
    dim = emb.shape[2] if emb is not None else 1
    dtypes = (policy.dtype,) + ((emb.dtype,) if emb is not None else ())
    acc = accumulation_dtype(*dtypes)
    device = policy.device
    if config.kernel_backend == "cuda":
        return _cuda_group_loss_forward(inputs, config, store_state, acc)
    stats = new_output((batch, len(STATS)), acc, device)
    grad_policy = new_output((batch, group), acc, device)
    chosen_counts = new_output((batch, group), acc, device)
    rejected_counts = new_output((batch, group), acc, device)
    sim = norms = inverse = None
    if store_state:
        sim = new_output((batch, group, group), acc, device)
        norms = new_output((batch, group), acc, device)
        inverse = new_output((batch, group, group), acc, device) if config.needs_logdet else None

    def contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.contiguous()

    block_g = group_block(group)
    _group_loss_forward_kernel[(batch,)](
        emb, inputs.mask, policy.contiguous(), contiguous(inputs.ref), inputs.rewards.contiguous(), inputs.counts,
        contiguous(inputs.scores), contiguous(inputs.weights), contiguous(inputs.lengths),
        contiguous(inputs.nll_logps), contiguous(inputs.nll_tokens),
        stats, grad_policy, chosen_counts, rejected_counts, sim, norms, inverse,
        group, dim, *(emb.stride() if emb is not None else (0, 0, 0)),
        config.beta, config.orpo_lambda, config.simpo_gamma, config.min_deviation, config.eps,
        config.quality_quantile,
        LOSS=LOSSES.index(config.loss), PAIRS=PAIR_MODES.index(config.pairs), WEIGHTS=config.weights_mode,
        NORM=DEVIATION_NORMS.index(config.deviation_norm), ORPO_DORPO=config.dorpo,
        DIVPO_RANKED=config.divpo_pools == "ranked",
        HAS_EMB=emb is not None, HAS_MASK=inputs.mask is not None, HAS_REF=inputs.ref is not None,
        HAS_SCORES=inputs.scores is not None, HAS_LENGTHS=inputs.lengths is not None,
        HAS_NLL_LOGPS=inputs.nll_logps is not None, HAS_NLL_TOKENS=inputs.nll_tokens is not None,
        NEED_LOGDET=config.needs_logdet and emb is not None, STORE_STATE=store_state, NUM_STATS=len(STATS),
        BLOCK_G=block_g, BLOCK_D=embedding_block(block_g, dim), ACC=triton_dtype(acc),
        PRECISION=dot_precision(emb.dtype if emb is not None else acc), RETRY_FP64=acc == torch.float32,
        num_warps=num_warps_for(block_g))
    return stats, grad_policy, chosen_counts, rejected_counts, sim, norms, inverse


def _cuda_group_loss_forward(inputs: LossTensors, config: LossConfig, store_state: bool,
                             acc: torch.dtype) -> tuple[torch.Tensor | None, ...]:
    """The same launch through the CUDA extension (``csrc/group_loss.cu``); same outputs."""
    def small(tensor: torch.Tensor | None) -> torch.Tensor | None:  # [B, G] inputs: acc dtype, contiguous
        return None if tensor is None else tensor.detach().to(acc).contiguous()

    emb = inputs.emb
    if emb is not None:  # the extension pairs float64 accumulation with float64 emb only
        emb = emb.detach().to(torch.float64) if acc == torch.float64 else emb.detach()
    outputs = _cuda.extension(inputs.policy.device).group_loss_forward(
        emb, inputs.mask, small(inputs.policy), small(inputs.ref), small(inputs.rewards), small(inputs.counts),
        small(inputs.scores), small(inputs.weights), small(inputs.lengths), small(inputs.nll_logps),
        small(inputs.nll_tokens), LOSSES.index(config.loss), PAIR_MODES.index(config.pairs), config.weights_mode,
        DEVIATION_NORMS.index(config.deviation_norm), config.orpo_weighting == "dorpo",
        config.divpo_pools == "ranked", config.needs_logdet, store_state, config.beta, config.orpo_lambda,
        config.simpo_gamma, config.min_deviation, config.eps, config.quality_quantile, poison_outputs())
    stats, grad_policy, sim, norms, inverse, chosen_counts, rejected_counts = outputs
    return stats, grad_policy, chosen_counts, rejected_counts, sim, norms, inverse


def cuda_similarity_backward(grad_sim: torch.Tensor, sim: torch.Tensor, norms: torch.Tensor, emb: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
    """``dL/d emb`` through the CUDA extension (``csrc/similarity_backward.cu``), cosine kernel."""
    rows = emb.detach().to(sim.dtype) if sim.dtype == torch.float64 else emb.detach()
    grad = _cuda.extension(emb.device).similarity_backward(grad_sim.to(sim.dtype), sim, norms, rows, mask,
                                                           poison_outputs())
    return grad.to(emb.dtype)


def nll_coefficient(totals: torch.Tensor, config: LossConfig) -> torch.Tensor | float:
    """What multiplies the NLL term: DORPO's batch mean of the chosen weights, or CPO's ``cpo_alpha``."""
    if config.dorpo:
        return totals[STAT["weight_sum"]] / totals[STAT["pairs"]].clamp_min(1.0)
    return config.cpo_alpha


def nll_from_totals(totals: torch.Tensor) -> torch.Tensor:
    """The token-mean NLL of the chosen sequences of the batch's pairs."""
    return -totals[STAT["nll_logps"]] / totals[STAT["nll_tokens"]].clamp_min(1e-30)


def loss_from_totals(totals: torch.Tensor, batch: int, config: LossConfig) -> torch.Tensor:
    """The scalar loss from the batch totals of the per-group partial sums:
    ``weighted_loss / P + c * NLL - alpha * mean_b logdet_b`` (``c``: :func:`nll_coefficient`)."""
    loss = totals[STAT["weighted_loss"]] / totals[STAT["pairs"]].clamp_min(1.0)
    if config.has_nll:
        loss = loss + nll_coefficient(totals, config) * nll_from_totals(totals)
    if config.diversity_alpha > 0:
        loss = loss - config.diversity_alpha * totals[STAT["logdet"]] / max(batch, 1)
    return loss


class GroupPreferenceLossFunction(torch.autograd.Function):
    """``(loss, per-group stats, batch totals, chosen counts, rejected counts)``: the loss is
    differentiable w.r.t. the policy, reference and NLL log-probs and emb."""

    @staticmethod
    def forward(ctx, policy: torch.Tensor, ref: torch.Tensor | None, emb: torch.Tensor | None,
                nll_logps: torch.Tensor | None, inputs: LossTensors, config: LossConfig) -> tuple[torch.Tensor, ...]:
        store_state = emb is not None and ctx.needs_input_grad[2] and config.diversity_alpha > 0
        stats, grad_policy, chosen_counts, rejected_counts, sim, norms, inverse = group_loss_forward(
            inputs, config, store_state)
        totals = stats.sum(0)
        loss = loss_from_totals(totals, policy.shape[0], config)
        ctx.save_for_backward(grad_policy, chosen_counts, totals, emb if store_state else None, inputs.mask, sim,
                              norms, inverse)
        ctx.config, ctx.policy_dtype = config, policy.dtype
        ctx.ref_dtype = None if ref is None else ref.dtype
        ctx.nll_dtype = None if nll_logps is None else nll_logps.dtype
        ctx.mark_non_differentiable(stats, totals, chosen_counts, rejected_counts)
        return loss.to(reference.compute_dtype(policy.dtype)), stats, totals, chosen_counts, rejected_counts

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_unused: torch.Tensor):
        grad_policy_sum, chosen_counts, totals, emb, mask, sim, norms, inverse = ctx.saved_tensors
        config = ctx.config
        grad_loss = grad_loss.to(grad_policy_sum.dtype)
        scaled = grad_policy_sum * (grad_loss / totals[STAT["pairs"]].clamp_min(1.0))
        grad_nll = None
        if config.has_nll:  # d (c * NLL) / d nll_logps_k = -c * chosen_k / sum_P nll_tokens
            grad_nll = chosen_counts * (-grad_loss * nll_coefficient(totals, config)
                                        / totals[STAT["nll_tokens"]].clamp_min(1e-30))
        grad_nll_logps = None
        if ctx.nll_dtype is not None:
            grad_nll_logps = grad_nll.to(ctx.nll_dtype) if ctx.needs_input_grad[3] and grad_nll is not None else None
        elif grad_nll is not None:  # the NLL term read the policy log-probs
            scaled = scaled + grad_nll
        grad_policy = scaled.to(ctx.policy_dtype) if ctx.needs_input_grad[0] else None
        grad_ref = None
        if ctx.needs_input_grad[1] and config.loss in ("dpo", "ipo"):
            ref_part = grad_policy_sum * (grad_loss / totals[STAT["pairs"]].clamp_min(1.0))
            grad_ref = (-ref_part).to(ctx.ref_dtype)
        grad_emb = None
        if emb is not None:
            batch = max(grad_policy_sum.shape[0], 1)
            grad_sim = inverse * (-config.diversity_alpha / batch * grad_loss.to(inverse.dtype))
            if config.kernel_backend == "cuda":
                grad_emb = cuda_similarity_backward(grad_sim, sim, norms, emb, mask)
            else:
                grad_emb = similarity_backward(grad_sim, sim, norms, emb, mask)
        return grad_policy, grad_ref, grad_emb, grad_nll_logps, None, None


def _metrics_from_totals(totals: torch.Tensor, batch: int, loss: torch.Tensor, config: LossConfig,
                         has_emb: bool) -> dict[str, torch.Tensor]:
    """The metrics from the batch totals of the per-group partial sums (device ops, no sync)."""
    pairs = totals[STAT["pairs"]]
    per_pair = pairs.clamp_min(1.0)
    chosen = totals[STAT["chosen_reward"]] / per_pair
    rejected = totals[STAT["rejected_reward"]] / per_pair
    metrics = {
        "loss": loss.detach(),
        "pairs": pairs,
        "groups_without_pairs": totals[STAT["no_pairs"]],
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": totals[STAT["correct"]] / per_pair,
        "logps/chosen": totals[STAT["logps_chosen"]] / per_pair,
        "logps/rejected": totals[STAT["logps_rejected"]] / per_pair,
    }
    if config.has_nll:
        metrics["nll_loss"] = nll_from_totals(totals)
    if config.loss == "orpo":
        metrics["log_odds_ratio"] = totals[STAT["log_odds_ratio"]] / per_pair
        metrics["log_odds_chosen"] = totals[STAT["log_odds_chosen"]] / per_pair
    if has_emb:
        metrics["diversity/mean_similarity"] = (totals[STAT["mean_similarity"]]
                                                / totals[STAT["has_similarity"]].clamp_min(1.0))
        metrics["diversity/deviation"] = totals[STAT["deviation"]] / totals[STAT["valid"]].clamp_min(1.0)
        if config.needs_logdet:
            metrics["diversity/logdet"] = totals[STAT["logdet"]] / max(batch, 1)
    return {name: value.detach().to(torch.float32) for name, value in metrics.items()}


def _check_pair_index(checks: DataChecks, pair_index: torch.Tensor, valid: torch.Tensor) -> None:
    """Every explicit pair names two different valid responses; ``(-1, -1)`` rows are padding."""
    group = valid.shape[1]
    chosen, rejected = pair_index[..., 0], pair_index[..., 1]
    padding = (chosen < 0) & (rejected < 0)
    in_range = (chosen >= 0) & (chosen < group) & (rejected >= 0) & (rejected < group)
    chosen_valid = valid.gather(1, chosen.clamp(0, group - 1).long())
    rejected_valid = valid.gather(1, rejected.clamp(0, group - 1).long())
    good = in_range & chosen_valid & rejected_valid & (chosen != rejected)
    checks.require((~padding & ~good).any(-1),
                   lambda groups: f"pair_index rows of groups {groups} do not name two different valid "
                                  f"responses in [0, {group}) (use (-1, -1) for padding rows)")


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
    check_choice("loss", loss, LOSSES)
    check_choice("diversity", diversity, DIVERSITIES)
    check_choice("pairs", pairs, PAIR_MODES)
    check_choice("deviation_norm", deviation_norm, DEVIATION_NORMS)
    check_choice("orpo_weighting", orpo_weighting, ORPO_WEIGHTINGS)
    check_choice("divpo_pools", divpo_pools, DIVPO_POOLS)
    check_scalar("beta", beta, low=0.0, low_open=True)
    check_scalar("orpo_lambda", orpo_lambda, low=0.0)
    check_scalar("simpo_gamma", simpo_gamma)
    check_scalar("min_deviation", min_deviation, low=0.0)
    check_scalar("diversity_alpha", diversity_alpha, low=0.0)
    check_scalar("eps", eps, low=0.0, low_open=True)
    check_scalar("quality_quantile", quality_quantile, low=0.0, high=1.0, low_open=True, high_open=True)
    check_scalar("cpo_alpha", cpo_alpha, low=0.0)
    if cpo_alpha > 0 and loss == "orpo":
        raise ValueError("cpo_alpha adds CPO's NLL term to dpo/ipo/simpo; loss='orpo' has its own NLL term")
    has_nll = (loss == "orpo" and orpo_weighting == "dorpo") or cpo_alpha > 0
    if (nll_logps is not None or nll_tokens is not None) and not has_nll:
        raise ValueError("nll_logps / nll_tokens feed the NLL term of loss='orpo' (orpo_weighting='dorpo') or of "
                         "cpo_alpha > 0; this loss has none")
    if token_counts is not None and loss != "ipo":
        raise ValueError("token_counts normalize IPO's log-ratios; they are only used with loss='ipo'")

    policy_logps = check_float_tensor("policy_logps", policy_logps, 2, "[B, G]")
    batch, group = policy_logps.shape
    if group < 2:
        raise ValueError(f"policy_logps must hold G >= 2 responses per group, got G={group}")
    rewards = check_group_tensor("rewards", rewards, batch, group)
    if ref_logps is not None:
        ref_logps = check_group_tensor("ref_logps", ref_logps, batch, group)
    if divpo_scores is not None:
        divpo_scores = check_group_tensor("divpo_scores", divpo_scores, batch, group)
    if weights is not None:
        weights = check_group_tensor("weights", weights, batch, group)
    extras = {name: check_group_tensor(name, value, batch, group) if value is not None else None
              for name, value in (("token_counts", token_counts), ("nll_logps", nll_logps),
                                  ("nll_tokens", nll_tokens))}
    token_counts, nll_logps, nll_tokens = extras["token_counts"], extras["nll_logps"], extras["nll_tokens"]
    mask = check_mask(mask, batch, group)
    encoders = _check_encoders(emb, batch, group)
    emb = encoders[0] if encoders else None
    if len(encoders) > 1 and (diversity != "deviation" or deviation_norm != "minmax" or weights is not None):
        raise ValueError("several encoders combine into DDPO weights: they need diversity='deviation' with "
                         "deviation_norm='minmax' and no weights")
    if pairs == "explicit" and pair_index is None:
        raise ValueError("pairs='explicit' needs pair_index [B, P, 2]")
    if pair_index is not None:
        if pairs not in ("all", "explicit"):
            raise ValueError(f"pair_index gives the pairs explicitly; it cannot be combined with pairs={pairs!r}")
        pair_index = check_index_tensor("pair_index", pair_index, batch)
        pairs = "explicit"
    needs_emb = {
        f"diversity={diversity!r}": diversity != "none" and weights is None,
        "diversity_alpha > 0": diversity_alpha > 0,
        "pairs='divpo' without divpo_scores": pairs == "divpo" and divpo_scores is None,
    }
    missing = [reason for reason, needed in needs_emb.items() if needed]
    if missing and emb is None:
        raise ValueError(f"{missing[0]} needs emb [B, G, D]")
    if divpo_scores is not None and pairs != "divpo":
        raise ValueError("divpo_scores is only used with pairs='divpo'")
    device = check_same_device(policy_logps=policy_logps, rewards=rewards, ref_logps=ref_logps, mask=mask,
                               pair_index=pair_index, divpo_scores=divpo_scores, weights=weights, **extras,
                               **{f"emb[{k}]" if len(encoders) > 1 else "emb": e for k, e in enumerate(encoders)})
    chosen = resolve_backend(backend, op="group_preference_loss", device=device, group_size=group,
                             kernels=("triton", "cuda"), dim=None if emb is None else emb.shape[-1],
                             emb_dtype=None if emb is None else emb.dtype)

    valid = reference.valid_mask(mask, batch, group, device)
    checks = DataChecks(check_inputs)
    for name, value in (("policy_logps", policy_logps), ("rewards", rewards), ("ref_logps", ref_logps),
                        ("divpo_scores", divpo_scores), ("weights", weights), *extras.items()):
        checks.finite(name, value, valid)
    for name, value in (("token_counts", token_counts), ("nll_tokens", nll_tokens)):
        if value is not None:
            checks.require((valid & ~(value > 0)).any(-1),
                           lambda groups, name=name: f"{name} must be > 0 for valid responses; groups {groups} "
                                                     f"are not")
    if missing:
        checks.group_size(valid, missing[0])
    if loss == "orpo":
        checks.require((valid & (policy_logps >= 0)).any(-1),
                       lambda groups: f"loss='orpo' needs mean token log-probs < 0 in policy_logps; "
                                      f"groups {groups} have values >= 0")
    if pair_index is not None:
        _check_pair_index(checks, pair_index, valid)
    for k, extra in enumerate(encoders[1:], start=1):
        checks.finite(f"emb[{k}]", extra, valid)

    if chosen in ("triton", "cuda"):
        if len(encoders) > 1:  # the combined weights of several encoders go in as given weights
            kernel = "triton" if chosen == "triton" else "auto"
            devs = [deviation(e.detach(), mask, backend=kernel, check_inputs=False) for e in encoders]
            weights = reference.deviation_weights(devs, valid, deviation_norm, min_deviation)
        config = LossConfig(loss, diversity, pairs, beta, orpo_lambda, simpo_gamma, deviation_norm, min_deviation,
                            diversity_alpha, eps, quality_quantile, orpo_weighting, divpo_pools, weights is not None,
                            cpo_alpha, chosen)
        counts = None if pair_index is None else reference.pair_counts_explicit(pair_index, group)
        tensors = LossTensors(policy_logps, rewards, ref_logps, emb, contiguous_mask(mask), counts, divpo_scores,
                              None if weights is None else weights.detach(), token_counts, nll_logps, nll_tokens)
        total, stats, totals, chosen_counts, rejected_counts = GroupPreferenceLossFunction.apply(
            policy_logps, ref_logps, emb, nll_logps, tensors, config)
        logdet = stats[:, STAT["logdet"]].to(reference.compute_dtype(emb.dtype)) if config.needs_logdet else None
        output = LossOutput(total, _metrics_from_totals(totals, batch, total, config, emb is not None), logdet,
                            chosen_counts, rejected_counts)
        if emb is not None:
            checks.nonfinite("emb", stats[:, STAT["emb_nonfinite"]] > 0)
    else:
        checks.finite("emb", emb, valid)
        output = reference.group_preference_loss(
            policy_logps, rewards, encoders or None, ref_logps, valid, loss=loss, diversity=diversity, pairs=pairs,
            pair_index=pair_index, beta=beta, orpo_lambda=orpo_lambda, simpo_gamma=simpo_gamma,
            deviation_norm=deviation_norm, min_deviation=min_deviation, orpo_weighting=orpo_weighting,
            diversity_alpha=diversity_alpha, eps=eps, quality_quantile=quality_quantile, divpo_pools=divpo_pools,
            divpo_scores=divpo_scores, weights=weights, token_counts=token_counts, nll_logps=nll_logps,
            nll_tokens=nll_tokens, cpo_alpha=cpo_alpha)
    if output.logdet is not None:
        check_factorization(checks, torch.isnan(output.logdet))
    checks.raise_if_failed()
    return output


def _check_encoders(emb: object, batch: int, group: int) -> list[torch.Tensor]:
    """``emb`` as a list of checked ``[B, G, D_k]`` tensors (empty for None)."""
    if emb is None:
        return []
    many = isinstance(emb, (list, tuple))
    if many and not emb:
        raise ValueError("emb is an empty sequence; give one [B, G, D] tensor per encoder")
    encoders = [check_emb(e) for e in (emb if many else [emb])]
    for k, e in enumerate(encoders):
        if tuple(e.shape[:2]) != (batch, group):
            name = f"emb[{k}]" if many else "emb"
            raise ValueError(f"{name} has [B, G] = {tuple(e.shape[:2])} but policy_logps has ({batch}, {group})")
    return encoders
