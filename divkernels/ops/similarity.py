"""Pairwise similarity of the responses in each group (SPEC 1)."""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.types import KERNELS
from divkernels.validation import DataChecks, check_choice, check_emb_and_mask, check_scalar


def pairwise_similarity(
    emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kernel: str = "cosine",
    gamma: float | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """Similarity matrix of each group of responses.

    Args:
        emb: ``[B, G, D]`` response embeddings (float32/bfloat16/float16/float64, any strides).
        mask: ``[B, G]`` bool, True for real responses; None means all real.
        kernel: ``"cosine"`` (diagonal exactly 1), ``"dot"`` or ``"rbf"``.
        gamma: RBF bandwidth ``exp(-gamma |e_i - e_j|^2)``, default ``1 / D``.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: check for NaN/inf (one host sync); False skips it.

    Returns:
        ``S`` ``[B, G, G]`` float32 (float64 for float64 ``emb``); padded rows and columns are the
        identity's. Differentiable w.r.t. ``emb``.
    """
    emb, mask = check_emb_and_mask(emb, mask)
    check_choice("kernel", kernel, KERNELS)
    if gamma is not None:
        check_scalar("gamma", gamma, low=0.0, low_open=True)
    batch, group, _ = emb.shape
    resolve_backend(backend, op="pairwise_similarity", device=emb.device, group_size=group)
    valid = reference.valid_mask(mask, batch, group, emb.device)
    checks = DataChecks(check_inputs)
    checks.finite("emb", emb, valid)
    sim = reference.pairwise_similarity(emb, valid, kernel, gamma)
    checks.raise_if_failed()
    return sim
