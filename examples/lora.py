"""DDPO with LoRA adapters (peft): only the adapters train; the reference is the base model with the
adapters off, so no copy of the model is held::

    python examples/lora.py --output_dir lora-example            # seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import GROUPS_FILE, save_tiny_model

from divkernels.integration import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="lora-example")
    parser.add_argument("--max_steps", type=int, default=12)
    args = parser.parse_args(argv)
    model = save_tiny_model(Path(args.output_dir) / "tiny-model")
    trainer = train.main([
        "--model_name_or_path", model, "--dataset", str(GROUPS_FILE), "--output_dir", args.output_dir,
        "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj",
        "--loss_type", "dpo", "--diversity", "deviation", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "4", "--max_steps", str(args.max_steps), "--logging_steps", "2",
        "--bf16", "False", "--report_to", "none", "--save_strategy", "no",
    ])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"trained {trainable} of {total} parameters (the LoRA adapters); adapters saved to {args.output_dir}")


if __name__ == "__main__":
    main()
