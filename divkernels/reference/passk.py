"""Pass@k advantages: each response's share of the best of k samples.

Every estimator reads a group's rewards ``g`` sorted ascending (ties by index; the results do not
depend on how ties are ordered). A response at rank ``p`` (0-based among the group's ``n`` valid
ones) is the maximum of ``C(p, k-1)`` of the ``C(n, k)`` subsets of size ``k``, and lies in
``C(n-1, k-1)`` of them. With ``d = g - min g`` (the estimators are shift invariant for ``k >= 2``
and the shift makes an all-equal group exactly 0):

* ``passk_analytic`` (Pass@k Training, Chen et al. 2025, arXiv 2508.10751, the analytical
  advantage): the group reward of a subset is its maximum (pass@k for 0/1 rewards, max@k
  otherwise); ``A_p = (mean of the subsets holding p - mean of all subsets) / std of all subsets``,
  ``mean_all = sum_p C(p, k-1) d_p / C(n, k)`` and
  ``mean_p = (C(p, k-1) d_p + sum_{q > p} C(q-1, k-2) d_q) / C(n-1, k-1)``. For 0/1 rewards this is
  the paper's closed form: ``(1 - R) / sigma`` for a correct response and
  ``(1 - R - C(n_neg-1, k-1) / C(n-1, k-1)) / sigma`` for a wrong one, ``R = 1 - C(n_neg, k) / C(n, k)``,
  ``sigma = sqrt(R (1 - R))``. ``scale="none"`` drops the division; a group whose subsets all have
  the same maximum gets 0.
* ``pkpo`` (PKPO, Walder & Karkhanis 2025, arXiv 2505.15201, ``s^(loo-1)``, eq. 33, the
  lowest-variance transform of the paper): ``A_i = sum_{|I| = k, i in I} (max g_I - max g_{I - i}) / C(n, k)``,
  an unbiased estimator of the gradient of max@k (pass@k for 0/1 rewards); in closed form
  ``A_p = sum_{q < p} C(q, k-2) (d_p - d_q) / C(n, k)``, and ``g_p / n`` for ``k = 1``. No further
  normalization (``scale`` does not apply).
* ``best_minus_second`` (verl's ``grpo_passk``, Tang et al. 2025, arXiv 2503.19595): the group's best
  response (first index on ties) gets ``max - second max``, divided by ``std + 1e-6`` (unbiased std,
  verl's ``norm_adv_by_std_in_grpo=True``) for ``scale="std"``; the others 0. Defined for
  ``k = n`` only, where it equals ``pkpo`` times ``C(n, k) = 1``.

A group with fewer valid responses than ``k`` uses ``k = n``.
"""

from __future__ import annotations

import torch

from divkernels.reference.common import PASSK_STD_EPS, compute_dtype
from divkernels.reference.losses import reward_ranks

# Estimators of divkernels.types.ADVANTAGE_ESTIMATORS that transform the whole group.
PASSK_ESTIMATORS = ("passk_analytic", "pkpo", "best_minus_second")


