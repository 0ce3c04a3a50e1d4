"""The specification of every op in plain PyTorch (sections 1-4 below; the repository's spec in code).

Every op of the package is defined here first, as batched tensor code with no Python loop over
groups. These functions are the CPU fallback (``backend="reference"``) and the ground truth that
every kernel is tested against. They validate nothing: the public functions in ``divkernels.ops``
check their inputs once and then call either these or a kernel.

Shapes: ``B`` groups (one per prompt), ``G`` responses per group (padded to the largest group),
``D`` embedding size. ``valid`` is the ``[B, G]`` bool mask of real responses. Padded entries of
any input may hold anything (NaN included): they are replaced by finite placeholders before any
arithmetic, so they change no value and no gradient.

Precision: similarities are accumulated in float32 (float64 for float64 inputs) without TF32; the
``G x G`` linear algebra (Cholesky, inverse, eigenvalues) runs in float64 for every input dtype.
It is ``B * G^2`` numbers, so this costs little, and it makes the fp64 retry that the kernels do
on a failed fp32 factorization unnecessary: every group is factored as the retry would factor it.

Numerics (what the kernels follow too): float32 Gram matrices never go through TF32 (at
``cond(K) ~ 1e6`` a TF32 Gram matrix puts errors of ~5e-2 into ``log det K``; bf16/fp16 inputs are
exact in TF32, so they may use it); the cosine and RBF diagonal is exactly 1, not the rounded
``|e_i|^2 / |e_i|^2`` of the Gram matrix; a float32 factorization that fails is retried in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from divkernels.types import LossOutput

# Floor on embedding norms in cosine similarity, as torch.nn.functional.normalize uses.
NORM_FLOOR = 1e-12
# Largest embedding row norm the similarity ops take, per accumulation dtype: 2^60 in float32 (1.2e18),
# 2^508 in float64 (8.4e152). Every Gram entry is then at most 2^120 (Cauchy-Schwarz: |<e_i, e_j>| <=
# |e_i| |e_j|) and every RBF squared distance at most 4 * 2^120, far below float32's 2^128, so no
# accumulation overflows. Larger rows are refused naming emb (cosine is scale-free: divide emb by a constant).
EMB_NORM_LIMIT = {torch.float32: 2.0**60, torch.float64: 2.0**508}
# Added to the group std of GRPO advantages, as TRL's GRPOTrainer does.
ADVANTAGE_STD_EPS = 1e-4
# Finite stand-in for padded log-probs: any value < 0 keeps log(1 - exp(pi)) finite.
PADDED_LOGP = -1.0
LN2 = 0.6931471805599453
# DivPO diversity scores this close (relative) to the pool's extreme are ties: first index wins.
DIVPO_TIE_RTOL = 1e-5
# DivPO pool size floor(q n + slack): q * n within this of an integer counts as that integer in every
# precision (q = 0.7 is 0.699999988 in float32, and 0.7 * 100 must give 70 there too).
DIVPO_COUNT_SLACK = 1e-4
# DDPO deviations whose spread (max - min) is at most this are "all equal" (weight 1): the authors
# test exact equality, which would turn float rounding of a collapsed group into weights.
DEVIATION_TIE = 1e-6
# DARLING floors partition diversity at 0.1 (partition_reward_vllm_serve.py: max(r, 0.1)).
DARLING_MIN_DIVERSITY = 0.1
# DQO's ridge: log det(L + I) (arXiv 2509.04784).
DQO_EPS = 1.0
# A pivot of a factorization of K in a precision with unit roundoff u carries an absolute rounding error
# of up to about G u K_kk (the Cholesky backward error bound, Higham, Accuracy and Stability, Thm 10.3),
# at most G u max_k K_kk. A pivot at most PIVOT_MARGIN times that has fewer than 8 correct bits (its log
# is off by up to 1 / 256), so the factorization is declared failed there: float32 sweeps retry in
# float64, and a float64 failure is reported naming eps. Exact duplicates with a tiny eps (1e-6) fall
# below it in float32. (One floor per group, from the largest valid K_kk: a scalar in the kernels.)
PIVOT_MARGIN = 256.0


def pivot_floor(kernel_mat: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B]``: the smallest pivot a factorization in ``dtype`` accepts, ``PIVOT_MARGIN G u max K_kk`` over
    each group's valid rows."""
    largest = torch.where(valid, kernel_mat.diagonal(dim1=-2, dim2=-1), 0.0).amax(-1)
    return PIVOT_MARGIN * kernel_mat.shape[-1] * (torch.finfo(dtype).eps / 2) * largest


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_mask(mask: torch.Tensor | None, batch: int, group: int, device: torch.device) -> torch.Tensor:
    """``[B, G]`` bool mask of real responses; ``None`` means every response is real."""
    if mask is None:
        return torch.ones(batch, group, dtype=torch.bool, device=device)
    return mask


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x x^T`` over the last dim, never through TF32 (see Numerics above: a TF32 Gram puts errors of
    ~5e-2 into ``log det K``). A float32 CUDA matmul may run in TF32 by the process's settings
    (``torch.backends.cuda.matmul.fp32_precision``), which a library must neither read as a promise nor
    change, so there the Gram is formed in float64 and rounded once: every product exact, at least as
    accurate as an IEEE float32 matmul. CPU matmuls and the other dtypes are IEEE already."""
    if x.is_cuda and x.dtype == torch.float32:
        wide = x.double()
        return (wide @ wide.mT).float()
    return x @ x.mT


def _pair_valid(valid: torch.Tensor) -> torch.Tensor:
    return valid[:, :, None] & valid[:, None, :]


def _eye(group: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(group, dtype=torch.bool, device=like.device)


# ---------------------------------------------------------------------------------------------
# 1. Pairwise similarity
# ---------------------------------------------------------------------------------------------


def pairwise_similarity(
    emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    kernel: str = "cosine",
    gamma: float | None = None,
) -> torch.Tensor:
    """Pairwise similarity ``S`` of the responses in each group (section 1).

    Args:
        emb: ``[B, G, D]`` embeddings, any float dtype and strides.
        mask: ``[B, G]`` bool, True for real responses; None means all real.
        kernel: ``"cosine"`` (``<e_i, e_j> / (max(|e_i|, tiny) max(|e_j|, tiny))``, diagonal exactly
            1), ``"dot"`` (``<e_i, e_j>``) or ``"rbf"`` (``exp(-gamma |e_i - e_j|^2)``).
        gamma: RBF bandwidth, default ``1 / D``.

    Returns:
        ``[B, G, G]`` in float32 (float64 for float64 ``emb``); padded rows and columns are those
        of the identity. Differentiable w.r.t. ``emb``.
    """
    batch, group, dim = emb.shape
    valid = valid_mask(mask, batch, group, emb.device)
    x = torch.where(valid[..., None], emb.to(compute_dtype(emb.dtype)), 0.0)
    gram = _gram(x)
    eye = _eye(group, x)
    force_unit_diagonal = True
    if kernel == "cosine":
        norms = torch.linalg.vector_norm(x, dim=-1).clamp_min(NORM_FLOOR)
        sim = gram / (norms[:, :, None] * norms[:, None, :])
    elif kernel == "dot":
        sim = gram
        force_unit_diagonal = False
    elif kernel == "rbf":
        gamma = 1.0 / dim if gamma is None else gamma
        sq_norms = gram.diagonal(dim1=-2, dim2=-1)
        sq_dist = (sq_norms[:, :, None] + sq_norms[:, None, :] - 2.0 * gram).clamp_min(0.0)
        sim = torch.exp(-gamma * sq_dist)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    # The diagonal of cosine and RBF is exactly 1 (Numerics above: not the rounded Gram diagonal).
    keep = _pair_valid(valid) & ~eye if force_unit_diagonal else _pair_valid(valid)
    return torch.where(keep, sim, eye.to(sim.dtype))


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
) -> torch.Tensor:
    """Partition diversity (DARLING, Li et al. 2025, arXiv 2509.02534): share of the group outside i's class.

    Authors' code: facebookresearch/darling ``verl/verl/utils/reward_score/partition_reward_vllm_serve.py``
    (``partition``): responses judged equivalent are merged with union-find, so the classes are the
    connected components of the equivalence graph, and ``div_i = (n - |C_i|) / (n - 1)``, floored
    at 0.1. Here ``i ~ j`` when cosine ``S_ij >= tau`` (the classes are the connected components of
    that graph; ``transitive=False`` counts only direct neighbours, our earlier variant) or, with
    ``partition`` labels ``[B, G]`` (e.g. from DARLING's learned classifier), when the labels are
    equal. ``min_diversity`` is the floor (0 disables it).

    Returns:
        ``[B, G]`` in ``dtype`` (default float32, float64 for float64 ``emb``), 0 at padding.
        Not differentiable (detached).
    """
    with torch.no_grad():
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
    if loss in ("dpo", "ipo"):
        logratio = policy - ref
        if loss == "dpo":
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

    DPO/IPO: ``beta (pi - ref)`` (DPOTrainer); ORPO: ``lambda * pi`` (ORPOTrainer, whose ``beta``
    is our ``orpo_lambda``); SimPO: ``beta * pi`` (CPOTrainer).
    """
    if loss in ("dpo", "ipo"):
        return beta * (policy - ref)
    if loss == "orpo":
        return orpo_lambda * policy
    return beta * policy


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
) -> LossOutput:
    """Diversity-weighted group-wise preference loss: DPO/IPO/ORPO/SimPO x DDPO/DORPO/DivPO/DQO.

    With ``C`` the pairs (chosen i, rejected j) of each group, ``P`` their number and ``w_i`` the
    (constant) diversity weight of the chosen response:

    * dpo / ipo / simpo, and orpo with ``orpo_weighting="pair"`` (ours):
      ``sum_(i, j) w_i l_ij / P`` (DDPO: mj-storytelling/DiversityTuning ``models/ddpo_trainer.py``
      multiplies each pair's DPO loss by ``score_chosen + 1``);
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
    metrics: dict[str, torch.Tensor] = {}

    sim = dev = logdet = inverse = None
    needs_logdet = diversity == "logdet_gain" or diversity_alpha > 0
    if encoders:
        sim = pairwise_similarity(encoders[0], valid, "cosine")
        dev = deviation_from_similarity(sim, valid)
        if needs_logdet:
            logdet, inverse, _ = logdet_and_inverse(sim, valid, eps)

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
    counts = counts.to(dtype)

    if weights is not None:
        weights = torch.where(valid, weights.to(dtype), 0.0)
    elif diversity == "none":
        weights = torch.ones_like(policy)
    elif diversity == "deviation":
        devs = [dev.detach()] + [deviation(extra.detach(), valid) for extra in encoders[1:]]
        weights = deviation_weights(devs if len(devs) > 1 else devs[0], valid, deviation_norm, min_deviation)
    else:
        weights = normalized_weights(torch.exp(gains_from_inverse(inverse.detach())), valid)
    weights = weights.to(dtype).detach()

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
    else:
        losses = pair_losses(loss, policy, ref, beta, orpo_lambda, simpo_gamma, lengths)
        total = (counts * weights[:, :, None] * losses).sum() / per_pair
    if cpo_alpha > 0:
        total = total + cpo_alpha * nll
    if diversity_alpha > 0:  # mean over groups; an empty batch adds nothing
        total = total - diversity_alpha * logdet.to(dtype).sum() / max(batch, 1)

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
        metrics = {name: value.detach().to(torch.float32) for name, value in metrics.items()}
    return LossOutput(loss=total, metrics=metrics, logdet=None if logdet is None else logdet.detach(),
                      chosen_counts=chosen_counts.detach(), rejected_counts=rejected_counts.detach())


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
) -> torch.Tensor:
    """Diversity-aware GRPO advantages.

    Shaped reward ``r'``: ``r`` (none); ``r * div_i`` (darling: partition diversity, floored at
    ``min_diversity``; ``darling_reward="minmax"`` first min-max scales ``r`` over the batch, our
    earlier variant); ``r + alpha gain_i`` (dqo, ``gain_i = logdet K - logdet K_-i``) or
    ``r + alpha dev_i`` (deviation). Then ``A = (r' - mean) / (std + 1e-4)`` per group (unbiased std
    over valid responses, as TRL's GRPO) for ``scale="std"``, or ``r' - mean`` for ``"none"``.
    ``scale=None`` takes each method's published setting: ``"none"`` for darling (the authors'
    ``verl/math_scripts/darling.batch`` sets ``norm_adv_by_std_in_grpo=False``), ``"std"`` otherwise.

    Args:
        rewards: ``[B, G]``. emb: ``[B, G, D]`` (not needed for none, or darling with partition).
        partition: ``[B, G]`` integer labels for darling instead of thresholded similarity.

    Returns:
        ``[B, G]`` float32 (float64 for float64 rewards) advantages, 0 at padding; no grad.
    """
    with torch.no_grad():
        valid = valid_mask(mask, rewards.shape[0], rewards.shape[1], rewards.device)
        dtype = compute_dtype(rewards.dtype)
        measure = None
        if diversity == "darling":
            measure = partition_diversity(emb, valid, tau, partition, dtype, min_diversity, transitive)
        elif diversity == "dqo":
            measure = logdet_diversity(emb, valid, eps, "cosine", return_gains=True)[1]
        elif diversity == "deviation":
            measure = deviation(emb, valid)
        return advantages_from_diversity(rewards, valid, diversity, measure, alpha, scale, darling_reward)


def default_scale(diversity: str, scale: str | None) -> str:
    """The advantage scaling a method was published with, unless ``scale`` says otherwise."""
    if scale is not None:
        return scale
    return "none" if diversity == "darling" else "std"


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
                              darling_reward: str = "raw") -> torch.Tensor:
    """Shape rewards with a per-response diversity ``measure`` ``[B, G]`` and normalize per group.

    ``measure`` is the partition diversity (darling), the logdet gain (dqo) or the deviation.
    """
    dtype = compute_dtype(rewards.dtype)
    shaped = torch.where(valid, rewards.to(dtype), 0.0)
    if diversity == "darling":
        shaped = darling_rewards(shaped, valid, measure.to(dtype), darling_reward)
    elif diversity in ("dqo", "deviation"):
        shaped = shaped + alpha * measure.to(dtype)
    shaped = torch.where(valid, shaped, 0.0)
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


# ---------------------------------------------------------------------------------------------
# 5. Sequence log-probs through the LM head
# ---------------------------------------------------------------------------------------------


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    """``(hidden @ weight.T + bias) / temperature`` in float32 (float64 for float64 inputs), ``[..., V]``.

    The temperature divides the LM head's whole output, bias included, as TRL's trainers divide the
    model's logits (``logits /= temperature``).
    """
    dtype = compute_dtype(hidden.dtype)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return logits / temperature


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """``[N]`` sum (``"sum"``) or mean (``"mean"``, 0 for a sequence without tokens) of ``[N, T]``
    token log-probs over the tokens where ``mask`` is True (every token for None)."""
    if mask is not None:
        token_logps = torch.where(mask, token_logps, 0.0)
    total = token_logps.sum(-1)
    if reduction == "sum":
        return total
    count = mask.sum(-1) if mask is not None else torch.full_like(total, token_logps.shape[-1])
    return total / count.clamp_min(1).to(total.dtype)


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Sequence log-probs of ``targets`` under the LM head, the unfused way (all logits at once).

    ``logp_n = sum_t mask_nt * log softmax((h_nt W^T + b) / temperature)[y_nt]`` (or the mean over
    the masked tokens), what TRL's trainers compute from ``model(...).logits``: ``log_softmax`` then
    ``gather``. Holds ``[N, T, V]`` logits in float32: the ground truth of the chunked and fused paths
    in :mod:`divkernels.ops.linear_logps`, which never hold more than one chunk of them.

    Args:
        hidden: ``[N, T, H]`` last hidden states. weight: ``[V, H]`` LM head. bias: ``[V]`` or None.
        targets: ``[N, T]`` int64 token ids in ``[0, V)`` where ``mask`` is True (anything elsewhere).
        mask: ``[N, T]`` bool, the tokens that count; None: all.

    Returns:
        ``[N]`` float32 (float64 for float64 ``hidden``). Differentiable w.r.t. hidden, weight, bias.
    """
    logits = lm_head_logits(hidden, weight, bias, temperature)
    safe_targets = targets if mask is None else torch.where(mask, targets, 0)
    token_logps = logits.log_softmax(-1).gather(-1, safe_targets[..., None])[..., 0]
    return sequence_logps(token_logps, mask, reduction)


# Poolings of hidden states into one embedding per response.
POOLINGS = ("mean", "last")


def pool_hidden_states(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pool ``[N, L, H]`` hidden states over the positions where ``mask [N, L]`` is set.

    ``"mean"`` averages them; ``"last"`` takes the last one. Rows with no set position give 0.
    Differentiable w.r.t. ``hidden``.
    """
    weights = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask.to(positions.dtype)).argmax(1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return pooled * mask.any(1, keepdim=True).to(hidden.dtype)
    raise ValueError(f"pooling={pooling!r} is not valid; choose one of 'mean', 'last'")
