"""``python -m divkernels.benchmarks.resources``: what every kernel costs the chip, compiled here without a GPU.

For each kernel variant (every op's Triton kernels, forward and backward, at G = 2 ... 128 in bf16,
fp16, fp32 and fp64; the CUDA extension's kernels in the same dtypes) this compiles the sm_90 (and
sm_80) cubin and reads from it registers, spill stack, shared memory and the SASS instruction count,
then works out how many blocks fit one SM. It writes ``benchmarks/results/sm90_kernel_resources.csv``
(one row per variant and arch; columns ``COLUMNS``), the tool versions next to it (``.json``), and
prints the rows that spill.

How the Triton variants are found and compiled like a GPU launch:

1. the ops run under the Triton interpreter (``TRITON_INTERPRET=1``; this module re-runs itself with it)
   on small groups of each G and dtype with D = 64 (a multiple of 16, contiguous rows), and each
   kernel launch is recorded: its arguments (tensors as dtype and 16-byte alignment), constexprs and
   ``num_warps``;
2. a worker process without the interpreter (``resources_worker.py``) rebuilds each launch's
   specialization with Triton's own argument binder for the CUDA target, exactly as a launch on a GPU
   would: ints equal to 1 become constants, ints and pointers divisible by 16 are marked so;
3. ``triton.compile`` builds the cubin with the ptxas that Triton ships; ``cuobjdump`` reads the
   resources and the SASS.

The CUDA kernels are compiled with ``nvcc -cubin`` (torch's headers, as ``.ci/nvcc_check`` does); their
registers do not depend on G, their shared memory (the G x G workspace) and block size do.

``spill_bytes``: for CUDA the spill stores ptxas reports (its stack frame also holds local objects);
for Triton the cubin's stack frame, which holds nothing but spills (Triton keeps no local arrays).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORKER = ROOT / "resources_worker.py"
# The committed table is benchmarks/results/sm90_kernel_resources.csv (pass that as --out); by default a
# run writes into the working directory.
DEFAULT_OUT = Path("benchmark_results") / "sm90_kernel_resources.csv"
COLUMNS = ("backend", "kernel", "pass", "G", "dtype", "num_warps", "registers", "spill_bytes", "shared_bytes",
           "ctas_per_sm", "sass_instructions", "arch")
GROUPS = (2, 4, 8, 16, 32, 64, 128)
DTYPES = ("bfloat16", "float16", "float32", "float64")
DIM = 64  # a multiple of 16 with contiguous rows: the specialization real embeddings get
ENV_INTERPRET = "TRITON_INTERPRET"
# The loss configurations in the table: the default DDPO weighting, and the heaviest kernel (logdet
# gains with DivPO pairs: the G x G inverse and the pools live together).
LOSS_VARIANTS = {"loss[deviation/all]": ("dpo", "deviation", "all"),
                 "loss[logdet_gain/divpo]": ("dpo", "logdet_gain", "divpo"),
                 "loss[listwise/deviation/all]": ("dpo_listwise", "deviation", "all")}
# Appended to the kernel name of a launch with FIXUP=True: the second launch of a kernel that sweeps K,
# which redoes in float64 only the groups whose float32 sweep failed and returns at once for the others.
FIXUP_SUFFIX = "[fp64 fix-up]"
BACKWARD_KERNELS = {"_group_loss_backward_kernel", "_similarity_backward_kernel", "similarity_backward_kernel"}
# Per-SM limits (CUDA programming guide, compute capabilities 8.0 and 9.0).
SM_LIMITS = {80: dict(registers=65536, shared=167936, threads=2048, blocks=32),
             90: dict(registers=65536, shared=233472, threads=2048, blocks=32)}
RESERVED_SHARED = 1024  # per block, by the driver


def ctas_per_sm(arch: int, registers: int, threads: int, shared: int) -> int:
    """Blocks of ``threads`` that fit one SM at once: registers (allocated per warp in units of 256),
    threads, shared memory (+1 KiB the driver reserves per block) and the block limit."""
    limits = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = (limits["registers"] // per_warp) // warps
    by_shared = limits["shared"] // (shared + RESERVED_SHARED)
    return min(by_registers, limits["threads"] // threads, by_shared, limits["blocks"])


# -- 1. recording the Triton launches (under the interpreter)

def _encode(value: object) -> object:
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if type(value).__name__ == "dtype" and type(value).__module__.startswith("triton"):
        return {"tl_dtype": value.name}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a constexpr namedtuple (the fused loss's MODE)
        return {"namedtuple": f"{type(value).__module__}:{type(value).__name__}", "values": list(value)}
    return value


def _specialization_class(value: object) -> object:
    """What Triton specializes an argument on: ints by (== 1, % 16 == 0), floats not at all (the kernels
    declare them ``tl.float64``), everything else by value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ["int", value == 1, value % 16 == 0]
    if isinstance(value, float):
        return "float"
    return value


