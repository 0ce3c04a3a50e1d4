"""The mutation table's own check (``tests/mutation.py --check``, which CI runs): it must reject a mutant
whose text does not occur exactly once or whose mutated Python does not parse."""

from __future__ import annotations

from pathlib import Path

import mutation


def test_anchor_check_rejects_missing_repeated_and_unparseable_mutants(tmp_path: Path) -> None:
    (tmp_path / "code.py").write_text("x = 1\ny = x + 1\nz = x + 1\n")
    mutants = [mutation.Mutant("fine", "code.py", "y = x + 1", "y = x - 1", ("tests",)),
               mutation.Mutant("missing", "code.py", "w = 2", "w = 3", ("tests",)),
               mutation.Mutant("repeated", "code.py", "x + 1", "x - 1", ("tests",)),
               mutation.Mutant("unparseable", "code.py", "y = x + 1", "y = (x + 1", ("tests",))]
    problems = mutation.anchor_problems(mutants, tmp_path)
    assert len(problems) == 3
    assert ["missing" in problems[0], "repeated" in problems[1], "does not parse" in problems[2]] == [True] * 3


def test_every_mutant_of_the_table_applies_once() -> None:
    assert mutation.anchor_problems(mutation.MUTANTS, mutation.ROOT) == []
