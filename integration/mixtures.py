"""Best-of-k from mixtures of the study's models, and what predicts the gain (``python -m divkernels study``).

From the samples the study already drew (``n`` per prompt and model; no new sampling), per seed:

* **Mixtures.** For every subset of the trained models of size ``m <= 4``, a mixture draws ``k_i`` of
  its ``k`` samples from model ``i`` (``k / m`` each; when ``m`` does not divide ``k`` the first
  ``k mod m`` members draw one more). Its pass@k per prompt is the unbiased
  ``1 - prod_i C(n - c_i, k_i) / C(n, k_i)`` (``c_i`` correct of model ``i``'s ``n`` samples: the chance
  that all ``k_i`` draws without replacement from each model miss), averaged over prompts. Its gain
  is the difference to its best member's pass@k at the same ``k``.
* **Disparity** of two models, per prompt and then averaged: ``1 - Jaccard`` of their sets of distinct
  correct answers, ``1 - `` the mean cosine similarity between their samples (the first 16 of each),
  and the Jensen-Shannon divergence (base 2) of their answer distributions. A mixture's disparity is
  the mean over its pairs.
* **Correlations** (Spearman and Kendall, with bootstrap intervals over the mixtures): a mixture's
  disparity against its gain over its best member; a single model's diversity (distinct correct
  answers, Vendi, mean similarity) against its best-of-k gain (pass@16 - pass@1, and pass@16 - SFT's).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

KS = (4, 8, 16, 32, 64)
MAX_SIZE = 4
DISPARITIES = ("answer_overlap", "similarity", "jensen_shannon")
BOOTSTRAP = 400
SIMILARITY_SAMPLES = 16


def split(k: int, size: int) -> list[int]:
    """``k`` draws over ``size`` models: ``k // size`` each, one more for the first ``k % size``."""
    return [k // size + (1 if index < k % size else 0) for index in range(size)]


def miss_probability(n: int, c: int, draws: int) -> float:
    """Chance that ``draws`` samples taken without replacement from ``n`` (``c`` correct) are all wrong."""
    return 0.0 if n - c < draws else math.comb(n - c, draws) / math.comb(n, draws)


def mixture_pass_at_k(counts: Sequence[Sequence[int]], n: int, k: int) -> list[float]:
    """Per prompt, pass@k of a mixture whose members have ``counts[i][prompt]`` correct of ``n`` samples."""
    draws = split(k, len(counts))
    return [1.0 - math.prod(miss_probability(n, member[p], d) for member, d in zip(counts, draws, strict=True))
            for p in range(len(counts[0]))]


def jensen_shannon(a: Sequence[str], b: Sequence[str]) -> float:
    """Jensen-Shannon divergence (bits) of the empirical distributions of two lists of answers."""
    p, q = Counter(a), Counter(b)
    total_p, total_q = sum(p.values()), sum(q.values())
    divergence = 0.0
    for answer in set(p) | set(q):
        pa, qa = p[answer] / total_p, q[answer] / total_q
        middle = (pa + qa) / 2
        divergence += 0.5 * (pa * math.log2(pa / middle) if pa else 0.0)
        divergence += 0.5 * (qa * math.log2(qa / middle) if qa else 0.0)
    return divergence


def pair_disparity(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float]:
    """The three disparities of two models' ``{"answers": [P][n], "correct": [P] sets, "emb": [P] [16, D]}``."""
    overlap, similarity, divergence = [], [], []
    for p in range(len(first["answers"])):
        union = first["correct"][p] | second["correct"][p]
        overlap.append(1.0 - len(first["correct"][p] & second["correct"][p]) / len(union) if union else 0.0)
        similarity.append(1.0 - float((first["emb"][p] @ second["emb"][p].T).mean()))
        divergence.append(jensen_shannon(first["answers"][p], second["answers"][p]))
    return {"answer_overlap": statistics.fmean(overlap), "similarity": statistics.fmean(similarity),
            "jensen_shannon": statistics.fmean(divergence)}


def model_view(samples: list[list[str]], prompts: Sequence[str], verifier: Callable[[str, str], bool],
               embed: Callable[[Sequence[str]], torch.Tensor]) -> dict[str, Any]:
    """What the analysis reads of one model's samples ``[P][n]``: answers, correct counts and sets, and the
    unit embeddings of the first ``SIMILARITY_SAMPLES``."""
    answers = [[text.strip() for text in group] for group in samples]
    flags = [[verifier(prompt, text) for text in group] for prompt, group in zip(prompts, answers, strict=True)]
    emb = []
    for group in answers:
        vectors = embed(group[:SIMILARITY_SAMPLES]).to(torch.float64)
        emb.append(vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    correct = [{a for a, ok in zip(group, row, strict=True) if ok} for group, row in zip(answers, flags, strict=True)]
    return {"answers": answers, "counts": [sum(row) for row in flags], "correct": correct, "emb": emb}


def rank_correlations(x: Sequence[float], y: Sequence[float], rng: random.Random) -> dict[str, Any]:
    """Spearman and Kendall (tau-b) of ``x`` and ``y``, each with a 95% bootstrap interval (resampled pairs)."""
    from scipy import stats

    def both(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
        if len(set(xs)) < 2 or len(set(ys)) < 2:
            return math.nan, math.nan
        return float(stats.spearmanr(xs, ys).statistic), float(stats.kendalltau(xs, ys).statistic)

    spearman, kendall = both(x, y)
    draws: list[tuple[float, float]] = []
    for _ in range(BOOTSTRAP):
        picks = [rng.randrange(len(x)) for _ in range(len(x))]
        draws.append(both([x[i] for i in picks], [y[i] for i in picks]))
    out = {"n": len(x)}
    for index, (name, value) in enumerate((("spearman", spearman), ("kendall", kendall))):
        values = sorted(d[index] for d in draws if not math.isnan(d[index]))
        interval = ([values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]] if values
                    else [math.nan, math.nan])
        out[name] = {"value": value, "interval": interval}
    return out


def bootstrap_mean(per_prompt: Sequence[float], rng: random.Random) -> list[float]:
    """95% bootstrap interval of the mean over prompts."""
    means = sorted(statistics.fmean(rng.choice(per_prompt) for _ in per_prompt) for _ in range(BOOTSTRAP))
    return [means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]]


def seed_mixtures(views: dict[str, dict[str, Any]], n: int, ks: Sequence[int]) -> dict[str, Any]:
    """Per subset (name tuple) of one seed's trained models: pass@k per k (mean over prompts), the per-prompt
    values, the best member's, the gain, and the disparity."""
    names = sorted(views)
    pairs = {pair: pair_disparity(views[pair[0]], views[pair[1]]) for pair in itertools.combinations(names, 2)}
    rows = {}
    for size in range(1, MAX_SIZE + 1):
        for subset in itertools.combinations(names, size):
            counts = [views[name]["counts"] for name in subset]
            entry: dict[str, Any] = {"pass": {}, "per_prompt": {}, "best_member": {}, "best_name": {}, "gain": {}}
            for k in ks:
                per_prompt = mixture_pass_at_k(counts, n, k)
                singles = [statistics.fmean(mixture_pass_at_k([c], n, k)) for c in counts]
                entry["per_prompt"][k] = per_prompt
                entry["pass"][k] = statistics.fmean(per_prompt)
                entry["best_member"][k] = max(singles)
                entry["best_name"][k] = subset[singles.index(max(singles))]
                entry["gain"][k] = entry["pass"][k] - max(singles)
            if size >= 2:
                members = list(itertools.combinations(subset, 2))
                entry["disparity"] = {name: statistics.fmean(pairs[pair][name] for pair in members)
                                      for name in DISPARITIES}
            rows[subset] = entry
    return rows


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def best_mixtures(seeds: list[dict[tuple[str, ...], Any]], sft: list[dict[int, float]], ks: Sequence[int],
                  rng: random.Random) -> dict[int, dict[str, Any]]:
    """Per k: the mixture (size >= 2) and the single model with the highest pass@k averaged over seeds, the
    mixture's gain over its best member (per seed, and a bootstrap interval over prompts), and SFT's."""
    report = {}
    for k in ks:
        def mean_pass(subset: tuple[str, ...], k: int = k) -> float:
            return statistics.fmean(rows[subset]["pass"][k] for rows in seeds)
        subsets = list(seeds[0])
        mixture = max((s for s in subsets if len(s) >= 2), key=mean_pass)
        single = max((s for s in subsets if len(s) == 1), key=mean_pass)
        # per prompt, the mixture minus its best member of that seed (the member best over all prompts)
        per_prompt_gain = [statistics.fmean(rows[mixture]["per_prompt"][k][p]
                                            - rows[(rows[mixture]["best_name"][k],)]["per_prompt"][k][p]
                                            for rows in seeds)
                           for p in range(len(seeds[0][mixture]["per_prompt"][k]))]
        report[k] = {"mixture": list(mixture), "pass": _spread([rows[mixture]["pass"][k] for rows in seeds]),
                     "gain_over_best_member": _spread([rows[mixture]["gain"][k] for rows in seeds]),
                     "gain_interval": bootstrap_mean(per_prompt_gain, rng),
                     "best_single": single[0], "best_single_pass": _spread([rows[single]["pass"][k] for rows in seeds]),
                     "sft_pass": _spread([values[k] for values in sft])}
    return report


def mixtures_beating_members(seeds: list[dict[tuple[str, ...], Any]], ks: Sequence[int],
                             rng: random.Random) -> dict[int, dict[str, Any]]:
    """Per k: the share of mixtures (size >= 2) above their best member and their mean gain, per seed
    (mean and std), with a bootstrap interval over prompts of the mean gain."""
    report = {}
    for k in ks:
        shares, gains = [], []
        prompt_gains: list[list[float]] = []
        for rows in seeds:
            mixes = [entry for subset, entry in rows.items() if len(subset) >= 2]
            shares.append(statistics.fmean(entry["gain"][k] > 1e-12 for entry in mixes))
            gains.append(statistics.fmean(entry["gain"][k] for entry in mixes))
            prompt_gains.append([statistics.fmean(entry["per_prompt"][k][p] - entry["best_member"][k]
                                                  for entry in mixes) for p in range(len(mixes[0]["per_prompt"][k]))])
        per_prompt = [statistics.fmean(values) for values in zip(*prompt_gains, strict=True)]
        report[k] = {"share": _spread(shares), "gain": _spread(gains), "gain_interval": bootstrap_mean(per_prompt, rng)}
    return report


def disparity_correlations(seeds: list[dict[tuple[str, ...], Any]], ks: Sequence[int],
                           rng: random.Random) -> dict[str, Any]:
    """Spearman and Kendall of a mixture's disparity and its gain over its best member, every mixture of every
    seed pooled, per disparity and k."""
    out: dict[str, Any] = {}
    for name in DISPARITIES:
        out[name] = {}
        for k in ks:
            points = [(entry["disparity"][name], entry["gain"][k]) for rows in seeds
                      for subset, entry in rows.items() if len(subset) >= 2]
            out[name][k] = rank_correlations([x for x, _ in points], [y for _, y in points], rng)
    return out


def diversity_correlations(runs: dict[str, list[dict[str, Any]]], rng: random.Random, k: int = 16) -> dict[str, Any]:
    """Over every trained model and seed: rank correlation of each diversity metric with the model's
    pass@k - pass@1 and with its pass@k - SFT's pass@k (same seed)."""
    metrics = ("distinct_correct@16", "vendi", "mean_similarity")
    points = [(run, runs["SFT"][seed]) for name, per_seed in runs.items() if name != "SFT"
              for seed, run in enumerate(per_seed)]
    out = {}
    for metric in metrics:
        x = [run[metric] for run, _ in points]
        out[metric] = {"over_pass@1": rank_correlations(x, [run[f"pass@{k}"] - run["pass@1"] for run, _ in points],
                                                        rng),
                       "over_sft": rank_correlations(x, [run[f"pass@{k}"] - sft[f"pass@{k}"] for run, sft in points],
                                                     rng)}
    return out


def analyze(samples: dict[str, list[list[list[str]]]], runs: dict[str, list[dict[str, Any]]], prompts: Sequence[str],
            verifier: Callable[[str, str], bool], embed: Callable[[Sequence[str]], torch.Tensor], n: int,
            seed: int = 0) -> dict[str, Any]:
    """The whole analysis from ``samples[method][seed] = [P][n]`` texts (SFT included) and the study's
    per-run metrics; JSON-ready (subsets as lists, k as strings)."""
    rng = random.Random(seed)
    ks = [k for k in KS if k <= n]  # best-of-k needs k <= n samples per model
    seeds = len(samples["SFT"])
    per_seed, sft = [], []
    for index in range(seeds):
        views = {name: model_view(per_model[index], prompts, verifier, embed) for name, per_model in samples.items()}
        sft.append({k: statistics.fmean(mixture_pass_at_k([views["SFT"]["counts"]], n, k)) for k in ks})
        per_seed.append(seed_mixtures({name: view for name, view in views.items() if name != "SFT"}, n, ks))
    sizes = range(1, min(MAX_SIZE, len(samples) - 1) + 1)
    by_size = {k: {size: statistics.fmean(max(rows[s]["pass"][k] for s in rows if len(s) == size) for rows in per_seed)
                   for size in sizes} for k in ks}
    correlation_k = 16 if 16 in ks else ks[-1]
    report = {"ks": ks, "max_size": sizes[-1], "samples_per_model": n, "correlation_k": correlation_k,
              "best": best_mixtures(per_seed, sft, ks, rng),
              "beats_best_member": mixtures_beating_members(per_seed, ks, rng), "best_by_size": by_size,
              "disparity_vs_gain": disparity_correlations(per_seed, ks, rng),
              "diversity_vs_gain": diversity_correlations(runs, rng, correlation_k)}
    return json_ready(report)


def json_ready(value: Any) -> Any:
    """Dict keys to strings (k, sizes), tuples to lists, recursively."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def _cell(spread: dict[str, float]) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f}"


def _correlation(entry: dict[str, Any]) -> str:
    low, high = entry["interval"]
    return f"{entry['value']:+.2f} [{low:+.2f}, {high:+.2f}]"


def table(report: dict[str, Any]) -> str:
    """Markdown: per k the best mixture against its best member, the best single model and SFT; the share of
    mixtures above their best member; the rank correlations (at k = 16)."""
    lines = ["| k | best mixture (size 2-4) | its pass@k | gain over its best member [95% CI, prompts] | "
             "best single model | its pass@k | SFT | mixtures above their best member | their mean gain "
             "[95% CI] |", "|---" * 9 + "|"]
    for k in report["ks"]:
        best, beats = report["best"][str(k)], report["beats_best_member"][str(k)]
        low, high = best["gain_interval"]
        beat_low, beat_high = beats["gain_interval"]
        lines.append(f"| {k} | {' + '.join(best['mixture'])} | {_cell(best['pass'])} | "
                     f"{_cell(best['gain_over_best_member'])} [{low:+.3f}, {high:+.3f}] | {best['best_single']} | "
                     f"{_cell(best['best_single_pass'])} | {_cell(best['sft_pass'])} | {_cell(beats['share'])} | "
                     f"{_cell(beats['gain'])} [{beat_low:+.3f}, {beat_high:+.3f}] |")
    k = report["correlation_k"]
    lines += ["", f"| rank correlation at k = {k} (95% CI, bootstrap over the points) | Spearman | Kendall |",
              "|---|---|---|"]
    for name in DISPARITIES:
        entry = report["disparity_vs_gain"][name][str(k)]
        lines.append(f"| mixture disparity ({name.replace('_', ' ')}) vs gain over its best member (n = {entry['n']}) "
                     f"| {_correlation(entry['spearman'])} | {_correlation(entry['kendall'])} |")
    for metric, entry in report["diversity_vs_gain"].items():
        for gain, label in (("over_pass@1", f"pass@{k} - pass@1"), ("over_sft", f"pass@{k} - SFT's pass@{k}")):
            value = entry[gain]
            lines.append(f"| single model: {metric} vs {label} (n = {value['n']}) | {_correlation(value['spearman'])} "
                         f"| {_correlation(value['kendall'])} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> Path:
    """pass@k at k = 4..64 of the best single model and of the best mixture of each size, and SFT's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = report["ks"]
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for size in range(1, report["max_size"] + 1):
        label = "best single model" if size == 1 else f"best mixture of {size}"
        axis.plot(ks, [report["best_by_size"][str(k)][str(size)] for k in ks], marker="o", label=label)
    axis.plot(ks, [report["best"][str(k)]["sft_pass"]["mean"] for k in ks], linestyle="--", marker="o", label="SFT")
    return save_pass_at_k_plot(figure, axis, "k (samples per prompt; a mixture of m draws k / m from each)",
                               out / "mixtures.png")


def save_pass_at_k_plot(figure: Any, axis: Any, xlabel: str, target: Path) -> Path:
    """Finish a pass@k-against-k figure (log2 k, grid, legend) and write it to ``target``."""
    import matplotlib.pyplot as plt

    axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("pass@k (unbiased, mean over seeds)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target
