"""The integration across processes on CPU (gloo): DDP, FSDP2 and ZeRO-3 steps equal one process's, GRPO
rewards gather a group split across processes, PEFT and the training script; tiny models from configs.

Most tests embed with :func:`bag_embed` (digit counts, deterministic, no model load); the
bundled all-MiniLM-L6-v2 encoder is exercised once and by the demo test.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset

from divkernels.integration import (
    DarlingReward,
    DiversityBonusReward,
    DiversityCallback,
    DiversityPreferenceTrainer,
    demo,
)
from divkernels.integration.preference import sequence_statistics, to_groups

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

from test_integration import GROUPS, bag_embed, collate, config, grpo_batch, tiny  # noqa: E402

# ------------------------------------------------------------------ two processes (gloo) == one process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_one_step(out: str, batch_size: int) -> tuple[float, torch.Tensor]:
    model, tokenizer = tiny()
    args = config(Path(out), max_steps=1, logging_steps=1, per_device_train_batch_size=batch_size,
                  learning_rate=1.0, diversity="deviation", embedding_source="policy", diversity_alpha=0.5)
    trainer = DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(GROUPS),
                                         processing_class=tokenizer, encoder=bag_embed)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    trainer.train()
    step = torch.nn.utils.parameters_to_vector(trainer.accelerator.unwrap_model(trainer.model).parameters()) - start
    return next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry), step.detach()


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    loss, step = _train_one_step(out, batch_size=2)
    torch.save({"loss": loss, "step": step}, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_process_ddp_step_equals_single_process(tmp_path: Path) -> None:
    """Two gloo processes with two groups each take the same step as one process with all four
    (groups gathered with autograd, so the loss and its gradient are the single-process ones;
    DDP averages the gradients). Policy embeddings make the diversity term depend on the
    parameters through both the gathered log-probs and the gathered embeddings."""
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    loss, step = _train_one_step(str(tmp_path / "single"), batch_size=4)
    assert step.abs().max() > 1e-4  # the step is not trivially zero
    for result in results:
        assert result["loss"] == pytest.approx(loss, rel=1e-5)
        torch.testing.assert_close(result["step"], step, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ PEFT: the reference is the base model


def test_peft_reference_is_the_base_model_without_a_copy(tmp_path: Path) -> None:
    """A LoRA policy and no ref_model: the reference log-probs are the base model's (adapters off), no
    frozen copy is made, and a step moves only the adapters."""
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny()
    base = copy.deepcopy(model)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = DiversityPreferenceTrainer(model=model, args=config(tmp_path, diversity="deviation", max_steps=1),
                                         train_dataset=Dataset.from_list(GROUPS), processing_class=tokenizer,
                                         encoder=bag_embed, peft_config=lora)
    assert trainer.ref_model is None and trainer.reference_is_base
    policy = trainer.model
    for name, parameter in policy.named_parameters():  # adapters that change the output (B starts at 0)
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    batch = collate(trainer, GROUPS)
    with torch.no_grad():
        groups = trainer._group_tensors(policy, batch)
        stats = sequence_statistics(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    expected_ref = to_groups(stats["completion_logps"], batch["response_mask"])
    torch.testing.assert_close(groups["ref"], expected_ref, rtol=1e-5, atol=1e-5)
    assert (groups["policy"] - groups["ref"]).abs().max() > 1e-3  # the adapters are on for the policy
    frozen = {name: p.detach().clone() for name, p in policy.named_parameters() if not p.requires_grad}
    trainer.train()
    assert all(torch.equal(p, frozen[name]) for name, p in policy.named_parameters() if name in frozen)
    with pytest.raises(ValueError, match="already a peft model"):
        DiversityPreferenceTrainer(model=policy, args=config(tmp_path), processing_class=tokenizer,
                                   encoder=bag_embed, peft_config=lora)


# ------------------------------------------------------------------ FSDP2: two sharded processes == one process

CALLBACK_PROMPTS = ["<bos> 1 2 =", "<bos> 9 ="]


def _one_batch_step(model: Any, ref_model: Any, out: Path, loss_type: str, rows: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """Loss, full gradients, logged metrics and the callback's metrics of one batch through the trainer."""
    _, tokenizer = tiny()
    args = config(out, loss_type=loss_type, diversity="deviation", embedding_source="policy", diversity_alpha=0.5,
                  per_device_train_batch_size=len(rows))
    trainer = DiversityPreferenceTrainer(model=model, args=args, processing_class=tokenizer, encoder=bag_embed,
                                         ref_model=ref_model)
    model.train()
    loss = trainer.compute_loss(model, collate(trainer, rows))
    loss.backward()
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for name, p in model.named_parameters()}
    callback = DiversityCallback(trainer, CALLBACK_PROMPTS, num_samples=4, max_new_tokens=3, embed=bag_embed,
                                 verifier=lambda p, c: demo.is_correct(p.removeprefix("<bos> "), c))
    return {"loss": loss.item(), "grads": grads, "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items()},
            "callback": callback.evaluate()}


