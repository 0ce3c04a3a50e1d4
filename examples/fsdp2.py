"""DDPO under FSDP2: ``fully_shard`` per decoder layer and at the root, the reference model sharded the same
way; each process holds a shard of the weights and its own groups, and the loss gathers every process's
groups, so it equals one process's loss on all of them. On 2 CPU processes (gloo)::

    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py --output_dir fsdp2-example     # seconds on 2 CPU cores

This loop shards the models itself, which is how FSDP2 runs on CPUs (accelerate's FSDP plugin needs GPUs).
On GPUs the trainer does it all: ``accelerate launch --config_file integration/configs/fsdp2.yaml -m
divkernels.integration.train ...`` (README, "Past one machine").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import torch.distributed as dist
from datasets import Dataset
from tiny import GROUPS_FILE, arguments
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from divkernels.integration import DiversityPreferenceConfig, DiversityPreferenceTrainer, demo
from divkernels.integration.groups import tokenize_rows

GROUPS_PER_STEP = 2  # per process


def sharded_models(world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Policy and frozen reference, the same weights on every process, each decoder layer a shard unit."""
    mesh = init_device_mesh("cpu", (world,))
    models = [demo.build_model(0), demo.build_model(0)]
    for model in models:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    models[1].eval().requires_grad_(False)
    return models[0], models[1]


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "fsdp2-example", 6, argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    policy, reference = sharded_models(world)
    config = DiversityPreferenceConfig(output_dir=args.output_dir, loss_type="dpo", diversity="deviation",
                                       embedding_source="policy", per_device_train_batch_size=GROUPS_PER_STEP,
                                       use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[])
    trainer = DiversityPreferenceTrainer(model=policy, ref_model=reference, args=config,
                                         processing_class=demo.build_tokenizer())
    rows = tokenize_rows(Dataset.from_list([json.loads(line) for line in GROUPS_FILE.read_text().splitlines()]),
                         trainer.processing_class, config)
    mine = [rows[index] for index in range(rank, len(rows), world)]  # this process's groups
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    policy.train()
    for step in range(1, args.max_steps + 1):
        batch = [mine[(step * GROUPS_PER_STEP + j) % len(mine)] for j in range(GROUPS_PER_STEP)]
        loss = trainer.compute_loss(policy, trainer.data_collator(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % 2 == 0:
            deviation = trainer._metrics["train"]["diversity/deviation"][-1]
            print(f"step {step}: loss {loss.item():.4f} over {world} processes, deviation {deviation:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
