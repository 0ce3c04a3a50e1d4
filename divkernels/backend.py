"""Backend choice: ``reference`` (PyTorch, any device), ``triton`` and ``cuda`` (CUDA devices).

``backend="auto"`` picks a kernel backend on CUDA tensors and the reference elsewhere. Where an op
has both kernels, it takes the one measured faster for the device and shape class
(:mod:`divkernels.dispatch`), else Triton. The environment variable ``DIVKERNELS_BACKEND``
overrides what ``auto`` picks. Asking explicitly for a
backend that cannot run raises :class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Sequence

import torch

from divkernels import dispatch
from divkernels.types import BACKENDS
from divkernels.validation import check_choice

# Largest group the kernels hold on chip; larger groups run on the reference.
MAX_KERNEL_GROUP = 128
ENV_BACKEND = "DIVKERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why."""


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as error:  # any import failure (e.g. a broken CUDA setup) makes it unavailable
        return f"importing triton failed: {error}"
    return None


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "reference":
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error is not None:
            return error
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled()):
            return None
        if device.type == "cpu":
            return "Triton kernels need a CUDA device; on CPU they run only under TRITON_INTERPRET=1"
        return f"Triton kernels need a CUDA device, got {device.type}"
    if backend == "cuda":
        from divkernels import _cuda

        return _cuda.unavailable_reason(device)
    raise ValueError(f"unknown backend {backend!r}")


@functools.cache
def _warn_large_group(group_size: int) -> None:
    warnings.warn(f"groups of G={group_size} > {MAX_KERNEL_GROUP} responses exceed the kernels' "
                  "limit; falling back to the PyTorch reference", stacklevel=4)


@torch._dynamo.assume_constant_result
def _resolve_while_compiling(requested: str, op: str, device: torch.device, group_size: int, kernels: tuple[str, ...],
                             dim: int | None, emb_dtype: torch.dtype | None) -> str:
    """The choice, made once while torch.compile traces (it reads the environment and caches)."""
    return resolve_backend.__wrapped__(requested, op=op, device=device, group_size=group_size, kernels=kernels,
                                       dim=dim, emb_dtype=emb_dtype)


def _compile_aware(function):
    """Under torch.compile, :func:`resolve_backend` becomes a constant of the traced graph."""
    @functools.wraps(function)
    def wrapper(requested: str, *, op: str, device: torch.device, group_size: int, kernels: Sequence[str] = (),
                dim: int | None = None, emb_dtype: torch.dtype | None = None) -> str:
        if torch.compiler.is_compiling():
            return _resolve_while_compiling(requested, op, device, group_size, tuple(kernels), dim, emb_dtype)
        return function(requested, op=op, device=device, group_size=group_size, kernels=kernels, dim=dim,
                        emb_dtype=emb_dtype)
    return wrapper


@_compile_aware
def resolve_backend(requested: str, *, op: str, device: torch.device, group_size: int,
                    kernels: Sequence[str] = (), dim: int | None = None, emb_dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op``.

    Args:
        requested: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        op: public op name, for messages.
        device: device of the inputs.
        group_size: padded group size ``G``.
        kernels: kernel backends that ``op`` has (besides the reference), in default order.
        dim, emb_dtype: embedding width and dtype (None without embeddings), for the measured
            choice between two kernels (:func:`divkernels.dispatch.measured_backend`).
    """
    check_choice("backend", requested, BACKENDS)
    if requested == "auto":
        override = os.environ.get(ENV_BACKEND, "auto")
        check_choice(ENV_BACKEND, override, BACKENDS)
        if override != "auto":
            return resolve_backend(override, op=op, device=device, group_size=group_size, kernels=kernels,
                                   dim=dim, emb_dtype=emb_dtype)
        if device.type != "cuda":
            return "reference"
        if group_size > MAX_KERNEL_GROUP and kernels:
            _warn_large_group(group_size)
            return "reference"
        if len(kernels) > 1:
            # only a measured choice probes the second kernel (probing CUDA may JIT-build it)
            measured = dispatch.measured_backend(op, device, group_size, dim, emb_dtype)
            if measured in kernels and backend_unavailable_reason(measured, device) is None:
                return measured
        for candidate in kernels:
            if backend_unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    if requested == "reference":
        return requested
    reason = backend_unavailable_reason(requested, device)
    if reason is None and requested not in kernels:
        reason = f"{op} has no {requested} kernel"
    if reason is None and group_size > MAX_KERNEL_GROUP:
        reason = f"G={group_size} exceeds the in-kernel limit of {MAX_KERNEL_GROUP}; use backend='auto' or 'reference'"
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} is unavailable for {op}: {reason}")
    return requested


def backend_report(device: torch.device) -> dict[str, str | None]:
    """``{backend: None if available on device else the reason}`` for ``python -m divkernels info``."""
    return {name: backend_unavailable_reason(name, device) for name in BACKENDS if name != "auto"}
