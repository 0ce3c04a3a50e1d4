"""With diversity off, DiversityPreferenceTrainer equals TRL's trainer of the same loss, step for step.

TRL's ``DPOTrainer`` (``sigmoid`` and ``ipo``), ``ORPOTrainer`` and ``CPOTrainer`` (``simpo``) and
ours train copies of one tiny model on the same pair rows (ours through ``pairs_to_groups``): the
whole dataset per step, plain SGD, two steps, every setting at its default except the optimizer,
the learning rate, the step count, the batch size, logging every step and ``bf16=False`` (both
sides the same). The model has dropout modules, so ``disable_dropout`` matters; one prompt lacks
the BOS token, so ORPO/CPO's BOS rule matters; a rejected response appears in two pairs. Loss,
every metric both log, the gradient norm and the final parameters must agree to 1e-5.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from divkernels.integration import DiversityPreferenceConfig, DiversityPreferenceTrainer, pairs_to_groups
from divkernels.integration.demo import build_tokenizer
from divkernels.ops.linear_logps import token_outputs

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                                            "ignore::DeprecationWarning")]

PAIRS = [
    {"prompt": "<bos> 1 2 =", "chosen": " 3 9 0", "rejected": " 9 9 9"},
    {"prompt": "<bos> 1 2 =", "chosen": " 4 4 4", "rejected": " 9 9 9"},  # " 9 9 9" is rejected twice
    {"prompt": "<bos> 9 =", "chosen": " 1 8 0", "rejected": " 2 2"},
    {"prompt": "1 5 =", "chosen": " 5 5 5", "rejected": " 0 0 1 1"},  # no BOS in the text
    {"prompt": "<bos> 6 =", "chosen": " 2 2 2<eos>", "rejected": " 0 0 7"},  # EOS already there
]
CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": "1 2"}], "chosen": [{"role": "assistant", "content": "3 9 0"}],
     "rejected": [{"role": "assistant", "content": "9 9 9"}]},
    {"prompt": [{"role": "user", "content": "9"}], "chosen": [{"role": "assistant", "content": "1 8 0"}],
     "rejected": [{"role": "assistant", "content": "2 2"}]},
]
# A chat template over the digit vocabulary: " <user text> =" then " <assistant text>"
CHAT_TEMPLATE = ("{% for m in messages %} {{ m['content'] }}{% if m['role'] == 'user' %} ={% endif %}"
                 "{% endfor %}")


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 from a config, with dropout on (``torch.nn.Dropout`` modules)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(build_tokenizer()), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    return GPT2LMHeadModel(config)


COMMON = {"max_steps": 2, "learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant", "logging_steps": 1,
          "bf16": False, "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 0}


def run_trl(loss: str, model: Any, rows: list[dict[str, Any]], tmp_path: Path,
            **overrides: Any) -> tuple[list[dict], Any]:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    common = {**COMMON, "output_dir": str(tmp_path / "trl"), "per_device_train_batch_size": len(rows), **overrides}
    dataset = Dataset.from_list(rows)
    if loss in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(loss_type=["sigmoid" if loss == "dpo" else "ipo"], **common)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    elif loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common), train_dataset=dataset,
                              processing_class=tokenizer)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        trainer = CPOTrainer(model=model, args=CPOConfig(loss_type="simpo", **common), train_dataset=dataset,
                             processing_class=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer.state.log_history, trainer.model


def run_ours(loss: str, model: Any, rows: list[dict[str, Any]], tmp_path: Path,
             **overrides: Any) -> tuple[list[dict], Any]:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    groups = pairs_to_groups(rows)
    args = DiversityPreferenceConfig(output_dir=str(tmp_path / "ours"), loss_type=loss, diversity="none",
                                     per_device_train_batch_size=len(groups), kernel_backend="reference",
                                     **{**COMMON, **overrides})
    trainer = DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(groups),
                                         processing_class=tokenizer)
    trainer.train()
    return trainer.state.log_history, trainer.model


def compare(loss: str, rows: list[dict[str, Any]], tmp_path: Path, ours: dict[str, Any] | None = None,
            **overrides: Any) -> None:
    """``overrides`` go to both trainers, ``ours`` to ours only."""
    trl_history, trl_model = run_trl(loss, tiny_gpt2(), rows, tmp_path, **overrides)
    our_history, our_model = run_ours(loss, tiny_gpt2(), rows, tmp_path, **overrides, **(ours or {}))
    trl_steps = [entry for entry in trl_history if "loss" in entry and "train_runtime" not in entry]
    our_steps = [entry for entry in our_history if "loss" in entry and "train_runtime" not in entry]
    assert len(trl_steps) == len(our_steps) == 2
    for step, (want, got) in enumerate(zip(trl_steps, our_steps, strict=True)):
        shared = sorted((set(want) & set(got)) - {"epoch", "step", "learning_rate"})
        missing = sorted(set(want) - set(got) - {"epoch", "step", "learning_rate", "aux_loss"})
        assert not missing, f"TRL logs {missing} that we do not"
        for name in shared:
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (step, name, got[name], want[name])
    for (name, want), (_, got) in zip(trl_model.named_parameters(), our_model.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    changed = any(not torch.equal(p, q) for p, q in zip(trl_model.parameters(), tiny_gpt2().parameters(), strict=True))
    assert changed  # the two steps moved the weights


@pytest.mark.parametrize("loss", ["dpo", "ipo", "orpo", "simpo"])
def test_defaults_equal_trl_step_for_step(loss: str, tmp_path: Path) -> None:
    compare(loss, PAIRS, tmp_path)


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_conversational_rows_equal_trl(loss: str, tmp_path: Path) -> None:
    compare(loss, CONVERSATIONAL, tmp_path)


@pytest.mark.parametrize(("loss", "overrides"), [
    ("dpo", {"max_length": 6}),  # sequences cut from the end (keep_start)
    ("ipo", {"max_length": 7, "truncation_mode": "keep_end"}),  # ... or from the start
    ("orpo", {"max_length": 6}),  # ORPO/CPO cut the completion so that prompt + completion fit
    ("simpo", {"max_length": 7}),
], ids=["dpo-keep_start", "ipo-keep_end", "orpo", "simpo"])
def test_truncation_equals_trl(loss: str, overrides: dict[str, Any], tmp_path: Path) -> None:
    compare(loss, PAIRS, tmp_path, **overrides)


@pytest.mark.parametrize("ours", [{}, {"fused_linear": True, "linear_chunk_size": 8}], ids=["default", "chunks-of-8"])
@pytest.mark.parametrize("loss", ["dpo", "orpo", "simpo"])
def test_fused_linear_equals_trl(loss: str, ours: dict[str, Any], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Log-probs and logged logit statistics from the LM head's input (by default; and in chunks of 8 token
    rows, several per batch), the logits never formed: still TRL's trainer step for step (loss, metrics,
    weights)."""
    from divkernels.integration import preference

    vocab = tiny_gpt2().config.vocab_size
    calls, logits_seen = [], []
    monkeypatch.setattr(preference, "token_outputs",
                        lambda *args, **kwargs: calls.append(1) or token_outputs(*args, **kwargs))
    real_run_ours = run_ours

    def run_ours_watching(*args: Any, **kwargs: Any) -> tuple[list[dict], Any]:
        def watch(module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.shape[-1] == vocab and output.numel() > 0:
                logits_seen.append(tuple(output.shape))

        handle = torch.nn.modules.module.register_module_forward_hook(watch)
        try:
            return real_run_ours(*args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setitem(globals(), "run_ours", run_ours_watching)
    compare(loss, PAIRS, tmp_path, ours=ours)
    assert len(calls) >= 2 and not logits_seen, (len(calls), logits_seen)


def test_config_defaults_are_trl_defaults(tmp_path: Path) -> None:
    from trl import DPOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    where = {"output_dir": str(tmp_path), "use_cpu": True}  # bf16 defaults to True: CPU autocast here
    ours = DiversityPreferenceConfig(**where)
    dpo, orpo, cpo = DPOConfig(**where), ORPOConfig(**where), CPOConfig(**where)
    for name in ("learning_rate", "logging_steps", "gradient_checkpointing", "bf16", "max_length", "truncation_mode",
                 "beta", "disable_dropout"):
        assert getattr(ours, name) == getattr(dpo, name), name
    assert (ours.orpo_lambda, ours.max_length) == (orpo.beta, orpo.max_length)
    assert (ours.cpo_alpha, ours.simpo_gamma, ours.beta) == (cpo.cpo_alpha, cpo.simpo_gamma, cpo.beta)
