"""Single-process DDPO (deviation-weighted DPO) on the shipped groups file, configured with the flags a
TRL DPOTrainer user knows (``--loss_type``, ``--beta``, ``--learning_rate``, ...)::

    python examples/ddpo.py --output_dir ddpo-example            # seconds on 2 CPU cores

The same flags go to ``python -m divkernels.integration.train`` with your own model and groups file.
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
    parser.add_argument("--output_dir", default="ddpo-example")
    parser.add_argument("--max_steps", type=int, default=12)
    args = parser.parse_args(argv)
    model = save_tiny_model(Path(args.output_dir) / "tiny-model")
    trainer = train.main([
        "--model_name_or_path", model, "--dataset", str(GROUPS_FILE), "--output_dir", args.output_dir,
        "--loss_type", "dpo", "--diversity", "deviation", "--beta", "0.1", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "4", "--max_steps", str(args.max_steps), "--logging_steps", "2",
        "--bf16", "False", "--report_to", "none", "--save_strategy", "no",
    ])
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}, deviation {entry['diversity/deviation']:.3f}, "
                  f"reward accuracy {entry['rewards/accuracies']:.2f}")


if __name__ == "__main__":
    main()
