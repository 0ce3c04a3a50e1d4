"""``python -m divkernels``: ``info`` (versions, device, which backends can run and why not),
``demo`` (diversity-aware preference training of a tiny LM on CPU; ``demo --help``) and ``study``
(the pass@k study; ``study --help``)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

DESCRIPTION = ("divkernels: fused diversity-aware post-training ops. Commands: info (versions, device, which "
               "backends can run here and why not), demo (diversity-aware preference training of a tiny LM on "
               "CPU; see demo --help), study (pass@k of seven training methods over seeds on CPU; see "
               "study --help).")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> str:
    """The report that ``python -m divkernels info`` prints."""
    from divkernels import __version__, _cuda
    from divkernels.backend import backend_report

    lines = [
        f"divkernels {__version__}",
        f"python     {platform.python_version()} ({sys.platform}, {platform.machine()})",
        f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton     {_version('triton')}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
        lines.append(f"device     {torch.cuda.get_device_name()} (capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("device     no CUDA device; CPU only")
    for device in devices:
        lines.append(f"backends on {device.type}:")
        for name, reason in backend_report(device).items():
            status = "available" if reason is None else "unavailable: " + reason
            if name == "cuda":
                status = _cuda.describe(device)
            lines.append(f"  {name:<10} {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from divkernels.integration.demo import main as demo

        return demo(argv[1:])
    if argv and argv[0] == "study":
        from divkernels.integration.study import main as study

        return study(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m divkernels", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device and available backends")
    commands.add_parser("demo", help="diversity-aware preference training of a tiny LM (see demo --help)")
    commands.add_parser("study", help="pass@k study of seven methods over seeds, on CPU (see study --help)")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
