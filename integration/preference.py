"""Diversity-aware preference training on group-structured data (DDPO, DORPO, DivPO, DQO-style).

:class:`DiversityPreferenceTrainer` is a ``transformers.Trainer`` that follows TRL's conventions
(a config dataclass extending ``TrainingArguments``, a frozen copy of the model as reference when
none is given, TRL's metric names averaged over the logging interval and logged through
``Trainer.log``, so they reach TensorBoard / W&B like TRL's). Its loss is one call to
:func:`divkernels.group_preference_loss` over a batch of groups. TRL's own ``DPOTrainer`` works on
(chosen, rejected) pair batches with its loss inside one private method, so there is no hook
that could see a whole group; this trainer subclasses ``Trainer`` rather than patch it.

Data, one row per prompt:

* groups: ``{"prompt": str, "completions": [str, ...], "rewards": [float, ...]}``;
* pairs: TRL's ``{"prompt", "chosen", "rejected"}`` rows, turned into groups by
  :func:`pairs_to_groups` (all responses of a prompt form one group, so deviation is computed over
  all of them; the pairs stay as given).

Under ``torchrun`` / ``accelerate launch`` each process gathers every process's groups
(gradients flow back through the gather), so the loss equals the single-process loss.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

import divkernels as dk
from divkernels.integration.distributed import gather_rows, is_distributed, max_over_processes, pad_dim, row_counts
from divkernels.integration.embeddings import SentenceEncoder, pool_hidden_states
from divkernels.integration.models import load_causal_lm
from divkernels.types import DEVIATION_NORMS, DIVERSITIES, LOSSES, PAIR_MODES
from divkernels.validation import check_choice

EMBEDDING_SOURCES = ("encoder", "policy")
POOLINGS = ("mean", "last")
# Losses whose log-probs are mean token log-probs (TRL's ORPO and CPO/SimPO); DPO/IPO sum them.
MEAN_LOGP_LOSSES = ("orpo", "simpo")


@dataclass
class DiversityPreferenceConfig(TrainingArguments):
    """``TrainingArguments`` plus the diversity-aware loss (names as in SPEC 3 / TRL's DPOConfig).

    ``loss_type``: ``"dpo"``, ``"ipo"``, ``"orpo"`` or ``"simpo"``; ``diversity``: ``"none"``,
    ``"deviation"`` (DDPO/DORPO) or ``"logdet_gain"``; ``pairs``: ``"auto"`` (the dataset's
    explicit pairs if it has a ``pairs`` column, else every ``r_i > r_j``), ``"all"``,
    ``"best_worst"`` or ``"divpo"``; ``embedding_source``: ``"encoder"`` (frozen sentence encoder)
    or ``"policy"`` (pooled last hidden states of the response tokens, with gradient).
    """

    beta: float = field(default=0.1, metadata={"help": "DPO/IPO/SimPO temperature."})
    loss_type: str = field(default="dpo", metadata={"help": "dpo, ipo, orpo or simpo."})
    diversity: str = field(default="deviation", metadata={"help": "none, deviation or logdet_gain."})
    pairs: str = field(default="auto", metadata={"help": "auto, all, best_worst, divpo."})
    diversity_alpha: float = field(default=0.0, metadata={"help": "Weight of the -mean logdet regularizer."})
    eps: float = field(default=1e-4, metadata={"help": "Ridge of K = S + eps I."})
    orpo_lambda: float = field(default=0.1, metadata={"help": "ORPO odds-ratio weight (TRL's ORPO beta)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target margin."})
    deviation_norm: str = field(default="mean", metadata={"help": "mean or none."})
    min_deviation: float = field(default=0.0, metadata={"help": "Floor on deviation weights."})
    quality_quantile: float = field(default=0.5, metadata={"help": "DivPO chosen pool: top quantile."})
    embedding_source: str = field(default="encoder", metadata={"help": "encoder or policy."})
    pooling: str = field(default="mean", metadata={"help": "Pooling of policy hidden states: mean or last."})
    max_prompt_length: int | None = field(default=256, metadata={"help": "Prompt tokens kept (from the end)."})
    max_completion_length: int | None = field(default=256, metadata={"help": "Completion tokens kept."})
    kernel_backend: str = field(default="auto", metadata={"help": "divkernels backend for the loss."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collator reads the raw columns."})

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LOSSES)
        check_choice("diversity", self.diversity, DIVERSITIES)
        check_choice("pairs", self.pairs, ("auto", *PAIR_MODES[:-1]))
        check_choice("deviation_norm", self.deviation_norm, DEVIATION_NORMS)
        check_choice("embedding_source", self.embedding_source, EMBEDDING_SOURCES)
        check_choice("pooling", self.pooling, POOLINGS)
        super().__post_init__()

    @property
    def needs_embeddings(self) -> bool:
        return self.diversity != "none" or self.diversity_alpha > 0 or self.pairs == "divpo"


def pairs_to_groups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL pair rows ``{"prompt", "chosen", "rejected"}`` -> one group row per prompt.

    Each prompt's distinct responses form its group and its pairs are kept as ``pairs`` (indices
    into ``completions``). Rewards are ``score_chosen`` / ``score_rejected`` when the rows have
    them (averaged per response), else 1 for chosen and 0 for rejected responses; they only
    matter for pair modes that select pairs by reward.
    """
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        group = groups.setdefault(row["prompt"], {"prompt": row["prompt"], "completions": [], "scores": [],
                                                  "pairs": []})
        indices = []
        for key, default in (("chosen", 1.0), ("rejected", 0.0)):
            text = row[key]
            if text not in group["completions"]:
                group["completions"].append(text)
                group["scores"].append([])
            index = group["completions"].index(text)
            group["scores"][index].append(float(row.get(f"score_{key}", default)))
            indices.append(index)
        group["pairs"].append(indices)
    return [{"prompt": group["prompt"], "completions": group["completions"],
             "rewards": [sum(scores) / len(scores) for scores in group["scores"]], "pairs": group["pairs"]}
            for group in groups.values()]


@dataclass
class GroupPreferenceCollator:
    """Tokenizes a batch of group rows into one batch of ``prompt + completion`` sequences.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (``[N, L]``, right-padded, N the
    number of responses), ``response_mask`` (``[B, G]`` bool), ``rewards`` (``[B, G]``),
    ``completion_texts`` (N strings) and, when the rows have ``pairs``, ``pair_index``
    (``[B, P, 2]``, ``-1`` padded).
    """

    tokenizer: PreTrainedTokenizerBase
    max_prompt_length: int | None = 256
    max_completion_length: int | None = 256

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        group = max(len(row["completions"]) for row in rows)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        sequences, completion_masks, texts = [], [], []
        for row in rows:
            if len(row["completions"]) != len(row["rewards"]):
                raise ValueError(f"a row has {len(row['completions'])} completions but {len(row['rewards'])} rewards")
            prompt_ids = self.tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
            if self.max_prompt_length is not None:
                prompt_ids = prompt_ids[-self.max_prompt_length:]
            for completion in row["completions"]:
                completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
                if self.max_completion_length is not None:
                    completion_ids = completion_ids[:self.max_completion_length]
                sequences.append(prompt_ids + completion_ids)
                completion_masks.append([0] * len(prompt_ids) + [1] * len(completion_ids))
                texts.append(completion)
        length = max(len(sequence) for sequence in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = {
            "input_ids": torch.tensor([s + [pad] * (length - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
            "completion_mask": torch.tensor([m + [0] * (length - len(m)) for m in completion_masks]),
            "response_mask": torch.tensor([[i < len(row["completions"]) for i in range(group)] for row in rows]),
            "rewards": torch.tensor([list(map(float, row["rewards"])) + [0.0] * (group - len(row["rewards"]))
                                     for row in rows]),
            "completion_texts": texts,
        }
        if "pairs" in rows[0]:
            most = max(len(row["pairs"]) for row in rows)
            batch["pair_index"] = torch.tensor([list(row["pairs"]) + [[-1, -1]] * (most - len(row["pairs"]))
                                                for row in rows], dtype=torch.long).view(len(rows), most, 2)
        return batch


def to_groups(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-response ``values [N, ...]`` into ``[B, G, ...]`` at ``mask``; 0 elsewhere (differentiable)."""
    grouped = values.new_zeros((*mask.shape, *values.shape[1:]))
    return grouped.index_put((mask,), values)


def create_reference_model(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of ``model`` in eval mode (what TRL uses when no reference model is given)."""
    reference_model = copy.deepcopy(model).eval()
    for parameter in reference_model.parameters():
        parameter.requires_grad_(False)
    return reference_model


class DiversityPreferenceTrainer(Trainer):
    """Preference training with :func:`divkernels.group_preference_loss` over groups of responses.

    Args:
        model: a causal LM or its name (loaded with flash-attention 2 when available, else SDPA).
        args: :class:`DiversityPreferenceConfig`.
        train_dataset, eval_dataset: group rows (see the module docstring); for pair rows use
            :func:`pairs_to_groups` first.
        processing_class: the tokenizer.
        ref_model: reference model for dpo/ipo; None uses a frozen copy of ``model``.
        encoder: ``texts -> [N, D]`` for ``embedding_source="encoder"``; None loads the bundled
            all-MiniLM-L6-v2 when the loss needs embeddings.
        **kwargs: passed to ``transformers.Trainer`` (callbacks, ...).
    """

    def __init__(self, model: PreTrainedModel | str, args: DiversityPreferenceConfig, train_dataset: Any = None,
                 processing_class: PreTrainedTokenizerBase | None = None, *, eval_dataset: Any = None,
                 ref_model: PreTrainedModel | None = None,
                 encoder: Callable[[Sequence[str]], torch.Tensor] | None = None, **kwargs: Any) -> None:
        if not isinstance(args, DiversityPreferenceConfig):
            raise TypeError("args must be a DiversityPreferenceConfig")
        if isinstance(model, str):
            model = load_causal_lm(model)
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        if args.loss_type in ("dpo", "ipo") and ref_model is None:
            ref_model = create_reference_model(model)
        if args.embedding_source == "encoder" and encoder is None and args.needs_embeddings:
            encoder = SentenceEncoder()
        collator = GroupPreferenceCollator(processing_class, args.max_prompt_length, args.max_completion_length)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.encoder = encoder
        self.ref_model = None
        if args.loss_type in ("dpo", "ipo"):
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _sequence_logps(self, model: torch.nn.Module, inputs: dict[str, Any],
                        pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-response completion log-probs ``[N]`` (sum, or mean for orpo/simpo) and, with
        ``pooled``, the pooled last hidden state of the completion tokens ``[N, H]``."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                        output_hidden_states=pooled)
        logits = outputs.logits[:, :-1].float()
        targets = inputs["input_ids"][:, 1:]
        token_logps = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, -1)
        mask = inputs["completion_mask"][:, 1:].to(token_logps.dtype)
        logps = (token_logps * mask).sum(-1)
        if self.args.loss_type in MEAN_LOGP_LOSSES:
            logps = logps / mask.sum(-1).clamp_min(1.0)
        hidden = None
        if pooled:
            hidden = pool_hidden_states(outputs.hidden_states[-1].float(), inputs["completion_mask"], self.args.pooling)
        return logps, hidden

    def _group_tensors(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """``[B, G]`` log-probs, rewards and mask, ``[B, G, D]`` embeddings and pair indices of this process."""
        args = self.args
        mask = inputs["response_mask"]
        from_policy = args.needs_embeddings and args.embedding_source == "policy"
        logps, pooled = self._sequence_logps(model, inputs, from_policy)
        groups: dict[str, torch.Tensor | None] = {"policy": to_groups(logps, mask), "ref": None, "emb": None,
                                                  "rewards": inputs["rewards"], "mask": mask,
                                                  "pair_index": inputs.get("pair_index")}
        if self.ref_model is not None:
            with torch.no_grad():
                groups["ref"] = to_groups(self._sequence_logps(self.ref_model, inputs, False)[0], mask)
        if from_policy:
            groups["emb"] = to_groups(pooled, mask)
        elif self.encoder is not None:
            groups["emb"] = to_groups(self.encoder(inputs["completion_texts"]).to(logps.device), mask)
        return groups

    @staticmethod
    def _gather_groups(groups: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Every process's groups, padded to a common G (and P), in rank order; autograd-aware."""
        mask, pair_index = groups["mask"], groups["pair_index"]
        device = mask.device
        sizes = max_over_processes([mask.shape[1], 0 if pair_index is None else pair_index.shape[1]], device)
        counts = row_counts(mask.shape[0], device)
        gathered: dict[str, torch.Tensor | None] = {}
        for name, tensor in groups.items():
            if tensor is None:
                gathered[name] = None
                continue
            if name == "pair_index":
                tensor = pad_dim(tensor, 1, sizes[1], -1)
            else:
                tensor = pad_dim(tensor, 1, sizes[0], False if name == "mask" else 0)
            gathered[name] = gather_rows(tensor, counts)[0]
        return gathered

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: int | None = None) -> torch.Tensor | tuple[torch.Tensor, dk.LossOutput]:
        args = self.args
        groups = self._group_tensors(model, inputs)
        if is_distributed():
            groups = self._gather_groups(groups)
        pairs = args.pairs
        pair_index = groups["pair_index"]
        if pairs == "auto":
            pairs = "explicit" if pair_index is not None else "all"
        if pairs != "explicit":
            pair_index = None
        output = dk.group_preference_loss(
            groups["policy"], groups["rewards"], groups["emb"], groups["ref"], groups["mask"],
            loss=args.loss_type, diversity=args.diversity, pairs=pairs, pair_index=pair_index, beta=args.beta,
            orpo_lambda=args.orpo_lambda, simpo_gamma=args.simpo_gamma, deviation_norm=args.deviation_norm,
            min_deviation=args.min_deviation, diversity_alpha=args.diversity_alpha, eps=args.eps,
            quality_quantile=args.quality_quantile, backend=args.kernel_backend)
        mode = "train" if model.training else "eval"
        for name, value in output.log_dict().items():
            self._metrics[mode][name].append(value)
        return (output.loss, output) if return_outputs else output.loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """Evaluation computes the loss (and metrics); there are no labels or logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the loss metrics averaged since the last log (``eval_``-prefixed in evaluation)."""
        mode = "train" if self.model.training else "eval"
        metrics = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
