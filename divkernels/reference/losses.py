"""3. Group-wise preference losses: DPO / IPO / ORPO / SimPO x DDPO / DORPO / DivPO / DQO."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from divkernels.reference.common import (
    DEVIATION_TIE,
    DIVPO_COUNT_SLACK,
    DIVPO_TIE_RTOL,
    DQO_EPS,
    LN2,
    PADDED_LOGP,
    _eye,
    _pair_valid,
    compute_dtype,
    valid_mask,
)
from divkernels.reference.diversity import (
    deviation,
    deviation_from_similarity,
    gains_from_inverse,
    group_sizes,
    logdet_and_inverse,
    partition_diversity,
)
from divkernels.reference.similarity import pairwise_similarity
from divkernels.types import LossOutput

# ---------------------------------------------------------------------------------------------
# 3. Group-wise preference losses
# ---------------------------------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for large ``|x|`` (Maechler 2012).

    Each branch gets its input clamped to its own domain so that the branch ``where`` discards
    has a finite gradient too (a NaN there would leak through ``0 * NaN``).
    """
    near_zero = x > -LN2
    small = torch.log(-torch.expm1(torch.where(near_zero, x, -LN2)))
    large = torch.log1p(-torch.exp(torch.where(near_zero, -LN2, x)))
    return torch.where(near_zero, small, large)


