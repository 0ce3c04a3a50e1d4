"""Partition diversity (DARLING, arXiv 2509.02534): share of the group outside each response's class.

No gradient. On the Triton backend the similarity forward kernel computes ``S`` (one read of
``emb``); thresholding, the connected components and counting are ``O(B G^2 log G)`` tensor ops
on ``S`` (:func:`divkernels.reference.partition_from_equivalence`).
"""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.ops.common import contiguous_mask
from divkernels.ops.similarity import similarity_forward
from divkernels.validation import (
    DataChecks,
    check_emb_and_mask,
    check_mask,
    check_partition,
    check_same_device,
    check_scalar,
    nonfinite_groups,
)


def partition_diversity(
    emb: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    tau: float = 0.9,
    partition: torch.Tensor | None = None,
    min_diversity: float = reference.DARLING_MIN_DIVERSITY,
    transitive: bool = True,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """DARLING's partition diversity: ``div_i = max((n - |C_i|) / (n - 1), min_diversity)``.

    ``C_i`` is response i's equivalence class, as DARLING's reward computes it
    (facebookresearch/darling ``verl/verl/utils/reward_score/partition_reward_vllm_serve.py``:
    union-find over the pairs judged equivalent, so classes are connected components; floor 0.1).
    Two responses are linked when their cosine similarity is ``>= tau`` or, with ``partition``
    labels (e.g. from DARLING's learned classifier), when their labels are equal. Give exactly
    one of ``emb`` and ``partition``.

    Args:
        emb: ``[B, G, D]`` embeddings, or None with ``partition``.
        mask: ``[B, G]`` bool or None.
        tau: cosine threshold of a link.
        partition: ``[B, G]`` integer labels, or None with ``emb``.
        min_diversity: floor on the result (DARLING: 0.1; 0 disables it).
        transitive: classes are connected components of the links (DARLING); False counts only
            the responses linked to i directly (our earlier variant).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: check for NaN/inf and groups with fewer than 2 valid responses.

    Returns:
        ``[B, G]`` in [0, 1], float32 (float64 for float64 ``emb``), 0 at padding; no gradient.
    """
    if (emb is None) == (partition is None):
        raise ValueError("partition_diversity needs exactly one of emb (thresholded similarity) "
                         "and partition (labels)")
    check_scalar("tau", tau)
    check_scalar("min_diversity", min_diversity, low=0.0, high=1.0)
    if emb is not None:
        emb, mask = check_emb_and_mask(emb, mask)
        batch, group, device = emb.shape[0], emb.shape[1], emb.device
    else:
        if not isinstance(partition, torch.Tensor) or partition.dim() != 2:
            raise ValueError("partition must be a [B, G] tensor of integer labels")
        batch, group = partition.shape
        partition = check_partition(partition, batch, group)
        mask = check_mask(mask, batch, group)
        device = check_same_device(partition=partition, mask=mask)
        if group < 2:
            raise ValueError(f"partition must hold G >= 2 responses per group, got G={group}")
    chosen = resolve_backend(backend, op="partition_diversity", device=device, group_size=group,
                             kernels=("triton",))
    valid = reference.valid_mask(mask, batch, group, device)
    checks = DataChecks(check_inputs)
    checks.group_size(valid, "partition_diversity")
    if chosen == "triton" and emb is not None:
        with torch.no_grad():
            sim, norms = similarity_forward(emb, contiguous_mask(mask))
        checks.nonfinite("emb", nonfinite_groups(norms, valid))
        div = reference.partition_from_equivalence(sim >= tau, valid, sim.dtype, min_diversity, transitive)
    else:
        checks.finite("emb", emb, valid)
        div = reference.partition_diversity(emb, valid, tau, partition, None, min_diversity, transitive)
    checks.raise_if_failed()
    return div
