"""Loading the CUDA extension ``divkernels._C`` (sources in ``csrc/``).

On a CUDA device the extension comes from, in order:

1. ``divkernels._C``, prebuilt by ``pip install`` where ``nvcc`` and a CUDA build of torch were
   present (``setup.py``);
2. a JIT build of the shipped sources with ``torch.utils.cpp_extension.load`` (ninja), cached in
   ``$DIVKERNELS_CACHE`` (default ``~/.cache/divkernels``) per torch/CUDA version and source hash;
   ``DIVKERNELS_JIT=0`` disables it.

``python -m divkernels info`` reports which one happened, or why neither did.

Without a GPU, ``DIVKERNELS_CUDA_HOST_EMULATION=1`` makes ``backend="cuda"`` run on CPU tensors
through a host build of the same kernel math (``csrc/cpu/group_math_cpu.cpp``, which compiles
``csrc/group_math.h`` for the CPU): that is how the tests check the CUDA math here, as
``TRITON_INTERPRET=1`` does for Triton.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import torch

ENV_HOST_EMULATION = "DIVKERNELS_CUDA_HOST_EMULATION"
ENV_JIT = "DIVKERNELS_JIT"
ENV_CACHE = "DIVKERNELS_CACHE"
DEFAULT_ARCH_LIST = "8.0;9.0"


def source_dir() -> Path | None:
    """``csrc/``: next to the package in a clone / editable install, inside it in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "group_math.h").is_file():
            return candidate
    return None


def host_emulation_enabled() -> bool:
    return os.environ.get(ENV_HOST_EMULATION, "0") not in ("", "0")


def _sources(kind: str) -> list[Path]:
    root = source_dir()
    if root is None:
        raise FileNotFoundError("the csrc/ sources are not shipped with this installation")
    if kind == "cuda":
        return sorted(root.glob("*.cu")) + sorted(root.glob("*.cpp"))
    return [root / "cpu" / "group_math_cpu.cpp"]


def _build_directory(name: str, sources: list[Path]) -> Path:
    digest = hashlib.sha256()
    root = source_dir()
    for path in sorted([*sources, *root.glob("*.h")]):
        digest.update(path.read_bytes())
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda or 'none'}-{digest.hexdigest()[:12]}"
    base = Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "divkernels"))
    directory = base / name / tag.replace("+", "_")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _jit_build(name: str, kind: str) -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = _sources(kind)
    options: dict = {"extra_cflags": ["-O3"]}
    if kind == "cuda":
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _device_arch_list())
        options["extra_cuda_cflags"] = ["-O3"]
    directory = _build_directory(name, sources)
    return load(name=name, sources=[str(path) for path in sources], build_directory=str(directory), verbose=False,
                **options)


def _device_arch_list() -> str:
    """The visible devices' compute capabilities (a JIT build only needs this machine's)."""
    if not torch.cuda.is_available():
        return DEFAULT_ARCH_LIST
    capabilities = sorted({torch.cuda.get_device_capability(index) for index in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in capabilities)


@functools.cache
def _load(kind: str) -> tuple[ModuleType | None, str]:
    """``(module, how)`` where ``how`` says where it came from, or ``(None, why not)``."""
    if kind == "host":
        try:
            return _jit_build("divkernels_host", "host"), "host build of csrc/group_math.h (JIT)"
        except Exception as error:  # a missing compiler or ninja: report, do not crash the import
            return None, f"building the host emulation failed: {error}"
    if importlib.util.find_spec("divkernels._C") is not None:
        try:
            return importlib.import_module("divkernels._C"), "prebuilt divkernels._C"
        except ImportError as error:
            prebuilt_error = f"the prebuilt divkernels._C does not load ({error}); "
    else:
        prebuilt_error = "not prebuilt at install; "
    if torch.version.cuda is None:
        return None, prebuilt_error + "this torch is a CPU-only build"
    if os.environ.get(ENV_JIT, "1") in ("", "0"):
        return None, prebuilt_error + f"JIT build disabled ({ENV_JIT}=0)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None, prebuilt_error + "no nvcc / CUDA_HOME for a JIT build"
    if source_dir() is None:
        return None, prebuilt_error + "the csrc/ sources are not shipped with this installation"
    try:
        return _jit_build("divkernels_C", "cuda"), "JIT-built from csrc/ (torch.utils.cpp_extension.load)"
    except Exception as error:
        return None, prebuilt_error + _jit_failure(error, CUDA_HOME)


def _jit_failure(error: Exception, cuda_home: str) -> str:
    """A JIT build error in a few lines: the compiler's last words and the toolkit torch used."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    tail = "\n    ".join(lines[-6:])
    hint = (f" (torch used CUDA_HOME={cuda_home}; if libcudart is not found there, set CUDA_HOME to the "
            f"CUDA toolkit's root)") if "cudart" in str(error) else ""
    return f"the JIT build failed{hint}:\n    {tail}"


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``backend="cuda"`` cannot run on ``device`` (None when it can). May build the extension."""
    if device.type == "cpu" and host_emulation_enabled():
        module, how = _load("host")
        return None if module is not None else how
    if device.type != "cuda":
        hint = f" (or set {ENV_HOST_EMULATION}=1 to run its math on CPU, for tests)" if device.type == "cpu" else ""
        return f"the CUDA extension needs a CUDA device, got {device.type}{hint}"
    module, how = _load("cuda")
    return None if module is not None else how


def describe(device: torch.device) -> str:
    """One line for ``python -m divkernels info``."""
    kind = "host" if device.type == "cpu" and host_emulation_enabled() else "cuda"
    if kind == "cuda" and device.type != "cuda":
        return "unavailable: " + unavailable_reason(device)
    module, how = _load(kind)
    return f"available ({how})" if module is not None else f"unavailable: {how}"


def extension(device: torch.device) -> ModuleType:
    """The module with ``group_loss_forward`` and ``similarity_backward`` for tensors on ``device``."""
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"the CUDA extension is unavailable: {reason}")
    return _load("host" if device.type == "cpu" else "cuda")[0]
