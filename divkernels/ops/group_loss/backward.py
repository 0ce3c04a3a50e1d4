"""Step 3 of the fused loss: one launch, one program per (group, slice of D), scales the saved
per-response gradient by the upstream gradient (and the NLL term's), writes the gradients of the
policy, reference and NLL log-probs in their dtypes and, when ``emb`` needs one, the regularizer's
``dL/dS = -alpha / B * g * K^{-1}`` through the shared similarity backward (reading ``emb`` once)."""

from __future__ import annotations

import functools

import torch

from divkernels.backends import cuda as cuda_backend
from divkernels.loss_config import LossConfig
from divkernels.ops.common import (
    as_acc,
    backward_warps,
    column_block,
    dot_precision,
    embedding_block,
    group_block,
    new_output,
    rows_aligned,
    tl,
    triton,
    triton_dtype,
)
from divkernels.ops.group_loss.pair_math import COL_NLL_TOKENS, COL_PAIRS, COL_WEIGHT_SUM
from divkernels.ops.similarity import (
    emb_backward,
)
from divkernels.ops.tiles import (
    load_valid_rows,
)
from divkernels.types import REFERENCE_LOSSES


@triton.jit(do_not_specialize=["G", "stride_eb"])  # sizes that vary over a run: common.py
def _group_loss_backward_kernel(
    grad_loss_ptr, totals_ptr, grad_sum_ptr, chosen_counts_ptr, grad_policy_ptr, grad_ref_ptr, grad_nll_ptr,
    inverse_ptr, sim_ptr, norms_ptr, mask_ptr, emb_ptr, grad_emb_ptr,
    G, D, stride_eb, stride_eg, stride_ed, alpha_over_batch: tl.float64, cpo_alpha: tl.float64,
    DORPO: tl.constexpr, HAS_CPO: tl.constexpr, NLL_TO_POLICY: tl.constexpr, NEED_POLICY: tl.constexpr,
    NEED_REF: tl.constexpr, NEED_NLL: tl.constexpr, EMB_GRAD: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Gradients of group ``b`` from the upstream ``g`` (read on the device): log-probs in the
    programs of D slice 0, ``emb`` (the regularizer) slice by slice."""
    alpha_over_batch = as_acc(alpha_over_batch, ACC)
    cpo_alpha = as_acc(cpo_alpha, ACC)
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    g = tl.load(grad_loss_ptr).to(ACC)
    per_pair = tl.maximum(tl.load(totals_ptr + COL_PAIRS).to(ACC), 1.0)
    if tl.program_id(1) == 0:
        inside = offs < G
        grad = tl.load(grad_sum_ptr + b * G + offs, mask=inside, other=0.0).to(ACC) * (g / per_pair)
        if DORPO or HAS_CPO:
            # d (c NLL) / d nll_logps_k = -c chosen_k / sum_P nll_tokens
            if DORPO:
                coef = tl.load(totals_ptr + COL_WEIGHT_SUM).to(ACC) / per_pair
            else:
                coef = cpo_alpha
            tokens = tl.maximum(tl.load(totals_ptr + COL_NLL_TOKENS).to(ACC), 1e-30)
            chosen = tl.load(chosen_counts_ptr + b * G + offs, mask=inside, other=0.0).to(ACC)
            grad_nll = -chosen * (g * coef / tokens)
            if NLL_TO_POLICY:
                if NEED_POLICY:
                    tl.store(grad_policy_ptr + b * G + offs, (grad + grad_nll).to(grad_policy_ptr.dtype.element_ty),
                             mask=inside)
            else:
                if NEED_POLICY:
                    tl.store(grad_policy_ptr + b * G + offs, grad.to(grad_policy_ptr.dtype.element_ty), mask=inside)
                if NEED_NLL:
                    tl.store(grad_nll_ptr + b * G + offs, grad_nll.to(grad_nll_ptr.dtype.element_ty), mask=inside)
        else:
            if NEED_POLICY:
                tl.store(grad_policy_ptr + b * G + offs, grad.to(grad_policy_ptr.dtype.element_ty), mask=inside)
        if NEED_REF:  # z = pi - ref: the reference's gradient is the pair part's, negated
            tl.store(grad_ref_ptr + b * G + offs, (-grad).to(grad_ref_ptr.dtype.element_ty), mask=inside)
    if EMB_GRAD:  # d (-alpha / B sum_b logdet_b) / dS = -alpha g / B K^-1 on valid pairs (mode 2, no gains)
        valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
        emb_backward(b, tl.program_id(1) * BLOCK_D, valid, inverse_ptr, inverse_ptr, inverse_ptr, -alpha_over_batch * g,
                     sim_ptr, norms_ptr, mask_ptr, emb_ptr, grad_emb_ptr, G, D, 0.0, 0, 0, 0, stride_eb, stride_eg,
                     stride_ed, 2, False, 0, HAS_MASK, BLOCK_G, BLOCK_K, BLOCK_D, ACC, PRECISION, ALIGNED)



@functools.lru_cache(maxsize=256)
def _backward_constants(config: LossConfig, group: int, dim: int, emb_dtype: torch.dtype | None, acc: torch.dtype,
                        needs: tuple[bool, ...], has_mask: bool, aligned: bool) -> dict[str, object]:
    """``needs``: policy, ref, nll gradients, NLL inside policy_logps, emb gradient in Triton; ``aligned``:
    ``common.rows_aligned(emb)``."""
    need_policy, need_ref, need_nll, nll_to_policy, emb_grad = needs
    block_g = group_block(group)
    return dict(DORPO=config.dorpo, HAS_CPO=config.cpo_alpha > 0, NLL_TO_POLICY=nll_to_policy,
                NEED_POLICY=need_policy, NEED_REF=need_ref, NEED_NLL=need_nll, EMB_GRAD=emb_grad,
                HAS_MASK=has_mask, BLOCK_G=block_g, BLOCK_K=column_block(block_g),
                BLOCK_D=embedding_block(block_g, dim, emb_dtype or acc),
                ACC=triton_dtype(acc),
                PRECISION=dot_precision(emb_dtype if emb_dtype is not None else acc), ALIGNED=aligned,
                num_warps=backward_warps(block_g))



def fused_backward(grad_loss: torch.Tensor, saved: tuple[torch.Tensor | None, ...], config: LossConfig,
                   needs: tuple[bool, bool, bool], dtypes: tuple[torch.dtype | None, ...],
                   poison: bool) -> tuple[torch.Tensor | None, ...]:
    """Step 3, one launch (the CUDA backend adds its own emb backward): ``(d policy, d ref, d emb,
    d nll_logps)`` from the upstream ``grad_loss`` (read on the device) and the forward's
    ``saved = (grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse)``; None where not needed."""
    grad_sum, chosen_counts, totals, emb, mask, sim, norms, inverse = saved
    policy_dtype, ref_dtype, nll_dtype = dtypes
    batch, group = grad_sum.shape
    device = grad_sum.device
    need_policy, need_ref, need_nll = needs
    need_ref = need_ref and config.loss in REFERENCE_LOSSES
    need_nll = need_nll and config.has_nll
    grads = {
        "policy": new_output((batch, group), policy_dtype, device, poison) if need_policy else None,
        "ref": new_output((batch, group), ref_dtype, device, poison) if need_ref else None,
        "nll": new_output((batch, group), nll_dtype, device, poison) if need_nll else None,
    }
    emb_in_triton = emb is not None and config.kernel_backend == "triton"
    grad_emb = new_output(emb.shape, emb.dtype, device, poison) if emb_in_triton else None
    dim = emb.shape[2] if emb is not None else 1
    constants = _backward_constants(config, group, dim, None if emb is None else emb.dtype, grad_sum.dtype,
                                    (need_policy, need_ref, need_nll, nll_dtype is None, emb_in_triton),
                                    mask is not None, emb is not None and rows_aligned(emb))
    chunks = -(-dim // constants["BLOCK_D"]) if emb_in_triton else 1  # ceil(D / BLOCK_D)
    _group_loss_backward_kernel[(batch, chunks)](
        grad_loss, totals, grad_sum, chosen_counts, grads["policy"], grads["ref"], grads["nll"],
        inverse, sim, norms, mask, emb, grad_emb, group, dim, *(emb.stride() if emb is not None else (0, 0, 0)),
        config.diversity_alpha / max(batch, 1), config.cpo_alpha, **constants)
    if emb is not None and not emb_in_triton:  # the CUDA extension's own emb backward
        grad_emb = cuda_backend.similarity_backward(sim, norms, inverse, emb, mask, grad_loss,
                                                    -config.diversity_alpha / max(batch, 1))
    return grads["policy"], grads["ref"], grad_emb, grads["nll"]

