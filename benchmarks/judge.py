"""``--suite judge``: what DARLING's learned judge costs per GRPO step.

For G in 4, 8, 16 completions per prompt:

* judge calls per group: the ``G (G - 1) / 2`` pairs, and how many reach the classifier when the
  authors' short-answer shortcut decides pairs of short answers (a fixed mix of answers: half of them
  at most 5 words, the shape of math answers; the other half 8-24 words);
* seconds of the reward function per step (``DarlingReward`` with the judge on ``PROMPTS`` groups of
  that mix), the in-process judge batching every pair of the step into forward passes of 64 pairs,
  against one pair per forward pass (a served judge's one request per pair);
* seconds per TRL ``GRPOTrainer`` step on the demo's tiny policy with the reward linked by the judge
  (shortcut off: its three-digit answers are all short), batched and one pair per pass, and with
  embeddings (hashed n-grams, ``cos >= tau``) instead of a judge.

The judge is the small pair classifier of ``judge_training.tiny_classifier`` (a 2-layer BERT, width 64)
on the CPU: the ratio between the rows is what carries over, not the seconds; a 4B classifier behind
vLLM costs per pair what its server takes.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

GROUPS = (4, 8, 16)
PROMPTS = 8  # groups per step
STEPS = 4  # GRPO steps timed (after one warm-up step)
RESULTS_NAME = "judge"
WORDS = ("the", "answer", "is", "we", "add", "multiply", "both", "sides", "by", "two", "so", "that", "x", "equals",
         "then", "it", "follows", "four", "nine", "seven", "since", "divide", "each", "term", "gives", "twelve",
         "hence", "result", "final", "check", "again")


def answer_mix(group: int, rng: random.Random) -> list[str]:
    """One group's answers: half short (1-5 words, some repeated), half long (8-24 words)."""
    answers = []
    for k in range(group):
        if k % 2 == 0:
            answers.append(" ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(1, 5))))
        else:
            answers.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))))
    return answers


def tiny_judge(batch_size: int) -> Any:
    from divkernels.integration.judge import HFPairJudge
    from divkernels.integration.judge_training import tiny_classifier

    model, tokenizer = tiny_classifier(0)
    return HFPairJudge(model.eval(), tokenizer, max_len=128, batch_size=batch_size)


def judge_calls(group: int) -> dict[str, float]:
    """Pairs per group, and judge calls per group with and without the shortcut, over 64 groups."""
    from divkernels.integration.judge import judge_groups

    groups = [answer_mix(group, random.Random(seed)) for seed in range(64)]
    _, _, with_shortcut = judge_groups(lambda pairs: [0.0] * len(pairs), groups)
    _, _, without = judge_groups(lambda pairs: [0.0] * len(pairs), groups, shortcut=False)
    return {"pairs_per_group": with_shortcut.pairs / len(groups),
            "calls_per_group_shortcut": with_shortcut.judged / len(groups),
            "calls_per_group_all": without.judged / len(groups)}


def reward_seconds(group: int, batch_size: int) -> float:
    """Median seconds of one ``DarlingReward`` call on ``PROMPTS`` groups (the judge's pairs dominate)."""
    from divkernels.integration import DarlingReward

    judge = tiny_judge(batch_size)
    reward = DarlingReward(lambda prompts, completions, **_: [1.0] * len(completions), num_generations=group,
                           judge=judge, backend="reference")
    times = []
    for seed in range(STEPS + 1):
        rng = random.Random(seed)
        completions = [answer for _ in range(PROMPTS) for answer in answer_mix(group, rng)]
        prompts = [f"prompt {k // group}" for k in range(len(completions))]
        started = time.perf_counter()
        reward(prompts, completions)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def grpo_seconds(group: int, mode: str, out: str) -> float:
    """Median seconds per TRL GRPO step with the reward linked by ``mode``: "batched", "one pair" or
    "embeddings"."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from divkernels.integration import DarlingReward, demo
    from divkernels.integration.embeddings import HashedNgramEncoder

    config = GRPOConfig(output_dir=out, max_steps=STEPS + 1, per_device_train_batch_size=2 * group,
                        num_generations=group, max_completion_length=4, learning_rate=1e-3, beta=0.0,
                        scale_rewards="none", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        disable_tqdm=True, seed=0, bf16=False)
    if mode == "embeddings":
        darling = DarlingReward(demo.correctness_reward, num_generations=group, embed=HashedNgramEncoder(),
                                backend="reference")
    else:
        darling = DarlingReward(demo.correctness_reward, num_generations=group, shortcut=False, backend="reference",
                                judge=tiny_judge(64 if mode == "batched" else 1))
    prompts = [f"<bos> {demo.prompt_for(target)}" for target in demo.TARGETS]
    trainer = GRPOTrainer(model=demo.build_model(0), reward_funcs=[darling], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=demo.build_tokenizer())
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    trainer.add_callback(Stamp())
    started = time.perf_counter()
    trainer.train()
    steps = [later - earlier for earlier, later in zip([started, *stamps], stamps, strict=False)]
    return statistics.median(steps[1:])


def run(log: Callable[[str], None], out: str) -> list[dict[str, object]]:
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = []
    for group in GROUPS:
        row: dict[str, object] = {"G": group, **judge_calls(group)}
        row["reward_s_batched"] = reward_seconds(group, 64)
        row["reward_s_one_pair"] = reward_seconds(group, 1)
        for mode, key in (("batched", "grpo_s_batched"), ("one pair", "grpo_s_one_pair"),
                          ("embeddings", "grpo_s_embeddings")):
            row[key] = grpo_seconds(group, mode, out)
        log(f"G={group}: " + ", ".join(f"{key} {value:.3f}" for key, value in row.items() if key != "G"))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per G."""
    lines = ["| G | pairs / group | judge calls / group (shortcut) | reward s / step: batched | one pair per pass | "
             "GRPO s / step: judge batched | one pair per pass | embeddings |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['G']} | {row['pairs_per_group']:.0f} | {row['calls_per_group_shortcut']:.1f} | "
                     f"{row['reward_s_batched']:.3f} | {row['reward_s_one_pair']:.3f} | {row['grpo_s_batched']:.3f} | "
                     f"{row['grpo_s_one_pair']:.3f} | {row['grpo_s_embeddings']:.3f} |")
    return "\n".join(lines)


def readme_block(results: dict) -> str:
    """The README block of a committed result file: where it ran, then :func:`table`."""
    return (f"Measured on {results['device']} (torch {results['torch']}, transformers {results['transformers']}, "
            f"trl {results['trl']}, commit {str(results['commit'])[:12]}, {results['date'][:10]}), "
            f"{PROMPTS} prompts per step for the reward, 2 for GRPO:\n\n" + table(results["rows"]))
