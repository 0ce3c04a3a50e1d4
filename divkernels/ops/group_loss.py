"""Group-wise preference loss with diversity weights (SPEC 3): DPO/IPO/ORPO/SimPO x DDPO/DQO."""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.ops.logdet import check_factorization
from divkernels.types import DEVIATION_NORMS, DIVERSITIES, LOSSES, PAIR_MODES, LossOutput
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
    emb: torch.Tensor | None = None,
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
    deviation_norm: str = "mean",
    min_deviation: float = 0.0,
    diversity_alpha: float = 0.0,
    eps: float = 1e-4,
    quality_quantile: float = 0.5,
    divpo_scores: torch.Tensor | None = None,
    check_inputs: bool = True,
    backend: str = "auto",
) -> LossOutput:
    """Preference loss over a batch of response groups, with diversity-weighted pairs.

    ``loss = sum_b sum_(i, j) w_bi l_bij / #pairs - diversity_alpha * mean_b logdet_b`` where
    ``(i, j)`` are (chosen, rejected) pairs inside group ``b``, ``l`` is the pair loss of ``loss``
    and ``w`` the diversity weight of the chosen response (detached).

    Args:
        policy_logps: ``[B, G]`` sequence log-probs of the policy: summed token log-probs for dpo
            and ipo, mean token log-probs for orpo and simpo (the op does not renormalize).
        rewards: ``[B, G]`` quality scores that order the pairs; no grad.
        emb: ``[B, G, D]`` response embeddings; needed for diversity weights, DivPO selection by
            deviation and the logdet regularizer. Gradients reach it through the regularizer.
        ref_logps: ``[B, G]`` reference-model log-probs for dpo/ipo; None means reference-free
            (0). orpo and simpo do not use it.
        mask: ``[B, G]`` bool, True for real responses; None means all real.
        loss: ``"dpo"`` (TRL's sigmoid), ``"ipo"``, ``"orpo"`` or ``"simpo"``.
        diversity: pair weight ``"none"`` (1), ``"deviation"`` (DDPO/DORPO) or ``"logdet_gain"``
            (``1 / (K^{-1})_ii``, DQO-style); both normalized to mean 1 over the group.
        pairs: ``"all"`` (every ``r_i > r_j``), ``"best_worst"``, ``"divpo"`` or ``"explicit"``.
        pair_index: ``[B, P, 2]`` integer (chosen, rejected) indices for explicit pairs;
            ``(-1, -1)`` rows are padding.
        beta: DPO/IPO/SimPO temperature. orpo_lambda: weight of ORPO's odds-ratio term (TRL's
            ORPO ``beta``). simpo_gamma: SimPO target margin.
        deviation_norm: ``"mean"`` (weights average 1 in a group) or ``"none"`` (raw deviation).
        min_deviation: floor on deviation weights.
        diversity_alpha: weight of the ``-mean_b logdet_b`` regularizer (0 disables it).
        eps: ridge of ``K = S + eps I``.
        quality_quantile: DivPO's chosen pool is the top ``quality_quantile`` of rewards.
        divpo_scores: ``[B, G]`` diversity scores for DivPO instead of deviation (e.g.
            ``-policy_logps``, DivPO's "model probability" criterion).
        check_inputs: NaN/inf, group-size and pair-index checks (one host sync); False skips.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        :class:`LossOutput`: ``.loss`` scalar (float32, float64 for float64 logps) and
        ``.metrics`` (SPEC 7).
    """
    check_choice("loss", loss, LOSSES)
    check_choice("diversity", diversity, DIVERSITIES)
    check_choice("pairs", pairs, PAIR_MODES)
    check_choice("deviation_norm", deviation_norm, DEVIATION_NORMS)
    check_scalar("beta", beta, low=0.0, low_open=True)
    check_scalar("orpo_lambda", orpo_lambda, low=0.0)
    check_scalar("simpo_gamma", simpo_gamma)
    check_scalar("min_deviation", min_deviation, low=0.0)
    check_scalar("diversity_alpha", diversity_alpha, low=0.0)
    check_scalar("eps", eps, low=0.0, low_open=True)
    check_scalar("quality_quantile", quality_quantile, low=0.0, high=1.0, low_open=True, high_open=True)

    policy_logps = check_float_tensor("policy_logps", policy_logps, 2, "[B, G]")
    batch, group = policy_logps.shape
    if group < 2:
        raise ValueError(f"policy_logps must hold G >= 2 responses per group, got G={group}")
    rewards = check_group_tensor("rewards", rewards, batch, group)
    if ref_logps is not None:
        ref_logps = check_group_tensor("ref_logps", ref_logps, batch, group)
    if divpo_scores is not None:
        divpo_scores = check_group_tensor("divpo_scores", divpo_scores, batch, group)
    mask = check_mask(mask, batch, group)
    if emb is not None:
        emb = check_emb(emb)
        if tuple(emb.shape[:2]) != (batch, group):
            raise ValueError(f"emb has [B, G] = {tuple(emb.shape[:2])} but policy_logps has ({batch}, {group})")
    if pairs == "explicit" and pair_index is None:
        raise ValueError("pairs='explicit' needs pair_index [B, P, 2]")
    if pair_index is not None:
        if pairs not in ("all", "explicit"):
            raise ValueError(f"pair_index gives the pairs explicitly; it cannot be combined with pairs={pairs!r}")
        pair_index = check_index_tensor("pair_index", pair_index, batch)
    needs_emb = {
        f"diversity={diversity!r}": diversity != "none",
        "diversity_alpha > 0": diversity_alpha > 0,
        "pairs='divpo' without divpo_scores": pair_index is None and pairs == "divpo" and divpo_scores is None,
    }
    missing = [reason for reason, needed in needs_emb.items() if needed]
    if missing and emb is None:
        raise ValueError(f"{missing[0]} needs emb [B, G, D]")
    if divpo_scores is not None and pairs != "divpo":
        raise ValueError("divpo_scores is only used with pairs='divpo'")
    device = check_same_device(policy_logps=policy_logps, rewards=rewards, emb=emb, ref_logps=ref_logps,
                               mask=mask, pair_index=pair_index, divpo_scores=divpo_scores)
    resolve_backend(backend, op="group_preference_loss", device=device, group_size=group)

    valid = reference.valid_mask(mask, batch, group, device)
    checks = DataChecks(check_inputs)
    for name, value in (("policy_logps", policy_logps), ("rewards", rewards), ("ref_logps", ref_logps),
                        ("divpo_scores", divpo_scores), ("emb", emb)):
        checks.finite(name, value, valid)
    if missing:
        checks.group_size(valid, missing[0])
    if loss == "orpo":
        checks.require((valid & (policy_logps >= 0)).any(-1),
                       lambda groups: f"loss='orpo' needs mean token log-probs < 0 in policy_logps; "
                                      f"groups {groups} have values >= 0")
    if pair_index is not None:
        _check_pair_index(checks, pair_index, valid)

    output = reference.group_preference_loss(
        policy_logps, rewards, emb, ref_logps, valid, loss=loss, diversity=diversity, pairs=pairs,
        pair_index=pair_index, beta=beta, orpo_lambda=orpo_lambda, simpo_gamma=simpo_gamma,
        deviation_norm=deviation_norm, min_deviation=min_deviation, diversity_alpha=diversity_alpha,
        eps=eps, quality_quantile=quality_quantile, divpo_scores=divpo_scores)
    if output.logdet is not None:
        check_factorization(checks, torch.isnan(output.logdet))
    checks.raise_if_failed()
    return output

