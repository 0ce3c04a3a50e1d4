"""Result types and the names that the public API accepts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

LOSSES = ("dpo", "ipo", "orpo", "simpo", "dpo_listwise")
# Losses on the log-ratio pi - ref (they read ref_logps and differentiate it).
REFERENCE_LOSSES = ("dpo", "ipo", "dpo_listwise")
DIVERSITIES = ("none", "deviation", "logdet_gain", "partition")
PAIR_MODES = ("all", "best_worst", "divpo", "explicit")
ADVANTAGE_DIVERSITIES = ("none", "darling", "dqo", "deviation")
ADVANTAGE_SCALES = ("std", "none")
ADVANTAGE_ESTIMATORS = ("grpo", "passk_analytic", "pkpo", "best_minus_second")
DEVIATION_NORMS = ("minmax", "mean", "none")
ORPO_WEIGHTINGS = ("dorpo", "pair")
DIVPO_POOLS = ("ranked", "threshold")
DARLING_REWARDS = ("raw", "minmax")
KERNELS = ("cosine", "dot", "rbf")
BACKENDS = ("auto", "reference", "triton", "cuda")


class MetricVector(Mapping):
    """Named scalars that are views of one float32 vector (the fused loss's finalize output): a
    read-only dict whose values are made on access, so a step that does not log costs no tensor ops."""

    def __init__(self, vector: torch.Tensor, index: Mapping[str, int], names: tuple[str, ...]) -> None:
        self.vector, self._index, self._names = vector, index, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.vector[self._index[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def floats(self) -> dict[str, float]:
        """Every metric as a Python float, with one copy of the vector (one host sync)."""
        values = self.vector.tolist()
        return {name: values[self._index[name]] for name in self._names}

    def __repr__(self) -> str:
        return repr(dict(self.items()))


@dataclass
class LossOutput:
    """What :func:`divkernels.group_preference_loss` returns.

    Attributes:
        loss: scalar tensor to call ``backward()`` on.
        metrics: detached float32 scalars named as TRL logs them (``rewards/chosen``,
            ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
            ``logps/rejected``; ``nll_loss`` with an NLL term; ``log_odds_ratio`` and
            ``log_odds_chosen`` for ORPO; each a mean over pairs) plus ``loss``, ``pairs``,
            ``groups_without_pairs`` and the ``diversity/*`` metrics.
        logdet: ``[B]`` detached per-group ``log det(S + eps I)`` when the loss computed it
            (``diversity="logdet_gain"`` or ``diversity_alpha > 0``), else None.
        chosen_counts, rejected_counts: ``[B, G]`` how many pairs each response is the chosen /
            rejected response of (detached), to weight per-response statistics as pairs do.
    """

    loss: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    logdet: torch.Tensor | None = None
    chosen_counts: torch.Tensor | None = None
    rejected_counts: torch.Tensor | None = None

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        """Metrics as Python floats for a logger (one host sync for all of them)."""
        if isinstance(self.metrics, MetricVector):
            floats = self.metrics.floats()
        else:
            names = list(self.metrics)
            values = torch.stack([self.metrics[name] for name in names]).tolist() if names else []
            floats = dict(zip(names, values, strict=True))
        return {prefix + name: value for name, value in floats.items()}
