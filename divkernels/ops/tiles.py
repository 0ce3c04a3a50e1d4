"""Addressing of one group's rows and ``G x G`` tiles in memory, shared by every op's kernels: the
valid-row mask, the padded row stride of stored ``S`` / ``K^-1`` (``common.square_shape``), the
16-byte-aligned start of a group's ``emb`` rows, and tile loads and stores."""

from __future__ import annotations

from divkernels.ops.common import ROW_ALIGN, tl, triton

ALIGN = tl.constexpr(ROW_ALIGN)


@triton.jit
def load_valid(mask_ptr, b, idx, G, HAS_MASK: tl.constexpr):
    """bool per index in ``idx``: a real response of group ``b`` (inside G and not masked out)."""
    inside = idx < G
    if HAS_MASK:
        return inside & (tl.load(mask_ptr + b * G + idx, mask=inside, other=0) != 0)
    return inside


@triton.jit
def load_valid_rows(mask_ptr, b, G, HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr):
    """``[BLOCK_G]`` bool: row is a real response of group ``b`` (inside G and not masked out)."""
    return load_valid(mask_ptr, b, tl.arange(0, BLOCK_G), G, HAS_MASK)


@triton.jit
def square_stride(G):
    """Row stride of the kernels' ``[B, G, G]`` matrices: G rounded up to a multiple of ``ROW_ALIGN``
    (``common.padded_row``). Written as ``// ALIGN * ALIGN`` so that the compiler knows it divides by 16 (its
    alignment analysis multiplies divisors) though G is not specialized: every row starts 16-element aligned."""
    return (G + ALIGN - 1) // ALIGN * ALIGN


@triton.jit
def square_at(ptr, b, G):
    """Group ``b``'s ``[G, G]`` matrix in a ``[B, G, square_stride(G)]`` buffer (``common.square_shape``)."""
    return ptr + b * G * square_stride(G)


@triton.jit
def group_start(ptr, b, stride_b, ALIGNED: tl.constexpr):
    """``ptr + b * stride_b``: the first element of group ``b`` of ``emb``. ``stride_b`` is not specialized
    (it changes with G); ``ALIGNED`` (``common.rows_aligned``: the host saw it divide by 16) restates that it
    does, as ``// ALIGN * ALIGN``, so that rows load as vectors as they did when the stride was specialized."""
    if ALIGNED:
        stride_b = stride_b // ALIGN * ALIGN
    return ptr + b * stride_b


@triton.jit
def store_rows(ptr, tile, G, row, BLOCK_G: tl.constexpr):
    """Write the first G rows of a tile to one group's matrix, ``row`` columns each (``row >= G``: the
    columns past G come from the tile's padding, the identity's, zeros), so that no element is left
    unwritten."""
    offs = tl.arange(0, BLOCK_G)
    inside = (offs[:, None] < G) & (offs[None, :] < row)
    tl.store(ptr + offs[:, None] * row + offs[None, :], tile.to(ptr.dtype.element_ty), mask=inside)


@triton.jit
def store_square(ptr, tile, G, BLOCK_G: tl.constexpr):
    """Write a tile's ``[G, G]`` part to one group's matrix with padded rows (``square_stride(G)`` apart)."""
    store_rows(ptr, tile, G, square_stride(G), BLOCK_G)


@triton.jit
def load_square_transposed(ptr, G, BLOCK_G: tl.constexpr):
    """Read the transpose of one group's ``[G, G]`` matrix (of a symmetric one, like ``S``: itself)
    into a tile whose padding is the identity's. Its offsets are not :func:`store_square`'s, so a
    kernel that reads one matrix, works on it and writes another keeps no offsets live in between (the
    logdet fix-up at G = 128, sm_90: 32 bytes spilled with the same offsets, none with these)."""
    offs = tl.arange(0, BLOCK_G)
    inside = (offs[:, None] < G) & (offs[None, :] < G)
    tile = tl.load(ptr + offs[None, :] * square_stride(G) + offs[:, None], mask=inside, other=0.0)
    return tl.where(inside, tile, tl.where(offs[:, None] == offs[None, :], 1.0, 0.0))
