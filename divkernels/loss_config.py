"""What the fused group loss passes between Python, the Triton kernels and the CUDA kernels.

One place for the settings (:class:`LossConfig`), the tensors (:class:`LossTensors`), the mode
numbers the kernels switch on and the columns of the per-group partial sums. ``csrc/group_math.h``
declares the same enums in C++; ``tests/test_loss_config.py`` parses it and checks that both agree,
so no offset is kept in step by a comment.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from functools import cached_property

import torch

from divkernels.types import DEVIATION_NORMS, DIVERSITIES, DIVPO_POOLS, LOSSES, ORPO_WEIGHTINGS, PAIR_MODES

# Weight mode of the kernels: the diversity modes, then weights given by the caller.
WEIGHT_MODES = (*DIVERSITIES, "given")
# Columns of the [B, NUM_STATS] per-group partial sums both kernels write (C++: enum Stat).
STATS = ("weighted_loss", "pairs", "chosen_reward", "rejected_reward", "correct", "no_pairs", "deviation",
         "mean_similarity", "has_similarity", "logdet", "valid", "emb_nonfinite", "weight_sum", "nll_logps",
         "nll_tokens", "logps_chosen", "logps_rejected", "log_odds_ratio", "log_odds_chosen")
# With check_inputs=True the Triton forward appends one 0/1 column per data check (1: the group fails it).
CHECK_STATS = ("bad_policy_logps", "bad_rewards", "bad_ref_logps", "bad_divpo_scores", "bad_weights",
               "bad_token_counts", "bad_nll_logps", "bad_nll_tokens", "too_few_responses", "orpo_nonnegative",
               "bad_pair_index", "factorization_failed")
STAT = {name: index for index, name in enumerate(STATS + CHECK_STATS)}
# The finalize kernel's output vector (float32): the loss and every metric the op can report.
METRICS = ("loss", "pairs", "groups_without_pairs", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen",
           "diversity/mean_similarity", "diversity/deviation", "diversity/logdet")
METRIC = {name: index for index, name in enumerate(METRICS)}


@dataclass(frozen=True)
class LossConfig:
    """The non-tensor arguments of the fused loss (hashable, passed through autograd)."""

    loss: str
    diversity: str
    pairs: str
    beta: float
    orpo_lambda: float
    simpo_gamma: float
    deviation_norm: str
    min_deviation: float
    diversity_alpha: float
    eps: float
    quality_quantile: float
    orpo_weighting: str = "dorpo"
    divpo_pools: str = "ranked"
    given_weights: bool = False
    cpo_alpha: float = 0.0
    check_inputs: bool = False
    needs_two: bool = False  # the data checks require two valid responses per group
    kernel_backend: str = "triton"  # "triton" or "cuda"

    @cached_property
    def key(self) -> str:
        """The config as one string, how the ``torch.library`` custom ops receive it."""
        return json.dumps([getattr(self, name) for name in self.__dataclass_fields__])

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_key(key: str) -> LossConfig:
        return LossConfig(*json.loads(key))

    def __hash__(self) -> int:  # computed once: the launch-constant caches hash the config every call
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, name) for name in self.__dataclass_fields__))

    @cached_property
    def needs_logdet(self) -> bool:
        return self.diversity == "logdet_gain" or self.diversity_alpha > 0

    @cached_property
    def dorpo(self) -> bool:
        """DORPO's form: weight inside the log-sigmoid, NLL scaled by the batch mean of the weights."""
        return self.loss == "orpo" and self.orpo_weighting == "dorpo"

    @cached_property
    def has_nll(self) -> bool:
        """The loss has the batch NLL term of the chosen sequences (DORPO / ORPO, or CPO's cpo_alpha)."""
        return self.dorpo or self.cpo_alpha > 0

    @cached_property
    def loss_mode(self) -> int:
        return LOSSES.index(self.loss)

    @cached_property
    def pair_mode(self) -> int:
        return PAIR_MODES.index(self.pairs)

    @cached_property
    def weight_mode(self) -> int:
        return WEIGHT_MODES.index("given" if self.given_weights else self.diversity)

    @cached_property
    def norm_mode(self) -> int:
        return DEVIATION_NORMS.index(self.deviation_norm)

    @cached_property
    def ranked_pools(self) -> bool:
        return self.divpo_pools == DIVPO_POOLS[0]

    @cached_property
    def orpo_dorpo(self) -> bool:
        return self.orpo_weighting == ORPO_WEIGHTINGS[0]


@dataclass
class LossTensors:
    """The tensor inputs of the fused loss; the optional ones are None when not given."""

    policy: torch.Tensor
    rewards: torch.Tensor
    ref: torch.Tensor | None = None
    emb: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    nll_logps: torch.Tensor | None = None
    nll_tokens: torch.Tensor | None = None
    poison: bool = False  # outputs start as NaN (DIVKERNELS_POISON_OUTPUTS, read once per call)
    # the forward's non-differentiable outputs (metrics, stats, totals, chosen / rejected counts),
    # handed back outside autograd
    aux: tuple[torch.Tensor, ...] | None = None


@dataclass
class ForwardOutputs:
    """What a backend's fused forward returns (the same for Triton and CUDA)."""

    stats: torch.Tensor  # [B, NUM_STATS] per-group partial sums
    grad_policy: torch.Tensor  # [B, G] d loss_sum / d policy, unscaled
    chosen_counts: torch.Tensor  # [B, G]
    rejected_counts: torch.Tensor  # [B, G]
    sim: torch.Tensor | None = None  # S, norms [B, G], K^-1 when emb needs a gradient (S, K^-1: [B, G, G], on
    # Triton with rows padded to a multiple of 16 elements, common.square_shape)
    norms: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    # Triton: (the forward launch's arguments but stats, the fix-up's constants) when its float32 sweeps
    # may need the finalize kernel's float64 fix-up (None otherwise, and for CUDA)
    fixup: tuple[tuple, dict] | None = None
