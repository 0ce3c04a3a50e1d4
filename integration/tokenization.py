"""Tokenization of a prompt and its group of completions, as TRL's preference trainers do it.

The sequences a trainer scores decide its loss, so :class:`~divkernels.integration.DiversityPreferenceTrainer`
builds them as the TRL trainer of the same loss would (TRL 1.x; the rules below are read from its
``DPOTrainer._prepare_dataset`` and ``DataCollatorForPreference``, and from the ``tokenize_row`` of
``ORPOTrainer`` / ``CPOTrainer``):

* ``"dpo"`` (DPO and IPO): standard rows get the EOS *text* appended to each completion that does
  not end with it; ``prompt`` and ``prompt + completion`` are tokenized as texts (with the
  tokenizer's special tokens, e.g. its BOS), conversational rows through the chat template (the
  prompt with the generation prompt); the completion starts where the two token lists diverge
  (a group takes the shortest common prefix over its completions, TRL the shorter of chosen and
  rejected). Sequences longer than ``max_length`` are truncated by ``truncation_mode`` in the
  collator, and groups whose prompt alone fills ``max_length`` are dropped (``keep_start``).
* ``"orpo"`` (ORPO and CPO/SimPO): conversational rows are first rendered as text by the chat
  template; the prompt is tokenized without special tokens, each completion as the tail of
  ``prompt + completion`` (the last prompt token goes with the completion when the tokenizer
  merges across the boundary); the BOS token is prepended and the EOS token appended where
  missing, and a completion is cut so that prompt + completion fit ``max_length`` (a group whose
  prompt alone fills it is dropped: no completion token is left).

Our own additions, off by default: ``max_prompt_length`` (keep the prompt's last tokens) and
``max_completion_length`` (keep a completion's first tokens), applied before TRL's rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import takewhile
from typing import Any

# The TRL trainer whose tokenization each loss follows.
TOKENIZATION = {"dpo": "dpo", "ipo": "dpo", "orpo": "orpo", "simpo": "orpo", "dpo_listwise": "dpo"}
TRUNCATION_MODES = ("keep_start", "keep_end")


def is_conversational(value: Any) -> bool:
    """A list of chat messages (``{"role", "content"}`` dicts), as TRL's conversational rows."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def common_prefix_length(first: Sequence[Any], second: Sequence[Any]) -> int:
    """Number of leading elements two sequences share."""
    return sum(1 for _ in takewhile(lambda pair: pair[0] == pair[1], zip(first, second, strict=False)))


def _generation_prompt(messages: list[dict[str, Any]]) -> dict[str, bool]:
    """Render a prompt ready for the assistant to answer (TRL: continue a final assistant message)."""
    if messages[-1]["role"] == "assistant":
        return {"add_generation_prompt": False, "continue_final_message": True}
    return {"add_generation_prompt": True, "continue_final_message": False}


def _ids(encoding: Any) -> list[int]:
    """``input_ids`` of a tokenizer call or ``apply_chat_template(..., return_dict=True)``."""
    ids = encoding["input_ids"] if isinstance(encoding, dict) or hasattr(encoding, "keys") else encoding
    return list(ids)


def tokenize_group_dpo(tokenizer: Any, prompt: Any, completions: Sequence[Any]) -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [completion_ids])`` as TRL's DPOTrainer tokenizes (see the module docstring)."""
    if is_conversational(prompt):
        prompt_ids = _ids(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                        add_generation_prompt=True))
        full = [_ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True))
                for completion in completions]
    else:
        eos = tokenizer.eos_token or ""
        texts = [completion if completion.endswith(eos) else completion + eos for completion in completions]
        prompt_ids = _ids(tokenizer(text=prompt))
        full = [_ids(tokenizer(text=prompt + text)) for text in texts]
    prompt_length = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:prompt_length], [ids[prompt_length:] for ids in full]


def render_conversational(tokenizer: Any, prompt: list[dict[str, Any]],
                          completions: Sequence[list[dict[str, Any]]]) -> tuple[str, list[str]]:
    """Prompt and completions as texts through the chat template (TRL's ``maybe_apply_chat_template``):
    the prompt text is the part every ``prompt + completion`` rendering shares with it."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, **_generation_prompt(prompt))
    full = [tokenizer.apply_chat_template(prompt + completion, tokenize=False) for completion in completions]
    shared = min([len(prompt_text)] + [common_prefix_length(prompt_text, text) for text in full])
    prompt_text = prompt_text[:shared]
    return prompt_text, [text[shared:] for text in full]


def _answer_tokens(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` of ``prompt + answer`` tokenized as one text, without special tokens:
    ``enc(prompt + answer)`` split after ``enc(prompt)``, one token earlier if the last prompt token
    merged with the answer's first characters."""
    full = _ids(tokenizer(prompt + answer, add_special_tokens=False))
    prompt_ids = _ids(tokenizer(prompt, add_special_tokens=False))
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def tokenize_group_orpo(tokenizer: Any, prompt: Any, completions: Sequence[Any],
                        max_length: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """``([prompt_ids per completion], [completion_ids])`` as TRL's ORPO/CPO trainers tokenize (module docstring)."""
    if is_conversational(prompt):
        prompt, completions = render_conversational(tokenizer, prompt, completions)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts, answers = [], []
    for completion in completions:
        prompt_ids, answer_ids = _answer_tokens(tokenizer, prompt, completion)
        if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids = [bos, *prompt_ids]
        if eos is not None and (not answer_ids or answer_ids[-1] != eos):
            answer_ids = [*answer_ids, eos]
        if max_length is not None and len(prompt_ids) + len(answer_ids) > max_length:
            answer_ids = answer_ids[:max(0, max_length - len(prompt_ids))]
        prompts.append(prompt_ids)
        answers.append(answer_ids)
    return prompts, answers


def tokenize_group(tokenizer: Any, prompt: Any, completions: Sequence[Any], style: str, *,
                   max_length: int | None = None, max_prompt_length: int | None = None,
                   max_completion_length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Per completion ``(prompt_ids, completion_ids)`` in the tokenization ``style`` (``"dpo"`` / ``"orpo"``)."""
    if style == "dpo":
        prompt_ids, answers = tokenize_group_dpo(tokenizer, prompt, completions)
        prompts = [prompt_ids] * len(answers)
    else:
        prompts, answers = tokenize_group_orpo(tokenizer, prompt, completions, None)
    if max_prompt_length is not None:
        prompts = [ids[-max_prompt_length:] if max_prompt_length > 0 else [] for ids in prompts]
    if max_completion_length is not None:
        answers = [ids[:max_completion_length] for ids in answers]
    if style == "orpo" and max_length is not None:
        answers = [ids[:max(0, max_length - len(p))] if len(p) + len(ids) > max_length else ids
                   for p, ids in zip(prompts, answers, strict=True)]
    return prompts, answers


def truncate(ids: list[int], mask: list[int], max_length: int | None, mode: str) -> tuple[list[int], list[int]]:
    """TRL's collator truncation of a ``prompt + completion`` sequence and its completion mask."""
    if max_length is None or len(ids) <= max_length:
        return ids, mask
    if mode == "keep_start":
        return ids[:max_length], mask[:max_length]
    return ids[-max_length:], mask[-max_length:]
