"""Compile recorded Triton launches for real GPUs, without a GPU (run by ``resources.py``).

``python resources_worker.py JOBS`` takes launches recorded under the Triton interpreter, one JSON file
each in the folder JOBS, claiming each file by renaming it (so that several workers share the folder)
(kernel, arguments, launch options, and the archs to build for), and for each arch rebuilds the
launch's specialization with Triton's own argument binder for the CUDA target (ints equal to 1 become
constexprs, ints and 16-byte aligned pointers get ``tt.divisibility = 16``, as on a GPU), compiles it
with ``triton.compile`` down to a cubin (Triton ships ptxas) and prints one JSON line per (launch,
arch): shared memory, registers, spill stack and SASS instruction count, or the compiler's error.
Must run without ``TRITON_INTERPRET``, so the kernels are ``JITFunction`` s.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature


def decode(value: object) -> object:
    """A recorded argument back as the launch had it: a small CPU tensor of the dtype and alignment
    (the binder reads only ``dtype`` and ``data_ptr()``), a Triton dtype, a namedtuple, or the plain value."""
    if isinstance(value, dict) and "tensor" in value:
        dtype = getattr(torch, value["tensor"])
        storage = torch.empty(16, dtype=dtype)
        return storage if value["aligned"] else storage[1:]
    if isinstance(value, dict) and "tl_dtype" in value:
        return tl.dtype(value["tl_dtype"])
    if isinstance(value, dict) and "namedtuple" in value:
        module, name = value["namedtuple"].split(":")
        return getattr(importlib.import_module(module), name)(*value["values"])
    return value


def cubin_functions(cubin: Path) -> dict[str, dict[str, int]]:
    """``{mangled name: {registers, stack, static_shared, sass_instructions}}`` of every kernel in a
    cubin, from the cuobjdump that Triton ships (also used for the CUDA extension's cubins)."""
    tool = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    functions: dict[str, dict[str, int]] = {}
    for name, body in re.findall(r"Function ([^\s:]+):\s*\n\s*(REG:.*)", usage):
        values = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", body))
        functions[name] = dict(registers=int(values["REG"]), stack=int(values["STACK"]),
                               static_shared=int(values["SHARED"]), sass_instructions=0)
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    current = None
    for line in sass.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = match.group(1)
        elif current in functions and re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line):
            functions[current]["sass_instructions"] += 1
    return functions


def compile_launch(launch: dict, arch: int) -> dict:
    """Compile one recorded launch for ``sm_{arch}`` with a GPU launch's specialization."""
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [decode(value) for value in launch["args"]]
    kwargs = {key: decode(value) for key, value in launch["kwargs"].items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        (usage,) = cubin_functions(Path(handle.name)).values()  # a Triton cubin holds one kernel
    return dict(shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                registers=usage["registers"], stack=usage["stack"], sass_instructions=usage["sass_instructions"])


def claimed_jobs(queue: Path) -> Iterator[dict]:
    """The jobs in ``queue`` (files in name order) that this worker claims: a rename succeeds for one
    worker only, the others see the file gone and move on."""
    for path in sorted(queue.glob("*.json")):
        mine = path.with_suffix(f".{os.getpid()}")
        try:
            path.rename(mine)
        except FileNotFoundError:
            continue
        yield json.loads(mine.read_text())


def main(path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    for job in claimed_jobs(Path(path)):
        for arch in job["archs"]:
            result = {"launch": job["index"], "kernel": job["name"], "arch": arch, "triton": triton.__version__,
                      "triton_path": str(Path(triton.__file__).resolve()), "num_warps": job["kwargs"].get("num_warps")}
            started = time.perf_counter()
            try:
                result.update(compile_launch(job, arch))
                result["seconds"] = round(time.perf_counter() - started, 2)
            except Exception as error:  # reported to the caller, which fails with the message
                causes = [error]  # Triton nests the failing device function's error as __cause__
                while causes[-1].__cause__ is not None and len(causes) < 8:
                    causes.append(causes[-1].__cause__)
                result["error"] = "\n".join(f"{type(e).__name__}: {e}"[-1500:] for e in causes)[-4000:]
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m divkernels.benchmarks.resources_worker",
                                     description="Compile the launches queued in a job folder (written by "
                                     "divkernels.benchmarks.resources) and print one JSON report per launch and arch.")
    parser.add_argument("jobs", help="the job folder")
    main(parser.parse_args().jobs)
