"""Pairwise similarity of the responses in each group (reference/similarity.py): the two passes over ``emb``.

Forward: one program per group streams ``emb[b]`` through in ``[BLOCK_G, BLOCK_D]`` tiles and
accumulates the Gram matrix ``E E^T`` in fp32 (``gram_matrix``); ``similarity_from_gram`` turns it
into ``S`` (cosine, dot or RBF) and the row norms. Every other op's forward kernel starts with
these two device functions.

Backward: every op ends its backward in ``similarity_backward``. Whatever the op, its gradient
reaches ``emb`` through ``S``, and for all three kernels ``dL/dE = A E`` with a ``G x G`` matrix
``A`` built from ``G_S = dL/dS`` and the saved ``S`` and norms (``Gsym = G_S + G_S^T``, diagonal
and padding zeroed where ``S`` is constant there):

* cosine ``S_ij = <e_i, e_j> / (n_i n_j)``: ``dE_i = sum_j Gsym_ij e_j / (n_i n_j) - c_i e_i / n_i^2``
  with ``c_i = sum_j Gsym_ij S_ij``, the projection of ``d e_hat_i`` on ``e_hat_i`` (dropped when
  ``|e_i|`` is below the norm floor, where the normalization is a constant scale);
* dot: ``A = Gsym``;
* RBF ``S_ij = exp(-gamma |e_i - e_j|^2)``: with ``M = Gsym * S``, ``A = 2 gamma (M - diag(rowsum M))``.

So the backward launch reads ``emb`` once (at G = 128 the diagonal term reads the slice again, from
cache) and writes ``d emb`` once, one program per (group, slice of D). Each program forms ``A`` from
what is in memory, ``BLOCK_K`` columns at a time at G = 128 (``emb_backward``), so no ``G x G`` tile
but one column chunk is ever live in its registers.
"""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.ops.common import (
    KERNEL_IDS,
    accumulation_dtype,
    as_acc,
    backward_warps,
    column_block,
    contiguous,
    dot_precision,
    embedding_block,
    group_block,
    new_output,
    num_warps_for,
    rows_aligned,
    tl,
    triton,
    triton_dtype,
)
from divkernels.ops.tiles import (
    group_start,
    load_valid,
    load_valid_rows,
    square_at,
    square_stride,
    store_rows,
    store_square,
)
from divkernels.types import KERNELS
from divkernels.validation import DataChecks, check_choice, check_emb_and_mask, check_scalar

NORM_FLOOR = tl.constexpr(reference.NORM_FLOOR)
NORM_LIMIT_32 = tl.constexpr(reference.EMB_NORM_LIMIT[torch.float32])
NORM_LIMIT_64 = tl.constexpr(reference.EMB_NORM_LIMIT[torch.float64])


