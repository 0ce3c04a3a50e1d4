"""``DiversityCallback``: track how diverse (and how correct) a model's samples are during training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

import divkernels as dk
from divkernels.integration.distributed import is_distributed, sharded_parameters
from divkernels.integration.embeddings import SentenceEncoder
from divkernels.reference import mean_offdiagonal_similarity

logger = logging.get_logger(__name__)


def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[str], num_samples: int, *,
                       max_new_tokens: int, generation_kwargs: dict[str, Any] | None = None) -> list[list[str]]:
    """``num_samples`` sampled completions per prompt (``[P][k]`` strings), special tokens removed."""
    options = {"do_sample": True, "max_new_tokens": max_new_tokens, "num_return_sequences": num_samples,
               "pad_token_id": tokenizer.pad_token_id, **(generation_kwargs or {})}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    with torch.no_grad():
        generated = model.generate(**batch, **options)
    model.train(was_training)
    texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[index * num_samples:(index + 1) * num_samples] for index in range(len(prompts))]


def diversity_metrics(samples: list[list[str]], embed: Callable[[Sequence[str]], torch.Tensor], *,
                      prompts: Sequence[str] | None = None, verifier: Callable[[str, str], bool] | None = None,
                      eps: float = 1e-4, ngram: int = 2) -> dict[str, float]:
    """Diversity (and, with a verifier, quality) of ``[P][k]`` sampled completions.

    ``mean_similarity`` (cosine, off-diagonal), ``logdet`` of ``S + eps I``, ``vendi`` and
    ``distinct_{n}`` (per prompt, then averaged); with ``verifier(prompt, completion)``: ``pass@1``
    (share correct), ``pass@k`` (share of prompts with a correct sample) and
    ``distinct_correct@k`` (distinct correct samples per prompt).
    """
    count, k = len(samples), len(samples[0])
    emb = embed([text for group in samples for text in group]).to(torch.float32).view(count, k, -1)
    full = torch.ones(count, k, dtype=torch.bool, device=emb.device)
    metrics = {
        "mean_similarity": mean_offdiagonal_similarity(dk.pairwise_similarity(emb), full).item(),
        "logdet": dk.logdet_diversity(emb, eps=eps).mean().item(),
        "vendi": dk.vendi_score(emb).mean().item(),
        f"distinct_{ngram}": sum(dk.distinct_n(group, ngram) for group in samples) / count,
    }
    if verifier is not None:
        if prompts is None:
            raise ValueError("a verifier needs the prompts")
        correct = [[bool(verifier(prompt, text)) for text in group] for prompt, group in zip(prompts, samples,
                                                                                               strict=True)]
        metrics["pass@1"] = sum(map(sum, correct)) / (count * k)
        metrics["pass@k"] = sum(any(row) for row in correct) / count
        metrics["distinct_correct@k"] = sum(len({text for text, ok in zip(group, row, strict=True) if ok})
                                            for group, row in zip(samples, correct, strict=True)) / count
    return metrics


class DiversityCallback(TrainerCallback):
    """Every ``every_n_steps`` steps, sample ``num_samples`` completions for each prompt of a fixed
    set, embed them and log diversity metrics (and pass@1 / pass@k with a ``verifier``) through
    the trainer's own ``log`` (so they reach TensorBoard / W&B like the trainer's metrics).

    Drop-in for any ``transformers.Trainer``: ``trainer.add_callback(DiversityCallback(trainer, prompts))``.

    Args:
        trainer: the trainer whose model is sampled and whose ``log`` receives the metrics.
        prompts: the fixed prompt set.
        num_samples: completions per prompt (``k``).
        every_n_steps: evaluation interval in optimizer steps; also evaluated before training.
        embed: ``texts -> [N, D]``; default the bundled all-MiniLM-L6-v2 encoder.
        verifier: ``(prompt, completion) -> bool`` for pass@1 / pass@k.
        max_new_tokens, generation_kwargs: for ``model.generate``.
        prefix: metric name prefix.

    The metrics are a record of their own in ``state.log_history`` at their step; the trainer's own
    record of that step (its loss) stays.

    Samples are drawn with the RNG seeded from ``seed`` (default the trainer's ``args.seed``) plus the
    step, inside a forked RNG state: they do not depend on, or disturb, the training randomness.
    Under DDP only the main process samples (every process holds the whole model). With a sharded
    model (FSDP2, FSDP, DeepSpeed ZeRO-3) every process takes part in each forward pass of the
    generation (``synced_gpus=True``) and draws the same samples; the main process logs.
    """

    def __init__(self, trainer: Trainer, prompts: Sequence[str], *, num_samples: int = 8, every_n_steps: int = 100,
                 embed: Callable[[Sequence[str]], torch.Tensor] | None = None,
                 verifier: Callable[[str, str], bool] | None = None, max_new_tokens: int = 64,
                 generation_kwargs: dict[str, Any] | None = None, prefix: str = "diversity_eval/",
                 seed: int | None = None) -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to measure diversity, got {num_samples}")
        if not prompts:
            raise ValueError("DiversityCallback needs at least one prompt")
        self.trainer = trainer
        self.prompts = list(prompts)
        self.num_samples = num_samples
        self.every_n_steps = every_n_steps
        self.embed = embed if embed is not None else SentenceEncoder()
        self.verifier = verifier
        self.max_new_tokens = max_new_tokens
        self.generation_kwargs = generation_kwargs
        self.prefix = prefix
        self.seed = seed

    def _sharded(self) -> bool:
        return is_distributed() and sharded_parameters(self.trainer.model)

    def evaluate(self) -> dict[str, float]:
        """Sample, embed and score now; returns the metrics (prefixed) without logging them. With a
        sharded model every process must call it (they return the same metrics)."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        generation_kwargs = dict(self.generation_kwargs or {})
        if self._sharded():
            generation_kwargs.setdefault("synced_gpus", True)
        seed = (trainer.args.seed if self.seed is None else self.seed) + trainer.state.global_step
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            samples = sample_completions(model, trainer.processing_class, self.prompts, self.num_samples,
                                         max_new_tokens=self.max_new_tokens, generation_kwargs=generation_kwargs)
        metrics = diversity_metrics(samples, self.embed, prompts=self.prompts, verifier=self.verifier)
        return {self.prefix + name: value for name, value in metrics.items()}

    def _evaluate_and_log(self, state: TrainerState, control: TrainerControl) -> None:
        # Under DDP every process holds the whole model: sampling on the main process is enough
        # (Trainer.log reports from there only). A sharded model needs every process to generate.
        if self._sharded():
            metrics = self.evaluate()
            if state.is_world_process_zero:
                self._log(metrics, control)
            return
        if not state.is_world_process_zero:
            return
        logger.info(f"DiversityCallback: sampling {self.num_samples} completions for {len(self.prompts)} prompts "
                    f"at step {state.global_step}")
        self._log(self.evaluate(), control)

    def _log(self, metrics: dict[str, float], control: TrainerControl) -> None:
        """Log ``metrics`` as their own record at this step. ``Trainer.log`` clears ``control.should_log``
        (the callback handler's ``on_log``), which would drop the loss the trainer logs after this step's
        callbacks: the flag is put back, so the step gets the trainer's record too."""
        pending = control.should_log
        self.trainer.log(metrics)
        control.should_log = pending  # the object the callback handler returns to the trainer

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._evaluate_and_log(state, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if state.global_step % self.every_n_steps == 0:
            self._evaluate_and_log(state, control)
