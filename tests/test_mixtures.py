"""The mixture analysis of the study (integration/mixtures.py): the mixture's unbiased best-of-k against an
enumeration of every draw, the disparities on known answers, the rank correlations, and the whole analysis
on synthetic samples (no training)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

mixtures = pytest.importorskip("divkernels.integration.mixtures")


def test_split_gives_every_draw_to_a_member() -> None:
    assert mixtures.split(8, 3) == [3, 3, 2] and mixtures.split(4, 4) == [1, 1, 1, 1] and mixtures.split(5, 1) == [5]


@pytest.mark.parametrize(("counts", "k"), [([2, 0], 2), ([1, 3], 3), ([0, 0, 1], 3), ([4, 1, 0], 5), ([6], 4)])
def test_mixture_pass_at_k_is_the_share_of_draws_with_a_correct_answer(counts: list[int], k: int) -> None:
    """Every way of drawing ``k_i`` of each member's ``n = 6`` samples without replacement, enumerated."""
    n = 6
    draws = mixtures.split(k, len(counts))
    outcomes = [[True] * c + [False] * (n - c) for c in counts]
    per_member = [list(itertools.combinations(member, d)) for member, d in zip(outcomes, draws, strict=True)]
    hits = [any(any(part) for part in choice) for choice in itertools.product(*per_member)]
    want = sum(hits) / len(hits)
    got = mixtures.mixture_pass_at_k([[c] for c in counts], n, k)[0]
    assert got == pytest.approx(want, abs=1e-12)


def test_disparities_on_known_answers() -> None:
    assert mixtures.jensen_shannon(["a", "b"], ["a", "b"]) == 0.0
    assert mixtures.jensen_shannon(["a", "a"], ["b", "b"]) == pytest.approx(1.0)
    unit = torch.eye(2, dtype=torch.float64)
    first = {"answers": [["1 2", "3 4"]], "correct": [{"1 2"}], "emb": [unit]}
    second = {"answers": [["1 2", "1 2"]], "correct": [{"1 2", "5 6"}], "emb": [unit[:1].expand(2, 2)]}
    disparity = mixtures.pair_disparity(first, second)
    assert disparity["answer_overlap"] == pytest.approx(0.5)  # 1 - |{1 2}| / |{1 2, 5 6}|
    assert disparity["similarity"] == pytest.approx(0.5)  # mean cosine of e1 and e2 against e1: 1/2
    assert disparity["jensen_shannon"] == pytest.approx(0.5 * (0.5 * math.log2(0.5 / 0.75)) + 0.5 * (
        0.5 * math.log2(0.5 / 0.25)) + 0.5 * (1.0 * math.log2(1.0 / 0.75)))


def test_rank_correlations_of_monotone_and_reversed_points() -> None:
    rng = random.Random(0)
    x = [float(i) for i in range(20)]
    up = mixtures.rank_correlations(x, [v**3 for v in x], rng)
    down = mixtures.rank_correlations(x, [-v for v in x], rng)
    assert up["spearman"]["value"] == pytest.approx(1.0) and up["kendall"]["value"] == pytest.approx(1.0)
    assert down["spearman"]["value"] == pytest.approx(-1.0) and down["kendall"]["interval"][1] == pytest.approx(-1.0)


def synthetic_samples(seeds: int, n: int, generator: random.Random) -> dict[str, list[list[list[str]]]]:
    """SFT and three models over two prompts: "A" knows answers a and b, "B" knows c, "C" gets everything wrong."""
    knows = {"SFT": ["a", "c"], "A": ["a", "b"], "B": ["c"], "C": []}
    samples = {}
    for name, answers in knows.items():
        per_seed = []
        for _ in range(seeds):
            prompts = []
            for _prompt in range(2):
                prompts.append([generator.choice(answers) if answers and generator.random() < 0.3 else "x"
                                for _ in range(n)])
            per_seed.append(prompts)
        samples[name] = per_seed
    return samples


def analysis_of_synthetic_samples(n: int = 16) -> dict:
    """:func:`mixtures.analyze` of two seeds of :func:`synthetic_samples` (tests/test_study.py reads it too)."""
    samples = synthetic_samples(2, n, random.Random(1))

    def verifier(_prompt: str, answer: str) -> bool:
        return answer in {"a", "b", "c"}

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.stack([torch.tensor([1.0, float(ord(text[0]) % 7), 0.5]) for text in texts])

    runs = {name: [{"pass@1": 0.1 * i, "pass@16": 0.2 + 0.1 * i, "distinct_correct@16": float(i), "vendi": 1.0 + i,
                    "mean_similarity": 0.9 - 0.1 * i} for i in range(2)] for name in samples}
    return mixtures.analyze(samples, runs, ["p1", "p2"], verifier, embed, n)


def test_analysis_on_synthetic_samples() -> None:
    """Two seeds of synthetic answers: the report's shape, a mixture of the two complementary models as the
    best pair, every value in range."""
    report = analysis_of_synthetic_samples()
    assert report["ks"] == [4, 8, 16]  # k <= n
    for k in report["ks"]:
        best = report["best"][str(k)]
        assert sorted(best["mixture"]) in (["A", "B"], ["A", "B", "C"])  # C adds no correct answer
        assert 0.0 <= best["pass"]["mean"] <= 1.0
        low, high = best["gain_interval"]  # a bootstrap of the per-prompt gains, whose mean is the gain
        assert low - 1e-12 <= best["gain_over_best_member"]["mean"] <= high + 1e-12
        share = report["beats_best_member"][str(k)]["share"]["mean"]
        assert 0.0 <= share <= 1.0
    correlation = report["disparity_vs_gain"]["answer_overlap"]["16"]
    assert correlation["n"] == 2 * 4  # every subset of 2 or 3 of the three models, per seed
    assert mixtures.table(report).count("\n") > 5
