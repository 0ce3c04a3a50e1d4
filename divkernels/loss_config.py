"""What the fused group loss passes between Python, the Triton kernels and the CUDA kernels, declared once.

One place for the settings (:class:`LossConfig`: each field carries its choices or range and what
the kernels take it as), the tensors (:class:`LossTensors`), the mode numbers the kernels switch on
and the columns of the per-group partial sums. Validation loops over the fields; the Triton launch
reads :data:`KERNEL_PARAMS`; the C++ declarations (``csrc/loss_params.h``: the mode and stats enums,
``LossParams`` and its unpacking) are generated from this module by ``python -m divkernels.loss_config``,
and ``tests/test_loss_config.py`` regenerates the header and compares.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import textwrap
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

import torch

from divkernels import reference
from divkernels.types import (
    ADVANTAGE_ESTIMATORS,
    DEVIATION_NORMS,
    DIVERSITIES,
    DIVPO_POOLS,
    LOSSES,
    ORPO_WEIGHTINGS,
    PAIR_MODES,
)

# Weight mode of the kernels: the diversity modes they compute, weights given by the caller, then
# "partition", whose weights the host computes from a judge's links and hands over as given ones.
WEIGHT_MODES = (*(mode for mode in DIVERSITIES if mode != "partition"), "given", "partition")
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


def option(default: object = None, *, choices: tuple[str, ...] | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False, public: bool = True,
           doc: str = "") -> object:
    """A :class:`LossConfig` field and what checks it: ``choices`` (names) or a finite number within
    ``low`` / ``high`` (open bounds excluded). ``public=False``: set by the op, not by the caller."""
    metadata = {"choices": choices, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "public": public, "doc": doc}
    return field(default=default, metadata=metadata) if default is not None else field(metadata=metadata)


@dataclass(frozen=True)
class LossConfig:
    """The non-tensor arguments of the fused loss (hashable, passed through autograd)."""

    loss: str = option("dpo", choices=LOSSES, doc='``"dpo"`` (TRL\'s sigmoid), ``"ipo"``, ``"orpo"``, ``"simpo"`` or '
                       '``"dpo_listwise"`` (Plackett-Luce over the group ranked by reward: each response against '
                       'those with a lower reward, ties unranked; summed over responses, divided by the pairs).')
    diversity: str = option("none", choices=DIVERSITIES, doc=(
        'pair weight ``"none"`` (1), ``"deviation"`` (DDPO/DORPO), ``"logdet_gain"`` (``1 / (K^{-1})_ii`` '
        'normalized to mean 1, our DQO-style variant) or ``"partition"`` (DARLING\'s partition diversity of '
        "a judge's ``equivalence`` links, normalized to mean 1, ours)."))
    pairs: str = option("all", choices=PAIR_MODES, doc=(
        '``"all"`` (every ``r_i > r_j``), ``"best_worst"``, ``"divpo"`` or ``"explicit"`` (``pair_index``).'))
    beta: float = option(0.1, low=0.0, low_open=True, doc="DPO / IPO / SimPO temperature.")
    orpo_lambda: float = option(0.1, low=0.0, doc="weight of ORPO's odds-ratio term (TRL's ORPO ``beta``).")
    simpo_gamma: float = option(0.5, doc="SimPO target margin.")
    deviation_norm: str = option("minmax", choices=DEVIATION_NORMS, doc=(
        '``"minmax"`` (DDPO/DORPO: ``(d - d_min) / (mean d - d_min)``, 1 for equal deviations), ``"mean"`` '
        '(ours: ``d / mean d``) or ``"none"`` (raw deviation).'))
    min_deviation: float = option(0.0, low=0.0, doc="floor on deviation weights.")
    diversity_alpha: float = option(0.0, low=0.0, doc="weight of the ``-mean_b logdet_b`` regularizer (0: none).")
    eps: float = option(reference.DQO_EPS, low=0.0, low_open=True, doc="ridge of ``K = S + eps I`` (DQO: 1).")
    quality_quantile: float = option(0.25, low=0.0, high=1.0, low_open=True, high_open=True, doc=(
        "DivPO's pool share ``q``: the top and bottom ``floor(q n)`` responses by reward (``divpo_pools="
        '"ranked"``, default 0.25 as the authors\' ``rho=25``), or the chosen pool\'s share above a quantile '
        'threshold (``"threshold"``, ours).'))
    orpo_weighting: str = option("dorpo", choices=ORPO_WEIGHTINGS, doc=(
        '``"dorpo"`` (the authors\' DORPO) or ``"pair"`` (ours: ``w_i`` multiplies each pair\'s whole ORPO '
        "loss, NLL included)."))
    divpo_pools: str = option("ranked", choices=DIVPO_POOLS, doc=(
        '``"ranked"`` (DivPO; diversity measured within each pool) or ``"threshold"`` (ours: rewards at or '
        "above the ``1 - q`` quantile against all the rest, deviation over the whole group)."))
    given_weights: bool = option(False, public=False, doc="weights given by the caller")
    cpo_alpha: float = option(0.0, low=0.0, doc=(
        "weight of the NLL term for dpo/ipo/simpo (TRL's CPOTrainer ``cpo_alpha``)."))
    check_inputs: bool = option(False, public=False, doc="the forward kernel runs the data checks")
    needs_two: bool = option(False, public=False, doc="the data checks require two valid responses per group")
    kernel_backend: str = option("triton", public=False, doc='"triton" or "cuda"')

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

    def kernel_values(self, need_logdet: bool, store_state: bool) -> tuple[float, ...]:
        """The :data:`KERNEL_PARAMS` of one launch, in order: the CUDA extension's packed ``LossParams``."""
        return tuple(float(param.value(self, need_logdet, store_state)) for param in KERNEL_PARAMS)

    def kernel_mode(self, need_logdet: bool, store_state: bool) -> KernelMode:
        """The integer and flag :data:`KERNEL_PARAMS`: the Triton kernels' one constexpr ``MODE``
        (a stage reads ``MODE.pairs``, ``MODE.divpo_ranked``, ...)."""
        return KernelMode(*(param.value(self, need_logdet, store_state) for param in KERNEL_PARAMS
                            if param.ctype != "double"))

    @cached_property  # read on every Triton forward
    def triton_scalars(self) -> tuple[float, ...]:
        """The real :data:`KERNEL_PARAMS`, in :data:`SCALARS` order: the Triton kernels' float64 scalar
        table, which a stage reads at ``scalar_slot(name)``."""
        return tuple(param.value(self, False, False) for param in KERNEL_PARAMS if param.ctype == "double")


