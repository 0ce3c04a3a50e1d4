"""5. Sequence log-probs through the LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divkernels.reference.common import compute_dtype

# ---------------------------------------------------------------------------------------------
# 5. Sequence log-probs through the LM head
# ---------------------------------------------------------------------------------------------


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    """``(hidden @ weight.T + bias) / temperature`` in float32 (float64 for float64 inputs), ``[..., V]``.

    The temperature divides the LM head's whole output, bias included, as TRL's trainers divide the
    model's logits (``logits /= temperature``).
    """
    dtype = compute_dtype(hidden.dtype)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return logits / temperature


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """``[N]`` sum (``"sum"``) or mean (``"mean"``, 0 for a sequence without tokens) of ``[N, T]``
    token log-probs over the tokens where ``mask`` is True (every token for None)."""
    if mask is not None:
        token_logps = torch.where(mask, token_logps, 0.0)
    total = token_logps.sum(-1)
    if reduction == "sum":
        return total
    count = mask.sum(-1) if mask is not None else torch.full_like(total, token_logps.shape[-1])
    return total / count.clamp_min(1).to(total.dtype)


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "sum",
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of ``targets`` under the LM head, the unfused way (all logits at once).

    ``logp_n = sum_t mask_nt * log softmax((h_nt W^T + b) / temperature)[y_nt]`` (or the mean over
    the masked tokens), what TRL's trainers compute from ``model(...).logits``: ``log_softmax`` then
    ``gather``. Holds ``[N, T, V]`` logits in float32: the ground truth of the chunked and fused paths
    in :mod:`divkernels.ops.linear_logps`, which never hold more than one chunk of them.

    Args:
        hidden: ``[N, T, H]`` last hidden states. weight: ``[V, H]`` LM head. bias: ``[V]`` or None.
        targets: ``[N, T]`` int64 token ids in ``[0, V)`` where ``mask`` is True (anything elsewhere).
        mask: ``[N, T]`` bool, the tokens that count; None: all.

    Returns:
        ``[N]`` float32 (float64 for float64 ``hidden``). Differentiable w.r.t. hidden, weight, bias. With
        ``return_entropy``: also each token's entropy ``-sum_v p_v log p_v`` ``[N, T]``, 0 where ``mask`` is False.
    """
    logits = lm_head_logits(hidden, weight, bias, temperature)
    safe_targets = targets if mask is None else torch.where(mask, targets, 0)
    log_probs = logits.log_softmax(-1)
    token_logps = log_probs.gather(-1, safe_targets[..., None])[..., 0]
    logps = sequence_logps(token_logps, mask, reduction)
    if not return_entropy:
        return logps
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropy if mask is None else torch.where(mask, entropy, 0.0)


# Poolings of hidden states into one embedding per response.
POOLINGS = ("mean", "last")


def pool_hidden_states(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pool ``[N, L, H]`` hidden states over the positions where ``mask [N, L]`` is set.

    ``"mean"`` averages them; ``"last"`` takes the last one. Rows with no set position give 0.
    Differentiable w.r.t. ``hidden``.
    """
    weights = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask.to(positions.dtype)).argmax(1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return pooled * mask.any(1, keepdim=True).to(hidden.dtype)
    raise ValueError(f"pooling={pooling!r} is not valid; choose one of 'mean', 'last'")
