"""Input validation for the public API, in one place.

Two kinds of checks:

* static checks (types, dtypes, shapes, devices, option names, scalar ranges) look only at
  metadata and raise at once;
* data checks (NaN/inf, too-small groups, bad pair indices, a factorization that failed) need
  the values. :class:`DataChecks` collects them as per-group device flags while the op runs and
  resolves all of them with a single host sync at the end, so a checked call costs one sync and
  ``check_inputs=False`` costs none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from divkernels import reference

# Offsets within one group are 32-bit in the kernels (rows of emb, columns of S): a group may span at most
# this many elements. Offsets across groups are 64-bit.
INDEX_LIMIT = 2**31 - 1
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = "float32, bfloat16, float16 or float64"


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` listing the valid names when ``value`` is not one of ``choices``."""
    if value not in choices:
        valid = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{name}={value!r} is not valid; choose one of {valid}")


def check_scalar(name: str, value: float, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def check_float_tensor(name: str, value: object, ndim: int, layout: str) -> torch.Tensor:
    """Check that ``value`` is a floating-point tensor with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype ({_DTYPE_NAMES}), got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(value.shape)}")
    return value


def check_emb(emb: object) -> torch.Tensor:
    """``emb`` must be a ``[B, G, D]`` float tensor with ``G >= 2`` and ``D >= 1``."""
    emb = check_float_tensor("emb", emb, 3, "[B, G, D]")
    if emb.shape[1] < 2:
        raise ValueError(f"emb must hold G >= 2 responses per group, got G={emb.shape[1]}")
    if emb.shape[2] < 1:
        raise ValueError(f"emb must have embedding size D >= 1, got D={emb.shape[2]}")
    _, group, dim = emb.shape
    if emb.is_contiguous() and group * dim < INDEX_LIMIT:  # the common case, without reading the strides
        return emb
    span = (group - 1) * emb.stride(1) + (dim - 1) * emb.stride(2)
    if span >= INDEX_LIMIT:  # the kernels index within a group with 32-bit offsets (across groups: 64-bit)
        hint = "pass emb.contiguous()" if group * dim < INDEX_LIMIT else "split the embedding dimension"
        raise ValueError(f"emb's strides {emb.stride()} put elements of one group up to {span} apart, past the "
                         f"2^31 - 1 that the kernels index within a group; {hint}")
    return emb


def check_group_tensor(name: str, value: object, batch: int, group: int) -> torch.Tensor:
    """A ``[B, G]`` float tensor whose B and G match the other inputs."""
    value = check_float_tensor(name, value, 2, "[B, G]")
    if tuple(value.shape) != (batch, group):
        raise ValueError(f"{name} has shape {tuple(value.shape)} but the other inputs have "
                         f"[B, G] = ({batch}, {group})")
    return value


def check_mask(mask: object, batch: int, group: int) -> torch.Tensor | None:
    """``mask`` must be None or a ``[B, G]`` bool tensor."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor [B, G] of bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = real response), got {mask.dtype}; "
                        "pass mask.bool() for a 0/1 mask")
    if tuple(mask.shape) != (batch, group):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the other inputs have "
                         f"[B, G] = ({batch}, {group})")
    return mask


def check_index_tensor(name: str, value: object, batch: int) -> torch.Tensor:
    """``pair_index`` must be an integer ``[B, P, 2]`` tensor. The kernels index with int32/int64; any
    other integer dtype (int8, uint8, int16) is widened to int64 here (every value of it is an index)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, P, 2] of integers, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 3 or value.shape[0] != batch or value.shape[2] != 2:
        raise ValueError(f"{name} must have shape [B, P, 2] with B={batch}, got {tuple(value.shape)}")
    return value if value.dtype in (torch.int32, torch.int64) else value.to(torch.int64)


def check_partition(value: object, batch: int, group: int) -> torch.Tensor:
    """Partition labels: an integer ``[B, G]`` tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"partition must be a torch.Tensor [B, G] of integer labels, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"partition must have an integer dtype, got {value.dtype}")
    if tuple(value.shape) != (batch, group):
        raise ValueError(f"partition has shape {tuple(value.shape)} but the other inputs have "
                         f"[B, G] = ({batch}, {group})")
    return value


