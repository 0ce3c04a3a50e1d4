"""Gathering response groups across processes (DDP, FSDP2 or ZeRO-3 under ``torchrun`` / ``accelerate launch``).

When every process gathers the whole batch of groups and computes the same loss on it, the loss
equals the single-process loss. Gradients must then reach each process's own rows:
:func:`gather_rows` all-gathers in the forward pass and, in the backward pass, all-reduces the
gradient of the gathered tensor (every process holds the gradient of the same loss) and keeps
the local rows. DDP (and FSDP's reduce-scatter, and ZeRO) then average the parameter gradients over
the W processes, which undoes the factor W of the all-reduce, so the update equals the
single-process one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def process_count() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def row_counts(rows: int, device: torch.device) -> list[int]:
    """Every process's number of rows, in rank order (one collective, one host sync)."""
    if not is_distributed():
        return [rows]
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.int64, device=device))
    return torch.cat(counts).tolist()


class _GatherRows(torch.autograd.Function):
    """All-gather of equally shaped tensors along dim 0; backward all-reduces, keeps the local rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(tensor: torch.Tensor, counts: list[int] | None = None) -> tuple[torch.Tensor, slice]:
    """Concatenate ``tensor`` along dim 0 over all processes (rank order).

    Processes may hold different numbers of rows; ``counts`` (from :func:`row_counts`) saves the
    exchange when several tensors with the same rows are gathered. Returns the gathered tensor and
    the slice of this process's rows in it; autograd-aware. Without a process group:
    ``(tensor, all rows)``.
    """
    if not is_distributed():
        return tensor, slice(0, tensor.shape[0])
    if counts is None:
        counts = row_counts(tensor.shape[0], tensor.device)
    most = max(counts)
    padded = torch.nn.functional.pad(tensor, (0,) * (2 * (tensor.dim() - 1)) + (0, most - tensor.shape[0]))
    gathered = _GatherRows.apply(padded)
    rank = dist.get_rank()
    pieces = [gathered[index * most:index * most + count] for index, count in enumerate(counts)]
    offset = sum(counts[:rank])
    return torch.cat(pieces), slice(offset, offset + counts[rank])


def pad_dim(tensor: torch.Tensor, dim: int, size: int, value: float | bool = 0) -> torch.Tensor:
    """Pad ``tensor`` with ``value`` at the end of ``dim`` up to ``size``."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(shape, value)], dim)


def max_over_processes(values: list[int], device: torch.device) -> list[int]:
    """The largest of each of ``values`` over all processes (e.g. padded sizes), in one all-reduce."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def sharded_parameters(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds only shards of its parameters: FSDP2 (``DTensor`` parameters), FSDP1
    (flat parameters) or DeepSpeed ZeRO-3 (partitioned parameters). Every process must then take part
    in each forward pass (generation included)."""
    for parameter in model.parameters():
        if type(parameter).__name__ in ("DTensor", "FlatParameter") or hasattr(parameter, "ds_id"):
            return True
    return False


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate picklable lists over all processes (rank order)."""
    if not is_distributed():
        return list(items)
    parts: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]