# The field names of LossConfig in order, and (name, checks) of those a caller sets: plain tuples, which
# torch.compile traces as constants.
FIELD_NAMES = tuple(item.name for item in fields(LossConfig))
PUBLIC_OPTIONS = tuple((item.name, dict(item.metadata)) for item in fields(LossConfig) if item.metadata["public"])
PUBLIC_DEFAULTS = {item.name: item.default for item in fields(LossConfig) if item.metadata["public"]}


def with_defaults(given: dict[str, object], function: str = "group_preference_loss") -> dict[str, object]:
    """The options a caller gave, with the declared defaults for the others; an unknown name is a
    TypeError, as Python raises for an unknown keyword."""
    for name in given:
        if name not in PUBLIC_DEFAULTS:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
    return {**PUBLIC_DEFAULTS, **given}


def takes_loss_options(function: Callable) -> Callable:
    """Give ``function`` (which takes the options as ``**options``) the declared options as keyword-only
    parameters of its signature, with their defaults, before its other keyword-only ones (what ``help``
    and ``inspect.signature`` show), and their docs in its docstring where it says ``{options}``."""
    signature = inspect.signature(function)
    hints = {item.name: item.type for item in fields(LossConfig)}
    declared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=PUBLIC_DEFAULTS[name],
                                  annotation=hints[name]) for name, _ in PUBLIC_OPTIONS]
    kept = [param for param in signature.parameters.values() if param.kind != inspect.Parameter.VAR_KEYWORD]
    first_keyword = next(i for i, param in enumerate(kept) if param.kind == inspect.Parameter.KEYWORD_ONLY)
    function.__signature__ = signature.replace(parameters=kept[:first_keyword] + declared + kept[first_keyword:])
    indent = " " * 8
    docs = "\n".join(textwrap.fill(f"{name}: {meta['doc']}", width=100, initial_indent=indent,
                                   subsequent_indent=indent + "    ") for name, meta in PUBLIC_OPTIONS)
    function.__doc__ = (function.__doc__ or "").replace("{options}", docs.lstrip())
    return function