def _fsdp2_worker(rank: int, port: int, out: str, loss_type: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    models = [tiny()[0] for _ in range(2 if loss_type == "dpo" else 1)]
    for model in models:  # each decoder layer its own FSDP2 unit, the rest (tied embeddings, head) the root's
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    from divkernels.integration.distributed import sharded_parameters

    assert all(sharded_parameters(model) for model in models)
    result = _one_batch_step(models[0], models[1] if len(models) > 1 else None, Path(out) / f"rank{rank}", loss_type,
                             GROUPS[2 * rank:2 * rank + 2])
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dpo", "orpo"])
def test_fsdp2_two_processes_equal_one(tmp_path: Path, loss_type: str) -> None:
    """FSDP2 (``fully_shard`` per decoder layer and at the root, gloo on CPU; accelerate's FSDP plugin
    needs GPUs) over two processes with two groups each: the loss, the full gradients, the logged
    metrics and the DiversityCallback's metrics (both processes generate, synced) equal one
    unsharded process with all four groups. DPO with a sharded reference model; policy-pooled
    embeddings and the logdet regularizer make the gradient cross the group gather."""
    torch.multiprocessing.spawn(_fsdp2_worker, args=(_free_port(), str(tmp_path), loss_type), nprocs=2, join=True)
    sharded = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    single = _one_batch_step(tiny()[0], tiny()[0] if loss_type == "dpo" else None, tmp_path / "single", loss_type,
                             GROUPS)
    assert max(grad.abs().max().item() for grad in single["grads"].values()) > 1e-4
    for result in sharded:
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-5)
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        assert result["metrics"].keys() == single["metrics"].keys()
        for name, value in single["metrics"].items():
            assert result["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        assert result["callback"] == pytest.approx(single["callback"], rel=1e-5)


# ------------------------------------------------------------------ DeepSpeed ZeRO-3 through the Trainer

ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_allow_untested_optimizer": True,  # the tests' plain SGD
         "zero_optimization": {"stage": 3}}


def _train_step_with_callback(out: str, batch_size: int, **overrides: Any) -> dict[str, Any]:
    """One training step (DPO, its frozen reference; policy-pooled diversity and the logdet term), then
    the DiversityCallback's metrics on the updated model; the full parameter step."""
    model, tokenizer = tiny()
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    args = config(Path(out), max_steps=1, logging_steps=1, per_device_train_batch_size=batch_size,
                  learning_rate=1.0, diversity="deviation", embedding_source="policy", diversity_alpha=0.5,
                  **overrides)
    trainer = DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(GROUPS),
                                         processing_class=tokenizer, encoder=bag_embed)
    trainer.train()
    callback = DiversityCallback(trainer, CALLBACK_PROMPTS, num_samples=4, max_new_tokens=3, embed=bag_embed)
    parameters = list(trainer.model.parameters())
    gathered = contextlib.nullcontext()
    if overrides.get("deepspeed"):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(parameters)
    with gathered:
        step = torch.nn.utils.parameters_to_vector(parameters).detach().clone() - start
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {"logged": logged, "step": step, "callback": callback.evaluate(),
            "reference": type(trainer.ref_model).__name__,
            "partitioned": all(hasattr(p, "ds_id") for p in trainer.ref_model.parameters())}


