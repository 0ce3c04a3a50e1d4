"""Build of divkernels. Pure Python by default; the optional CUDA extension ``divkernels._C``.

Environment switches (as flash-attention's):
  DIVKERNELS_BUILD_CUDA=0   never build the extension
  DIVKERNELS_BUILD_CUDA=1   build it or fail loudly (needs nvcc and a CUDA build of torch, so
                            install with ``pip install --no-build-isolation .``)
  unset                     build it when nvcc and a CUDA build of torch are importable
  TORCH_CUDA_ARCH_LIST      target architectures, default "8.0;9.0"
Without the prebuilt extension the package JIT-builds it on first use on a GPU (divkernels._cuda).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCH_LIST = "8.0;9.0"


def _cuda_extensions() -> tuple[list, dict]:
    mode = os.environ.get("DIVKERNELS_BUILD_CUDA", "auto")
    if mode == "0":
        return [], {}
    forced = mode == "1"

    def skip(reason: str) -> tuple[list, dict]:
        if forced:
            raise SystemExit(f"DIVKERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        return [], {}

    sources = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").glob("*.cu"))
    sources += sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return skip("csrc/ holds no sources")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable at build time (use pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return skip("torch is a CPU-only build")
    if CUDA_HOME is None:
        return skip("nvcc / CUDA_HOME not found")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    extension = CUDAExtension("divkernels._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
