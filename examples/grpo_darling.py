"""GRPO with DARLING's reward in TRL's GRPOTrainer: the verifier's reward times the partition diversity of
each prompt's group of samples (completions whose embeddings have cosine >= tau share a class)::

    python examples/grpo_darling.py --output_dir grpo-example    # under a minute on 2 CPU cores

DARLING's published runs take the group mean out without dividing by the std: ``scale_rewards="none"``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import Dataset
from tiny import GROUPS_FILE, arguments
from trl import GRPOConfig, GRPOTrainer

from divkernels.integration import DarlingReward, demo


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "grpo-example", 8, argv)
    prompts = [json.loads(line)["prompt"] for line in GROUPS_FILE.read_text().splitlines()]

    def correct(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        return [float(demo.is_correct(p.removeprefix("<bos> "), c)) for p, c in zip(prompts, completions, strict=True)]

    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=4, learning_rate=1e-3, beta=0.0,
                        scale_rewards="none", logging_steps=2, save_strategy="no", report_to=[], bf16=False,
                        use_cpu=True, seed=0)
    darling = DarlingReward(correct, num_generations=config.num_generations, tau=0.9)
    model, tokenizer = demo.build_model(0), demo.build_tokenizer()
    # a supervised warm-up, so that some samples are right
    demo.train_sft(model, tokenizer, demo.sft_examples(4000, random.Random(0)), steps=300)
    trainer = GRPOTrainer(model=model, reward_funcs=[darling], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: reward {entry['reward']:.3f}, partition diversity "
                  f"{entry['diversity/partition']:.3f}")


if __name__ == "__main__":
    main()