def pair_counts_all(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``C_bij = 1`` for every valid pair with ``r_i > r_j`` (ties give no pair)."""
    better = rewards[:, :, None] > rewards[:, None, :]
    return (better & _pair_valid(valid)).to(rewards.dtype)


def _one_hot_pair(chosen: torch.Tensor, rejected: torch.Tensor, exists: torch.Tensor, group: int) -> torch.Tensor:
    rows = F.one_hot(chosen, group)
    cols = F.one_hot(rejected, group)
    counts = rows[:, :, None] * cols[:, None, :]
    return counts.to(torch.float32) * exists[:, None, None]


def pair_counts_best_worst(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One pair per group: (argmax r, argmin r) over valid responses, first index on ties.

    A group whose valid rewards are all equal has no pair.
    """
    best_value, best = torch.where(valid, rewards, -torch.inf).max(-1)
    worst_value, worst = torch.where(valid, rewards, torch.inf).min(-1)
    return _one_hot_pair(best, worst, (best_value > worst_value).to(rewards.dtype), rewards.shape[1])


def quality_threshold(rewards: torch.Tensor, valid: torch.Tensor, quality_quantile: float) -> torch.Tensor:
    """``[B]`` reward at quantile ``1 - quality_quantile`` of each group's valid rewards.

    Linear interpolation between order statistics, as ``torch.quantile`` does.
    """
    n = valid.sum(-1)
    ordered = torch.where(valid, rewards, torch.inf).sort(-1).values
    position = (1.0 - quality_quantile) * (n - 1).clamp_min(0).to(rewards.dtype)
    lower = position.floor().long()
    upper = position.ceil().long()
    low_value = ordered.gather(-1, lower[:, None])[:, 0]
    high_value = ordered.gather(-1, upper[:, None])[:, 0]
    return low_value + (position - lower) * torch.where(upper > lower, high_value - low_value, 0.0)


def _first_near_extreme(scores: torch.Tensor, pool: torch.Tensor, largest: bool) -> torch.Tensor:
    """``[B]`` first index in ``pool`` whose score is within ``DIVPO_TIE_RTOL`` of the pool's extreme."""
    sign = 1.0 if largest else -1.0
    signed = torch.where(pool, sign * scores, -torch.inf)
    best = signed.max(-1, keepdim=True).values
    near = pool & (signed >= best - DIVPO_TIE_RTOL * best.abs().clamp_min(1.0))
    return near.to(torch.int8).argmax(-1)


def divpo_pool_size(n: torch.Tensor, quality_quantile: float) -> torch.Tensor:
    """``[B]`` size ``k`` of each DivPO pool: ``floor(q n)`` (``DIVPO_COUNT_SLACK`` absorbs float rounding),
    at least 1 and at most ``floor(n / 2)`` so that the two pools never overlap."""
    count = torch.floor(quality_quantile * n.to(torch.float64) + DIVPO_COUNT_SLACK).long()
    return torch.minimum(count.clamp_min(1), torch.div(n, 2, rounding_mode="floor"))


def reward_ranks(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, G]`` rank of each valid reward among its group's, ascending, ties broken by index (0-based)."""
    group = rewards.shape[1]
    index = torch.arange(group, device=rewards.device)
    before = (rewards[:, None, :] < rewards[:, :, None]) | ((rewards[:, None, :] == rewards[:, :, None])
                                                            & (index[None, :] < index[:, None])[None])
    return (before & valid[:, None, :]).sum(-1)


def divpo_pools(rewards: torch.Tensor, valid: torch.Tensor, quality_quantile: float,
                mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top, bottom)`` ``[B, G]`` bool: where DivPO takes the chosen and the rejected response.

    ``"ranked"``: the ``k`` highest and the ``k`` lowest rewards, ``k = divpo_pool_size(n, q)`` (ties
    by index, as a stable sort). ``"threshold"`` (our earlier variant): rewards at or above the
    group's ``1 - q`` quantile, and all the rest.
    """
    if mode == "ranked":
        n = valid.sum(-1)
        size = divpo_pool_size(n, quality_quantile)[:, None]
        rank = reward_ranks(rewards, valid)
        return valid & (rank >= (n[:, None] - size)), valid & (rank < size)
    threshold = quality_threshold(rewards, valid, quality_quantile)
    top = valid & (rewards >= threshold[:, None])
    return top, valid & ~top


def pair_counts_divpo(rewards: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None,
                      sim: torch.Tensor | None, quality_quantile: float, mode: str = "ranked") -> torch.Tensor:
    """DivPO pair selection (Lanchantin et al. 2025, arXiv 2501.18101): one pair per group, the most
    diverse response of the high-reward pool against the least diverse of the low-reward pool.

    Pools from :func:`divpo_pools`. Diversity is ``scores`` when given (DivPO's other criteria, e.g.
    ``-logp`` for "model probability"), else deviation by embedding computed *within each pool*, as
    Chung et al.'s re-implementation does (mj-storytelling/DiversityTuning
    ``scripts_dataset_cleaner/4_data_prep_for_divpo.py``: ``process_scores`` on each pool); the
    ``"threshold"`` mode uses the deviation over the whole group. A pair needs both pools non-empty
    and a strictly higher chosen reward (equal rewards carry no preference). Scores within a
    relative ``DIVPO_TIE_RTOL`` of the extreme count as tied and the first index wins: duplicated
    responses have equal deviation, and rounding must not decide between them.
    """
    top, bottom = divpo_pools(rewards, valid, quality_quantile, mode)
    if scores is not None:
        top_scores = bottom_scores = scores
    elif mode == "ranked":
        # deviation within each pool: the pool is the "valid" set of its own deviation
        top_scores, bottom_scores = deviation_from_similarity(sim, top), deviation_from_similarity(sim, bottom)
    else:
        top_scores = bottom_scores = deviation_from_similarity(sim, valid)
    chosen = _first_near_extreme(top_scores, top, largest=True)
    rejected = _first_near_extreme(bottom_scores, bottom, largest=False)
    exists = top.any(-1) & bottom.any(-1)
    exists = exists & (rewards.gather(1, chosen[:, None])[:, 0] > rewards.gather(1, rejected[:, None])[:, 0])
    return _one_hot_pair(chosen, rejected, exists.to(rewards.dtype), rewards.shape[1])


def pair_counts_explicit(pair_index: torch.Tensor, group: int) -> torch.Tensor:
    """``C_bij`` = how often (chosen i, rejected j) appears in ``pair_index [B, P, 2]``.

    Rows with a negative index are padding and give no pair; so do rows naming an index >= G (which
    the op's input check reports).
    """
    batch = pair_index.shape[0]
    chosen, rejected = pair_index[..., 0], pair_index[..., 1]
    real = (chosen >= 0) & (rejected >= 0) & (chosen < group) & (rejected < group)
    flat = torch.where(real, chosen * group + rejected, 0)
    counts = torch.zeros(batch, group * group, dtype=torch.float32, device=pair_index.device)
    counts.scatter_add_(1, flat, real.to(torch.float32))
    return counts.view(batch, group, group)


def pair_losses(
    loss: str,
    policy: torch.Tensor,
    ref: torch.Tensor,
    beta: float,
    orpo_lambda: float,
    simpo_gamma: float,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, G, G]`` loss ``l_ij`` of every ordered pair (i chosen, j rejected).

    With ``z = pi - ref``: dpo: ``-log sigmoid(beta (z_i - z_j))`` (TRL's ``sigmoid``); ipo:
    ``(z_i / T_i - z_j / T_j - 1 / (2 beta))^2`` with ``T`` the completion token counts (TRL's
    DPOTrainer divides each log-ratio by its completion length; 1 when ``token_counts`` is None);
    orpo: ``-pi_i + lambda * -log sigmoid(log_odds_i - log_odds_j)``, ``log_odds = pi - log(1 - e^pi)``
    (the per-pair form; DORPO's is in :func:`group_preference_loss`);
    simpo: ``-log sigmoid(beta (pi_i - pi_j) - gamma)``.
    """
    if loss in ("dpo", "ipo", "dpo_listwise"):
        logratio = policy - ref
        if loss in ("dpo", "dpo_listwise"):  # the listwise loss's pair logits (listwise_losses aggregates them)
            return -F.logsigmoid(beta * (logratio[:, :, None] - logratio[:, None, :]))
        if token_counts is not None:
            logratio = logratio / token_counts
        diff = logratio[:, :, None] - logratio[:, None, :]
        return (diff - 1.0 / (2.0 * beta)) ** 2
    if loss == "orpo":
        log_odds = policy - log1mexp(policy)
        odds_ratio = log_odds[:, :, None] - log_odds[:, None, :]
        return -policy[:, :, None] - orpo_lambda * F.logsigmoid(odds_ratio)
    if loss == "simpo":
        diff = policy[:, :, None] - policy[:, None, :]
        return -F.logsigmoid(beta * diff - simpo_gamma)
    raise ValueError(f"unknown loss {loss!r}")


def implicit_rewards(
    loss: str, policy: torch.Tensor, ref: torch.Tensor, beta: float, orpo_lambda: float
) -> torch.Tensor:
    """Per-response implicit reward that TRL logs as ``rewards/chosen`` and ``rewards/rejected``.

    DPO/IPO/listwise DPO: ``beta (pi - ref)`` (DPOTrainer); ORPO: ``lambda * pi`` (ORPOTrainer, whose ``beta``
    is our ``orpo_lambda``); SimPO: ``beta * pi`` (CPOTrainer).
    """
    if loss in ("dpo", "ipo", "dpo_listwise"):
        return beta * (policy - ref)
    if loss == "orpo":
        return orpo_lambda * policy
    return beta * policy


def listwise_losses(policy: torch.Tensor, ref: torch.Tensor, counts: torch.Tensor, beta: float) -> torch.Tensor:
    """``[B, G]`` listwise DPO term of each chosen response: ``l_i = log(1 + sum_j C_ij e^(-u_ij))``,
    ``u_ij = beta (z_i - z_j)``, ``z = pi - ref``; 0 for a response that is chosen in no pair.

    With ``pairs="all"`` (``C_ij = 1`` for ``r_i > r_j``) the terms of a group sum to the Plackett-Luce
    negative log-likelihood of its ranking by reward (DPO, Rafailov et al. 2023, arXiv 2305.18290,
    appendix A.3: ``-sum_k log(e^(beta z_(k)) / sum_(m >= k) e^(beta z_(m)))``), each response against
    those ranked below it. Ties are not ranked against each other: a response competes only with
    strictly lower rewards, so a group of equal rewards has no term and a strict ranking gives the
    Plackett-Luce likelihood exactly. With one pair per group (best-worst, DivPO) ``l`` is DPO's.
    """
    u = beta * ((policy - ref)[:, :, None] - (policy - ref)[:, None, :])
    paired = counts > 0
    # log-sum-exp over {0} and the row's -u_ij (with multiplicity C_ij), shifted by its maximum
    shift = torch.where(paired, -u, -torch.inf).amax(-1).clamp_min(0.0).detach()  # the value does not depend on it
    tail = torch.where(paired, counts * torch.exp(torch.where(paired, -u - shift[..., None], 0.0)), 0.0).sum(-1)
    return torch.where(paired.any(-1), shift + torch.log(torch.exp(-shift) + tail), 0.0)


def normalized_weights(raw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``w_i = raw_i / mean_{valid k} raw_k``; a group whose raw values are all 0 gets weight 1."""
    n = group_sizes(valid).to(raw.dtype).clamp_min(1.0)
    mean = (raw * valid).sum(-1) / n
    safe_mean = torch.where(mean > 0, mean, 1.0)
    return torch.where((mean > 0)[:, None], raw / safe_mean[:, None], 1.0)


def _valid_extremes(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 1]`` min and max of each group's valid values."""
    return (torch.where(valid, values, torch.inf).amin(-1, keepdim=True),
            torch.where(valid, values, -torch.inf).amax(-1, keepdim=True))


def ddpo_weights(deviations: torch.Tensor | Sequence[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """DDPO/DORPO weights of each response (Chung et al. 2025, arXiv 2503.17126), as the authors' code
    computes them: mj-storytelling/DiversityTuning ``scripts_dataset_cleaner/3_data_prep_for_diversified_training.py``
    (``transform_scores``) with the weight ``score + 1`` of ``models/ddpo_trainer.py``.

    Per encoder k the deviations are min-max scaled within the group, ``z_k = (d_k - min) / (max - min)``
    (0.5 when all are equal: the authors' score 0); several encoders combine by the geometric mean
    ``g = prod_k z_k^(1/K)``; then ``w = g / mean_valid(g)``, or ``2 g`` when every ``g`` is equal.
    One encoder: ``w_i = (d_i - d_min) / (mean d - d_min)``, and 1 for a group of equal deviations.
    Spreads up to ``DEVIATION_TIE`` count as equal (the authors test ``max == min`` exactly).

    Args:
        deviations: ``[B, G]``, or a sequence of them (one per encoder).
        valid: ``[B, G]`` bool.

    Returns:
        ``[B, G]`` weights (mean 1 over each group's valid responses unless all equal), 0 at padding.
    """
    stack = [deviations] if isinstance(deviations, torch.Tensor) else list(deviations)
    combined = torch.ones_like(stack[0])
    for dev in stack:
        low, high = _valid_extremes(dev, valid)
        spread = high - low
        scaled = torch.where(spread > DEVIATION_TIE, (dev - low) / torch.where(spread > DEVIATION_TIE, spread, 1.0),
                             0.5)
        combined = combined * scaled.clamp_min(0.0) ** (1.0 / len(stack))
    combined = torch.where(valid, combined, 0.0)
    low, high = _valid_extremes(combined, valid)
    n = group_sizes(valid).to(combined.dtype).clamp_min(1.0)
    mean = (combined.sum(-1) / n)[:, None]
    equal = (high - low) <= DEVIATION_TIE
    weights = torch.where(equal, 2.0 * combined, combined / torch.where(equal, 1.0, mean))
    return torch.where(valid, weights, 0.0)


def deviation_weights(dev: torch.Tensor | Sequence[torch.Tensor], valid: torch.Tensor, norm: str,
                      floor: float) -> torch.Tensor:
    """The weight of each chosen response from its deviation: ``norm`` ``"minmax"`` (DDPO/DORPO,
    :func:`ddpo_weights`), ``"mean"`` (ours: ``d / mean d``) or ``"none"`` (raw ``d``); floored at ``floor``."""
    if norm == "minmax":
        weights = ddpo_weights(dev, valid)
    else:
        weights = normalized_weights(dev, valid) if norm == "mean" else dev
    return weights.clamp_min(floor)


def mean_offdiagonal_similarity(sim: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``S_ij`` over valid ``i != j`` per group, averaged over groups with two or more."""
    others = _pair_valid(valid) & ~_eye(sim.shape[-1], valid)
    count = others.sum((-2, -1))
    per_group = torch.where(others, sim, 0.0).sum((-2, -1)) / count.clamp_min(1)
    has_pairs = count > 0
    return (per_group * has_pairs).sum() / has_pairs.sum().clamp_min(1)


def _loss_pair_counts(quality: torch.Tensor, valid: torch.Tensor, sim: torch.Tensor | None,
                      pair_index: torch.Tensor | None, pairs: str, divpo_scores: torch.Tensor | None,
                      quality_quantile: float, divpo_pools: str, dtype: torch.dtype) -> torch.Tensor:
    """``[B, G, G]`` pair counts ``C_ij`` of :func:`group_preference_loss`'s ``pairs`` mode."""
    group = valid.shape[1]
    if pair_index is not None:
        counts = pair_counts_explicit(pair_index, group)
    elif pairs == "all":
        counts = pair_counts_all(quality, valid)
    elif pairs == "best_worst":
        counts = pair_counts_best_worst(quality, valid)
    else:
        scores = None if divpo_scores is None else divpo_scores.to(dtype)
        counts = pair_counts_divpo(quality, valid, scores, None if sim is None else sim.detach(), quality_quantile,
                                   divpo_pools)
    return counts.to(dtype)



def _loss_weights(weights: torch.Tensor | None, valid: torch.Tensor, policy: torch.Tensor, encoders: list,
                  dev: torch.Tensor | None, inverse: torch.Tensor | None, diversity: str, deviation_norm: str,
                  min_deviation: float, dtype: torch.dtype, equivalence: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, G]`` constant weights of the chosen responses: given, or from ``diversity``."""
    if weights is not None:
        weights = torch.where(valid, weights.to(dtype), 0.0)
    elif diversity == "none":
        weights = torch.ones_like(policy)
    elif diversity == "partition":
        weights = normalized_weights(partition_diversity(mask=valid, equivalence=equivalence, dtype=dtype), valid)
    elif diversity == "deviation":
        devs = [dev.detach()] + [deviation(extra.detach(), valid) for extra in encoders[1:]]
        weights = deviation_weights(devs if len(devs) > 1 else devs[0], valid, deviation_norm, min_deviation)
    else:
        weights = normalized_weights(torch.exp(gains_from_inverse(inverse.detach())), valid)
    return weights.to(dtype).detach()


def _loss_metrics(total: torch.Tensor, counts: torch.Tensor, policy: torch.Tensor, ref: torch.Tensor,
                  nll: torch.Tensor, log_odds_terms: tuple | None, sim: torch.Tensor | None,
                  dev: torch.Tensor | None, logdet: torch.Tensor | None, valid: torch.Tensor, loss: str, beta: float,
                  orpo_lambda: float, orpo_weighting: str, cpo_alpha: float) -> dict[str, torch.Tensor]:
    """The metrics of :func:`group_preference_loss` (float32 scalars, TRL's names)."""
    batch, dtype = policy.shape[0], policy.dtype
    num_pairs = counts.sum()
    per_pair = num_pairs.clamp_min(1.0)
    chosen_counts, rejected_counts = counts.sum(-1), counts.sum(-2)
    metrics: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        implicit = implicit_rewards(loss, policy, ref, beta, orpo_lambda)
        chosen = (counts * implicit[:, :, None]).sum() / per_pair
        rejected = (counts * implicit[:, None, :]).sum() / per_pair
        correct = (implicit[:, :, None] > implicit[:, None, :]).to(dtype)
        metrics["loss"] = total.detach()
        metrics["pairs"] = num_pairs
        metrics["groups_without_pairs"] = (counts.sum((-2, -1)) == 0).sum().to(dtype)
        metrics["rewards/chosen"] = chosen
        metrics["rewards/rejected"] = rejected
        metrics["rewards/margins"] = chosen - rejected
        metrics["rewards/accuracies"] = (counts * correct).sum() / per_pair
        metrics["logps/chosen"] = (chosen_counts * policy).sum() / per_pair
        metrics["logps/rejected"] = (rejected_counts * policy).sum() / per_pair
        if (loss == "orpo" and orpo_weighting == "dorpo") or cpo_alpha > 0:
            metrics["nll_loss"] = nll
        if log_odds_terms is not None:
            metrics["log_odds_ratio"] = (counts * log_odds_terms[1]).sum() / per_pair
            metrics["log_odds_chosen"] = (counts * log_odds_terms[0]).sum() / per_pair
        if sim is not None:
            metrics["diversity/mean_similarity"] = mean_offdiagonal_similarity(sim, valid)
            metrics["diversity/deviation"] = dev.sum() / valid.sum().clamp_min(1)
        if logdet is not None:
            metrics["diversity/logdet"] = logdet.sum() / max(batch, 1)
        return {name: value.detach().to(torch.float32) for name, value in metrics.items()}


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
    eps: float = DQO_EPS,
    quality_quantile: float = 0.25,
    divpo_pools: str = "ranked",
    divpo_scores: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    nll_logps: torch.Tensor | None = None,
    nll_tokens: torch.Tensor | None = None,
    cpo_alpha: float = 0.0,
    equivalence: torch.Tensor | None = None,
) -> LossOutput:
    """Diversity-weighted group-wise preference loss: DPO/IPO/ORPO/SimPO x DDPO/DORPO/DivPO/DQO.

    With ``C`` the pairs (chosen i, rejected j) of each group, ``P`` their number and ``w_i`` the
    (constant) diversity weight of the chosen response:

    * dpo / ipo / simpo, and orpo with ``orpo_weighting="pair"`` (ours):
      ``sum_(i, j) w_i l_ij / P`` (DDPO: mj-storytelling/DiversityTuning ``models/ddpo_trainer.py``
      multiplies each pair's DPO loss by ``score_chosen + 1``);
    * dpo_listwise (ours, the DPO paper's Plackett-Luce form): ``sum_i w_i l_i / P`` with
      :func:`listwise_losses` ``l_i``: per group the (weighted) negative log-likelihood of its ranking
      by reward, normalized by the pairs as the pair losses are (switching from dpo keeps the scale of
      the gradient: ``l_i <= sum_j l_ij``);
    * orpo with ``orpo_weighting="dorpo"`` (DORPO, the authors' ``models/dorpo_trainer.py``,
      "Revision ver 2"): ``mean_P(w_i) * NLL - lambda * mean_P log sigmoid(w_i u_ij)`` with ``u``
      the log-odds difference: the weight scales the NLL term as a batch mean and sits *inside*
      the log-sigmoid (with ``w = 1``, TRL's ORPOTrainer);

    plus ``cpo_alpha * NLL`` (TRL's CPOTrainer adds it to simpo/dpo/ipo; ``cpo_alpha = 0``: none),
    minus ``diversity_alpha * mean_b logdet_b`` (the DQO regularizer) when ``diversity_alpha > 0``.
    ``NLL = -sum_P nll_logps_i / sum_P nll_tokens_i`` over the chosen responses of the pairs: with
    the summed log-probs and counts of every predicted token of each sequence (prompt included),
    the token-mean cross-entropy that TRL's ORPO/CPO trainers compute over the batch's chosen
    sequences; by default ``nll_logps = policy_logps`` and ``nll_tokens = 1``, i.e. ``mean_P(-pi_i)``.

    Args:
        policy_logps, rewards: ``[B, G]``; ``ref_logps`` ``[B, G]`` or None (reference-free: 0).
        emb: ``[B, G, D]``, or a sequence of them (several encoders, combined into DDPO weights as
            :func:`ddpo_weights` does; the first one serves the regularizer, DivPO and the metrics).
        mask: ``[B, G]`` bool or None.
        weights: ``[B, G]`` given weights (used instead of ``diversity``'s; constants).
        token_counts: ``[B, G]`` completion token counts (IPO's length normalization).
        nll_logps, nll_tokens: ``[B, G]`` the NLL term's summed token log-probs and token counts.
        equivalence: ``[B, G, G]`` bool links for ``diversity="partition"`` (weights: the partition
            diversity normalized to mean 1, ours).
        loss, diversity, pairs, ...: as in :func:`divkernels.group_preference_loss`.

    Returns:
        :class:`LossOutput` with the scalar loss and its metrics.
    """
    batch, group = policy_logps.shape
    valid = valid_mask(mask, batch, group, policy_logps.device)
    dtype = compute_dtype(policy_logps.dtype)
    policy = torch.where(valid, policy_logps.to(dtype), PADDED_LOGP)
    ref = torch.zeros_like(policy) if ref_logps is None else torch.where(valid, ref_logps.to(dtype), PADDED_LOGP)
    quality = torch.where(valid, rewards.to(dtype), 0.0)
    encoders = [] if emb is None else [emb] if isinstance(emb, torch.Tensor) else list(emb)
    sim = dev = logdet = inverse = None
    needs_logdet = diversity == "logdet_gain" or diversity_alpha > 0
    if encoders:
        sim = pairwise_similarity(encoders[0], valid, "cosine")
        dev = deviation_from_similarity(sim, valid)
        if needs_logdet:
            logdet, inverse, _ = logdet_and_inverse(sim, valid, eps)

    counts = _loss_pair_counts(quality, valid, sim, pair_index, pairs, divpo_scores, quality_quantile, divpo_pools,
                               dtype)
    weights = _loss_weights(weights, valid, policy, encoders, dev, inverse, diversity, deviation_norm,
                            min_deviation, dtype, equivalence)

    num_pairs = counts.sum()
    per_pair = num_pairs.clamp_min(1.0)
    chosen_counts, rejected_counts = counts.sum(-1), counts.sum(-2)
    lengths = None if token_counts is None else torch.where(valid, token_counts.to(dtype), 1.0)
    nll_values = policy if nll_logps is None else torch.where(valid, nll_logps.to(dtype), 0.0)
    nll_counts = torch.ones_like(policy) if nll_tokens is None else torch.where(valid, nll_tokens.to(dtype), 0.0)
    # the batch's token-mean NLL of the chosen sequences (a pair's chosen sequence counts once per pair)
    nll = -(chosen_counts * nll_values).sum() / (chosen_counts * nll_counts).sum().clamp_min(1e-30)
    log_odds_terms = None
    if loss == "orpo":
        log_odds = policy - log1mexp(policy)
        odds = log_odds[:, :, None] - log_odds[:, None, :]
        if orpo_weighting == "dorpo":
            odds = weights[:, :, None] * odds
        log_odds_terms = (odds, F.logsigmoid(odds))
    if loss == "orpo" and orpo_weighting == "dorpo":
        weight_mean = (counts * weights[:, :, None]).sum() / per_pair
        total = (counts * -orpo_lambda * log_odds_terms[1]).sum() / per_pair + weight_mean * nll
    elif loss == "dpo_listwise":  # each chosen response's term over its pairs, normalized as the pair losses
        total = (weights * listwise_losses(policy, ref, counts, beta)).sum() / per_pair
    else:
        losses = pair_losses(loss, policy, ref, beta, orpo_lambda, simpo_gamma, lengths)
        total = (counts * weights[:, :, None] * losses).sum() / per_pair
    if cpo_alpha > 0:
        total = total + cpo_alpha * nll
    if diversity_alpha > 0:  # mean over groups; an empty batch adds nothing
        total = total - diversity_alpha * logdet.to(dtype).sum() / max(batch, 1)

    metrics = _loss_metrics(total, counts, policy, ref, nll, log_odds_terms, sim, dev, logdet, valid, loss, beta,
                            orpo_lambda, orpo_weighting, cpo_alpha)
    return LossOutput(loss=total, metrics=metrics, logdet=None if logdet is None else logdet.detach(),
                      chosen_counts=chosen_counts.detach(), rejected_counts=rejected_counts.detach())
