"""Every command-line entry point prints its help and exits 0 (argparse formats help strings with %,
so a stray % in any field's help breaks ``--help`` of the whole command)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# (module, arguments before --help, extra needed to import it)
ENTRY_POINTS = [
    ("divkernels", [], None),
    ("divkernels", ["info"], None),
    ("divkernels", ["demo"], "transformers"),
    ("divkernels", ["study"], "transformers"),
    ("divkernels.integration.train", [], "transformers"),
    ("divkernels.benchmarks", [], None),
    ("divkernels.benchmarks.resources", [], None),
    ("divkernels.benchmarks.dispatch", [], None),
    ("divkernels.benchmarks.resources_worker", [], None),
    ("divkernels.benchmarks.trainer", [], None),
    ("divkernels.benchmarks.runner", [], None),
]
ROOT = Path(__file__).resolve().parents[1]
# scripts run by path: the examples and the GPU script
SCRIPTS = [[sys.executable, str(path)] for path in sorted((ROOT / "examples").glob("*.py")) if path.name != "tiny.py"]
SCRIPTS.append(["bash", str(ROOT / "benchmarks" / "device_run.sh")])


@pytest.mark.parametrize(("module", "arguments", "extra"), ENTRY_POINTS,
                         ids=[" ".join([module, *arguments]) for module, arguments, _ in ENTRY_POINTS])
def test_help_exits_cleanly(module: str, arguments: list[str], extra: str | None) -> None:
    if extra is not None:
        pytest.importorskip(extra)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", module, *arguments, "--help"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("command", SCRIPTS, ids=[Path(command[-1]).name for command in SCRIPTS])
def test_script_help_exits_cleanly(command: list[str]) -> None:
    pytest.importorskip("transformers")
    if "grpo" in command[-1]:
        pytest.importorskip("trl")
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout, result.stdout[-2000:]


def test_gpu_script_refuses_an_unknown_argument() -> None:
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh"), "--dryrun"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument: --dryrun" in result.stderr
