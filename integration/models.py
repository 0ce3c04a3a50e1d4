"""Model loading with the fastest attention the machine has."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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


def create_reference_model(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of ``model`` in eval mode (the reference when none is given)."""
    reference_model = copy.deepcopy(model).eval()
    for parameter in reference_model.parameters():
        parameter.requires_grad_(False)
    return reference_model


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without its DDP / accelerate wrappers (``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def prepare_reference_model(model: torch.nn.Module, accelerator: Any, batch_size: int) -> torch.nn.Module:
    """The frozen reference, sharded the way the policy is: a DeepSpeed engine without optimizer under
    ZeRO-3 (partitioned parameters; ZeRO-1/2 shard only optimizer states, so the reference stays whole),
    FSDP2's ``fully_shard`` with the plugin's settings under FSDP2, else placed on the device as is
    (DDP needs no wrapper for a model that is never trained). What TRL does for its reference models."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler", "train_batch_size"):
            config.pop(key, None)
        config["train_micro_batch_size_per_gpu"] = batch_size
        config["gradient_accumulation_steps"] = 1
        zero = config.get("zero_optimization", {})
        config["zero_optimization"] = ({key: value for key, value in zero.items() if value != "auto"}
                                       if zero.get("stage") == 3 else {"stage": 0})
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None
        return engine
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model).eval()
    return accelerator.prepare_model(model, evaluation_mode=True)


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` (under DDP/accelerate wrappers too) is a ``peft`` model with adapters."""
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(unwrapped(model), PeftModel)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model of a ``peft`` model: its adapters off for the duration (TRL's reference for PEFT)."""
    with unwrapped(model).disable_adapter():
        yield


def disable_dropout(model: torch.nn.Module) -> None:
    """Every ``torch.nn.Dropout`` module of ``model`` to ``p = 0`` (what TRL's ``disable_dropout`` does)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
