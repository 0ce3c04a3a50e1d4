"""Deviation of each response from the rest of its group (DDPO/DORPO, SPEC 2)."""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.validation import DataChecks, check_emb_and_mask


def deviation(
    emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """``dev_i = 1/(n-1) * sum_{j != i, valid} (1 - cos(e_i, e_j))``, in [0, 2].

    Args:
        emb: ``[B, G, D]`` response embeddings. mask: ``[B, G]`` bool or None.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: check for NaN/inf and groups with fewer than 2 valid responses.

    Returns:
        ``[B, G]`` float32 (float64 for float64 ``emb``), 0 at padding. Differentiable.
    """
    emb, mask = check_emb_and_mask(emb, mask)
    batch, group, _ = emb.shape
    resolve_backend(backend, op="deviation", device=emb.device, group_size=group)
    valid = reference.valid_mask(mask, batch, group, emb.device)
    checks = DataChecks(check_inputs)
    checks.finite("emb", emb, valid)
    checks.group_size(valid, "deviation")
    dev = reference.deviation(emb, valid)
    checks.raise_if_failed()
    return dev
