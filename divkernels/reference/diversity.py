"""2. Diversity measures: deviation, log-determinant, partition, Vendi."""

from __future__ import annotations

import math

import torch

from divkernels.reference.common import (
    DARLING_MIN_DIVERSITY,
    DQO_EPS,
    _eye,
    _pair_valid,
    compute_dtype,
    pivot_floor,
    valid_mask,
)
from divkernels.reference.similarity import pairwise_similarity

# ---------------------------------------------------------------------------------------------
# 2. Diversity measures
# ---------------------------------------------------------------------------------------------


def group_sizes(valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` number of real responses per group, in float32."""
    return valid.sum(-1, dtype=torch.float32)


def deviation_from_similarity(sim: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``dev_i = 1/(n-1) sum_{j != i, valid} (1 - S_ij)`` from a cosine ``S`` with unit diagonal.

    With ``S_ii = 1`` the sum over ``j != i`` equals ``n - sum_{valid j} S_ij``.
    """
    n = group_sizes(valid).to(sim.dtype)
    row_sum = (sim * valid[:, None, :]).sum(-1)
    dev = (n[:, None] - row_sum) / (n[:, None] - 1.0).clamp_min(1.0)
    return torch.where(valid, dev, 0.0)


def deviation(emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Deviation of each response from the rest of its group (DDPO/DORPO, Chung et al. 2025).

    ``dev_i = 1/(n-1) * sum_{j != i, valid} (1 - S_ij)`` with cosine ``S``; range [0, 2].

    Args:
        emb: ``[B, G, D]``. mask: ``[B, G]`` bool or None.

    Returns:
        ``[B, G]`` float32 (float64 for float64 ``emb``), 0 at padding. Differentiable.
    """
    valid = valid_mask(mask, emb.shape[0], emb.shape[1], emb.device)
    return deviation_from_similarity(pairwise_similarity(emb, valid, "cosine"), valid)


def logdet_and_inverse(
    sim: torch.Tensor, valid: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-determinant and inverse of ``K = S + eps I`` (valid block; padding stays the identity).

    ``K`` is formed and factored (Cholesky) in float64, whatever ``S``'s dtype. Returns
    ``(logdet [B], inverse [B, G, G], failed [B] bool)`` in ``S``'s dtype. ``cholesky_ex`` reports
    failure without a host sync; a group that cannot be factored even in float64 (K not positive
    definite, or a pivot under :func:`pivot_floor`: NaN input or eps too small for the rounding of S)
    gets NaN, never a number.
    """
    kernel_mat = sim.to(torch.float64) + eps * torch.diag_embed(valid.to(torch.float64))
    chol, info = torch.linalg.cholesky_ex(kernel_mat)
    floor = pivot_floor(kernel_mat, valid, torch.float64)
    failed = (info != 0) | ~(chol.diagonal(dim1=-2, dim2=-1) ** 2 > floor[:, None]).all(-1)
    logdet = 2.0 * torch.log(chol.diagonal(dim1=-2, dim2=-1)).sum(-1)
    inverse = torch.cholesky_inverse(chol)
    logdet = torch.where(failed, torch.nan, logdet)
    inverse = torch.where(failed[:, None, None], torch.nan, inverse)
    return logdet.to(sim.dtype), inverse.to(sim.dtype), failed


def logdet_diversity(
    emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = DQO_EPS,
    kernel: str = "cosine",
    return_gains: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DPP log-determinant diversity of each group and leave-one-out gains (DQO, arXiv 2509.04784).

    ``K = S + eps I`` over the valid responses (padding: identity), ``logdet_b = log det K_b``;
    ``gain_i = logdet(K) - logdet(K without i) = -log (K^{-1})_ii``, 0 at padding. DQO's diversity
    is ``log det(L + I)`` with ``L`` the Gram matrix of unit embeddings: cosine ``S`` and the default
    ``eps = 1``. A gain is the log of a residual variance in ``[eps, 1 + eps]``, so it lies in
    ``[log eps, log(1 + eps)]``: ``[0, log 2]`` for DQO's ridge, while ``eps = 1e-4`` sends an exact
    duplicate's gain to about ``log(2e-4) = -8.5``.

    Args:
        emb: ``[B, G, D]``. mask: ``[B, G]`` bool or None. eps: ridge, > 0 (DQO: 1).
        kernel: similarity kernel (see :func:`pairwise_similarity`).
        return_gains: also return the ``[B, G]`` leave-one-out gains.

    Returns:
        ``logdet [B]`` or ``(logdet [B], gains [B, G])``, float32 (float64 for float64 ``emb``).
        Differentiable: ``d logdet / dK = K^{-1}``.
    """
    valid = valid_mask(mask, emb.shape[0], emb.shape[1], emb.device)
    sim = pairwise_similarity(emb, valid, kernel)
    logdet, inverse, _ = logdet_and_inverse(sim, valid, eps)
    if not return_gains:
        return logdet
    return logdet, gains_from_inverse(inverse)


def gains_from_inverse(inverse: torch.Tensor) -> torch.Tensor:
    """``gain_i = -log (K^{-1})_ii``: the log residual variance of response i given its group."""
    return -torch.log(inverse.diagonal(dim1=-2, dim2=-1))


def partition_diversity(
    emb: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    tau: float = 0.9,
    partition: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    min_diversity: float = DARLING_MIN_DIVERSITY,
    transitive: bool = True,
    equivalence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Partition diversity (DARLING, Li et al. 2025, arXiv 2509.02534): share of the group outside i's class.

    Authors' code: facebookresearch/darling ``verl/verl/utils/reward_score/partition_reward_vllm_serve.py``
    (``partition``): responses judged equivalent are merged with union-find, so the classes are the
    connected components of the equivalence graph, and ``div_i = (n - |C_i|) / (n - 1)``, floored
    at 0.1. Here ``i ~ j`` when cosine ``S_ij >= tau`` (the classes are the connected components of
    that graph; ``transitive=False`` counts only direct neighbours, our earlier variant) or, with
    ``partition`` labels ``[B, G]``, when the labels are equal, or, with ``equivalence`` ``[B, G, G]``
    bool (DARLING's learned judge: :func:`divkernels.integration.judge.judge_groups`), when
    ``equivalence[b, i, j]`` for ``i < j`` (the authors judge each pair ``i < j`` once; the lower
    triangle and the diagonal are not read). ``min_diversity`` is the floor (0 disables it).

    Returns:
        ``[B, G]`` in ``dtype`` (default float32, float64 for float64 ``emb``), 0 at padding.
        Not differentiable (detached).
    """
    with torch.no_grad():
        if equivalence is not None:
            batch, group = equivalence.shape[:2]
            valid = valid_mask(mask, batch, group, equivalence.device)
            upper = torch.ones(group, group, dtype=torch.bool, device=equivalence.device).triu(1)
            linked = equivalence.bool() & upper
            return partition_from_equivalence(linked | linked.mT, valid, dtype or torch.float32, min_diversity,
                                              transitive)
        if partition is not None:
            batch, group = partition.shape
            valid = valid_mask(mask, batch, group, partition.device)
            equivalent = partition[:, :, None] == partition[:, None, :]
            return partition_from_equivalence(equivalent, valid, dtype or torch.float32, min_diversity, False)
        valid = valid_mask(mask, emb.shape[0], emb.shape[1], emb.device)
        equivalent = pairwise_similarity(emb, valid, "cosine") >= tau
        return partition_from_equivalence(equivalent, valid, dtype or compute_dtype(emb.dtype), min_diversity,
                                          transitive)


def connected_components(linked: torch.Tensor) -> torch.Tensor:
    """``[B, G, G]`` bool: i and j are joined by a path of ``linked`` edges (the transitive closure,
    what union-find computes). Reachability doubles its path length per step: ``R <- R R``, so
    ``ceil(log2 G)`` boolean matrix products (counts <= G are exact in float32) suffice."""
    group = linked.shape[-1]
    reach = (linked | linked.mT | _eye(group, linked)).to(torch.float32)
    for _ in range(max(1, math.ceil(math.log2(max(group, 2))))):
        reach = ((reach @ reach) > 0).to(torch.float32)
    return reach > 0


def partition_from_equivalence(equivalent: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype,
                               min_diversity: float = DARLING_MIN_DIVERSITY, transitive: bool = True) -> torch.Tensor:
    """``div_i = max(#{j != i valid : j not in i's class} / (n - 1), min_diversity)`` from a ``[B, G, G]``
    bool relation; the classes are its connected components among valid responses (``transitive``)."""
    pair_valid = _pair_valid(valid)
    if transitive:
        equivalent = connected_components(equivalent & pair_valid)
    others = pair_valid & ~_eye(valid.shape[1], valid)
    distinct = (others & ~equivalent).sum(-1, dtype=dtype)
    n = group_sizes(valid).to(dtype)
    return torch.where(valid, (distinct / (n[:, None] - 1.0).clamp_min(1.0)).clamp_min(min_diversity), 0.0)


def vendi_score(emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Vendi score of each group: ``exp(-sum_k lambda_k log lambda_k)``, ``lambda = eig(S / n)``.

    The effective number of distinct responses (1 for all-duplicates, n for orthogonal ones).
    Padded rows and columns are zeroed (not the identity) so they add no eigenvalue.

    Returns:
        ``[B]`` float32 (float64 for float64 ``emb``); a metric, not differentiable.
    """
    with torch.no_grad():
        valid = valid_mask(mask, emb.shape[0], emb.shape[1], emb.device)
        sim = pairwise_similarity(emb, valid, "cosine")
        sim = torch.where(_pair_valid(valid), sim, 0.0).to(torch.float64)
        n = group_sizes(valid).to(torch.float64).clamp_min(1.0)
        eigenvalues = torch.linalg.eigvalsh(sim / n[:, None, None]).clamp_min(0.0)
        entropy = -torch.special.xlogy(eigenvalues, eigenvalues).sum(-1)
        return torch.exp(entropy).to(compute_dtype(emb.dtype))
