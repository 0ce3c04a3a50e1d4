"""The README's Python examples run as written, in order, sharing one namespace (as a reader
pasting them into one session would)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if any("divkernels.integration" in block for block in BLOCKS):
        pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)  # the examples' output folders
    namespace: dict[str, object] = {}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
