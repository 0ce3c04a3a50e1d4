"""What every Triton op shares: the triton import, block sizes, dtypes and output allocation."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference backend works without Triton; backend.py says why Triton cannot run
    triton = SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=lambda value=None: value)

# Ids of the similarity kernels inside the Triton kernels (tl.constexpr).
KERNEL_IDS = {"cosine": 0, "dot": 1, "rbf": 2}
# Smallest tile side tl.dot accepts.
MIN_BLOCK = 16
# Bounded compiles: a training run meets many group sizes G (ragged groups, filtered responses), batch
# sizes B and pair counts P, and Triton compiles one variant per value class of each int argument (== 1,
# % 16 == 0). So no kernel specializes on a size that varies over a run: G, B, P and the batch stride of
# ``emb`` (G * D when contiguous) are ``do_not_specialize``, and each op compiles one variant per padded
# tile (``group_block``: 16, 32, 64, 128), dtype and configuration (tests/test_compile_variants.py counts
# them). What the specialization bought, the layout keeps: the kernels' own [B, G, G] matrices (S, K^-1)
# have rows padded to a multiple of 16 elements (``square_shape``), so rows still load as 16-byte vectors
# (with rows of stride G the G = 128 logdet forward spilled 48-496 bytes and the fused loss's backward
# 32-168 on sm_90, Triton 3.9), and ``rows_aligned`` tells a kernel that ``emb``'s rows start on a
# multiple of 16 elements (``tiles.group_start``), which the unspecialized batch stride no longer says.
# Elements a row start is aligned to: the kernels' padded [B, G, G] rows, emb's rows when ALIGNED (one
# declaration for the host and the kernels: tiles.square_stride, tiles.group_start).
ROW_ALIGN = 16
# Register budget of one program's [BLOCK_G, BLOCK_D] embedding tile (elements): half-precision tiles
# go to the tensor cores as they are; fp32/fp64 tiles take an IEEE dot on the CUDA cores, whose operand
# layouts hold the tile several times over, so they get narrower slices (the compiled sm_90 kernels
# spill at G = 16-64 with 8192, none with 512: benchmarks/results/sm90_kernel_resources.csv).
TILE_ELEMENTS = 8192
WIDE_TILE_ELEMENTS = 512
ENV_POISON = "DIVKERNELS_POISON_OUTPUTS"


@triton.jit
def is_finite(x):
    """Elementwise: neither NaN nor +-inf."""
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def as_acc(x, ACC: tl.constexpr):
    """A float kernel argument in the kernel's accumulation dtype, as exact as that dtype allows.

    A GPU launch passes a Python float as fp32 unless the parameter is annotated, so float arguments
    are declared ``tl.float64`` (0.1 reaches a float64 kernel as 0.1, not as fp32's 0.10000000149) and
    narrowed here once; the interpreter hands over the Python float itself, which the addition takes
    exactly in every Triton (3.6-3.9), where ``tl.cast`` would round it through fp32 first."""
    return (tl.zeros((), ACC) + x).to(ACC)


@triton.jit
def any_bad(flags):
    """1.0 if any element of a ``[BLOCK_G]`` bool vector is set."""
    return tl.where(tl.sum(flags.to(tl.int32), axis=0) > 0, 1.0, 0.0)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1); plain Python, it runs on every launch."""
    return 1 << max(n - 1, 0).bit_length()


def group_block(group: int) -> int:
    """Padded group size inside the kernels: a power of two >= 16."""
    return max(MIN_BLOCK, next_power_of_2(group))


def padded_row(group: int) -> int:
    """Row stride of the kernels' ``[B, G, G]`` matrices: G rounded up to a multiple of 16 (also for a
    symbolic G under ``torch.compile``). ``tiles.square_stride`` computes the same in the kernels."""
    return (group + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN


def square_shape(batch: int, group: int) -> tuple[int, int, int]:
    """Shape of a kernel-written ``[B, G, G]`` matrix with padded rows; ``[..., :G]`` is the matrix."""
    return batch, group, padded_row(group)


def rows_aligned(emb: torch.Tensor) -> bool:
    """``emb``'s batch and row strides are multiples of 16 elements (true for a contiguous ``emb`` whenever
    16 divides D, whatever G is): its rows may load as 16-byte vectors."""
    return emb.stride(0) % ROW_ALIGN == 0 and emb.stride(1) % ROW_ALIGN == 0


def embedding_block(block_g: int, dim: int, emb_dtype: torch.dtype) -> int:
    """Width of the slice of D that one loop step loads: the tile stays within the dtype's budget."""
    budget = TILE_ELEMENTS if emb_dtype in (torch.bfloat16, torch.float16) else WIDE_TILE_ELEMENTS
    return max(MIN_BLOCK, min(budget // block_g, 128, next_power_of_2(dim)))


def column_block(block_g: int, packed: bool = False) -> int:
    """Columns of the backward's ``G x G`` matrix ``A`` per step of ``d emb = A emb``: the whole tile up to
    G = 64 (one dot, the diagonal folded in); 32 at G = 128, so that a ``[128, 32]`` chunk of ``A`` meets
    32 rows of ``emb`` at a time and the whole ``A`` never sits in registers. ``packed``: ``A`` formed from
    ``pairwise_similarity``'s plain ``S`` and ``dL/dS``, whose rows G apart load element by element (each
    element its own address): 16 columns at G = 128 (with 32 it spilled 224 bytes in bf16, sm_90)."""
    if block_g <= 64:
        return block_g
    return 16 if packed else 32


def num_warps_for(block_g: int, heavy: bool = False) -> int:
    """Warps per program, so that each thread holds a bounded share of the ``G x G`` tiles.

    G <= 16: one warp. A 16 x 16 tile is 8 values per thread, every row/column reduction of the
    elimination stays inside the warp (shuffles, no shared memory, no barrier) and the 16-row
    ``tl.dot`` is one warp's MMA tile; more warps would only duplicate it. Larger tiles: 4 / 8 / 16
    warps (32 / 64 / 128), the fewest with which the compiled kernels keep their tiles in registers.
    ``heavy``: the fused loss's whole group forward in one kernel at G = 128, which runs only as the
    float64 fix-up (the forward with embeddings is split there, ``group_loss.split_forward``) and
    without embeddings: 32 warps (64 registers per thread), which spilled half as much as 16.
    """
    if block_g <= 16:
        return 1
    if block_g >= 128 and heavy:
        return 32
    return 4 if block_g <= 32 else 8 if block_g <= 64 else 16


def backward_warps(block_g: int) -> int:
    """Warps of the backward kernels (``d emb = A emb``, A a column chunk at a time): as
    ``num_warps_for`` up to G = 64, and 8 at G = 128. Only ``[G, BLOCK_K]`` chunks and the ``[G, BLOCK_D]``
    output live in registers, which 8 warps hold in ~190-235 registers per thread; 16 warps' cap of 128
    spills (benchmarks/results/sm90_kernel_resources.csv). Either way one program fills an SM's registers."""
    return min(num_warps_for(block_g), 8)


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64 (tests), otherwise float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """How the kernels' ``tl.dot`` takes ``emb`` of this dtype.

    ``"native"``: bf16/fp16 go into the tensor cores as they are (fp32 accumulate; exact for the Gram,
    ``split_dot`` for ``d emb = A emb``); float32 must not go through TF32 (reference/__init__.py, Numerics:
    logdet errors ~5e-2 at cond ~1e6), so ``"ieee"``; float64 stays float64.
    """
    return "native" if dtype in (torch.bfloat16, torch.float16) else "ieee"


def poison_outputs() -> bool:
    """``DIVKERNELS_POISON_OUTPUTS=1``: kernel outputs start as NaN (the CUDA launchers read it too)."""
    return os.environ.get(ENV_POISON, "0") not in ("", "0")


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               poison: bool | None = None) -> torch.Tensor:
    """An output buffer for a kernel to fill; NaN-poisoned when ``DIVKERNELS_POISON_OUTPUTS=1``
    so that tests see any element a kernel failed to write (``poison``: the caller read it already)."""
    if poison_outputs() if poison is None else poison:
        fill = torch.nan if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A contiguous copy (or the tensor itself) for kernels that index ``[B, G]`` inputs as ``b * G + g``;
    None stays None (an absent optional input, e.g. ``mask=None``: every response is real)."""
    return None if tensor is None else tensor.contiguous()
