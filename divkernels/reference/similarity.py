"""1. Pairwise similarity of a group's embeddings."""

from __future__ import annotations

import torch

from divkernels.reference.common import NORM_FLOOR, _eye, _gram, _pair_valid, compute_dtype, valid_mask

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
