"""The group preference loss straight from the policy's last hidden states: no logits ever exist.

:func:`divkernels.ops.linear_logps.token_outputs` gives every response's token log-probs chunk by
chunk through the LM head; the sequence sums (and ORPO's NLL over another token mask) are ``O(B G T)``
reductions of them, and :func:`divkernels.group_preference_loss` takes it from there. Gradients run
back through the same chunks (the head's GEMMs recomputed per chunk), so peak extra memory is one
``[chunk, V]`` logits buffer however many responses and tokens a batch holds.
"""

from __future__ import annotations

from typing import Any

import torch

from divkernels.ops.group_loss import group_preference_loss
from divkernels.ops.linear_logps import token_outputs
from divkernels.reference import POOLINGS, pool_hidden_states, sequence_logps
from divkernels.types import LossOutput
from divkernels.validation import check_choice, check_float_tensor


def linear_backend(backend: str) -> str:
    """The linear op's backend for a loss ``backend``: it has a Triton kernel only (``"cuda"`` -> Triton)."""
    return "triton" if backend == "cuda" else backend


def group_preference_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    emb: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    group_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "sum",
    pooling: str | None = None,
    nll_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
    **loss_options: Any,
) -> LossOutput:
    """:func:`divkernels.group_preference_loss` of the policy log-probs of ``B x G`` responses computed
    from their hidden states through the LM head, without materializing the logits.

    Args:
        hidden: ``[B, G, T, H]`` last hidden states of every response (prompt positions included).
        weight: ``[V, H]`` LM head, hidden's dtype. bias: ``[V]`` or None.
        targets: ``[B, G, T]`` int64 id of the token each position predicts.
        mask: ``[B, G, T]`` bool, the tokens scored (completion tokens); padded responses may hold anything.
        rewards: ``[B, G]`` quality scores. ref_logps: ``[B, G]`` reference log-probs (e.g. from
            :func:`divkernels.linear_logps` on the reference model's hidden states under ``no_grad``).
        emb: ``[B, G, D]`` response embeddings, or None with ``pooling``.
        group_mask: ``[B, G]`` bool, real responses (the loss's ``mask``); None: all.
        temperature, reduction, chunk_size: as in :func:`divkernels.linear_logps` (``reduction="mean"``
            for orpo and simpo, which score a response by its mean token log-prob).
        pooling: ``"mean"`` or ``"last"``: ``emb`` is the pooled ``hidden`` over ``mask`` (in float32,
            with gradient); None: use ``emb`` as given.
        nll_mask: ``[B, G, T]`` bool, the tokens of the NLL term (ORPO/CPO: every predicted token,
            prompt included): ``nll_logps`` and ``nll_tokens`` come from the same token log-probs.
        backend: for the loss (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``); the linear
            part runs on Triton for ``"triton"``/``"cuda"``, the chunked PyTorch path for ``"reference"``.
        **loss_options: every other keyword of :func:`divkernels.group_preference_loss`.

    Returns:
        :class:`divkernels.LossOutput` of the loss.
    """
    hidden = check_float_tensor("hidden", hidden, 4, "[B, G, T, H]")
    batch, group, length, width = hidden.shape
    if pooling is not None:
        check_choice("pooling", pooling, POOLINGS)
        if emb is not None:
            raise ValueError("pass emb or pooling, not both: pooling makes emb from hidden")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor [B, G, T] of token ids, got {type(targets).__name__}")
    for name, value, optional in (("mask", mask, False), ("nll_mask", nll_mask, True)):
        if not (optional and value is None) and (not isinstance(value, torch.Tensor) or value.dtype != torch.bool):
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{name} must be a bool tensor [B, G, T]{' or None' if optional else ''}, got {kind}; "
                            f"pass {name}.bool() for a 0/1 mask")
    for name, value in (("targets", targets), ("mask", mask), ("nll_mask", nll_mask)):
        if isinstance(value, torch.Tensor) and tuple(value.shape) != (batch, group, length):
            raise ValueError(f"{name} must be [B, G, T] = [{batch}, {group}, {length}], got {tuple(value.shape)}")
    if group_mask is not None and (not isinstance(group_mask, torch.Tensor) or group_mask.dtype != torch.bool
                                   or tuple(group_mask.shape) != (batch, group)):
        raise ValueError(f"group_mask must be a bool tensor [B, G] = [{batch}, {group}] or None")
    rows = batch * group
    counted = mask if group_mask is None else mask & group_mask[..., None]
    nll = None if nll_mask is None else nll_mask & counted.any(-1, keepdim=True)  # real responses only
    scored = counted if nll is None else counted | nll
    token = token_outputs(hidden.reshape(rows, length, width), weight, targets.reshape(rows, length),
                          scored.reshape(rows, length), bias=bias, temperature=temperature, chunk_size=chunk_size,
                          backend=linear_backend(backend), check_inputs=check_inputs)
    token_logps = token.logps.view(batch, group, length)
    policy_logps = sequence_logps(token_logps, counted, reduction)
    if nll is not None:
        loss_options["nll_logps"] = sequence_logps(token_logps, nll, "sum")
        loss_options["nll_tokens"] = nll.sum(-1).clamp_min(1).to(policy_logps.dtype)
    if pooling is not None:
        emb = pool_hidden_states(hidden.to(policy_logps.dtype).reshape(rows, length, width),
                                 counted.reshape(rows, length), pooling).view(batch, group, width)
    return group_preference_loss(policy_logps, rewards, emb, ref_logps, group_mask, backend=backend,
                                 check_inputs=check_inputs, **loss_options)
