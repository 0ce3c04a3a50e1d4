"""Input validation for the public API (SPEC 6), in one place.

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

import torch

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
    """``pair_index`` must be an integer ``[B, P, 2]`` tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, P, 2] of integers, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 3 or value.shape[0] != batch or value.shape[2] != 2:
        raise ValueError(f"{name} must have shape [B, P, 2] with B={batch}, got {tuple(value.shape)}")
    return value


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


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors must be on one device; returns it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"inputs must be on one device, got {where}")
    return next(iter(devices))


def nonfinite_groups(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` True where a valid entry of a ``[B, G]`` or ``[B, G, D]`` tensor is NaN or inf.

    For ``[B, G, D]`` the row is summed in float32 first (one read, no ``[B, G, D]`` temporary); a
    finite row whose sum overflows float32 is flagged too, since its similarities would overflow.
    """
    if value.dim() == 3:
        value = value.sum(-1, dtype=torch.float32)
    return (~torch.isfinite(value) & valid).any(-1)


class DataChecks:
    """Data-dependent checks collected as ``[B]`` device flags and resolved by one host sync."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._flags: list[torch.Tensor] = []
        self._messages: list[Callable[[list[int]], str]] = []

    def require(self, bad_groups: torch.Tensor, message: Callable[[list[int]], str]) -> None:
        """Record a check; ``bad_groups`` is ``[B]`` bool, ``message(groups)`` explains a failure."""
        if self.enabled:
            self._flags.append(bad_groups)
            self._messages.append(message)

    def finite(self, name: str, value: torch.Tensor | None, valid: torch.Tensor) -> None:
        """``value`` (``[B, G]`` or ``[B, G, D]``) must hold no NaN/inf in valid responses."""
        if value is not None:
            self.nonfinite(name, nonfinite_groups(value, valid))

    def nonfinite(self, name: str, bad_groups: torch.Tensor) -> None:
        """``bad_groups`` ``[B]``: groups where ``name`` has NaN/inf (e.g. flagged by a kernel)."""
        self.require(bad_groups, lambda groups: f"{name} has NaN or inf in valid responses of groups {groups} "
                                                "(check_inputs=False skips this check)")

    def group_size(self, valid: torch.Tensor, reason: str) -> None:
        """Every group needs at least two valid responses (deviation and logdet need a pair)."""
        self.require(valid.sum(-1) < 2,
                     lambda groups: f"{reason} needs at least 2 valid responses per group; "
                                    f"groups {groups} have fewer (see mask)")

    def raise_if_failed(self) -> None:
        """One host sync for all recorded checks; raise ``ValueError`` for the first that failed."""
        if not self._flags:
            return
        failed = torch.stack([flag.any() for flag in self._flags]).tolist()
        for flag, message, bad in zip(self._flags, self._messages, failed, strict=True):
            if bad:
                groups = flag.nonzero().flatten()[:8].tolist()
                raise ValueError(message(groups))


def check_emb_and_mask(emb: object, mask: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(emb, mask)`` pair that every diversity op takes, checked together."""
    emb = check_emb(emb)
    mask = check_mask(mask, emb.shape[0], emb.shape[1])
    check_same_device(emb=emb, mask=mask)
    return emb, mask