@dataclass(frozen=True)
class KernelParam:
    """One member of the kernels' parameters: a C++ ``LossParams`` member (``ctype``) and, for ints and
    flags, a Triton constexpr of the same name in upper case; ``value(config, need_logdet, store_state)``."""

    name: str
    ctype: str
    value: Callable[[LossConfig, bool, bool], object]


# What the forward kernels take of a LossConfig, in LossParams' order (the CUDA extension receives them
# packed as float64 in this order; the reals follow the ints and flags).
KERNEL_PARAMS = (
    KernelParam("loss", "int", lambda c, *_: c.loss_mode),
    KernelParam("pairs", "int", lambda c, *_: c.pair_mode),
    KernelParam("weights", "int", lambda c, *_: c.weight_mode),
    KernelParam("deviation_norm", "int", lambda c, *_: c.norm_mode),
    KernelParam("orpo_dorpo", "bool", lambda c, *_: c.dorpo),
    KernelParam("divpo_ranked", "bool", lambda c, *_: c.ranked_pools),
    KernelParam("need_logdet", "bool", lambda c, need_logdet, _: need_logdet),
    KernelParam("store_state", "bool", lambda c, _, store_state: store_state),
    KernelParam("beta", "double", lambda c, *_: c.beta),
    KernelParam("orpo_lambda", "double", lambda c, *_: c.orpo_lambda),
    KernelParam("simpo_gamma", "double", lambda c, *_: c.simpo_gamma),
    KernelParam("min_deviation", "double", lambda c, *_: c.min_deviation),
    KernelParam("eps", "double", lambda c, *_: c.eps),
    KernelParam("quality_quantile", "double", lambda c, *_: c.quality_quantile),
)
# The Triton kernels take the ints and flags as one constexpr namedtuple and the reals as one float64
# table (a pointer): a kernel signature names no option, only the stage that uses one does.
KernelMode = namedtuple("KernelMode", [param.name for param in KERNEL_PARAMS if param.ctype != "double"])
SCALARS = tuple(param.name for param in KERNEL_PARAMS if param.ctype == "double")


def scalar_slot(name: str) -> int:
    """Index of the real parameter ``name`` in the Triton kernels' scalar table."""
    return SCALARS.index(name)


# The CUDA forward's tensors, in its argument order (LossTensors' names; pair_index arrives as the
# [B, G, G] pair counts). The optional ones set LossParams' has_<name> flags.
CUDA_INPUTS = ("policy", "rewards", "ref", "emb", "mask", "counts", "scores", "weights", "lengths", "nll_logps",
               "nll_tokens")
CUDA_REQUIRED = ("policy", "rewards")
# The mode enums of the header: (C++ enum, enumerator prefix, the Python names in order).
MODE_ENUMS = (("Loss", "kLoss", LOSSES), ("Pairs", "kPairs", PAIR_MODES), ("Weights", "kWeights", WEIGHT_MODES),
              ("DeviationNorm", "kNorm", DEVIATION_NORMS), ("Estimator", "kEstimator", ADVANTAGE_ESTIMATORS))