class LaunchRecorder:
    """Records the distinct Triton launches made inside ``with recorder.label(...)`` blocks.

    ``launches``: one entry per distinct specialization (what compiles to a different cubin);
    ``rows``: ``(label, launch index)`` for every labelled launch, a variant of the table.
    """

    def __init__(self) -> None:
        self.launches: list[dict] = []
        self.rows: list[tuple[dict, int]] = []
        self._keys: dict[str, int] = {}
        self._seen: set[str] = set()
        self._label: dict | None = None

    @contextlib.contextmanager
    def label(self, **label: object) -> Iterator[None]:
        self._label = label
        try:
            yield
        finally:
            self._label = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[LaunchRecorder]:
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            recorder.add(self.fn, args, kwargs, self.kwargs.get("do_not_specialize") or ())
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        try:
            yield self
        finally:
            InterpretedFunction.run = original

    def add(self, fn: Callable, args: tuple, kwargs: dict, unspecialized: Iterable[str | int] = ()) -> None:
        launch = {"module": fn.__module__, "name": fn.__name__, "args": [_encode(a) for a in args],
                  "kwargs": {key: _encode(value) for key, value in kwargs.items()}}
        # runtime ints by what Triton specializes on; constexprs and launch options by value
        params = inspect.signature(fn).parameters
        names = list(params)
        constant = {name for name, param in params.items() if "constexpr" in str(param.annotation)}
        # do_not_specialize (names or positions): one class for every value, as Triton's binder has it
        loose = {names[item] if isinstance(item, int) else item for item in unspecialized}

        def key_of(name: str, value: object) -> object:
            if name in constant:
                return value
            return "any" if name in loose else _specialization_class(value)

        args_key = [key_of(names[i], value) for i, value in enumerate(launch["args"])]
        kwargs_key = {k: key_of(k, v) if k in names else v for k, v in launch["kwargs"].items()}
        key = json.dumps([launch["name"], args_key, kwargs_key], sort_keys=True)
        index = self._keys.get(key)
        if index is None:
            index = self._keys[key] = len(self.launches)
            self.launches.append(launch)
        if self._label is not None:
            row_key = json.dumps([self._label, launch["name"], index], sort_keys=True)
            if row_key not in self._seen:
                self._seen.add(row_key)
                self.rows.append((dict(self._label), index))


def run_variant(op: str, group: int, dtype_name: str) -> None:
    """One op at one (G, dtype), forward and backward, on 2 groups of D = ``DIM`` (Triton backend)."""
    import torch

    import divkernels as dk

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(group)
    emb = torch.randn(2, group, DIM, generator=generator).to(dtype).requires_grad_(True)
    mask = torch.ones(2, group, dtype=torch.bool)
    mask[1, group - 1] = group < 3  # ragged: keep at least 2 responses
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rewards = torch.randn(2, group, generator=generator, dtype=acc)
    if op == "similarity":
        dk.pairwise_similarity(emb, mask, backend="triton").sum().backward()
    elif op == "logdet":
        logdet, gains = dk.logdet_diversity(emb, mask, return_gains=True, backend="triton")
        (logdet.sum() + gains.sum()).backward()
    elif op == "deviation":
        dk.deviation(emb, mask, backend="triton").sum().backward()
    elif op == "partition":
        dk.partition_diversity(emb, mask, tau=0.1, backend="triton")
    elif op == "partition[judge]":  # a judge's links: no emb, the same variant in every dtype
        links = torch.rand(2, group, group, generator=generator) < 0.3
        dk.partition_diversity(equivalence=links, mask=mask, backend="triton")
    elif op == "advantages":
        dk.group_advantages(rewards, emb.detach(), mask, diversity="dqo", backend="triton")
    elif op == "advantages[passk]":  # Pass@k Training's estimator, no emb: the same variant in every dtype
        dk.group_advantages(rewards, None, mask, estimator="passk_analytic", k=2, backend="triton")
    else:
        loss, diversity, pairs = LOSS_VARIANTS[op]
        policy = (-torch.rand(2, group, generator=generator, dtype=acc)).requires_grad_(True)
        out = dk.group_preference_loss(policy, rewards, emb, policy.detach() - 0.1, mask, loss=loss,
                                       diversity=diversity, pairs=pairs, diversity_alpha=0.1, backend="triton",
                                       check_inputs=False)
        out.loss.backward()


