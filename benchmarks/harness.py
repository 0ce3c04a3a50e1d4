"""Timing and memory measurement shared by every benchmark family (no asserts, only numbers).

* time: median of repeated runs after warm-up, with CUDA events on a GPU (``perf_counter`` on
  CPU); every run takes the next of several input sets whose total exceeds the L2 cache, so the
  numbers are DRAM numbers, not cache numbers;
* memory: peak bytes allocated by one run beyond what was allocated before it (inputs excluded);
* floor: bytes that must move (each input read once, each output written once) over the
  device's measured copy bandwidth.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Providers that run divkernels' fused kernels (their speed-ups over eager/compile are reported).
KERNEL_PROVIDERS = ("triton", "cuda")
# Bytes the rotating input sets must exceed (H100/H200 L2 is 50-60 MB).
ROTATION_BYTES = 256 * 2**20
MAX_INPUT_SETS = 8
# Timed runs per row: ``repeats``, fewer for slow steps so one row takes about BUDGET_MS (never
# fewer than MIN_REPEATS): a slow eager case must not eat a device call's 10 minutes.
BUDGET_MS = 400.0
MIN_REPEATS = 5


@dataclass
class Measurement:
    median_ms: float
    peak_extra_mib: float | None


def input_sets(make: Callable[[], object], bytes_per_set: int) -> list[object]:
    """As many independent input sets as it takes to exceed the L2 cache (at most 8)."""
    count = max(1, min(MAX_INPUT_SETS, -(-ROTATION_BYTES // max(bytes_per_set, 1))))
    return [make() for _ in range(count)]


def timed_repeats(step_ms: float, repeats: int, budget_ms: float = BUDGET_MS) -> int:
    """``repeats``, or fewer so that they take about ``budget_ms``, but at least MIN_REPEATS."""
    if step_ms <= 0:
        return repeats
    return max(min(repeats, MIN_REPEATS), min(repeats, int(budget_ms / step_ms)))


def measure(step: Callable[[object], object], sets: list[object], device: torch.device, *, warmup: int = 5,
            repeats: int = 30, budget_ms: float = BUDGET_MS) -> Measurement:
    """Median time of ``step(inputs)`` over rotating input sets, and the peak extra memory of one step.

    The last warm-up step is timed on its own to cut ``repeats`` for slow steps (:func:`timed_repeats`).
    """
    for index in range(max(warmup - 1, 0)):
        step(sets[index % len(sets)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step(sets[(warmup - 1) % len(sets)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    repeats = timed_repeats((time.perf_counter() - start) * 1e3, repeats, budget_ms)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for index in range(repeats):
            starts[index].record()
            step(sets[index % len(sets)])
            ends[index].record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(sets[0])
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return Measurement(statistics.median(times), peak)
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        step(sets[index % len(sets)])
        times.append((time.perf_counter() - start) * 1e3)
    return Measurement(statistics.median(times), None)


def copy_bandwidth(device: torch.device, size_bytes: int = 2**30) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted), GPU only."""
    if device.type != "cuda":
        return None
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    source.random_()
    result = measure(lambda _: target.copy_(source), [None], device, warmup=3, repeats=20)
    return 2 * size_bytes / (result.median_ms / 1e3)


@dataclass
class Case:
    """One benchmark: an op at one shape, dtype and pass, runnable by every provider.

    ``make_inputs(device)`` builds one input set; ``run(provider, inputs)`` executes one step
    (forward, plus backward when ``backward``); ``floor_bytes`` is the minimum traffic of that step.
    """

    family: str
    name: str
    batch: int
    group: int
    dim: int
    dtype: torch.dtype
    backward: bool
    floor_bytes: int
    make_inputs: Callable[[torch.device], dict]
    run: Callable[[Callable, dict], None]
    public_op: Callable
    reference_op: Callable

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.family}/{self.name} B={self.batch} G={self.group} D={self.dim} {dtype} " \
               f"{'fwd+bwd' if self.backward else 'fwd'}"


def embeddings(batch: int, group: int, dim: int, dtype: torch.dtype, device: torch.device,
               requires_grad: bool) -> torch.Tensor:
    """Random response embeddings (never zeros: zeros can time faster than real data)."""
    emb = torch.randn(batch, group, dim, device=device, dtype=torch.float32).to(dtype)
    return emb.requires_grad_(requires_grad)


def clear_grads(inputs: dict) -> None:
    """Drop the gradients of the previous step: a timed step must write its gradients, not add
    them to old ones (an extra read and write of every leaf that would blur the memory floor)."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            value.grad = None


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
