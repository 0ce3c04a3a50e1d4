"""DDPO under FSDP2 with ``accelerate launch`` (each decoder layer its own shard unit; the reference model is
sharded the same way). On 2 CPU processes::

    accelerate launch --config_file examples/configs/fsdp2_cpu.yaml examples/fsdp2.py --output_dir fsdp2-example

On GPUs use ``integration/configs/fsdp2.yaml`` (``num_processes``: your GPU count). The loss and the
gradients equal one process's on the same groups (each process gathers every process's groups).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import arguments, save_tiny_model, train_flags

from divkernels.integration import train


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "fsdp2-example", 6, argv)
    from accelerate import PartialState

    state = PartialState()
    folder = Path(args.output_dir) / "tiny-model"
    with state.main_process_first():  # one process writes the model, the others read it
        model = save_tiny_model(folder)
    trainer = train.main([*train_flags(model, args, batch_size=2), "--loss_type", "dpo", "--diversity", "deviation",
                          "--learning_rate", "1e-3", "--gradient_checkpointing", "False"])
    if state.is_main_process:
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print(f"step {entry['step']}: loss {entry['loss']:.4f}, deviation {entry['diversity/deviation']:.3f}")


if __name__ == "__main__":
    main()