OPS = ("similarity", "logdet", "deviation", "partition", "partition[judge]", "advantages", "advantages[passk]",
       *LOSS_VARIANTS)


def record_variants(groups: tuple[int, ...], dtypes: tuple[str, ...], ops: tuple[str, ...] = OPS) -> dict:
    """Under the interpreter: ``{"launches": [...], "rows": [[label, launch index], ...]}``."""
    recorder = LaunchRecorder()
    with recorder.recording():
        for op, group, dtype in itertools.product(ops, groups, dtypes):
            with recorder.label(op=op, G=group, dtype=dtype):
                run_variant(op, group, dtype)
    return {"launches": recorder.launches, "rows": recorder.rows}


# -- 2./3. compiling them (worker processes without the interpreter)

def compile_triton(launches: list[dict], archs: tuple[int, ...], folder: Path,
                   extra_triton: str | None = None, processes: int | None = None) -> list[dict]:
    """Compile each launch for each arch in parallel workers; one report per (launch, arch)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != ENV_INTERPRET}
    env["TRITON_CACHE_DIR"] = str(folder / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the default it keeps
    if extra_triton:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_triton, env.get("PYTHONPATH")]))
    else:  # the worker must import this checkout's divkernels, installed or not
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT.parent), env.get("PYTHONPATH")]))
    jobs = [dict(launch, index=index, archs=list(launch.get("archs", archs))) for index, launch in enumerate(launches)]
    # One file per launch, the largest kernels first; each worker claims the next unclaimed one when it is
    # done with its last (resources_worker.py), so a run of slow launches does not keep one worker busy
    # while the others idle (a fixed round-robin split left one of two workers alone for minutes).
    jobs.sort(key=lambda job: -job["kwargs"].get("BLOCK_G", 0))
    queue = folder / "jobs"
    queue.mkdir(exist_ok=True)
    for rank, job in enumerate(jobs):
        (queue / f"{rank:06d}.json").write_text(json.dumps(job))
    count = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(queue)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for _ in range(count)]
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=3000)
        if worker.returncode != 0:
            raise RuntimeError(f"resources worker failed:\n{err[-4000:]}")
        reports += [json.loads(line) for line in out.splitlines()]
    return reports


def triton_rows(recorded: dict, reports: list[dict]) -> list[dict]:
    """Table rows of the recorded variants from the compile reports."""
    by_launch = {(r["launch"], r["arch"]): r for r in reports}
    rows = []
    for label, index in recorded["rows"]:
        launch = recorded["launches"][index]
        for arch in sorted({arch for (number, arch) in by_launch if number == index}):
            report = by_launch[index, arch]
            if "error" in report:
                raise RuntimeError(f"{launch['name']} ({label}, sm_{arch}) does not compile: {report['error']}")
            threads = 32 * report["num_warps"]
            fixup = launch["kwargs"].get("FIXUP", False)  # the second launch: float64 sweep of flagged groups only
            rows.append(dict(
                backend="triton", kernel=f"{label['op']}:{launch['name']}{FIXUP_SUFFIX if fixup else ''}",
                **{"pass": "backward" if launch["name"] in BACKWARD_KERNELS else "forward"},
                G=label["G"], dtype=label["dtype"], num_warps=report["num_warps"], registers=report["registers"],
                spill_bytes=report["stack"], shared_bytes=report["shared_bytes"],
                ctas_per_sm=ctas_per_sm(arch, report["registers"], threads, report["shared_bytes"]),
                sass_instructions=report["sass_instructions"], arch=arch))
    return rows


# -- the CUDA extension's kernels

CUDA_SOURCES = {"group_loss_forward_kernel": ("group_loss.cu", "forward"),
                "similarity_backward_kernel": ("similarity_backward.cu", "backward"),
                "partition_kernel": ("partition.cu", "forward"),
                "advantages_kernel": ("advantages.cu", "forward")}
CUDA_PARTITION_THREADS = 128  # partition.cu's and advantages.cu's launchers
CUDA_DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}
CUDA_BACKWARD_THREADS = 256


def _cuda_threads(kernel: str, group: int) -> int:
    """Block size of each CUDA launcher (group_loss.cu: threads_for; similarity_backward.cu: 256)."""
    if kernel == "similarity_backward_kernel":
        return CUDA_BACKWARD_THREADS
    if kernel in ("partition_kernel", "advantages_kernel"):
        return CUDA_PARTITION_THREADS
    return 64 if group <= 32 else 128 if group <= 64 else 256


def _nvcc_flags(arch: int) -> list[str]:
    import sysconfig

    import torch.utils.cpp_extension as cpp

    include = cpp.include_paths()[0]
    shim = ROOT.parent / ".ci" / "cuda_shim"
    return ["-std=c++17", "-O3", "-DTORCH_EXTENSION_NAME=_C", f"-I{include}", f"-I{include}/torch/csrc/api/include",
            f"-I{sysconfig.get_paths()['include']}", "-Xcompiler", f"-idirafter,{shim}", "-cubin",
            f"-arch=sm_{arch}", "-diag-suppress", "3306", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


# Each CUDA kernel's dynamic shared memory, as group_math.h sizes it.
CUDA_WORKSPACE = {"group_loss_forward_kernel": "workspace_elements",
                  "similarity_backward_kernel": "backward_workspace_elements"}


def workspace_bytes(groups: tuple[int, ...], csrc: Path, folder: Path) -> dict[tuple[str, int, int], int]:
    """``{(kernel, G, sizeof T): bytes}`` of each CUDA kernel's dynamic shared workspace, from
    group_math.h's own functions (compiled for the host, so the table never restates the formula)."""
    source = folder / "workspace.cpp"
    prints = "".join(f'std::printf("%lld\\n", (long long)divkernels::{function}(std::atoi(argv[i]))); '
                     for function in CUDA_WORKSPACE.values())
    source.write_text('#include "group_math.h"\n#include <cstdio>\n#include <cstdlib>\n'
                      f"int main(int argc, char** argv) {{ for (int i = 1; i < argc; ++i) {{ {prints}}} }}\n")
    binary = folder / "workspace"
    subprocess.run(["c++", "-std=c++17", f"-I{csrc}", str(source), "-o", str(binary)], check=True)
    out = iter(subprocess.run([str(binary), *map(str, groups)], capture_output=True, text=True, check=True)
               .stdout.split())
    elements = {(kernel, group): int(next(out)) for group in groups for kernel in CUDA_WORKSPACE}
    return {(kernel, group, size): count * size for (kernel, group), count in elements.items() for size in (4, 8)}


