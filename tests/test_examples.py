"""Every script in examples/ runs as its docstring prints it, at its smallest (2 steps), on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def run(command: list[str], cwd: Path) -> str:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result.stdout


def test_every_example_is_tested() -> None:
    assert {path.name for path in EXAMPLES.glob("*.py")} - {"tiny.py"} == {
        "ddpo.py", "lora.py", "grpo_darling.py", "fsdp2.py"}


@pytest.mark.parametrize(("script", "flags"), [("ddpo.py", []), ("lora.py", []), ("grpo_darling.py", []),
                                             ("grpo_darling.py", ["--judge", "tiny"])])
def test_example_runs(script: str, flags: list[str], tmp_path: Path) -> None:
    pytest.importorskip("trl")
    if script == "lora.py":
        pytest.importorskip("peft")
    out = run([sys.executable, str(EXAMPLES / script), "--output_dir", "out", "--max_steps", "2", *flags], tmp_path)
    assert "step 2" in out or "trained" in out, out
    if flags:  # the learned judge ran on every pair of every group (4 completions: 6 pairs)
        assert "judge calls per group 6.0" in out, out
    assert {path.name for path in tmp_path.iterdir()} == {"out"}  # nothing beside its output folder


def test_fsdp2_example_runs_on_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(EXAMPLES / "fsdp2.py"), "--output_dir", "out", "--max_steps", "2"], tmp_path)
    assert "step 2: loss" in out and "over 2 processes" in out, out
