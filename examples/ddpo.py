"""Single-process DDPO (deviation-weighted DPO) on the shipped groups file, configured with the flags a
TRL DPOTrainer user knows (``--loss_type``, ``--beta``, ``--learning_rate``, ...)::

    python examples/ddpo.py --output_dir ddpo-example            # seconds on 2 CPU cores

The same flags go to ``python -m divkernels.integration.train`` with your own model and groups file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import arguments, save_tiny_model, train_flags

from divkernels.integration import train


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "ddpo-example", 12, argv)
    model = save_tiny_model(Path(args.output_dir) / "tiny-model")
    trainer = train.main([*train_flags(model, args), "--loss_type", "dpo", "--diversity", "deviation", "--beta", "0.1",
                          "--learning_rate", "1e-3"])
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}, deviation {entry['diversity/deviation']:.3f}, "
                  f"reward accuracy {entry['rewards/accuracies']:.2f}")


if __name__ == "__main__":
    main()
