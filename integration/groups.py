"""Preference rows as groups: TRL pair rows to groups, tokenization of group rows, and the collator
that pads a batch of groups for :class:`divkernels.integration.DiversityPreferenceTrainer`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from divkernels.integration.embeddings import completion_text
from divkernels.integration.tokenization import tokenize_group, truncate

if TYPE_CHECKING:
    from divkernels.integration.preference import DiversityPreferenceConfig


def _prompt_key(prompt: Any) -> str:
    """A hashable key of a prompt (text, or a conversational message list)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def pairs_to_groups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL pair rows ``{"prompt", "chosen", "rejected"}`` -> one group row per prompt.

    Each prompt's distinct responses form its group and its pairs are kept as ``pairs`` (indices
    into ``completions``). Rewards are ``score_chosen`` / ``score_rejected`` when the rows have
    them (averaged per response), else 1 for chosen and 0 for rejected responses; they only
    matter for pair modes that select pairs by reward. Conversational rows work the same way.
    """
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        group = groups.setdefault(_prompt_key(row["prompt"]), {"prompt": row["prompt"], "completions": [],
                                                                "keys": [], "scores": [], "pairs": []})
        indices = []
        for key, default in (("chosen", 1.0), ("rejected", 0.0)):
            completion = row[key]
            completion_key = _prompt_key(completion)
            if completion_key not in group["keys"]:
                group["keys"].append(completion_key)
                group["completions"].append(completion)
                group["scores"].append([])
            index = group["keys"].index(completion_key)
            group["scores"][index].append(float(row.get(f"score_{key}", default)))
            indices.append(index)
        group["pairs"].append(indices)
    return [{"prompt": group["prompt"], "completions": group["completions"],
             "rewards": [sum(scores) / len(scores) for scores in group["scores"]], "pairs": group["pairs"]}
            for group in groups.values()]


def tokenize_rows(dataset: Any, tokenizer: PreTrainedTokenizerBase, args: DiversityPreferenceConfig) -> Any:
    """Add ``prompt_ids`` and ``completion_ids`` (one list per completion) to every group row, as the
    loss's TRL trainer tokenizes (:func:`divkernels.integration.tokenization.tokenize_group`), and
    drop the groups whose prompt alone fills ``max_length`` (as TRL's DPOTrainer does under ``keep_start``
    truncation, and for ORPO/SimPO, whose completions are cut to ``max_length`` minus the prompt): no
    completion token would remain."""
    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        if len(row["completions"]) != len(row["rewards"]):
            raise ValueError(f"a row has {len(row['completions'])} completions but {len(row['rewards'])} rewards")
        prompts, completions = tokenize_group(tokenizer, row["prompt"], row["completions"], args.tokenization,
                                              max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                              max_completion_length=args.max_completion_length)
        return {"prompt_ids": prompts, "completion_ids": completions}

    dataset = dataset.map(tokenize)
    if args.tokenization == "dpo" and args.max_length is not None and args.truncation_mode == "keep_start":
        dataset = dataset.filter(lambda row: len(row["prompt_ids"][0]) < args.max_length)
    if args.tokenization == "orpo":  # the prompt alone fills max_length: no completion token is left
        kept = dataset.filter(lambda row: any(row["completion_ids"]))
        if len(kept) < len(dataset):
            warnings.warn(f"groups whose prompt alone fills max_length={args.max_length} are dropped: no "
                          "completion token is left", UserWarning, stacklevel=2)
        dataset = kept
    return dataset


@dataclass
class GroupPreferenceCollator:
    """Pads a batch of tokenized group rows into one batch of ``prompt + completion`` sequences.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (``[N, L]``, right-padded, N the
    number of responses; sequences truncated to ``max_length`` by ``truncation_mode``; a response left
    without a completion token is left out, masked in its group, with a warning once),
    ``response_mask`` (``[B, G]`` bool), ``rewards`` (``[B, G]``), ``completion_texts`` (N strings,
    for the encoders) and, when the rows have ``pairs``, ``pair_index`` (``[B, P, 2]``, ``-1`` padded).
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        group = max(len(row["completions"]) for row in rows)
        sequences, completion_masks, texts = [], [], []
        kept = [[False] * group for _ in rows]
        for b, row in enumerate(rows):
            for i, (prompt_ids, completion_ids, completion) in enumerate(zip(
                    row["prompt_ids"], row["completion_ids"], row["completions"], strict=True)):
                ids, mask = truncate(list(prompt_ids) + list(completion_ids),
                                     [0] * len(prompt_ids) + [1] * len(completion_ids), self.max_length,
                                     self.truncation_mode)
                if not any(mask):  # no completion token left: the response leaves its group
                    continue
                kept[b][i] = True
                sequences.append(ids)
                completion_masks.append(mask)
                texts.append(completion_text(completion))
        if not sequences:
            raise ValueError(f"no completion token is left in this batch after truncation to max_length="
                             f"{self.max_length} ({self.truncation_mode}): raise max_length")
        dropped = sum(len(row["completions"]) for row in rows) - len(sequences)
        if dropped:
            warnings.warn(f"responses without a completion token after truncation to max_length={self.max_length} "
                          f"({self.truncation_mode}) are masked out of their groups", UserWarning, stacklevel=2)
        length = max(len(sequence) for sequence in sequences)
        batch = {
            "input_ids": torch.tensor([s + [self.pad_token_id] * (length - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
            "completion_mask": torch.tensor([m + [0] * (length - len(m)) for m in completion_masks]),
            "response_mask": torch.tensor(kept),
            "rewards": torch.tensor([list(map(float, row["rewards"])) + [0.0] * (group - len(row["rewards"]))
                                     for row in rows]),
            "completion_texts": texts,
        }
        if "pairs" in rows[0]:  # pairs of a masked-out response go too
            pairs = [[pair for pair in row["pairs"] if kept[b][pair[0]] and kept[b][pair[1]]]
                     for b, row in enumerate(rows)]
            most = max(len(row) for row in pairs)
            batch["pair_index"] = torch.tensor([row + [[-1, -1]] * (most - len(row)) for row in pairs],
                                               dtype=torch.long).view(len(rows), most, 2)
        return batch


def to_groups(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-response ``values [N, ...]`` into ``[B, G, ...]`` at ``mask``; 0 elsewhere (differentiable)."""
    grouped = values.new_zeros((*mask.shape, *values.shape[1:]))
    return grouped.index_put((mask,), values)