@triton.jit
def gram_matrix(emb_ptr, stride_g, stride_d, valid, D, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``E E^T`` of one group (``emb_ptr`` at its first element), accumulated in ``ACC`` over D.

    Padded rows are never loaded, so NaN there cannot leak in. Each element is read once.
    float64 takes rank-1 updates on CUDA cores, one column of E at a time: Triton up to 3.8 cannot
    compile an fp64 ``tl.dot`` for sm_80/sm_90 (its fp64 MMA lowering asserts).
    """
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gram = tl.zeros([BLOCK_G, BLOCK_G], dtype=ACC)
    if ACC == tl.float64:  # noqa: SIM300 (ACC is a constexpr, not a constant)
        for d in range(0, D):
            col = tl.load(emb_ptr + offs_g * stride_g + d * stride_d, mask=valid != 0, other=0.0).to(ACC)
            gram += col[:, None] * col[None, :]
        return gram
    for start in range(0, D, BLOCK_D):
        cols = start + offs_d
        ptrs = emb_ptr + offs_g[:, None] * stride_g + cols[None, :] * stride_d
        rows = tl.load(ptrs, mask=valid[:, None] & (cols[None, :] < D), other=0.0)
        if PRECISION == "native":
            # bf16/fp16 operands straight into the tensor cores: each product of two 8/11-bit
            # mantissas is exact in the fp32 accumulator, so this equals the upcast product
            gram += tl.dot(rows, tl.trans(rows), out_dtype=ACC)
        else:
            rows = rows.to(ACC)
            gram += tl.dot(rows, tl.trans(rows), input_precision=PRECISION, out_dtype=ACC)
    return gram


@triton.jit
def unusable_norms(norms, ACC: tl.constexpr):
    """Elementwise: a row norm that is NaN, inf or above ``reference.EMB_NORM_LIMIT`` (its Gram entries could
    overflow ``ACC``); NaN fails the comparison too."""
    if ACC == tl.float64:  # noqa: SIM300 (ACC is a constexpr, not a constant)
        usable = norms <= NORM_LIMIT_64
    else:
        usable = norms <= NORM_LIMIT_32
    return ~usable


@triton.jit
def similarity_from_gram(gram, valid, gamma, KERNEL: tl.constexpr, BLOCK_G: tl.constexpr):
    """``(S, norms)`` from a group's Gram matrix.

    ``S``: cosine (``gram_ij / (max(n_i, floor) max(n_j, floor))``), dot, or RBF
    (``exp(-gamma (n_i^2 + n_j^2 - 2 gram_ij))``); the cosine and RBF diagonal is exactly 1 (reference/__init__.py,
    Numerics) and padded rows/columns are the identity's. ``norms``: raw ``|e_i|``.
    """
    offs = tl.arange(0, BLOCK_G)
    eye = offs[:, None] == offs[None, :]
    squared_rows = tl.sum(tl.where(eye, gram, 0.0), axis=1)
    squared_cols = tl.sum(tl.where(eye, gram, 0.0), axis=0)
    norms = tl.sqrt(squared_rows)
    keep = valid[:, None] & valid[None, :]
    if KERNEL == 0:
        row_norms = tl.maximum(norms, NORM_FLOOR)
        col_norms = tl.maximum(tl.sqrt(squared_cols), NORM_FLOOR)
        sim = gram / (row_norms[:, None] * col_norms[None, :])
        keep = keep & ~eye
    elif KERNEL == 1:
        sim = gram
    else:
        squared_distance = tl.maximum(squared_rows[:, None] + squared_cols[None, :] - 2.0 * gram, 0.0)
        sim = tl.exp(-gamma * squared_distance)
        keep = keep & ~eye
    sim = tl.where(keep, sim, tl.where(eye, 1.0, 0.0))
    return sim, norms


@triton.jit(do_not_specialize=["G", "stride_b"])  # sizes that vary over a run: common.py
def _similarity_forward_kernel(emb_ptr, mask_ptr, sim_ptr, norms_ptr, G, D, gamma: tl.float64,
                               stride_b, stride_g, stride_d,
                               KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr,
                               BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                               ALIGNED: tl.constexpr, PACKED: tl.constexpr):
    """``S`` and the norms of group ``b``. ``PACKED``: ``S`` is ``pairwise_similarity``'s own output, a plain
    ``[B, G, G]`` (rows G apart, the layout every backend returns); otherwise a kernel's padded matrix."""
    gamma = as_acc(gamma, ACC)
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
    gram = gram_matrix(group_start(emb_ptr, b, stride_b, ALIGNED), stride_g, stride_d, valid, D, BLOCK_G, BLOCK_D,
                       ACC, PRECISION)
    sim, norms = similarity_from_gram(gram, valid, gamma, KERNEL, BLOCK_G)
    if PACKED:
        store_rows(sim_ptr + b * G * G, sim, G, G, BLOCK_G)
    else:
        store_square(square_at(sim_ptr, b, G), sim, G, BLOCK_G)
    tl.store(norms_ptr + b * G + offs, norms, mask=offs < G)


@triton.jit
def add_gain_columns(sym, grad_extra_ptr, inv, mask_ptr, b, cols, G, HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr,
                     ACC: tl.constexpr):
    """``sym`` plus columns ``cols`` of ``P + P^T``, ``P = K^-1 diag(w) K^-1`` with ``w_k = h_k / (K^-1)_kk``
    on valid ``k`` (``h = dL/d gains``, ``inv``: the group's saved ``K^-1``), as rank-1 terms
    ``w_k (K^-1[:, k] K^-1[k, cols] + K^-1[k, :]^T K^-1[cols, k]^T)`` whose vectors are read from memory
    (L1-resident): no ``G x G`` tile is ever held in registers.

    Accumulated into ``sym`` (a second ``[BLOCK_G, BLOCK_K]`` accumulator took ~100 more registers at G = 64).
    Not a ``tl.dot`` over blocks of k: IEEE fp32 dots run on the CUDA cores with both operands held whole
    in registers, which took the G = 128 backward from 234 registers and no spills to 255 and 120 bytes
    spilled (sm_90; a TF32 dot would lose ``K^-1`` of an ill-conditioned ``K``). Each k's validity is
    one scalar load (``load_valid``), not a reduction over a vector.
    """
    offs = tl.arange(0, BLOCK_G)
    rows_in, cols_in = offs < G, cols < G
    row = square_stride(G)
    for k in range(0, G):
        valid_k = load_valid(mask_ptr, b, k, G, HAS_MASK)
        w = (tl.load(grad_extra_ptr + b * G + k, mask=valid_k, other=0.0).to(ACC)
             / tl.load(inv + k * row + k, mask=valid_k, other=1.0).to(ACC))
        column_k = tl.load(inv + offs * row + k, mask=rows_in, other=0.0).to(ACC)
        row_k = tl.load(inv + k * row + cols, mask=cols_in, other=0.0).to(ACC)
        row_k_t = tl.load(inv + k * row + offs, mask=rows_in, other=0.0).to(ACC)
        column_k_t = tl.load(inv + cols * row + k, mask=cols_in, other=0.0).to(ACC)
        sym += w * (column_k[:, None] * row_k[None, :] + row_k_t[:, None] * column_k_t[None, :])
    return sym


@triton.jit
def grad_sym_columns(grad_ptr, grad_extra_ptr, inverse_ptr, g, mask_ptr, b, cols, valid, valid_cols, G,
                     stride_sb, stride_si, stride_sj, GRAD: tl.constexpr, HAS_EXTRA: tl.constexpr,
                     HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    """Columns ``cols`` of ``Gsym = G_S + G_S^T`` (``[BLOCK_G, BLOCK_K]``), zero outside valid pairs.

    ``GRAD=0``: ``G_S`` read from memory, the transposed half through swapped strides; ``1``: ``G_S_ij =
    -p_i`` with ``p = dL/d dev / (n - 1)``, so ``Gsym_ij = -(p_i + p_j)``; ``2``: ``G_S = g K^-1 + K^-1
    diag(w) K^-1`` with ``w_k = h_k / (K^-1)_kk`` (``h = dL/d gains``, ``HAS_EXTRA``; ``add_gain_columns``).
    """
    offs = tl.arange(0, BLOCK_G)
    pair = valid[:, None] & valid_cols[None, :]
    if GRAD == 0:
        base = grad_ptr + b * stride_sb
        sym = tl.load(base + offs[:, None] * stride_si + cols[None, :] * stride_sj, mask=pair, other=0.0).to(ACC)
        sym += tl.load(base + cols[None, :] * stride_si + offs[:, None] * stride_sj, mask=pair, other=0.0).to(ACC)
    elif GRAD == 1:
        n = tl.sum(valid.to(ACC), axis=0)
        per_row = tl.load(grad_ptr + b * G + offs, mask=valid, other=0.0).to(ACC) / tl.maximum(n - 1.0, 1.0)
        per_col = tl.load(grad_ptr + b * G + cols, mask=valid_cols, other=0.0).to(ACC) / tl.maximum(n - 1.0, 1.0)
        sym = -(per_row[:, None] + per_col[None, :])
    else:
        inv = square_at(inverse_ptr, b, G)
        row = square_stride(G)
        inside = (offs[:, None] < G) & (cols[None, :] < G)
        sym = g * (tl.load(inv + offs[:, None] * row + cols[None, :], mask=inside, other=0.0).to(ACC)
                   + tl.load(inv + cols[None, :] * row + offs[:, None], mask=inside, other=0.0).to(ACC))
        if HAS_EXTRA:
            sym = add_gain_columns(sym, grad_extra_ptr, inv, mask_ptr, b, cols, G, HAS_MASK, BLOCK_G, ACC)
    return tl.where(pair, sym, 0.0)


@triton.jit
def a_columns(grad_ptr, grad_extra_ptr, inverse_ptr, g, sim_ptr, norms_ptr, mask_ptr, b, cols, valid, valid_cols,
              norms, G, gamma, stride_sb, stride_si, stride_sj, GRAD: tl.constexpr, HAS_EXTRA: tl.constexpr,
              KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    """``(C[:, cols], the row sums that r needs)`` for ``A = C - diag(r)`` (``emb_backward``): cosine
    ``C_ij = Gsym_ij / (n_i n_j)``, dot ``Gsym``, RBF ``2 gamma Gsym_ij S_ij``; the row sums are those of
    ``Gsym_ij S_ij`` (zero for dot). The cosine and RBF diagonal of ``Gsym`` is zeroed (``S`` is 1 there)."""
    offs = tl.arange(0, BLOCK_G)
    sym = grad_sym_columns(grad_ptr, grad_extra_ptr, inverse_ptr, g, mask_ptr, b, cols, valid, valid_cols, G,
                           stride_sb, stride_si, stride_sj, GRAD, HAS_EXTRA, HAS_MASK, BLOCK_G, ACC)
    if KERNEL == 1:
        part = sym
        row_sum = tl.zeros([BLOCK_G], dtype=ACC)
    else:
        sym = tl.where(offs[:, None] == cols[None, :], 0.0, sym)
        inside = (offs[:, None] < G) & (cols[None, :] < G)
        # S: pairwise_similarity's own plain [B, G, G] with GRAD = 0 (its backward), else padded rows
        row = G if GRAD == 0 else square_stride(G)
        weighted = sym * tl.load(sim_ptr + b * G * row + offs[:, None] * row + cols[None, :], mask=inside,
                                 other=0.0).to(ACC)
        row_sum = tl.sum(weighted, axis=1)
        if KERNEL == 0:
            col_norms = tl.load(norms_ptr + b * G + cols, mask=valid_cols, other=1.0).to(ACC)
            part = sym / (norms[:, None] * tl.maximum(col_norms, NORM_FLOOR)[None, :])
        else:
            part = 2.0 * gamma * weighted
    return part, row_sum


@triton.jit
def diagonal_term(row_sum, raw, norms, gamma, KERNEL: tl.constexpr):
    """``r`` of ``A = C - diag(r)``: cosine ``c_i / n_i^2`` (the projection on ``e_hat_i``, dropped below the
    norm floor), RBF ``2 gamma`` times the row sum; dot has none (``row_sum`` is 0)."""
    if KERNEL == 0:
        term = tl.where(raw >= NORM_FLOOR, row_sum, 0.0) / (norms * norms)
    else:
        term = 2.0 * gamma * row_sum
    return term


@triton.jit
def times_rows(part, c0, valid_cols, mask_ptr, b, emb_rows, offs_d, in_d, G, stride_eg, stride_ed,
               HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``part @ emb[c0:c0 + BLOCK_K, offs_d]`` (``[BLOCK_G, BLOCK_D]`` in ``ACC``); padded and masked rows
    read as 0."""
    cols = c0 + tl.arange(0, BLOCK_K)
    if ACC == tl.float64:  # noqa: SIM300 (ACC is a constexpr, not a constant)
        # rank-1 updates part[:, k] emb[k, :] (no fp64 tl.dot: see gram_matrix)
        product = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
        for k in range(c0, tl.minimum(c0 + BLOCK_K, G)):
            a_col = tl.sum(tl.where(cols[None, :] == k, part, 0.0), axis=1)
            valid_k = load_valid(mask_ptr, b, k, G, HAS_MASK)  # row k is real (never load NaN): one scalar load
            row = tl.load(emb_rows + k * stride_eg + offs_d * stride_ed, mask=tl.where(valid_k, in_d, False),
                          other=0.0).to(ACC)
            product += a_col[:, None] * row[None, :]
    else:
        rows = tl.load(emb_rows + cols[:, None] * stride_eg + offs_d[None, :] * stride_ed,
                       mask=valid_cols[:, None] & in_d[None, :], other=0.0)
        if PRECISION == "native":
            product = split_dot(part, rows, ACC)
        else:
            product = tl.dot(part, rows.to(ACC), input_precision=PRECISION, out_dtype=ACC)
    return product


@triton.jit
def emb_backward(b, start, valid, grad_ptr, grad_extra_ptr, inverse_ptr, g, sim_ptr, norms_ptr, mask_ptr, emb_ptr,
                 grad_emb_ptr, G, D, gamma, stride_sb, stride_si, stride_sj, stride_eb, stride_eg, stride_ed,
                 GRAD: tl.constexpr, HAS_EXTRA: tl.constexpr, KERNEL: tl.constexpr, HAS_MASK: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                 PRECISION: tl.constexpr, ALIGNED: tl.constexpr):
    """Write ``dL/d emb[b, :, start:start + BLOCK_D] = A emb`` (module docstring), with ``A = C - diag(r)``
    (``a_columns``, ``diagonal_term``).

    ``BLOCK_K = BLOCK_G``: all of ``A`` in one tile, the diagonal folded in, one dot whose output streams
    to memory. ``BLOCK_K < BLOCK_G`` (G = 128): ``BLOCK_K`` columns of ``C`` at a time meet ``BLOCK_K``
    rows of ``emb`` and accumulate, while the chunks sum ``r``; ``r_i e_i`` is taken off at the end. So
    nothing ``G x G`` is ever held in registers.
    """
    offs = tl.arange(0, BLOCK_G)
    offs_d = start + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    emb_rows = group_start(emb_ptr, b, stride_eb, ALIGNED)
    raw = tl.load(norms_ptr + b * G + offs, mask=valid, other=1.0).to(ACC)
    norms = tl.maximum(raw, NORM_FLOOR)
    if BLOCK_K == BLOCK_G:
        part, row_sum = a_columns(grad_ptr, grad_extra_ptr, inverse_ptr, g, sim_ptr, norms_ptr, mask_ptr, b, offs,
                                  valid, valid, norms, G, gamma, stride_sb, stride_si, stride_sj, GRAD, HAS_EXTRA,
                                  KERNEL, HAS_MASK, BLOCK_G, ACC)
        if KERNEL != 1:
            part -= tl.where(offs[:, None] == offs[None, :], diagonal_term(row_sum, raw, norms, gamma, KERNEL)[:, None],
                             0.0)
        grad_rows = times_rows(part, 0, valid, mask_ptr, b, emb_rows, offs_d, in_d, G, stride_eg, stride_ed, HAS_MASK,
                               BLOCK_G, BLOCK_G, BLOCK_D, ACC, PRECISION)
    else:
        grad_rows = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
        row_sum = tl.zeros([BLOCK_G], dtype=ACC)
        for c0 in range(0, G, BLOCK_K):
            cols = c0 + tl.arange(0, BLOCK_K)
            valid_cols = load_valid(mask_ptr, b, cols, G, HAS_MASK)
            part, sums = a_columns(grad_ptr, grad_extra_ptr, inverse_ptr, g, sim_ptr, norms_ptr, mask_ptr, b, cols,
                                   valid, valid_cols, norms, G, gamma, stride_sb, stride_si, stride_sj, GRAD,
                                   HAS_EXTRA, KERNEL, HAS_MASK, BLOCK_G, ACC)
            row_sum += sums
            grad_rows += times_rows(part, c0, valid_cols, mask_ptr, b, emb_rows, offs_d, in_d, G, stride_eg,
                                    stride_ed, HAS_MASK, BLOCK_G, BLOCK_K, BLOCK_D, ACC, PRECISION)
        if KERNEL != 1:  # the diagonal of A: d e_i -= r_i e_i
            mine = tl.load(emb_rows + offs[:, None] * stride_eg + offs_d[None, :] * stride_ed,
                           mask=valid[:, None] & in_d[None, :], other=0.0).to(ACC)
            grad_rows -= diagonal_term(row_sum, raw, norms, gamma, KERNEL)[:, None] * mine
    out = grad_emb_ptr + b * G * D + offs[:, None] * D + offs_d[None, :]
    tl.store(out, grad_rows.to(grad_emb_ptr.dtype.element_ty), mask=(offs[:, None] < G) & in_d[None, :])


@triton.jit
def split_dot(a, rows, ACC: tl.constexpr):
    """``a @ rows`` for an fp32 ``a`` and half-precision ``rows`` on the half tensor cores.

    ``a = s (hi + lo)`` with ``hi``, ``lo`` in ``rows``' dtype and ``s`` a power of two that puts
    ``max |a|`` near 1 (fp16's range holds it); two dots with fp32 accumulation then carry ``a`` to
    ~2^-16 (bf16) / 2^-22 (fp16) of ``max |a|``, far below the half-precision output's rounding.
    """
    big = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    scale = tl.exp2(tl.ceil(tl.log2(tl.maximum(big, 1e-30))))
    scaled = a / scale
    hi = scaled.to(rows.dtype)
    lo = (scaled - hi.to(ACC)).to(rows.dtype)
    return (tl.dot(hi, rows, out_dtype=ACC) + tl.dot(lo, rows, out_dtype=ACC)) * scale


# dL/dS's strides (GRAD = 0) vary with G and with how it was made (0 for an expanded sum() gradient):
# unspecialized; its rows are not known aligned anyway, so it loads element by element either way
@triton.jit(do_not_specialize=["G", "stride_sb", "stride_si", "stride_sj", "stride_eb"])  # common.py
def _similarity_backward_kernel(grad_ptr, grad_extra_ptr, inverse_ptr, sim_ptr, norms_ptr, mask_ptr, emb_ptr,
                                grad_emb_ptr, G, D, gamma: tl.float64, stride_sb, stride_si, stride_sj, stride_eb,
                                stride_eg, stride_ed, GRAD: tl.constexpr, HAS_GRAD: tl.constexpr,
                                HAS_EXTRA: tl.constexpr, KERNEL: tl.constexpr, HAS_MASK: tl.constexpr,
                                BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                                PRECISION: tl.constexpr, ALIGNED: tl.constexpr):
    """``dL/d emb`` of one (group, D slice), with ``dL/dS`` formed here from what the op's output got:

    ``GRAD=0``: ``dL/dS`` itself (``grad_ptr``, any strides); ``1``: deviation, ``dL/dS_ij = -g_i / (n - 1)``
    for valid ``i, j`` (``grad_ptr`` is ``dL/d dev [B, G]``); ``2``: logdet and gains,
    ``dL/dS = g K^-1 + K^-1 diag(h / diag K^-1) K^-1`` (``grad_ptr``: ``dL/d logdet [B]``,
    ``grad_extra_ptr``: ``dL/d gains [B, G]``, either may be absent).
    """
    gamma = as_acc(gamma, ACC)
    b = tl.program_id(0).to(tl.int64)
    valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
    g = 0.0
    if GRAD == 2:
        if HAS_GRAD:
            g = tl.load(grad_ptr + b).to(ACC)
    emb_backward(b, tl.program_id(1) * BLOCK_D, valid, grad_ptr, grad_extra_ptr, inverse_ptr, g, sim_ptr, norms_ptr,
                 mask_ptr, emb_ptr, grad_emb_ptr, G, D, gamma, stride_sb, stride_si, stride_sj, stride_eb, stride_eg,
                 stride_ed, GRAD, HAS_EXTRA, KERNEL, HAS_MASK, BLOCK_G, BLOCK_K, BLOCK_D, ACC, PRECISION, ALIGNED)


def default_gamma(kernel: str, gamma: float | None, dim: int) -> float:
    """RBF bandwidth (``1 / D`` unless given); unused by the other kernels."""
    return (1.0 / dim if gamma is None else gamma) if kernel == "rbf" else 0.0


def similarity_forward(emb: torch.Tensor, mask: torch.Tensor | None, kernel: str = "cosine",
                       gamma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(S [B, G, G], raw norms [B, G])`` in the accumulation dtype."""
    batch, group, _ = emb.shape
    acc = accumulation_dtype(emb.dtype)
    sim = new_output((batch, group, group), acc, emb.device)
    norms = new_output((batch, group), acc, emb.device)
    launch_forward(emb, mask, kernel, gamma, sim, norms, packed=True)
    return sim, norms


def launch_forward(emb: torch.Tensor, mask: torch.Tensor | None, kernel: str, gamma: float | None,
                   sim: torch.Tensor, norms: torch.Tensor, acc: torch.dtype | None = None,
                   packed: bool = False) -> None:
    """One launch of the forward kernel, one program per group, into ``S`` and ``norms [B, G]``
    (accumulation dtype, or ``acc``, contiguous); ``S`` of ``common.square_shape``, or a plain ``[B, G, G]``
    when ``packed`` (``pairwise_similarity``'s output). The fused loss's split forward launches it too."""
    batch, group, dim = emb.shape
    block_g = group_block(group)
    _similarity_forward_kernel[(batch,)](
        emb, mask, sim, norms, group, dim, default_gamma(kernel, gamma, dim), *emb.stride(),
        KERNEL=KERNEL_IDS[kernel], HAS_MASK=mask is not None, BLOCK_G=block_g,
        BLOCK_D=embedding_block(block_g, dim, emb.dtype), ACC=triton_dtype(acc or accumulation_dtype(emb.dtype)),
        PRECISION=dot_precision(emb.dtype), ALIGNED=rows_aligned(emb), PACKED=packed,
        num_warps=num_warps_for(block_g))


def similarity_backward(grad: torch.Tensor, sim: torch.Tensor, norms: torch.Tensor, emb: torch.Tensor,
                        mask: torch.Tensor | None, kernel: str = "cosine", gamma: float | None = None, *,
                        mode: int = 0, grad_extra: torch.Tensor | None = None,
                        inverse: torch.Tensor | None = None) -> torch.Tensor:
    """``dL/d emb`` ``[B, G, D]`` (emb's dtype, contiguous), one launch.

    ``mode=0``: ``grad`` is ``dL/dS`` ``[B, G, G]`` (any strides); ``1``: ``grad`` is ``dL/d deviation``
    ``[B, G]``; ``2``: ``grad`` is ``dL/d logdet`` ``[B]`` (or None) and ``grad_extra`` ``dL/d gains``
    ``[B, G]`` (or None), with ``inverse`` = ``K^-1``. See ``_similarity_backward_kernel``.
    """
    batch, group, dim = emb.shape
    acc = accumulation_dtype(emb.dtype)
    grad_emb = new_output((batch, group, dim), emb.dtype, emb.device)
    block_g = group_block(group)
    block_d = embedding_block(block_g, dim, emb.dtype)
    grid = (batch, -(-dim // block_d))  # ceil(D / BLOCK_D) slices of D
    strides = grad.stride() if mode == 0 else (0, 0, 0)

    _similarity_backward_kernel[grid](
        grad if mode == 0 else contiguous(grad), contiguous(grad_extra), inverse, sim, norms, mask, emb, grad_emb,
        group, dim, default_gamma(kernel, gamma, dim), *strides, *emb.stride(),
        GRAD=mode, HAS_GRAD=grad is not None, HAS_EXTRA=grad_extra is not None, KERNEL=KERNEL_IDS[kernel],
        HAS_MASK=mask is not None, BLOCK_G=block_g, BLOCK_K=column_block(block_g, packed=mode == 0), BLOCK_D=block_d,
        ACC=triton_dtype(acc), PRECISION=dot_precision(emb.dtype), ALIGNED=rows_aligned(emb),
        num_warps=backward_warps(block_g))
    return grad_emb


class SimilarityFunction(torch.autograd.Function):
    """``S = similarity(emb)`` with the Triton forward and backward; saves ``S`` and the norms."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, mask: torch.Tensor | None, kernel: str,
                gamma: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        sim, norms = similarity_forward(emb, mask, kernel, gamma)
        ctx.save_for_backward(emb, mask, sim, norms)
        ctx.kernel, ctx.gamma = kernel, gamma
        ctx.mark_non_differentiable(norms)
        ctx.set_materialize_grads(False)
        return sim, norms

    @staticmethod
    def backward(ctx, grad_sim: torch.Tensor | None, _grad_norms: torch.Tensor | None):
        emb, mask, sim, norms = ctx.saved_tensors
        if grad_sim is None:
            return None, None, None, None
        return similarity_backward(grad_sim, sim, norms, emb, mask, ctx.kernel, ctx.gamma), None, None, None


# torch.library custom ops: the same launches, opaque to torch.compile (used while it traces).


@torch.library.custom_op("divkernels::similarity_backward", mutates_args=())
def similarity_backward_op(grad: torch.Tensor | None, grad_extra: torch.Tensor | None, inverse: torch.Tensor | None,
                           sim: torch.Tensor, norms: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor | None,
                           kernel: str, gamma: float | None, mode: int) -> torch.Tensor:
    """:func:`similarity_backward` (``dL/d emb``) as a custom op."""
    return similarity_backward(grad, sim, norms, emb, mask, kernel, gamma, mode=mode, grad_extra=grad_extra,
                               inverse=inverse)


@similarity_backward_op.register_fake
def _(grad, grad_extra, inverse, sim, norms, emb, mask, kernel, gamma, mode):
    return emb.new_empty(emb.shape)


@torch.library.custom_op("divkernels::pairwise_similarity", mutates_args=())
def similarity_op(emb: torch.Tensor, mask: torch.Tensor | None, kernel: str,
                  gamma: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S [B, G, G], norms [B, G])``, one launch (:func:`similarity_forward`)."""
    return similarity_forward(emb, mask, kernel, gamma)


@similarity_op.register_fake
def _(emb, mask, kernel, gamma):
    batch, group, _ = emb.shape
    acc = accumulation_dtype(emb.dtype)
    return emb.new_empty((batch, group, group), dtype=acc), emb.new_empty((batch, group), dtype=acc)


def _similarity_setup(ctx, inputs: tuple, output: tuple) -> None:
    emb, mask, ctx.kernel, ctx.gamma = inputs
    ctx.save_for_backward(emb, mask, *output)


def _similarity_op_backward(ctx, grad_sim: torch.Tensor | None, _grad_norms: torch.Tensor | None):
    emb, mask, sim, norms = ctx.saved_tensors
    if grad_sim is None:
        return None, None, None, None
    grad_emb = similarity_backward_op(grad_sim, None, None, sim, norms, emb, mask, ctx.kernel, ctx.gamma, 0)
    return grad_emb, None, None, None


similarity_op.register_autograd(_similarity_op_backward, setup_context=_similarity_setup)


def pairwise_similarity(
    emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kernel: str = "cosine",
    gamma: float | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """Similarity matrix of each group of responses.

    Args:
        emb: ``[B, G, D]`` response embeddings (float32/bfloat16/float16/float64, any strides).
        mask: ``[B, G]`` bool, True for real responses; None means all real.
        kernel: ``"cosine"`` (diagonal exactly 1), ``"dot"`` or ``"rbf"``.
        gamma: RBF bandwidth ``exp(-gamma |e_i - e_j|^2)``, default ``1 / D``.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: check for NaN/inf (one host sync); False skips it.

    Returns:
        ``S`` ``[B, G, G]`` float32 (float64 for float64 ``emb``); padded rows and columns are the
        identity's. Differentiable w.r.t. ``emb``.
    """
    emb, mask = check_emb_and_mask(emb, mask)
    check_choice("kernel", kernel, KERNELS)
    if gamma is not None:
        check_scalar("gamma", gamma, low=0.0, low_open=True)
    batch, group, _ = emb.shape
    resolved = resolve_backend(backend, op="pairwise_similarity", device=emb.device, group_size=group,
                               kernels=("triton",))
    checks = DataChecks(check_inputs)  # nothing below computes a check when it is off

    def valid() -> torch.Tensor:
        return reference.valid_mask(mask, batch, group, emb.device)

    if resolved == "triton":
        function = similarity_op if torch.compiler.is_compiling() else SimilarityFunction.apply
        sim, norms = function(emb, contiguous(mask), kernel, gamma)
        checks.emb(norms, valid)
    else:
        checks.emb(emb, valid)
        sim = reference.pairwise_similarity(emb, valid(), kernel, gamma)
    checks.raise_if_failed()
    return sim
