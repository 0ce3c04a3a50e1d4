"""The pass@k study's pieces (integration/study.py) without its training runs; `.ci/run` runs
`python -m divkernels study --quick` end to end."""

from __future__ import annotations

import itertools
import math
import random

import pytest

study = pytest.importorskip("divkernels.integration.study")


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    """``1 - C(n - c, k) / C(n, k)`` equals the share of k-subsets of the n samples holding a correct one."""
    for n, c, k in [(6, 2, 1), (6, 2, 3), (6, 0, 4), (6, 5, 2), (7, 3, 7)]:
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert study.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert study.pass_at_k(64, 1, 1) == pytest.approx(1 / 64)


def test_task_has_answers_from_many_to_few() -> None:
    counts = {target: len(study.solutions(target)) for target in study.TARGETS}
    assert counts[18] == 670 and counts[33] == 20 and max(counts.values()) / min(counts.values()) > 10
    assert all(study.is_correct(study.prompt_for(t), answer) for t in study.TARGETS for answer in study.solutions(t))
    assert not study.is_correct(study.prompt_for(18), "9 9")  # three digits short
    rng = random.Random(0)
    examples = study.sft_examples(2000, rng)
    correct = sum(study.is_correct(prompt, completion) for prompt, completion in examples) / len(examples)
    assert 0.6 < correct < 0.8  # 30% noise, a few random strings are correct by chance


def test_summary_table_and_readme_block() -> None:
    runs = {"SFT": [{"pass@k": [0.2, 0.5], "pass@1": 0.2, "pass@16": 0.5, "pass@2": 0.5, "distinct_correct@16": 1.0,
                     "mean_similarity": 0.6, "vendi": 2.0}] * 2}
    runs["SFT"] = [runs["SFT"][0], {**runs["SFT"][0], "pass@1": 0.4, "pass@k": [0.4, 0.7]}]
    summary = study.summarize(runs)
    assert summary["SFT"]["pass@1"]["mean"] == pytest.approx(0.3)
    assert summary["SFT"]["pass@1"]["std"] == pytest.approx(math.sqrt(0.02))
    assert summary["SFT"]["pass@k"] == pytest.approx([0.3, 0.6])
    text = study.table(summary, samples=2, seeds=2)
    assert "| SFT | 0.300 ± 0.141 |" in text
    from test_mixtures import analysis_of_synthetic_samples

    report = analysis_of_synthetic_samples()
    results = {"settings": {"seeds": 2, "samples": 2}, "minutes": 1.0, "machine": "x", "summary": summary,
               "mixtures": report}
    block = study.readme_block(results)
    assert block.startswith(study.README_BEGIN) and block.endswith(study.README_END)
    assert mixtures_table_in(block, report)


def mixtures_table_in(block: str, report: dict) -> bool:
    from divkernels.integration import mixtures

    return mixtures.table(report) in block


def test_compare_names_every_number_that_moved(tmp_path) -> None:
    """``--compare``: exact equality after the JSON round trip; a moved number is named by its path, and the
    environments are named when they differ."""
    import json

    results = {"settings": {"seeds": 1}, "targets": [6], "summary": {"SFT": {"pass@1": {"mean": 0.1, "std": 0.0}}},
               "mixtures": {"ks": [4]}, "environment": {"torch": "a"}, "runs": {"SFT": []}}
    path = tmp_path / "committed.json"
    path.write_text(json.dumps(study.committed(results)))
    assert study.compare(results, path) == []
    moved = json.loads(json.dumps(results))
    moved["summary"]["SFT"]["pass@1"]["mean"] = 0.1 + 1e-15
    moved["environment"]["torch"] = "b"
    found = study.compare(moved, path)
    assert found[0].startswith("environment:") and found[1].startswith("summary/SFT/pass@1/mean:")
