"""Evaluation-side diversity metrics: Vendi score and distinct-n."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from divkernels import reference
from divkernels.validation import DataChecks, check_emb_and_mask


def vendi_score(emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Vendi score per group: ``exp(entropy of eig(S / n))`` with cosine ``S``.

    The effective number of distinct responses: 1 when all are duplicates, ``n`` when they are
    mutually orthogonal.

    Args:
        emb: ``[B, G, D]`` response embeddings. mask: ``[B, G]`` bool or None.

    Returns:
        ``[B]`` float32 (float64 for float64 ``emb``); a metric, no gradient.
    """
    emb, mask = check_emb_and_mask(emb, mask)
    valid = reference.valid_mask(mask, emb.shape[0], emb.shape[1], emb.device)
    checks = DataChecks(True)
    checks.emb(emb, valid)
    checks.raise_if_failed()  # before the eigensolver, which does not converge on NaN/inf
    return reference.vendi_score(emb, valid)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n: unique word n-grams over all word n-grams of ``texts`` (0 when there are none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(words[i:i + n]) for words in (text.split() for text in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