def _zero3_worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    torch.save(_train_step_with_callback(out, batch_size=2, deepspeed=ZERO3), Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_zero3_two_processes_equal_one(tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 through the Trainer (DeepSpeed's CPU accelerator, gloo): two processes with two
    groups each take the step one process takes with all four; the reference model is a partitioned
    engine; the logged metrics and the callback's metrics (both processes generate) are the same."""
    pytest.importorskip("deepspeed")
    torch.multiprocessing.spawn(_zero3_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _train_step_with_callback(str(tmp_path / "single"), batch_size=4)
    assert single["step"].abs().max() > 1e-4
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["reference"] == "DeepSpeedEngine" and result["partitioned"]
        torch.testing.assert_close(result["step"], single["step"], rtol=1e-4, atol=1e-6)
        for name, value in single["logged"].items():
            if name not in ("epoch", "step", "learning_rate"):
                assert result["logged"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        assert result["callback"] == pytest.approx(single["callback"], rel=1e-5)


# ------------------------------------------------------------------ GRPO reward functions: a group across processes


def _grpo_rewards(prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
    def quality(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [float(text.count("1")) for text in completions]

    return {"darling": DarlingReward(quality, num_generations=4, tau=0.99, embed=bag_embed, backend="reference")(
                prompts, completions),
            "dqo": DiversityBonusReward("dqo", num_generations=4, embed=bag_embed, backend="reference")(
                prompts, completions),
            "deviation": DiversityBonusReward("deviation", num_generations=4, embed=bag_embed, backend="reference")(
                prompts, completions)}


def _rewards_worker(rank: int, port: int, out: str, prompts: list[str], completions: list[str]) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    half = len(prompts) // 2  # 6 of 12 rows: the second prompt's 4 completions sit on both processes
    rows = slice(rank * half, (rank + 1) * half)
    torch.save(_grpo_rewards(prompts[rows], completions[rows]), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_grpo_rewards_gather_a_group_split_across_processes(tmp_path: Path, generator: torch.Generator) -> None:
    """TRL hands each process its slice of the batch; with num_generations = 4 and 6 rows per process the
    middle prompt's group spans both. DARLING, DQO and deviation rewards gather it whole: the two
    processes' rewards, concatenated, are the single-process rewards."""
    prompts, completions = grpo_batch(generator)
    completions[4:8] = ["1 1 1", "1 1 1", "2 0 1", "7 7 7"]  # duplicates across the process boundary
    torch.multiprocessing.spawn(_rewards_worker, args=(_free_port(), str(tmp_path), prompts, completions), nprocs=2,
                                join=True)
    parts = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    single = _grpo_rewards(prompts, completions)
    for name, values in single.items():
        torch.testing.assert_close(torch.tensor(parts[0][name] + parts[1][name]), torch.tensor(values), msg=name)
    dqo = single["dqo"]  # the split group's duplicates (one on each process) gain less than a distinct answer
    assert dqo[4] == pytest.approx(dqo[5]) and dqo[4] < dqo[7]


def test_train_script_with_lora(tmp_path: Path) -> None:
    """``python -m divkernels.integration.train`` end to end on a saved tiny model and a pair-rows file,
    with LoRA (the reference is the base model, adapters off)."""
    from divkernels.integration import train

    model, tokenizer = tiny()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pairs = [{"prompt": "<bos> 1 2 =", "chosen": " 3 9 0", "rejected": " 9 9 9"},
             {"prompt": "<bos> 1 2 =", "chosen": " 4 4 4", "rejected": " 9 9 9"},
             {"prompt": "<bos> 9 =", "chosen": " 1 8 0", "rejected": " 2 2"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in pairs))
    trainer = train.main(["--model_name_or_path", str(tmp_path / "model"), "--dataset", str(tmp_path / "pairs.jsonl"),
                          "--lora_r", "2", "--lora_target_modules", "q_proj,v_proj", "--output_dir",
                          str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
                          "--use_cpu", "--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none",
                          "--save_strategy", "no", "--learning_rate", "0.1", "--diversity", "deviation",
                          "--embedding_source", "policy", "--logging_steps", "1"])
    assert trainer.reference_is_base and trainer.ref_model is None
    assert trainer.state.global_step == 2
    assert math.isfinite(next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry))
    assert (tmp_path / "out" / "adapter_config.json").exists()
