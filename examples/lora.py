"""DDPO with LoRA adapters (peft): only the adapters train; the reference is the base model with the
adapters off, so no copy of the model is held::

    python examples/lora.py --output_dir lora-example            # seconds on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import arguments, save_tiny_model, train_flags

from divkernels.integration import train


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "lora-example", 12, argv)
    model = save_tiny_model(Path(args.output_dir) / "tiny-model")
    trainer = train.main([*train_flags(model, args), "--lora_r", "4", "--lora_alpha", "8",
                          "--lora_target_modules", "q_proj,v_proj", "--loss_type", "dpo", "--diversity", "deviation",
                          "--learning_rate", "1e-2"])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"trained {trainable} of {total} parameters (the LoRA adapters); adapters saved to {args.output_dir}")


if __name__ == "__main__":
    main()
