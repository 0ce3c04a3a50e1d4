"""The Python examples of the README and the docs/ pages run as written, each on its own (a fresh
namespace), and leave nothing in the working directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [block for page in PAGES for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if any("divkernels.integration" in block for block in BLOCKS):
        pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)  # anything an example writes lands here, and nothing may
    for index, block in enumerate(BLOCKS):  # each example runs on its own, as a reader pastes it
        exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})
    assert not list(tmp_path.iterdir()), f"the examples wrote {sorted(p.name for p in tmp_path.iterdir())}"


def test_demo_table_is_the_committed_run() -> None:
    """The README's demo table is generated from integration/demo_results.json (``demo --readme``)."""
    import json

    from divkernels.integration import demo

    results = json.loads(demo.RESULTS_FILE.read_text())
    assert demo.readme_block(results) in README.read_text(), "run: python -m divkernels demo --readme README.md"


def test_study_table_is_the_committed_run() -> None:
    """The README's study table is generated from integration/study_results.json (``study --readme``)."""
    import json

    from divkernels.integration import study

    results = json.loads(study.RESULTS_FILE.read_text())
    assert study.readme_block(results) in README.read_text(), "run: python -m divkernels study --readme README.md"
