"""Compile recorded Triton launches for real GPUs, without a GPU (run by tests/test_triton_compile.py).

``python tests/triton_compile_worker.py LAUNCHES.json`` reads launches recorded under the Triton
interpreter (kernel, arguments, launch options, and the CUDA archs to build for, e.g. [80, 90]),
rebuilds each kernel's signature and constexprs, and compiles it with ``triton.compile`` for each
arch down to a cubin with the ptxas that Triton ships. It prints one JSON line per (launch, arch):
shared memory, registers and spill stack from ``cuobjdump --dump-resource-usage``, or the
compiler's error. Must run without ``TRITON_INTERPRET`` so the kernels are ``JITFunction`` s.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
POINTER_TYPES = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "bool": "i1",
                 "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8"}


def decode(value: object) -> object:
    """A recorded constexpr value back as Python / Triton (tl.dtype values are stored by name)."""
    if isinstance(value, dict) and "tl_dtype" in value:
        return tl.dtype(value["tl_dtype"])
    return value


def signature_of(kernel: triton.runtime.jit.JITFunction, args: list, kwargs: dict) -> tuple[dict, dict]:
    """``(signature, constexprs)`` of one launch, in the kernel's parameter order."""
    values = dict(zip([param.name for param in kernel.params], args, strict=False))
    values.update({key: value for key, value in kwargs.items() if key not in LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values.get(param.name, param.default)
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = decode(value)
        elif isinstance(value, dict) and "tensor" in value:
            signature[param.name] = "*" + POINTER_TYPES[value["tensor"]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, SHARED and STACK of the kernel in a cubin, from Triton's bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True,
                              check=True).stdout
    names = {"REG": "registers", "SHARED": "static_shared_bytes", "STACK": "stack"}
    return {names[key]: int(number) for key, number in re.findall(r"\b(REG|SHARED|STACK):(\d+)", text)}


def main(path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    launches = json.loads(Path(path).read_text())
    for number, launch in enumerate(launches):
        kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
        signature, constexprs = signature_of(kernel, launch["args"], launch["kwargs"])
        options = {key: launch["kwargs"][key] for key in LAUNCH_OPTIONS if key in launch["kwargs"]}
        for arch in launch["archs"]:
            result = {"launch": number, "kernel": launch["name"], "arch": arch, "triton": triton.__version__,
                      "triton_path": str(Path(triton.__file__).resolve()),
                      **options}
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                          options=options)
                result.update(shared_bytes=compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]))
            except Exception as error:  # reported to the test, which fails with the message
                result["error"] = f"{type(error).__name__}: {error}"[-2000:]
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
