"""4. Group advantages for RL (GRPO family): DARLING, DQO, deviation."""

from __future__ import annotations

import torch

from divkernels.reference.common import ADVANTAGE_STD_EPS, DARLING_MIN_DIVERSITY, DQO_EPS, compute_dtype, valid_mask
from divkernels.reference.diversity import deviation, group_sizes, logdet_diversity, partition_diversity
from divkernels.reference.passk import passk_advantages

# ---------------------------------------------------------------------------------------------
# 4. Group advantages for RL (GRPO family)
# ---------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    emb: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    diversity: str = "none",
    alpha: float = 0.1,
    tau: float = 0.9,
    eps: float = DQO_EPS,
    scale: str | None = None,
    partition: torch.Tensor | None = None,
    min_diversity: float = DARLING_MIN_DIVERSITY,
    transitive: bool = True,
    darling_reward: str = "raw",
    equivalence: torch.Tensor | None = None,
    estimator: str = "grpo",
    k: int | None = None,
) -> torch.Tensor:
    """Diversity-aware GRPO advantages.

    Shaped reward ``r'``: ``r`` (none); ``r * div_i`` (darling: partition diversity, floored at
    ``min_diversity``; ``darling_reward="minmax"`` first min-max scales ``r`` over the batch, our
    earlier variant); ``r + alpha gain_i`` (dqo, ``gain_i = logdet K - logdet K_-i``) or
    ``r + alpha dev_i`` (deviation). Then ``A = (r' - mean) / (std + 1e-4)`` per group (unbiased std
    over valid responses, as TRL's GRPO) for ``scale="std"``, or ``r' - mean`` for ``"none"``.
    ``scale=None`` takes each method's published setting: ``"none"`` for darling (the authors'
    ``verl/math_scripts/darling.batch`` sets ``norm_adv_by_std_in_grpo=False``), ``"std"`` otherwise.
    ``estimator`` other than ``"grpo"`` replaces the normalization by a pass@k advantage of the
    shaped rewards (:mod:`divkernels.reference.passk`, size ``k``; ``scale=None``: ``"std"``).

    Args:
        rewards: ``[B, G]``. emb: ``[B, G, D]`` (not needed for none, or darling with partition).
        partition: ``[B, G]`` integer labels for darling instead of thresholded similarity.
        equivalence: ``[B, G, G]`` bool links for darling (a judge's verdicts on the pairs ``i < j``).

    Returns:
        ``[B, G]`` float32 (float64 for float64 rewards) advantages, 0 at padding; no grad.
    """
    with torch.no_grad():
        valid = valid_mask(mask, rewards.shape[0], rewards.shape[1], rewards.device)
        dtype = compute_dtype(rewards.dtype)
        measure = None
        if diversity == "darling":
            measure = partition_diversity(emb, valid, tau, partition, dtype, min_diversity, transitive, equivalence)
        elif diversity == "dqo":
            measure = logdet_diversity(emb, valid, eps, "cosine", return_gains=True)[1]
        elif diversity == "deviation":
            measure = deviation(emb, valid)
        return advantages_from_diversity(rewards, valid, diversity, measure, alpha, scale, darling_reward,
                                         estimator, k)


def default_scale(diversity: str, scale: str | None, estimator: str = "grpo") -> str:
    """The advantage scaling a method was published with, unless ``scale`` says otherwise: a pass@k
    estimator's own (``"std"``: Pass@k Training's sigma, verl's ``norm_adv_by_std_in_grpo=True``)."""
    if scale is not None:
        return scale
    return "none" if diversity == "darling" and estimator == "grpo" else "std"


