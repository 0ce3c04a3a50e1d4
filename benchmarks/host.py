"""Host overhead of the fused ops: device launches, host syncs and host microseconds per call.

On a GPU the kernels of a small batch run in microseconds, so a fused step costs what the host
spends issuing it: every aten op that launches a kernel (~5 us of CPU each on an H100 machine),
every host sync, and the Python around them. This suite measures that without a GPU:

* **launches**: a ``TorchDispatchMode`` sees every aten op of one forward + backward (the autograd
  engine's ``ones_like`` for ``loss.backward()`` included) and counts those that launch a kernel
  (views, ``empty`` and metadata ops do not), plus every Triton kernel launch;
* **syncs**: ops that wait for the device (``item``, ``nonzero``, ``tolist`` ...);
* **host us**: the median wall time of one forward + backward on CPU tensors with the Triton
  kernels *stubbed* (the launch returns at once, as an asynchronous GPU launch does), so it is the
  host work alone: validation, dispatch, the PyTorch ops around the kernels, autograd.

Without a GPU the kernels run through the Triton interpreter's launch path (``TRITON_INTERPRET=1``,
set by the runner for this suite) and are stubbed there; on a GPU the same counts come from the
real launches. CPU aten ops cost a few microseconds each, like a CUDA launch's host side, so the
host time here tracks what a GPU host would pay (it is a measurement of this machine, not of a GPU).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import divkernels as dk

aten = torch.ops.aten
# aten ops that launch no device kernel: views and aliases, uninitialized allocation, metadata.
NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.view.default,
    aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.detach.default, aten.alias.default,
    aten.t.default, aten.transpose.int, aten.permute.default, aten.select.int, aten.slice.Tensor,
    aten.as_strided.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.unbind.int,
    aten.split.Tensor, aten.lift_fresh.default, aten.is_same_size.default, aten.sym_size.int, aten.sym_stride.int,
    aten.sym_numel.default, aten.sym_storage_offset.default, aten.diagonal.default, aten.view_as_real.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten.set_.source_Storage_storage_offset,
}
# aten ops that make the host wait for the device.
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default}


class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that launch a kernel, the syncs, and (per name) the ops seen."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.syncs = 0
        self.ops: Counter[str] = Counter()

    def __enter__(self):
        # Tensor.tolist reads a CPU tensor's memory without an aten op; on a GPU it is a copy and a sync
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor: torch.Tensor):
            counter.syncs += 1
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in NO_KERNEL:
            self.launches += 1
            self.ops[str(func._overloadpacket).removeprefix("aten.")] += 1
        if func in SYNCS:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def triton_launches(stub: bool) -> Iterator[list[str]]:
    """Record every Triton launch (kernel names); with ``stub`` the kernel body does not run."""
    names: list[str] = []
    patched = []
    try:
        from triton.runtime.interpreter import InterpretedFunction

        patched.append(InterpretedFunction)
    except ImportError:
        pass
    try:
        from triton.runtime.jit import JITFunction

        patched.append(JITFunction)
    except ImportError:
        pass
    originals = {cls: cls.run for cls in patched}

    def wrap(original: Callable) -> Callable:
        def run(self, *args, **kwargs):
            names.append(getattr(self.fn, "__name__", str(self.fn)) if hasattr(self, "fn") else str(self))
            if stub:
                return None
            with _disable_current_modes():  # the interpreter's own tensor copies are not launches
                return original(self, *args, **kwargs)
        return run

    for cls in patched:
        cls.run = wrap(originals[cls])
    try:
        yield names
    finally:
        for cls, original in originals.items():
            cls.run = original


@dataclass
class HostCase:
    """One op and mode: ``make(device) -> (call, leaves)``; ``call()`` returns the op's outputs: one
    scalar loss (``backward()`` on it, the autograd engine's ``ones_like`` included, as in training)
    or a tuple of tensors that get precomputed upstream gradients (so the harness adds no op)."""

    op: str
    mode: str
    make: Callable[[torch.device], tuple[Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], list[torch.Tensor]]]


def _loss_case(mode: str, options: dict, batch: int = 8, group: int = 16, dim: int = 64,
               emb_grad: bool = False) -> HostCase:
    def make(device: torch.device):
        policy = (-torch.rand(batch, group, device=device) * 10).requires_grad_()
        ref = policy.detach() - torch.rand(batch, group, device=device)
        rewards = torch.randn(batch, group, device=device)
        emb = torch.randn(batch, group, dim, device=device).to(torch.bfloat16).requires_grad_(emb_grad)

        def call() -> torch.Tensor:
            return dk.group_preference_loss(policy, rewards, emb, ref, check_inputs=False, backend="triton",
                                            **options).loss
        return call, [policy, emb]
    return HostCase("group_preference_loss", mode, make)


def _diversity_case(op: str, batch: int = 8, group: int = 16, dim: int = 64) -> HostCase:
    def make(device: torch.device):
        emb = torch.randn(batch, group, dim, device=device).requires_grad_(op not in FORWARD_ONLY)
        rewards = torch.randn(batch, group, device=device)

        def call() -> tuple[torch.Tensor, ...]:
            if op == "pairwise_similarity":
                return (dk.pairwise_similarity(emb, backend="triton", check_inputs=False),)
            if op == "deviation":
                return (dk.deviation(emb, backend="triton", check_inputs=False),)
            if op == "logdet_diversity":
                return dk.logdet_diversity(emb, return_gains=True, backend="triton", check_inputs=False)
            if op == "partition_diversity":
                return (dk.partition_diversity(emb, backend="triton", check_inputs=False),)
            return (dk.group_advantages(rewards, emb.detach(), diversity="dqo", backend="triton",
                                        check_inputs=False),)
        return call, [emb]
    return HostCase(op, "fwd" if op in FORWARD_ONLY else "fwd+bwd", make)


FORWARD_ONLY = ("partition_diversity", "group_advantages")
CASES = [
    _loss_case("ddpo+logdet (bf16 emb grad)", {"loss": "dpo", "diversity": "deviation", "diversity_alpha": 0.1},
               emb_grad=True),
    _loss_case("dpo", {"loss": "dpo", "diversity": "none"}),
    _loss_case("ddpo", {"loss": "dpo", "diversity": "deviation"}),
    _loss_case("dorpo", {"loss": "orpo", "diversity": "deviation"}),
    _loss_case("ipo+logdet_gain", {"loss": "ipo", "diversity": "logdet_gain"}),
    _loss_case("simpo+divpo", {"loss": "simpo", "pairs": "divpo"}),
    _diversity_case("pairwise_similarity"),
    _diversity_case("deviation"),
    _diversity_case("logdet_diversity"),
    _diversity_case("partition_diversity"),
    _diversity_case("group_advantages"),
]


class _Step:
    """One forward + backward of a case; upstream gradients of non-scalar outputs are made once."""

    def __init__(self, call: Callable, leaves: list[torch.Tensor]) -> None:
        self.call, self.leaves, self.grads = call, leaves, None

    def forward(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        for leaf in self.leaves:
            leaf.grad = None
        return self.call()

    def backward(self, out: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        if isinstance(out, torch.Tensor):
            if out.requires_grad:
                out.backward()
            return
        outputs = [o for o in out if o.requires_grad]
        if not outputs:
            return
        if self.grads is None:
            with torch.no_grad():
                self.grads = [torch.rand(o.shape, dtype=o.dtype, device=o.device) for o in outputs]
        torch.autograd.backward(outputs, self.grads)

    def __call__(self) -> None:
        self.backward(self.forward())


def measure_case(case: HostCase, device: torch.device, repeats: int = 50, stub: bool = True) -> dict[str, object]:
    """Launches (forward, backward), syncs and median host microseconds of one forward + backward of ``case``."""
    step = _Step(*case.make(device))
    # stubbed kernels leave their outputs uninitialized: denormal garbage would make the CPU ops after
    # them slow for a reason a GPU would not have
    flush = torch.set_flush_denormal(True)
    with triton_launches(stub) as names, contextlib.ExitStack() as stack:
        stack.callback(lambda: torch.set_flush_denormal(False) if flush else None)
        step()  # warm-up: first-call caches (backend choice, imports, launch constants)
        step()
        names.clear()
        forward, backward = LaunchCounter(), LaunchCounter()
        with forward:
            out = step.forward()
        triton_forward = len(names)
        with backward:
            step.backward(out)
        triton = list(names)
        del out
        times = []
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside one timed step would be noise, not host work of the op
        try:
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e6)
        finally:
            if gc_was_enabled:
                gc.enable()
    fwd = forward.launches + triton_forward
    bwd = backward.launches + len(triton) - triton_forward
    return {"op": case.op, "mode": case.mode, "aten_launches": forward.launches + backward.launches,
            "triton_launches": len(triton), "launches": fwd + bwd, "forward_launches": fwd,
            "backward_launches": bwd, "syncs": forward.syncs + backward.syncs,
            "host_us": statistics.median(times), "kernels": ",".join(triton),
            "aten_ops": ",".join(f"{name}x{count}" for name, count in sorted((forward.ops + backward.ops).items()))}


def run(device: torch.device, repeats: int = 200) -> list[dict[str, object]]:
    """Every host case; the kernels are stubbed (host work only) unless ``device`` is a GPU."""
    return [measure_case(case, device, repeats, stub=device.type != "cuda") for case in CASES]
