"""Diversity-aware GRPO advantages and the policy-gradient loss (SPEC 4).

On the Triton backend the per-response diversity (deviation, logdet gains, partition) comes from
the forward kernels of those ops, one read of ``emb``; shaping and the per-group normalization
are ``O(B G)`` tensor ops shared with the reference.
"""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.ops.common import contiguous_mask
from divkernels.ops.deviation import deviation_forward
from divkernels.ops.logdet import check_factorization, logdet_forward
from divkernels.ops.similarity import similarity_forward
from divkernels.types import ADVANTAGE_DIVERSITIES, ADVANTAGE_SCALES, DARLING_REWARDS
from divkernels.validation import (
    DataChecks,
    check_choice,
    check_emb,
    check_float_tensor,
    check_group_tensor,
    check_mask,
    check_partition,
    check_same_device,
    check_scalar,
    nonfinite_groups,
)


def group_advantages(
    rewards: torch.Tensor,
    emb: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    diversity: str = "none",
    alpha: float = 0.1,
    tau: float = 0.9,
    eps: float = reference.DQO_EPS,
    scale: str | None = None,
    partition: torch.Tensor | None = None,
    min_diversity: float = reference.DARLING_MIN_DIVERSITY,
    transitive: bool = True,
    darling_reward: str = "raw",
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """Group-normalized advantages with a diversity term, for GRPO-style training.

    Shaped reward ``r'``: ``"none"`` ``r``; ``"darling"`` ``r * div_i`` (DARLING, arXiv 2509.02534:
    the raw quality reward times the partition diversity of :func:`divkernels.partition_diversity`,
    as ``multiplicative=True`` in the authors' ``verl/verl/trainer/ppo/ray_trainer.py``);
    ``"dqo"`` ``r + alpha * gain_i`` (leave-one-out gain of ``log det(S + eps I)``, DQO's ``eps = 1``);
    ``"deviation"`` ``r + alpha * dev_i``. Then ``A = (r' - mean_g r') / (std_g r' + 1e-4)``
    (``scale="std"``, unbiased std over the group's valid responses, as TRL) or ``r' - mean_g r'``
    (``"none"``). ``scale=None`` takes each method's published setting: ``"none"`` for darling (the
    authors' runs, ``verl/math_scripts/darling.batch``, set ``norm_adv_by_std_in_grpo=False``),
    ``"std"`` for the others.

    Args:
        rewards: ``[B, G]`` quality rewards.
        emb: ``[B, G, D]`` embeddings (needed by darling without ``partition``, dqo, deviation).
        mask: ``[B, G]`` bool or None.
        diversity: ``"none"``, ``"darling"``, ``"dqo"`` or ``"deviation"``.
        alpha: weight of the additive bonus (dqo, deviation).
        tau: cosine threshold of a link between two responses (darling).
        eps: ridge of ``K = S + eps I`` (dqo).
        scale: ``"std"``, ``"none"`` (Dr. GRPO) or None (the method's published setting).
        partition: ``[B, G]`` integer labels for darling (e.g. from a learned classifier).
        min_diversity: darling's floor on partition diversity (0.1; 0 disables it).
        transitive: darling's classes are connected components of the links (False: direct links only, ours).
        darling_reward: ``"raw"`` (DARLING) or ``"minmax"`` (ours: rewards min-max scaled over the batch first).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: NaN/inf and group-size checks (one host sync).

    Returns:
        ``[B, G]`` float32 (float64 for float64 rewards), 0 at padding; no gradient.
    """
    check_choice("diversity", diversity, ADVANTAGE_DIVERSITIES)
    if scale is not None:
        check_choice("scale", scale, ADVANTAGE_SCALES)
    check_choice("darling_reward", darling_reward, DARLING_REWARDS)
    check_scalar("alpha", alpha)
    check_scalar("tau", tau)
    check_scalar("min_diversity", min_diversity, low=0.0, high=1.0)
    check_scalar("eps", eps, low=0.0, low_open=True)
    rewards = check_float_tensor("rewards", rewards, 2, "[B, G]")
    batch, group = rewards.shape
    if group < 2:
        raise ValueError(f"rewards must hold G >= 2 responses per group, got G={group}")
    mask = check_mask(mask, batch, group)
    if partition is not None:
        if diversity != "darling":
            raise ValueError("partition labels are only used with diversity='darling'")
        partition = check_partition(partition, batch, group)
    if emb is not None:
        emb = check_emb(emb)
        if tuple(emb.shape[:2]) != (batch, group):
            raise ValueError(f"emb has [B, G] = {tuple(emb.shape[:2])} but rewards has ({batch}, {group})")
    if diversity != "none" and emb is None and partition is None:
        raise ValueError(f"diversity={diversity!r} needs emb [B, G, D]"
                         + (" or partition labels" if diversity == "darling" else ""))
    device = check_same_device(rewards=rewards, emb=emb, mask=mask, partition=partition)
    uses_emb = diversity != "none" and partition is None
    chosen = resolve_backend(backend, op="group_advantages", device=device, group_size=group, kernels=("triton",))

    valid = reference.valid_mask(mask, batch, group, device)
    checks = DataChecks(check_inputs)
    checks.finite("rewards", rewards, valid)
    if diversity != "none":
        checks.group_size(valid, f"diversity={diversity!r}")
    if chosen == "triton" and uses_emb:
        measure, norms = _diversity_measure(emb, contiguous_mask(mask), valid, diversity, tau, eps, min_diversity,
                                            transitive)
        checks.nonfinite("emb", nonfinite_groups(norms, valid))
        advantages = reference.advantages_from_diversity(rewards, valid, diversity, measure, alpha, scale,
                                                         darling_reward)
    else:
        checks.finite("emb", emb if uses_emb else None, valid)
        advantages = reference.group_advantages(rewards, emb if uses_emb else None, valid, diversity=diversity,
                                                alpha=alpha, tau=tau, eps=eps, scale=scale, partition=partition,
                                                min_diversity=min_diversity, transitive=transitive,
                                                darling_reward=darling_reward)
    if diversity == "dqo":
        check_factorization(checks, advantages.isnan().any(-1))
    checks.raise_if_failed()
    return advantages


def _diversity_measure(emb: torch.Tensor, mask: torch.Tensor | None, valid: torch.Tensor, diversity: str,
                       tau: float, eps: float, min_diversity: float,
                       transitive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-response diversity [B, G], norms [B, G])`` from the Triton forward kernels."""
    with torch.no_grad():
        if diversity == "deviation":
            dev, _, norms = deviation_forward(emb, mask)
            return dev, norms
        if diversity == "dqo":
            _, gains, _, _, norms = logdet_forward(emb, mask, eps)
            return gains, norms
        sim, norms = similarity_forward(emb, mask)
        return reference.partition_from_equivalence(sim >= tau, valid, sim.dtype, min_diversity, transitive), norms


def policy_gradient_loss(
    policy_logps: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    clip: float = 0.2,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Sequence-level clipped-ratio policy-gradient loss (REINFORCE without ``old_logps``).

    ``ratio = exp(pi - pi_old)``; ``loss = -mean_valid min(ratio A, clip(ratio, 1-clip, 1+clip) A)``.
    Without ``old_logps`` the ratio is ``exp(pi - pi.detach())``: value ``-mean(A)``, REINFORCE
    gradient, as TRL's GRPOTrainer with one update per generation.

    Args:
        policy_logps: ``[B, G]`` sequence log-probs (grad flows). advantages: ``[B, G]``.
        old_logps: ``[B, G]`` log-probs of the sampling policy, or None.
        mask: ``[B, G]`` bool or None. clip: ratio clip range, >= 0.
        check_inputs: NaN/inf check of the inputs (one host sync).

    Returns:
        Scalar loss, float32 (float64 for float64 ``policy_logps``).
    """
    check_scalar("clip", clip, low=0.0)
    policy_logps = check_float_tensor("policy_logps", policy_logps, 2, "[B, G]")
    batch, group = policy_logps.shape
    advantages = check_group_tensor("advantages", advantages, batch, group)
    if old_logps is not None:
        old_logps = check_group_tensor("old_logps", old_logps, batch, group)
    mask = check_mask(mask, batch, group)
    device = check_same_device(policy_logps=policy_logps, advantages=advantages, old_logps=old_logps, mask=mask)
    valid = reference.valid_mask(mask, batch, group, device)
    checks = DataChecks(check_inputs)
    for name, value in (("policy_logps", policy_logps), ("advantages", advantages), ("old_logps", old_logps)):
        checks.finite(name, value, valid)
    result = reference.policy_gradient_loss(policy_logps, advantages, old_logps, valid, clip=clip)
    checks.raise_if_failed()
    return result
