"""Every command-line entry point prints its help and exits 0 (argparse formats help strings with %,
so a stray % in any field's help breaks ``--help`` of the whole command)."""

from __future__ import annotations

import os
import subprocess
import sys

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
]


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
