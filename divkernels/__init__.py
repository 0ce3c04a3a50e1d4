"""divkernels: fused diversity-aware post-training ops (DDPO/DORPO, DPP logdet, DARLING, DivPO).

Public API only. The op modules (and with them Triton) load on first use, so importing the
package does no work and ``TRITON_INTERPRET`` may still be set after ``import divkernels``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BackendUnavailableError": "divkernels.backend",
    "LossOutput": "divkernels.types",
    "deviation": "divkernels.ops.deviation",
    "distinct_n": "divkernels.metrics",
    "group_advantages": "divkernels.ops.advantages",
    "group_preference_loss": "divkernels.ops.group_loss",
    "group_preference_loss_from_hidden": "divkernels.ops.hidden_loss",
    "linear_logps": "divkernels.ops.linear_logps",
    "logdet_diversity": "divkernels.ops.logdet",
    "pairwise_similarity": "divkernels.ops.similarity",
    "partition_diversity": "divkernels.ops.partition",
    "policy_gradient_loss": "divkernels.ops.advantages",
    "vendi_score": "divkernels.metrics",
}
__all__ = [
    "BackendUnavailableError",
    "LossOutput",
    "deviation",
    "distinct_n",
    "group_advantages",
    "group_preference_loss",
    "group_preference_loss_from_hidden",
    "linear_logps",
    "logdet_diversity",
    "pairwise_similarity",
    "partition_diversity",
    "policy_gradient_loss",
    "vendi_score",
]

if TYPE_CHECKING:
    from divkernels.backend import BackendUnavailableError
    from divkernels.metrics import distinct_n, vendi_score
    from divkernels.ops.advantages import group_advantages, policy_gradient_loss
    from divkernels.ops.deviation import deviation
    from divkernels.ops.group_loss import group_preference_loss
    from divkernels.ops.hidden_loss import group_preference_loss_from_hidden
    from divkernels.ops.linear_logps import linear_logps
    from divkernels.ops.logdet import logdet_diversity
    from divkernels.ops.partition import partition_diversity
    from divkernels.ops.similarity import pairwise_similarity
    from divkernels.types import LossOutput


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'divkernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]