def darling_rewards(rewards: torch.Tensor, valid: torch.Tensor, partition_div: torch.Tensor,
                    darling_reward: str = "raw") -> torch.Tensor:
    """DARLING's shaped reward ``r * div`` (facebookresearch/darling ``verl/verl/trainer/ppo/ray_trainer.py``,
    ``multiplicative=True``: the quality reward times the partition reward); 0 at padding.

    ``darling_reward="minmax"`` (our earlier variant) min-max scales ``r`` to [0, 1] over the batch's
    valid responses first (all equal: 1).
    """
    if darling_reward == "raw":
        return torch.where(valid, rewards * partition_div, 0.0)
    if rewards.shape[0] == 0:  # an empty batch has no extremes (min() of an empty tensor raises)
        return torch.zeros_like(rewards)
    low = torch.where(valid, rewards, torch.inf).min()
    high = torch.where(valid, rewards, -torch.inf).max()
    spread = high - low
    quality = torch.where(spread > 0, (rewards - low) / torch.where(spread > 0, spread, 1.0), 1.0)
    return torch.where(valid, quality * partition_div, 0.0)


def advantages_from_diversity(rewards: torch.Tensor, valid: torch.Tensor, diversity: str,
                              measure: torch.Tensor | None, alpha: float, scale: str | None,
                              darling_reward: str = "raw", estimator: str = "grpo",
                              k: int | None = None) -> torch.Tensor:
    """Shape rewards with a per-response diversity ``measure`` ``[B, G]`` and normalize per group
    (``estimator="grpo"``), or turn them into pass@k advantages (the others).

    ``measure`` is the partition diversity (darling), the logdet gain (dqo) or the deviation.
    """
    dtype = compute_dtype(rewards.dtype)
    shaped = torch.where(valid, rewards.to(dtype), 0.0)
    if diversity == "darling":
        shaped = darling_rewards(shaped, valid, measure.to(dtype), darling_reward)
    elif diversity in ("dqo", "deviation"):
        shaped = shaped + alpha * measure.to(dtype)
    shaped = torch.where(valid, shaped, 0.0)
    if estimator != "grpo":
        return passk_advantages(shaped, valid, estimator, k, default_scale(diversity, scale, estimator))
    n = group_sizes(valid).to(dtype)
    mean = shaped.sum(-1) / n.clamp_min(1.0)
    centered = torch.where(valid, shaped - mean[:, None], 0.0)
    if default_scale(diversity, scale) == "std":
        std = torch.sqrt((centered**2).sum(-1) / (n - 1.0).clamp_min(1.0))
        centered = centered / (std[:, None] + ADVANTAGE_STD_EPS)
    return centered


# Bound of the importance log-ratio pi - pi_old before exp (verl's ``compute_policy_loss`` clamps it to
# [-20, 20]): ratios up to e^20 ~ 4.9e8, finite in float32 times any finite advantage below ~7e29.
LOG_RATIO_CLAMP = 20.0


def policy_gradient_loss(
    policy_logps: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    clip: float = 0.2,
) -> torch.Tensor:
    """Sequence-level clipped-ratio policy-gradient loss, mean over valid responses.

    ``ratio = exp(pi - pi_old)``, ``l_i = -min(ratio A_i, clip(ratio, 1 - clip, 1 + clip) A_i)``, with
    ``pi - pi_old`` clamped to ``[-20, 20]`` first (``LOG_RATIO_CLAMP``, verl's bound: no overflow).
    Without ``old_logps`` the ratio is ``exp(pi - pi.detach())`` (value 1, gradient of REINFORCE),
    as TRL's GRPOTrainer does for a single update per generation.

    Returns:
        Scalar, float32 (float64 for float64 ``policy_logps``).
    """
    batch, group = policy_logps.shape
    valid = valid_mask(mask, batch, group, policy_logps.device)
    dtype = compute_dtype(policy_logps.dtype)
    policy = torch.where(valid, policy_logps.to(dtype), 0.0)
    old = policy.detach() if old_logps is None else torch.where(valid, old_logps.to(dtype), 0.0)
    adv = torch.where(valid, advantages.to(dtype), 0.0).detach()
    # the log-ratio clamped to +-LOG_RATIO_CLAMP before exp, as verl's policy loss does: a stale or
    # diverged sample (pi - pi_old > 88 in float32) would otherwise overflow the ratio to inf, and with a
    # negative advantage the loss and its gradient with it; inside the clamp the loss is unchanged
    ratio = torch.exp((policy - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    objective = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
    return -torch.where(valid, objective, 0.0).sum() / valid.sum().clamp_min(1)
