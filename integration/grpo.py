"""TRL's ``GRPOTrainer`` with its per-token log-probs and entropies from :func:`divkernels.linear_token_logps`.

TRL computes them in ``GRPOTrainer._get_per_token_logps_and_entropies``; this subclass replaces only that
method: the backbone runs with the LM head hooked to an empty slice (no logits), and the last hidden
states of the completion positions go through the head in chunks (``linear_token_logps(stats=True)``: the
log-prob of each completion token and the entropy of its distribution, both with gradient). Everything
else is TRL's: the loss, the entropy bonus (``GRPOConfig.entropy_coef``, adaptive or not), the
high-entropy token mask (``top_entropy_quantile``), the metrics. With the same seed the two trainers
take the same steps (within the rounding of the two chunked paths).

The model must have a plain linear LM head (no logit softcapping or scaling, unsharded): otherwise, and
for multimodal inputs, the MoE load-balancing loss or ``cast_lm_head_to_fp32``, the call goes to TRL's own
path (with a warning once).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from trl import GRPOTrainer

from divkernels.integration.preference import head_inputs
from divkernels.ops.linear_logps import linear_token_logps


class LinearLogpsGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose log-probs and entropies come from :func:`divkernels.linear_token_logps`.

    Takes TRL's arguments unchanged, plus ``chunk_size`` (token rows per LM-head chunk; None: the op's
    default) and ``linear_backend`` (``"auto"``: Triton on CUDA, the chunked PyTorch path on CPU).
    """

    def __init__(self, *args: Any, chunk_size: int | None = None, linear_backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.linear_chunk_size, self.linear_backend = chunk_size, linear_backend
        self._warned_fallback = False

    def _own_path_reason(self, compute_aux_loss: bool, extras: dict[str, Any]) -> str | None:
        """Why TRL's path serves this call (None: divkernels' does)."""
        if compute_aux_loss:
            return "the MoE load-balancing loss"
        if any(value is not None for value in extras.values()):
            return "multimodal inputs"
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            return "cast_lm_head_to_fp32=True"
        return None

    def _get_per_token_logps_and_entropies(self, model: torch.nn.Module, input_ids: torch.Tensor,
                                           attention_mask: torch.Tensor, logits_to_keep: int,
                                           batch_size: int | None = None, compute_entropy: bool = False,
                                           compute_aux_loss: bool = False, **extras: Any
                                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        reason = self._own_path_reason(compute_aux_loss, extras)
        if reason is None:
            try:
                return self._linear_logps(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                          compute_entropy)
            except ValueError as error:  # output_head: not a plain linear head
                reason = str(error)
        if not self._warned_fallback:
            warnings.warn(f"LinearLogpsGRPOTrainer uses TRL's log-probs here: {reason}", stacklevel=2)
            self._warned_fallback = True
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                          batch_size, compute_entropy, compute_aux_loss, **extras)

    def _linear_logps(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      logits_to_keep: int, batch_size: int | None, compute_entropy: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """``([B, K] log-probs, [B, K] entropies or None, None)`` of the last ``K = logits_to_keep``
        positions' next tokens, 0 where the token is padding (as TRL's fused head gives them)."""
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, attention = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                hidden, head = head_inputs(model, {"input_ids": ids, "attention_mask": attention})
            # position t predicts token t + 1: the completion's K tokens are predicted by positions -K-1 .. -2
            hidden = hidden[:, -logits_to_keep - 1:-1]
            targets = ids[:, -logits_to_keep:]
            mask = attention[:, -logits_to_keep:].bool()
            token = linear_token_logps(hidden, head.weight, targets, mask, bias=head.bias, temperature=self.temperature,
                                       chunk_size=self.linear_chunk_size, stats=compute_entropy,
                                       backend=self.linear_backend, check_inputs=False)
            logps.append(token.logps)
            if compute_entropy:
                entropies.append(torch.where(mask, token.entropy, 0.0))
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None
