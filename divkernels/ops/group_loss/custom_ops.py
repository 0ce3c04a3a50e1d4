"""The fused loss as ``torch.library`` custom ops with their registered autograd (opaque to
``torch.compile``: no graph break, capturable by CUDA graphs with ``check_inputs=False``), and
:class:`GroupPreferenceLossFunction`, the same steps for eager calls without the dispatcher.
Optional outputs come back empty (0 elements)."""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.loss_config import CHECK_STATS, METRIC, STATS, LossConfig, LossTensors
from divkernels.ops.common import accumulation_dtype, poison_outputs, square_shape
from divkernels.ops.group_loss.backward import fused_backward
from divkernels.ops.group_loss.checks import raise_kernel_checks
from divkernels.ops.group_loss.launch import fused_forward
from divkernels.types import REFERENCE_LOSSES

# ---------------------------------------------------------------------------------------------
# torch.library custom ops: the same steps, opaque to torch.compile (no graph break, capturable by
# CUDA graphs with check_inputs=False). Optional outputs come back empty (0 elements).
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("divkernels::group_loss_forward", mutates_args=())
def group_loss_forward_op(policy: torch.Tensor, rewards: torch.Tensor, ref: torch.Tensor | None,
                          emb: torch.Tensor | None, mask: torch.Tensor | None, pair_index: torch.Tensor | None,
                          scores: torch.Tensor | None, weights: torch.Tensor | None, lengths: torch.Tensor | None,
                          nll_logps: torch.Tensor | None, nll_tokens: torch.Tensor | None, config: str,
                          store_state: bool, too_few_reason: str) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, metrics, stats, totals, chosen_counts, rejected_counts, grad_sum, sim, norms, inverse)``;
    ``config`` is :attr:`LossConfig.key`. With the config's in-kernel checks a failure raises here."""
    loss_config = LossConfig.from_key(config)
    inputs = LossTensors(policy, rewards, ref, emb, mask, pair_index, scores, weights, lengths, nll_logps,
                         nll_tokens, poison_outputs())
    out, totals, loss, metrics = fused_forward(inputs, loss_config, store_state)
    if loss_config.check_inputs:
        raise_kernel_checks(totals, out.stats, policy.shape[1], too_few_reason or None,
                            None if emb is None else emb.dtype)
    return (loss, metrics, out.stats, totals, out.chosen_counts, out.rejected_counts, out.grad_policy,
            *(policy.new_empty(0, dtype=out.stats.dtype) if state is None else state  # distinct: no aliasing
              for state in (out.sim, out.norms, out.inverse)))


@group_loss_forward_op.register_fake
def _(policy, rewards, ref, emb, mask, pair_index, scores, weights, lengths, nll_logps, nll_tokens, config,
      store_state, too_few_reason):
    loss_config = LossConfig.from_key(config)
    batch, group = policy.shape
    acc = accumulation_dtype(policy.dtype, *((emb.dtype,) if emb is not None else ()))
    num_stats = len(STATS) + (len(CHECK_STATS) if loss_config.check_inputs else 0)

    def new(*shape: int) -> torch.Tensor:
        return policy.new_empty(shape, dtype=acc)

    # the kernels' padded rows (common.square_shape) on Triton; the CUDA extension's [B, G, G]
    square = ((square_shape(batch, group) if loss_config.kernel_backend == "triton" else (batch, group, group))
              if store_state else (0,))
    return (policy.new_empty((), dtype=reference.compute_dtype(policy.dtype)),
            policy.new_empty((len(METRIC),), dtype=torch.float32), new(batch, num_stats), new(num_stats),
            new(batch, group), new(batch, group), new(batch, group), new(*square),
            new(*((batch, group) if store_state else (0,))),
            new(*(square if store_state and loss_config.needs_logdet else (0,))))


