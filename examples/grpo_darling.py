"""GRPO with DARLING's reward in TRL's GRPOTrainer: the verifier's reward times the partition diversity of
each prompt's group of samples::

    python examples/grpo_darling.py --output_dir grpo-example                # embeddings: cos >= tau links
    python examples/grpo_darling.py --output_dir grpo-example --judge tiny   # a learned pair classifier

``--judge tiny`` first fine-tunes a small pair classifier (the bundled all-MiniLM-L6-v2 encoder, no
download) on labelled pairs of the task's answers (two answers are "similar" when they hold the same
digits in any order), then lets it judge every pair of each group in process, as DARLING's learned judge
does; the short-answer shortcut is off so that the classifier decides every pair of these three-digit
answers. Each takes a minute or two on
2 CPU cores. DARLING's published runs take the group mean out without dividing by the std:
``scale_rewards="none"``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import Dataset
from tiny import GROUPS_FILE, arguments
from trl import GRPOConfig, GRPOTrainer

from divkernels.integration import DarlingReward, HFPairJudge, demo
from divkernels.integration.judge_training import JudgeTrainingConfig, bundled_classifier, train_judge


def judge_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", choices=("none", "tiny"), default="none",
                        help="link completions by a learned pair classifier (tiny: trained here) or embeddings")


def answer_pairs(count: int, rng: random.Random) -> list[dict[str, object]]:
    """Labelled pairs of three-digit answers: half are the same digits reordered (similar), half not."""
    rows = []
    for k in range(count):
        digits = [rng.choice(demo.DIGITS) for _ in range(demo.ANSWER_LENGTH)]
        other = rng.sample(digits, len(digits)) if k % 2 == 0 else [rng.choice(demo.DIGITS) for _ in digits]
        rows.append({"generation_0": " ".join(digits), "generation_1": " ".join(other),
                     "similar": int(sorted(digits) == sorted(other))})
    return rows


def trained_judge(seed: int) -> HFPairJudge:
    """The bundled all-MiniLM-L6-v2 encoder fine-tuned as a pair classifier on :func:`answer_pairs` with
    the authors' recipe, on a shorter schedule (60 steps of 16 pairs; their defaults,
    ``JudgeTrainingConfig()``, take 80 steps of 64)."""
    model, tokenizer = bundled_classifier(seed)
    config = JudgeTrainingConfig(steps=60, warmup_steps=5, max_lr=5e-5, min_lr=5e-6, batch_size=16,
                                 grad_accumulation=1, max_len=64, seed=seed)
    train_judge(model, tokenizer, answer_pairs(512, random.Random(seed)), config, log=None)
    return HFPairJudge(model, tokenizer, max_len=config.max_len)


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "grpo-example", 8, argv, judge_flag)
    prompts = [json.loads(line)["prompt"] for line in GROUPS_FILE.read_text().splitlines()]

    def correct(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        return [float(demo.is_correct(p.removeprefix("<bos> "), c)) for p, c in zip(prompts, completions, strict=True)]

    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=4, learning_rate=1e-3, beta=0.0,
                        scale_rewards="none", logging_steps=2, save_strategy="no", report_to=[], bf16=False,
                        use_cpu=True, seed=0)
    if args.judge == "tiny":
        darling = DarlingReward(correct, num_generations=config.num_generations, judge=trained_judge(0),
                                shortcut=False)
    else:
        darling = DarlingReward(correct, num_generations=config.num_generations, tau=0.9)
    model, tokenizer = demo.build_model(0), demo.build_tokenizer()
    # a supervised warm-up, so that some samples are right
    demo.train_sft(model, tokenizer, demo.sft_examples(4000, random.Random(0)), steps=300)
    trainer = GRPOTrainer(model=model, reward_funcs=[darling], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            judged = f", judge calls per group {entry['judge/calls_per_group']:.1f}" if args.judge != "none" else ""
            print(f"step {entry['step']}: reward {entry['reward']:.3f}, partition diversity "
                  f"{entry['diversity/partition']:.3f}{judged}")


if __name__ == "__main__":
    main()
