"""verl custom reward function for tests/test_verl.py (``reward.custom_reward_function.path``): the demo's
verifier, with the prompt text as the ground truth."""

from __future__ import annotations

from typing import Any

from divkernels.integration.demo import is_correct


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Any = None,
                  **kwargs: Any) -> float:
    return 1.0 if is_correct(ground_truth, solution_str) else 0.0


def word_overlap_judge(pairs: list[tuple[str, str]]) -> list[float]:
    """A stand-in pair classifier for the board's judge tests: P(similar) = shared words / all words."""
    return [len(set(a.split()) & set(b.split())) / max(len(set(a.split()) | set(b.split())), 1) for a, b in pairs]