def check_equivalence(value: object, batch: int | None = None, group: int | None = None) -> torch.Tensor:
    """A judge's links: a bool ``[B, G, G]`` tensor (``[B, G]`` of the other inputs when given)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"equivalence must be a torch.Tensor [B, G, G] of bool, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"equivalence must have dtype torch.bool, got {value.dtype}")
    if value.dim() != 3 or value.shape[1] != value.shape[2]:
        raise ValueError(f"equivalence must have shape [B, G, G], got {tuple(value.shape)}")
    if batch is not None and tuple(value.shape[:2]) != (batch, group):
        raise ValueError(f"equivalence has [B, G] = {tuple(value.shape[:2])} but the other inputs have "
                         f"({batch}, {group})")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors must be on one device; returns it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"inputs must be on one device, got {where}")
    return next(iter(devices))


def nonfinite_groups(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` True where a valid entry of a ``[B, G]`` tensor is NaN or inf."""
    return (~torch.isfinite(value) & valid).any(-1)


def emb_norm_limit(dtype: torch.dtype) -> float:
    """The largest row norm of ``emb`` the similarity ops take for ``emb`` (or norms) of ``dtype``."""
    return reference.EMB_NORM_LIMIT[reference.compute_dtype(dtype)]


def unusable_emb_groups(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` True where a valid row of ``emb`` ``[B, G, D]`` (or its norms ``[B, G]``, as a kernel computed
    them) is NaN/inf or has a norm above :func:`emb_norm_limit`: its Gram entries could overflow.

    ``emb``'s norms are taken in its accumulation dtype (one read, no ``[B, G, D]`` temporary); a norm that
    overflows there is inf, above the limit too, so the result does not depend on how the norm is summed.
    """
    norms = (torch.linalg.vector_norm(value, dim=-1, dtype=reference.compute_dtype(value.dtype)) if value.dim() == 3
             else value)
    return (~(norms <= emb_norm_limit(value.dtype)) & valid).any(-1)  # NaN fails <= too


# What a failed data check says; ``{groups}``: the first failing groups.
NONFINITE_MESSAGE = ("{name} has NaN or inf in valid responses of groups {groups} (check_inputs=False skips this "
                     "check)")
EMB_MESSAGE = ("{name} has NaN or inf, or a row norm above {limit:.3g} (its Gram entries would overflow {dtype}), in "
               "valid responses of groups {groups}; cosine similarity is scale-free: divide {name} by a constant "
               "(check_inputs=False skips this check)")
POSITIVE_MESSAGE = "{name} must be finite and > 0 for valid responses; groups {groups} are not"


def emb_message(dtype: torch.dtype, name: str = "emb") -> Callable[[list[int]], str]:
    """The message of a failed ``emb`` check for ``emb`` (called ``name``) of ``dtype``."""
    wide = str(reference.compute_dtype(dtype)).removeprefix("torch.")
    return lambda groups: EMB_MESSAGE.format(name=name, limit=emb_norm_limit(dtype), dtype=wide, groups=groups)


class DataChecks:
    """Data-dependent checks collected as ``[B]`` device flags and resolved by one host sync."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._flags: list[torch.Tensor] = []
        self._messages: list[Callable[[list[int]], str]] = []

    def require(self, bad_groups: torch.Tensor | Callable[[], torch.Tensor],
                message: Callable[[list[int]], str]) -> None:
        """Record a check; ``bad_groups`` is ``[B]`` bool (or a callable making it, so that nothing is
        computed when checks are off), ``message(groups)`` explains a failure."""
        if self.enabled:
            self._flags.append(bad_groups() if callable(bad_groups) else bad_groups)
            self._messages.append(message)

    def finite(self, name: str, value: torch.Tensor | None, valid: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """``value`` (``[B, G]``) must hold no NaN/inf in valid responses."""
        if value is not None and self.enabled:
            self.nonfinite(name, nonfinite_groups(value, valid() if callable(valid) else valid))

    def emb(self, value: torch.Tensor | None, valid: torch.Tensor | Callable[[], torch.Tensor],
            name: str = "emb") -> None:
        """``emb`` ``[B, G, D]`` (or the norms ``[B, G]`` a kernel computed from it): valid rows finite with
        norms within :func:`emb_norm_limit`."""
        if value is not None and self.enabled:
            self.emb_flagged(lambda: unusable_emb_groups(value, valid() if callable(valid) else valid), value.dtype,
                             name)

    def emb_flagged(self, bad_groups: torch.Tensor | Callable[[], torch.Tensor], dtype: torch.dtype,
                    name: str = "emb") -> None:
        """``bad_groups`` ``[B]``: groups a kernel flagged for unusable ``emb`` rows (see :meth:`emb`)."""
        self.require(bad_groups, emb_message(dtype, name))

    def nonfinite(self, name: str, bad_groups: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """``bad_groups`` ``[B]``: groups where ``name`` has NaN/inf (e.g. flagged by a kernel)."""
        self.require(bad_groups, lambda groups: NONFINITE_MESSAGE.format(name=name, groups=groups))

    def group_size(self, valid: torch.Tensor | Callable[[], torch.Tensor], reason: str) -> None:
        """Every group needs at least two valid responses (deviation and logdet need a pair)."""
        if self.enabled:
            flags = (valid() if callable(valid) else valid).sum(-1) < 2
            self.require(flags, too_few_message(reason))

    def raise_if_failed(self) -> None:
        """One host sync for all recorded checks; raise ``ValueError`` for the first that failed."""
        if not self._flags:
            return
        if any(flag.device.type == "meta" for flag in self._flags):
            return  # meta tensors (deferred init, shape inference) hold no data to check; outputs stay meta
        if torch.compiler.is_compiling():  # no sync inside a graph: device-side asserts, without the group list
            for flag, message in zip(self._flags, self._messages, strict=True):
                torch._assert_async(~flag.any(), message(["(run eagerly for the group list)"]))
            return
        failed = torch.stack([flag.any() for flag in self._flags]).tolist()
        for flag, message, bad in zip(self._flags, self._messages, failed, strict=True):
            if bad:
                groups = flag.nonzero().flatten()[:8].tolist()
                raise ValueError(message(groups))


def too_few_message(reason: str) -> Callable[[list[int]], str]:
    return lambda groups: (f"{reason} needs at least 2 valid responses per group; groups {groups} have fewer "
                           "(see mask)")


def check_emb_and_mask(emb: object, mask: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(emb, mask)`` pair that every diversity op takes, checked together."""
    emb = check_emb(emb)
    mask = check_mask(mask, emb.shape[0], emb.shape[1])
    check_same_device(emb=emb, mask=mask)
    return emb, mask


@dataclass
class GroupLossArguments:
    """The checked arguments of :func:`divkernels.group_preference_loss`."""

    policy_logps: torch.Tensor
    rewards: torch.Tensor
    encoders: list[torch.Tensor]
    ref_logps: torch.Tensor | None
    mask: torch.Tensor | None
    pairs: str
    pair_index: torch.Tensor | None
    extras: dict[str, torch.Tensor | None]  # divpo_scores, weights, token_counts, nll_logps, nll_tokens
    needs_emb_reason: str | None  # why the call needs emb (for the group-size check), or None
    device: torch.device

    @property
    def emb(self) -> torch.Tensor | None:
        return self.encoders[0] if self.encoders else None


def check_encoders(emb: object, batch: int, group: int) -> list[torch.Tensor]:
    """``emb`` as a list of checked ``[B, G, D_k]`` tensors (empty for None; several encoders as a list)."""
    if emb is None:
        return []
    many = isinstance(emb, (list, tuple))
    if many and not emb:
        raise ValueError("emb is an empty sequence; give one [B, G, D] tensor per encoder")
    encoders = [check_emb(e) for e in (emb if many else [emb])]
    for k, e in enumerate(encoders):
        if tuple(e.shape[:2]) != (batch, group):
            name = f"emb[{k}]" if many else "emb"
            raise ValueError(f"{name} has [B, G] = {tuple(e.shape[:2])} but policy_logps has ({batch}, {group})")
    return encoders


def check_group_loss_options(backend: str, **options: object) -> None:
    """The choices and scalars of :func:`divkernels.group_preference_loss`, each checked as its
    :class:`divkernels.loss_config.LossConfig` field declares (run once per call signature, see
    ``divkernels.ops.group_loss.checks._checked_arguments``)."""
    from divkernels.loss_config import PUBLIC_OPTIONS
    from divkernels.types import BACKENDS

    for name, meta in PUBLIC_OPTIONS:
        value = options[name]
        if meta["choices"] is not None:
            check_choice(name, value, meta["choices"])
        else:
            check_scalar(name, value, low=meta["low"], high=meta["high"], low_open=meta["low_open"],
                         high_open=meta["high_open"])
    check_choice("backend", backend, BACKENDS)
    if options["cpo_alpha"] > 0 and options["loss"] == "orpo":
        raise ValueError("cpo_alpha adds CPO's NLL term to dpo/ipo/simpo; loss='orpo' has its own NLL term")


def check_group_loss_arguments(policy_logps: object, rewards: object, emb: object, ref_logps: object, mask: object,
                               *, pair_index: object, options: dict[str, object],
                               **extras: object) -> GroupLossArguments:
    """Every static check of :func:`divkernels.group_preference_loss` (shapes, dtypes, devices, choices,
    combinations); ``options``: its keyword options, ``backend`` included. Data checks (NaN, group
    sizes) happen on the device, see ``check_inputs``."""
    check_group_loss_options(**options)
    loss, diversity, pairs = options["loss"], options["diversity"], options["pairs"]
    deviation_norm, diversity_alpha = options["deviation_norm"], options["diversity_alpha"]
    orpo_weighting, cpo_alpha = options["orpo_weighting"], options["cpo_alpha"]
    has_nll = (loss == "orpo" and orpo_weighting == "dorpo") or cpo_alpha > 0
    if (extras.get("nll_logps") is not None or extras.get("nll_tokens") is not None) and not has_nll:
        raise ValueError("nll_logps / nll_tokens feed the NLL term of loss='orpo' (orpo_weighting='dorpo') or of "
                         "cpo_alpha > 0; this loss has none")
    if extras.get("token_counts") is not None and loss != "ipo":
        raise ValueError("token_counts normalize IPO's log-ratios; they are only used with loss='ipo'")

    policy_logps = check_float_tensor("policy_logps", policy_logps, 2, "[B, G]")
    batch, group = policy_logps.shape
    if group < 2:
        raise ValueError(f"policy_logps must hold G >= 2 responses per group, got G={group}")
    rewards = check_group_tensor("rewards", rewards, batch, group)
    if ref_logps is not None:
        ref_logps = check_group_tensor("ref_logps", ref_logps, batch, group)
    equivalence = extras.pop("equivalence", None)
    extras = {name: None if value is None else check_group_tensor(name, value, batch, group)
              for name, value in extras.items()}
    if (diversity == "partition") != (equivalence is not None):
        raise ValueError("diversity='partition' weighs the chosen responses by the partition diversity of a judge's "
                         "links: it needs equivalence [B, G, G], and equivalence needs it")
    extras["equivalence"] = None if equivalence is None else check_equivalence(equivalence, batch, group)
    mask = check_mask(mask, batch, group)
    encoders = check_encoders(emb, batch, group)
    if len(encoders) > 1 and (diversity != "deviation" or deviation_norm != "minmax"
                              or extras.get("weights") is not None):
        raise ValueError("several encoders combine into DDPO weights: they need diversity='deviation' with "
                         "deviation_norm='minmax' and no weights")
    if pairs == "explicit" and pair_index is None:
        raise ValueError("pairs='explicit' needs pair_index [B, P, 2]")
    if pair_index is not None:
        if pairs not in ("all", "explicit"):
            raise ValueError(f"pair_index gives the pairs explicitly; it cannot be combined with pairs={pairs!r}")
        pair_index = check_index_tensor("pair_index", pair_index, batch)
        pairs = "explicit"
    needs_emb = {
        f"diversity={diversity!r}": diversity not in ("none", "partition") and extras.get("weights") is None,
        "diversity_alpha > 0": diversity_alpha > 0,
        "pairs='divpo' without divpo_scores": pairs == "divpo" and extras.get("divpo_scores") is None,
    }
    missing = [reason for reason, needed in needs_emb.items() if needed]
    if missing and not encoders:
        raise ValueError(f"{missing[0]} needs emb [B, G, D]")
    if extras.get("divpo_scores") is not None and pairs != "divpo":
        raise ValueError("divpo_scores is only used with pairs='divpo'")
    device = check_same_device(policy_logps=policy_logps, rewards=rewards, ref_logps=ref_logps, mask=mask,
                               pair_index=pair_index, **extras,
                               **{f"emb[{k}]" if len(encoders) > 1 else "emb": e for k, e in enumerate(encoders)})
    return GroupLossArguments(policy_logps, rewards, encoders, ref_logps, mask, pairs, pair_index, extras,
                              missing[0] if missing else None, device)
