"""Measured choice between the Triton and CUDA kernels for ``backend="auto"``.

Both kernel backends compute the same fused group loss; which one is faster depends on the GPU and
the shape. The benchmark suite times both on the same inputs, and
``python -m divkernels.benchmarks.dispatch RESULTS.json`` turns those timings into a table of
``(device name, op, shape class) -> backend``. ``auto`` follows the table for the device it runs
on and falls back to the first available kernel (Triton) where the table has no entry.

A shape class is ``(G class, D class, emb dtype)``: G rounded up to a power of two (2..128), D
rounded up to 512, 2048 or 8192 (``"large"`` above, ``"none"`` without embeddings), and the
embedding dtype (``"none"`` without embeddings). Within a class the backend with the lower
geometric-mean time over every measured case (both passes, all loss variants, all batch sizes)
wins.

The table ships as ``divkernels/dispatch_table.json``; ``DIVKERNELS_DISPATCH_TABLE=path`` uses
another one (e.g. made from your own benchmark run on a GPU that the shipped table lacks).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

ENV_TABLE = "DIVKERNELS_DISPATCH_TABLE"
DEFAULT_TABLE = Path(__file__).resolve().parent / "dispatch_table.json"
DIM_CLASSES = (512, 2048, 8192)
TABLE_VERSION = 1


def group_class(group: int) -> int:
    """G rounded up to a power of two, at least 2."""
    return max(2, 1 << (max(group, 1) - 1).bit_length())


def dim_class(dim: int | None) -> str:
    """``"none"`` without embeddings, else the smallest of 512/2048/8192 that holds D, else ``"large"``."""
    if dim is None:
        return "none"
    for bound in DIM_CLASSES:
        if dim <= bound:
            return str(bound)
    return "large"


def shape_class(group: int, dim: int | None, dtype: torch.dtype | str | None) -> str:
    """The key of a shape class: ``shape_class(16, 4096, torch.bfloat16) == "G16-D8192-bfloat16"``."""
    if dim is None or dtype is None:
        return f"G{group_class(group)}-Dnone-none"
    name = str(dtype).removeprefix("torch.")
    return f"G{group_class(group)}-D{dim_class(dim)}-{name}"


def table_path() -> Path:
    """The table in use: ``$DIVKERNELS_DISPATCH_TABLE`` or the shipped one."""
    override = os.environ.get(ENV_TABLE)
    return Path(override) if override else DEFAULT_TABLE


@functools.cache
def _load(path: str) -> dict[tuple[str, str], dict[str, str]]:
    if path != str(DEFAULT_TABLE) and not Path(path).exists():
        raise FileNotFoundError(f"{ENV_TABLE}={path} does not exist")
    table: dict[tuple[str, str], dict[str, str]] = {}
    for entry in read_entries(Path(path))[0]:
        table.setdefault((entry["device"], entry["op"]), {})[entry["class"]] = entry["backend"]
    return table


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The CUDA device's name as the benchmark files record it (cached per device)."""
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def measured_backend(op: str, device: torch.device, group: int, dim: int | None,
                     dtype: torch.dtype | None) -> str | None:
    """The faster kernel backend measured for this device, op and shape class, or None if unmeasured."""
    if device.type != "cuda":
        return None
    by_class = _load(str(table_path())).get((device_name(device), op))
    if not by_class:
        return None
    return by_class.get(shape_class(group, dim, dtype))


def forget_cached_tables() -> None:
    """Re-read table files on the next lookup (after the benchmark tooling wrote one)."""
    _load.cache_clear()


def read_entries(path: Path) -> tuple[list[dict], list[str]]:
    """Entries and sources of a table file (empty if it does not exist)."""
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    if data.get("version") != TABLE_VERSION:
        raise ValueError(f"dispatch table {path} has version {data.get('version')!r}, expected {TABLE_VERSION}")
    return list(data.get("entries", [])), list(data.get("sources", []))
