"""Log-determinant (DPP) diversity of each group and leave-one-out gains (DQO, SPEC 2)."""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.types import KERNELS
from divkernels.validation import DataChecks, check_choice, check_emb_and_mask, check_scalar


def check_factorization(checks: DataChecks, failed: torch.Tensor) -> None:
    """Name the groups (``failed`` ``[B]`` bool) whose ``K = S + eps I`` could not be factored."""
    checks.require(failed,
                   lambda groups: f"the Cholesky factorization of K = S + eps*I failed even in float64 for "
                                  f"groups {groups}; K is not positive definite there (raise eps)")


def logdet_diversity(
    emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps: float = 1e-4,
    kernel: str = "cosine",
    return_gains: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``logdet_b = log det(S_b + eps I)`` over each group's valid responses.

    Args:
        emb: ``[B, G, D]`` response embeddings. mask: ``[B, G]`` bool or None.
        eps: ridge added to the diagonal, > 0 (default 1e-4; gradients scale like 1/eps).
        kernel: ``"cosine"``, ``"dot"`` or ``"rbf"``.
        return_gains: also return ``gain_i = -log (K^{-1})_ii``, each response's marginal
            contribution to its group's logdet.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: check for NaN/inf, groups with fewer than 2 valid responses and failed
            factorizations (one host sync).

    Returns:
        ``logdet [B]``, or ``(logdet [B], gains [B, G])`` with gains 0 at padding; float32
        (float64 for float64 ``emb``). Differentiable.
    """
    emb, mask = check_emb_and_mask(emb, mask)
    check_scalar("eps", eps, low=0.0, low_open=True)
    check_choice("kernel", kernel, KERNELS)
    batch, group, _ = emb.shape
    resolve_backend(backend, op="logdet_diversity", device=emb.device, group_size=group)
    valid = reference.valid_mask(mask, batch, group, emb.device)
    checks = DataChecks(check_inputs)
    checks.finite("emb", emb, valid)
    checks.group_size(valid, "logdet_diversity")
    result = reference.logdet_diversity(emb, valid, eps, kernel, return_gains)
    check_factorization(checks, torch.isnan(result[0] if return_gains else result))
    checks.raise_if_failed()
    return result
