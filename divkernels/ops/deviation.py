"""Deviation of each response from the rest of its group (DDPO/DORPO; reference/diversity.py).

``dev_i = 1/(n-1) sum_{j != i, valid} (1 - S_ij) = (n - sum_{valid j} S_ij) / (n - 1)`` with cosine
``S`` (unit diagonal). Forward: one program per group (Gram -> S -> row sums). Backward: the
shared similarity backward forms ``dL/dS_ij = -g_i / (n - 1)`` for valid ``i, j`` in the kernel.
"""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.ops.common import (
    accumulation_dtype,
    contiguous,
    dot_precision,
    embedding_block,
    group_block,
    new_output,
    num_warps_for,
    rows_aligned,
    square_shape,
    tl,
    triton,
    triton_dtype,
)
from divkernels.ops.similarity import (
    gram_matrix,
    similarity_backward,
    similarity_backward_op,
    similarity_from_gram,
)
from divkernels.ops.tiles import (
    group_start,
    load_valid_rows,
    square_at,
    store_square,
)
from divkernels.validation import DataChecks, check_emb_and_mask


@triton.jit
def deviation_from_similarity(sim, valid):
    """``[BLOCK_G]`` deviation of each valid response (0 at padding) from a cosine ``S`` tile."""
    return deviation_from_row_sums(tl.sum(tl.where(valid[None, :], sim, 0.0), axis=1), valid)


@triton.jit
def deviation_from_row_sums(row_sums, valid):
    """``(n - sum_{j valid} S_ij) / (n - 1)`` on valid rows, 0 at padding; ``row_sums``: the sums."""
    n = tl.sum(valid.to(row_sums.dtype), axis=0)
    return tl.where(valid, (n - row_sums) / tl.maximum(n - 1.0, 1.0), 0.0)


@triton.jit(do_not_specialize=["G", "stride_b"])  # sizes that vary over a run: common.py
def _deviation_forward_kernel(emb_ptr, mask_ptr, dev_ptr, sim_ptr, norms_ptr, G, D, stride_b, stride_g, stride_d,
                              HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                              ACC: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
    gram = gram_matrix(group_start(emb_ptr, b, stride_b, ALIGNED), stride_g, stride_d, valid, D, BLOCK_G, BLOCK_D,
                       ACC, PRECISION)
    sim, norms = similarity_from_gram(gram, valid, 0.0, 0, BLOCK_G)
    tl.store(dev_ptr + b * G + offs, deviation_from_similarity(sim, valid), mask=offs < G)
    store_square(square_at(sim_ptr, b, G), sim, G, BLOCK_G)
    tl.store(norms_ptr + b * G + offs, norms, mask=offs < G)


def deviation_forward(emb: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernel: ``(dev [B, G], S, norms [B, G])``, accumulation dtype (``S`` with padded
    rows: ``common.square_shape``)."""
    batch, group, dim = emb.shape
    acc = accumulation_dtype(emb.dtype)
    dev = new_output((batch, group), acc, emb.device)
    sim = new_output(square_shape(batch, group), acc, emb.device)
    norms = new_output((batch, group), acc, emb.device)
    block_g = group_block(group)
    _deviation_forward_kernel[(batch,)](
        emb, mask, dev, sim, norms, group, dim, *emb.stride(), HAS_MASK=mask is not None, BLOCK_G=block_g,
        BLOCK_D=embedding_block(block_g, dim, emb.dtype), ACC=triton_dtype(acc),
        PRECISION=dot_precision(emb.dtype), ALIGNED=rows_aligned(emb),
        num_warps=num_warps_for(block_g))
    return dev, sim, norms


class DeviationFunction(torch.autograd.Function):
    """Deviation with the Triton forward and the shared similarity backward (one launch each way)."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        dev, sim, norms = deviation_forward(emb, mask)
        ctx.save_for_backward(emb, mask, sim, norms)
        ctx.mark_non_differentiable(norms)
        ctx.set_materialize_grads(False)
        return dev, norms

    @staticmethod
    def backward(ctx, grad_dev: torch.Tensor | None, _grad_norms: torch.Tensor | None):
        emb, mask, sim, norms = ctx.saved_tensors
        if grad_dev is None:
            return None, None
        return similarity_backward(grad_dev, sim, norms, emb, mask, mode=1), None


@torch.library.custom_op("divkernels::deviation", mutates_args=())
def deviation_op(emb: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dev [B, G], S, norms)`` as a custom op for torch.compile (one launch each way)."""
    return deviation_forward(emb, mask)


@deviation_op.register_fake
def _(emb, mask):
    batch, group, _ = emb.shape
    acc = accumulation_dtype(emb.dtype)
    return (emb.new_empty((batch, group), dtype=acc), emb.new_empty(square_shape(batch, group), dtype=acc),
            emb.new_empty((batch, group), dtype=acc))


def _deviation_setup(ctx, inputs: tuple, output: tuple) -> None:
    emb, mask = inputs
    _, sim, norms = output
    ctx.save_for_backward(emb, mask, sim, norms)


def _deviation_op_backward(ctx, grad_dev: torch.Tensor | None, *_unused: torch.Tensor | None):
    emb, mask, sim, norms = ctx.saved_tensors
    if grad_dev is None:
        return None, None
    return similarity_backward_op(grad_dev, None, None, sim, norms, emb, mask, "cosine", None, 1), None


deviation_op.register_autograd(_deviation_op_backward, setup_context=_deviation_setup)


def deviation(
    emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """``dev_i = 1/(n-1) * sum_{j != i, valid} (1 - cos(e_i, e_j))``, in [0, 2].

    Args:
        emb: ``[B, G, D]`` response embeddings. mask: ``[B, G]`` bool or None.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: check for NaN/inf and groups with fewer than 2 valid responses.

    Returns:
        ``[B, G]`` float32 (float64 for float64 ``emb``), 0 at padding. Differentiable.
    """
    emb, mask = check_emb_and_mask(emb, mask)
    batch, group, _ = emb.shape
    resolved = resolve_backend(backend, op="deviation", device=emb.device, group_size=group, kernels=("triton",))
    checks = DataChecks(check_inputs)  # nothing below computes a check when it is off

    def valid() -> torch.Tensor:
        return reference.valid_mask(mask, batch, group, emb.device)

    checks.group_size(valid, "deviation")
    if resolved == "triton":
        if torch.compiler.is_compiling():
            dev, _, norms = deviation_op(emb, contiguous(mask))
        else:
            dev, norms = DeviationFunction.apply(emb, contiguous(mask))
        checks.emb(norms, valid)
    else:
        checks.emb(emb, valid)
        dev = reference.deviation(emb, valid())
    checks.raise_if_failed()
    return dev