def log_binomial(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """``log C(top, bottom)`` in float64; ``-inf`` where ``bottom < 0`` or ``bottom > top``."""
    top, bottom = torch.broadcast_tensors(top.to(torch.float64), bottom.to(torch.float64))
    inside = (bottom >= 0) & (bottom <= top)
    safe_top, safe_bottom = torch.where(inside, top, 0.0), torch.where(inside, bottom, 0.0)
    value = torch.lgamma(safe_top + 1) - torch.lgamma(safe_bottom + 1) - torch.lgamma(safe_top - safe_bottom + 1)
    return torch.where(inside, value, -torch.inf)


def binomial_ratio(top: torch.Tensor, bottom: torch.Tensor, log_denominator: torch.Tensor) -> torch.Tensor:
    """``C(top, bottom) / exp(log_denominator)`` in float64 (0 outside the binomial's domain)."""
    return torch.exp(log_binomial(top, bottom) - log_denominator)


def passk_advantages(shaped: torch.Tensor, valid: torch.Tensor, estimator: str, k: int,
                     scale: str) -> torch.Tensor:
    """``[B, G]`` advantages of ``estimator`` (see the module) from the shaped rewards; 0 at padding."""
    dtype = compute_dtype(shaped.dtype)
    g = torch.where(valid, shaped.to(dtype), 0.0)
    n = valid.sum(-1, keepdim=True)
    if estimator == "best_minus_second":
        return best_minus_second(g, valid, n, scale)
    k_group = torch.clamp(torch.full_like(n, k), max=n).clamp_min(1)
    rank = reward_ranks(g, valid)  # ascending, ties by index
    low = torch.where(valid, g, torch.inf).amin(-1, keepdim=True)
    d = torch.where(valid, g - torch.where(n > 0, low, 0.0), 0.0)
    below = (rank[:, None, :] < rank[:, :, None]) & valid[:, None, :] & valid[:, :, None]  # [b, p, q]: q below p
    log_subsets = log_binomial(n, k_group)
    if estimator == "pkpo":
        lower = binomial_ratio(rank, k_group - 2, log_subsets).to(dtype)  # C(q, k-2) / C(n, k), per q
        spread = torch.where(below, lower[:, None, :] * (d[:, :, None] - d[:, None, :]), 0.0).sum(-1)
        single = g / n.clamp_min(1).to(dtype)
        return torch.where(valid, torch.where(k_group == 1, single, spread), 0.0)
    top = torch.where(valid, binomial_ratio(rank, k_group - 1, log_subsets), 0.0).to(dtype)  # P(max is p)
    mean_all = (top * d).sum(-1, keepdim=True)
    # the variance of the subsets' maxima as 1/2 sum_pq w_p w_q (d_p - d_q)^2: exactly 0 when every subset has
    # the same maximum (sum_p w_p (d_p - mean)^2 keeps mean's rounding, and 0 / tiny would be a full advantage)
    gaps = (d[:, :, None] - d[:, None, :]) ** 2
    variance = 0.5 * (top[:, :, None] * top[:, None, :] * gaps).sum((-2, -1))[:, None]
    log_holding = log_binomial(n - 1, k_group - 1)
    own = binomial_ratio(rank, k_group - 1, log_holding).to(dtype) * d
    above = binomial_ratio(rank - 1, k_group - 2, log_holding).to(dtype) * d  # C(q-1, k-2) d_q / C(n-1, k-1)
    mean_holding = own + torch.where(below.transpose(1, 2), above[:, None, :], 0.0).sum(-1)
    advantages = mean_holding - mean_all
    if scale == "std":
        std = variance.sqrt()
        advantages = torch.where(std > 0, advantages / torch.where(std > 0, std, 1.0), 0.0)
    return torch.where(valid, advantages, 0.0)


def best_minus_second(g: torch.Tensor, valid: torch.Tensor, n: torch.Tensor, scale: str) -> torch.Tensor:
    """verl's ``grpo_passk``: ``max - second max`` at the first maximum, 0 elsewhere (groups of 2 or more)."""
    masked = torch.where(valid, g, -torch.inf)
    best = masked.argmax(-1, keepdim=True)
    top = masked.gather(-1, best)
    second = masked.scatter(-1, best, -torch.inf).amax(-1, keepdim=True)
    gap = torch.where(n >= 2, top - second, 0.0)
    if scale == "std":
        mean = g.sum(-1, keepdim=True) / n.clamp_min(1)
        centered = torch.where(valid, g - mean, 0.0)
        std = torch.sqrt((centered**2).sum(-1, keepdim=True) / (n - 1).clamp_min(1))
        gap = gap / (std + PASSK_STD_EPS)
    out = torch.zeros_like(g)
    return out.scatter(-1, best, torch.where(n >= 2, gap, 0.0))
