"""Model loading with the fastest attention the machine has."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch


def attention_implementation() -> str:
    """``"flash_attention_2"`` when flash-attn is installed and a GPU is present, else ``"sdpa"``."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with :func:`attention_implementation` (overridable).

    flash-attention 2 needs bf16/fp16 weights, so with it ``torch_dtype`` defaults to bfloat16.
    """
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("attn_implementation", attention_implementation())
    if kwargs["attn_implementation"] == "flash_attention_2":
        kwargs.setdefault("dtype", torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