# Constants of the reference that the C++ math uses: (C++ name, value).
CPP_CONSTANTS = (("kNormFloor", reference.NORM_FLOOR),
                 ("kEmbNormLimit32", reference.EMB_NORM_LIMIT[torch.float32]),
                 ("kEmbNormLimit64", reference.EMB_NORM_LIMIT[torch.float64]),
                 ("kDivpoTieRtol", reference.DIVPO_TIE_RTOL), ("kDivpoCountSlack", reference.DIVPO_COUNT_SLACK),
                 ("kDeviationTie", reference.DEVIATION_TIE), ("kLn2", reference.LN2),
                 ("kPivotMargin", reference.PIVOT_MARGIN), ("kAdvantageStdEps", reference.ADVANTAGE_STD_EPS),
                 ("kPasskStdEps", reference.PASSK_STD_EPS))
HEADER_PATH = Path(__file__).resolve().parent.parent / "csrc" / "loss_params.h"


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


def camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _enum(name: str, enumerators: list[str]) -> str:
    items = ", ".join(f"{item} = {index}" if index == 0 else item for index, item in enumerate(enumerators))
    return f"enum {name} : int {{ {items} }};"


def cpp_header() -> str:
    """``csrc/loss_params.h``: the declarations the C++ kernels share with this module."""
    lines = ["// Generated from divkernels/loss_config.py by `python -m divkernels.loss_config`: edit that file,",
             "// then regenerate; tests/test_loss_config.py checks that this file is what it generates.",
             "#pragma once", "", "#include <vector>", "", "namespace divkernels {", ""]
    lines += [f"constexpr double {name} = {float(value).hex()};  // {float(value)!r}" for name, value in CPP_CONSTANTS]
    lines += ["", "// Mode numbers: the index of the option's name in its Python tuple."]
    lines += [_enum(name, [prefix + camel(item) for item in items]) for name, prefix, items in MODE_ENUMS]
    lines += ["// Columns of the [B, kNumStats] per-group partial sums (loss_config.STATS).",
              _enum("Stat", ["k" + camel(name) for name in STATS] + ["kNumStats"]),
              "// The tensors of group_loss_forward, in order (null where an optional one is absent).",
              _enum("Input", ["kInput" + camel(name) for name in CUDA_INPUTS] + ["kNumInputs"]), ""]
    members = [f"  {param.ctype} {param.name};" for param in KERNEL_PARAMS]
    flags = [f"  bool has_{name};" for name in CUDA_INPUTS if name not in CUDA_REQUIRED]
    lines += ["// Scalar settings of one launch: the packed KERNEL_PARAMS, then what the inputs hold.",
              "struct LossParams {", *members, *flags,
              "  bool vector_loads;  // emb rows are contiguous and 16-byte aligned: load 16 bytes at a time", "};",
              f"constexpr int kNumPackedParams = {len(KERNEL_PARAMS)};", "",
              "// LossParams from the packed values (has_* and vector_loads are set by the launcher).",
              "inline LossParams unpack_params(const std::vector<double>& packed) {", "  LossParams p{};"]
    cast = {"int": "int", "bool": "bool", "double": "double"}
    lines += [f"  p.{param.name} = {cast[param.ctype]}(packed[{index}]);"
              if param.ctype != "bool" else f"  p.{param.name} = packed[{index}] != 0.0;"
              for index, param in enumerate(KERNEL_PARAMS)]
    lines += ["  return p;", "}", "",
              "// LossParams' has_* flags: which optional inputs (indexed by enum Input) are given.",
              "template <class Inputs>", "void set_input_flags(LossParams& p, const Inputs& inputs) {"]
    lines += [f"  p.has_{name} = bool(inputs[kInput{camel(name)}]);" for name in CUDA_INPUTS
              if name not in CUDA_REQUIRED]
    lines += ["}", "", "}  // namespace divkernels", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m divkernels.loss_config [PATH]: write the generated C++ header
    Path(sys.argv[1] if len(sys.argv) > 1 else HEADER_PATH).write_text(cpp_header())
