"""divkernels: fused diversity-aware post-training ops (DDPO/DORPO, DPP logdet, DARLING, DivPO).

Public API only; nothing heavy is imported here (Triton and the CUDA extension load on first use).
"""

from divkernels.backend import BackendUnavailableError
from divkernels.metrics import distinct_n, vendi_score
from divkernels.ops.advantages import group_advantages, policy_gradient_loss
from divkernels.ops.deviation import deviation
from divkernels.ops.group_loss import group_preference_loss
from divkernels.ops.logdet import logdet_diversity
from divkernels.ops.partition import partition_diversity
from divkernels.ops.similarity import pairwise_similarity
from divkernels.types import LossOutput

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LossOutput",
    "deviation",
    "distinct_n",
    "group_advantages",
    "group_preference_loss",
    "logdet_diversity",
    "pairwise_similarity",
    "partition_diversity",
    "policy_gradient_loss",
    "vendi_score",
]