@torch.library.custom_op("divkernels::group_loss_backward", mutates_args=())
def group_loss_backward_op(grad_loss: torch.Tensor, grad_sum: torch.Tensor, chosen_counts: torch.Tensor,
                           totals: torch.Tensor, emb: torch.Tensor | None, mask: torch.Tensor | None,
                           sim: torch.Tensor | None, norms: torch.Tensor | None, inverse: torch.Tensor | None,
                           config: str, need_policy: bool, need_ref: bool, need_nll: bool,
                           policy_dtype: torch.dtype, ref_dtype: torch.dtype | None,
                           nll_dtype: torch.dtype | None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d policy, d ref, d emb, d nll_logps)``; empty where not needed."""
    grads = fused_backward(grad_loss, (grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse),
                           LossConfig.from_key(config), (need_policy, need_ref, need_nll),
                           (policy_dtype, ref_dtype, nll_dtype), poison_outputs())
    return tuple(grad_sum.new_empty(0) if grad is None else grad for grad in grads)


@group_loss_backward_op.register_fake
def _(grad_loss, grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse, config, need_policy, need_ref,
      need_nll, policy_dtype, ref_dtype, nll_dtype):
    loss_config = LossConfig.from_key(config)
    shape = grad_sum.shape
    need_ref = need_ref and loss_config.loss in REFERENCE_LOSSES
    need_nll = need_nll and loss_config.has_nll
    return (grad_sum.new_empty(shape if need_policy else (0,), dtype=policy_dtype),
            grad_sum.new_empty(shape if need_ref else (0,), dtype=ref_dtype or grad_sum.dtype),
            grad_sum.new_empty(0) if emb is None else torch.empty_like(emb),
            grad_sum.new_empty(shape if need_nll else (0,), dtype=nll_dtype or grad_sum.dtype))


def _forward_op_setup(ctx, inputs: tuple, output: tuple) -> None:
    policy, _, ref, emb, mask, *_, nll_logps, _, config, store_state, _ = inputs
    _, _, _, totals, chosen_counts, _, grad_sum, sim, norms, inverse = output
    ctx.save_for_backward(grad_sum, chosen_counts, totals, emb if store_state else None, mask,
                          *(state if store_state else None for state in (sim, norms, inverse)))
    ctx.config = config
    ctx.dtypes = (policy.dtype, None if ref is None else ref.dtype, None if nll_logps is None else nll_logps.dtype)
    ctx.set_materialize_grads(False)  # only the loss is differentiable: no zeros for the other nine outputs


def _forward_op_backward(ctx, grad_loss: torch.Tensor | None, *_unused: torch.Tensor | None
                         ) -> tuple[torch.Tensor | None, ...]:
    if grad_loss is None:  # only another output was used
        return (None,) * 14
    grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = group_loss_backward_op(grad_loss, grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse,
                                   ctx.config, need[0], need[2], need[9], *ctx.dtypes)
    # an empty gradient is one the op did not need (or of an empty batch, where None means the same zeros)
    policy, ref, emb_grad, nll = (grad if grad.numel() else None for grad in grads)
    return policy, None, ref, emb_grad, None, None, None, None, None, nll, None, None, None, None


group_loss_forward_op.register_autograd(_forward_op_backward, setup_context=_forward_op_setup)


class GroupPreferenceLossFunction(torch.autograd.Function):
    """The loss, differentiable w.r.t. the policy, reference and NLL log-probs and emb, for eager calls:
    the custom ops' steps (``fused_forward`` / ``fused_backward``) without the dispatcher, whose
    wrappers cost about 120 us of host time per fused forward + backward (``docs/design.md``). The
    non-differentiable outputs (metrics vector, per-group stats, totals, chosen / rejected counts)
    come back in ``inputs.aux``, outside autograd, which would only record them as constants."""

    @staticmethod
    def forward(ctx, policy: torch.Tensor, ref: torch.Tensor | None, emb: torch.Tensor | None,
                nll_logps: torch.Tensor | None, inputs: LossTensors, config: LossConfig,
                store_state: bool) -> torch.Tensor:
        out, totals, loss, metrics = fused_forward(inputs, config, store_state)
        ctx.save_for_backward(out.grad_policy, out.chosen_counts, totals, emb if store_state else None, inputs.mask,
                              out.sim, out.norms, out.inverse)
        ctx.config = config
        ctx.dtypes = (policy.dtype, None if ref is None else ref.dtype, None if nll_logps is None else nll_logps.dtype)
        ctx.poison = inputs.poison
        ctx.set_materialize_grads(False)
        inputs.aux = (metrics, out.stats, totals, out.chosen_counts, out.rejected_counts)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor | None):
        if grad_loss is None:
            return None, None, None, None, None, None, None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        grads = fused_backward(grad_loss, ctx.saved_tensors, ctx.config, needs, ctx.dtypes, ctx.poison)
        return (*grads, None, None, None)