def cuda_rows(archs: tuple[int, ...], groups: tuple[int, ...], dtypes: tuple[str, ...], folder: Path) -> list[dict]:
    """Rows of the CUDA extension's kernels (nvcc from PATH; none without it)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("resources: nvcc not on PATH, no CUDA rows", file=sys.stderr)
        return []
    csrc = ROOT.parent / "csrc"
    folder.mkdir(parents=True, exist_ok=True)
    workspace = workspace_bytes(groups, csrc, folder)
    filt = shutil.which("cu++filt") or shutil.which("c++filt")  # either demangles the Itanium names
    if filt is None:
        raise RuntimeError("resources: neither cu++filt nor c++filt is on PATH to demangle the CUDA kernel names")
    rows = []
    for arch, (kernel, (source, pass_)) in itertools.product(archs, CUDA_SOURCES.items()):
        cubin = folder / f"{kernel}-sm{arch}.cubin"
        build = subprocess.run([nvcc, *_nvcc_flags(arch), "-Xptxas", "-v", str(csrc / source), "-o", str(cubin)],
                               check=True, capture_output=True, text=True)
        # ptxas -v: "Function properties for NAME / S bytes stack frame, N bytes spill stores, ..."
        spills = {name: int(stores) for name, stores in re.findall(
            r"Function properties for (\S+)\s+\d+ bytes stack frame, (\d+) bytes spill stores", build.stderr)}
        from divkernels.benchmarks.resources_worker import cubin_functions  # imports triton

        for mangled, usage in cubin_functions(cubin).items():
            name = subprocess.run([filt, mangled], capture_output=True, text=True, check=True).stdout.strip()
            match = re.match(rf"void divkernels::{kernel}<(\w+)(?:, ([\w:]+))?>", name)
            if match is None:
                continue
            acc, emb = match.groups()
            if emb is None:  # partition_kernel<Label>: links in, float32 out; advantages_kernel<T>: T in and out
                acc = emb = acc if kernel == "advantages_kernel" else "float"
            dtype = CUDA_DTYPES[emb]
            if dtype not in dtypes:
                continue
            size = 8 if acc == "double" else 4
            for group in groups:
                threads = _cuda_threads(kernel, group)
                shared = usage["static_shared"] + workspace.get((kernel, group, size), 0)
                rows.append(dict(backend="cuda", kernel=kernel, **{"pass": pass_}, G=group, dtype=dtype,
                                 num_warps=threads // 32, registers=usage["registers"], spill_bytes=spills[mangled],
                                 shared_bytes=shared,
                                 ctas_per_sm=ctas_per_sm(arch, usage["registers"], threads, shared),
                                 sass_instructions=usage["sass_instructions"], arch=arch))
    return rows


def tool_versions() -> dict[str, str]:
    """What compiled the table: Triton (and its ptxas), nvcc, torch."""
    import torch
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    versions = {"triton": triton.__version__, "torch": torch.__version__}
    for name, tool in (("triton_ptxas", str(ptxas)), ("nvcc", shutil.which("nvcc"))):
        if tool:
            out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            versions[name] = out[-1] if out else "unknown"
    return versions


def write_table(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        order = {op: number for number, op in enumerate(OPS)}
        rows = sorted(rows, key=lambda r: (r["arch"] != 90, r["backend"], order.get(r["kernel"].split(":")[0], 99),
                                           r["kernel"], r["pass"], DTYPES.index(r["dtype"]), r["G"]))
        writer.writerows(rows)


def _record_in_subprocess(groups: tuple[int, ...], dtypes: tuple[str, ...], ops: tuple[str, ...],
                          folder: Path) -> dict:
    """Run the recording step in a fresh interpreter with ``TRITON_INTERPRET=1`` (the JIT reads it at import)."""
    path = folder / "recorded.json"
    env = dict(os.environ, **{ENV_INTERPRET: "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT.parent), env.get("PYTHONPATH")]))
    code = ("import json, sys; from divkernels.benchmarks import resources as r; "
            f"json.dump(r.record_variants({groups!r}, {dtypes!r}, {ops!r}), open({str(path)!r}, 'w'))")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"CSV to write (default {DEFAULT_OUT})")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SM_LIMITS))
    parser.add_argument("--groups", type=int, nargs="+", default=list(GROUPS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="Triton ops to record (default: all)")
    parser.add_argument("--no-cuda", action="store_true", help="Triton kernels only")
    parser.add_argument("--triton", default=None, metavar="DIR",
                        help="compile with the Triton installed in DIR (pip install --target DIR triton==X)")
    args = parser.parse_args(argv)
    groups, dtypes, archs = tuple(args.groups), tuple(args.dtypes), tuple(args.arch)
    with tempfile.TemporaryDirectory(prefix="divkernels-resources-") as tmp:
        folder = Path(tmp)
        recorded = _record_in_subprocess(groups, dtypes, tuple(args.ops), folder)
        reports = compile_triton(recorded["launches"], archs, folder / "triton", args.triton)
        rows = triton_rows(recorded, reports)
        if not args.no_cuda:
            rows += cuda_rows(archs, groups, dtypes, folder / "cuda")
    write_table(rows, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python -m divkernels.benchmarks.resources", *(argv or sys.argv[1:])]),
         "dim": DIM, **tool_versions()}, indent=1) + "\n")
    spilling = [r for r in rows if r["spill_bytes"] and r["arch"] == 90]
    print(f"wrote {len(rows)} rows ({len(recorded['launches'])} distinct Triton launches) to {args.out}")
    print(f"sm_90 variants with a spill stack: {len(spilling)}")
    for row in spilling:
        print(f"  {row['backend']} {row['kernel']} {row['pass']} G={row['G']} {row['dtype']}: "
              f"{row['spill_bytes']} bytes, {row['registers']} registers, {row['num_warps']} warps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
