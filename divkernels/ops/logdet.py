"""Log-determinant (DPP) diversity of each group and leave-one-out gains (DQO; reference/diversity.py).

Forward, one program per group: Gram -> ``S`` -> ``K = S + eps I`` (padding: identity) ->
Gauss-Jordan sweep of ``K`` in registers. Without pivoting on an SPD matrix the sweep's pivots are
the ``d_k`` of ``K = L D L^T`` (``d_k = L_kk^2`` of the Cholesky factor), so
``logdet = sum_k log d_k``, and the swept matrix is ``K^{-1}``; the gains
``-log (K^{-1})_ii`` follow. A non-positive pivot (``K`` numerically indefinite in fp32) makes the
group's logdet NaN, and a second launch of the same kernel (``FIXUP``, :mod:`divkernels.ops.fixup`)
sweeps exactly those groups again in fp64, from the ``S`` the first launch stored, while every
other program returns at once; if that fails too, its logdet and inverse stay NaN. No host sync
either way, and the fp64 tile never occupies the first launch's registers (two launches forward in
fp32, one in fp64).

Backward: ``d logdet / dK = K^{-1}`` and ``d gain_i / dK = k_i k_i^T / (K^{-1})_ii`` (``k_i`` the
i-th column of ``K^{-1}``), so ``dL/dS = g K^{-1} + K^{-1} diag(g_gain / diag K^{-1}) K^{-1}``,
formed inside the shared similarity backward kernel (one launch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.ops.common import (
    KERNEL_IDS,
    accumulation_dtype,
    as_acc,
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
from divkernels.ops.fixup import fixup_launches, sweep_failed
from divkernels.ops.similarity import (
    default_gamma,
    gram_matrix,
    similarity_backward,
    similarity_backward_op,
    similarity_from_gram,
)
from divkernels.ops.tiles import (
    group_start,
    load_square_transposed,
    load_valid_rows,
    square_at,
    store_square,
)
from divkernels.types import KERNELS
from divkernels.validation import DataChecks, check_choice, check_emb_and_mask, check_scalar

# The smallest tile whose S a forward that sweeps K stores before the sweep, not after: at G = 128 an
# S kept live through the sweep spilled; smaller tiles take fewer registers storing it after
# (benchmarks/results/sm90_kernel_resources.csv). The logdet forward and the fused loss forward read it.
SIM_BEFORE_SWEEP = tl.constexpr(128)
PIVOT_MARGIN = tl.constexpr(reference.PIVOT_MARGIN)
UNIT_32 = tl.constexpr(torch.finfo(torch.float32).eps / 2)
UNIT_64 = tl.constexpr(torch.finfo(torch.float64).eps / 2)


@triton.jit
def gauss_jordan_inverse(matrix, floor, G, BLOCK_G: tl.constexpr):
    """Sweep an SPD tile: ``(sum of log pivots, inverse, number of pivots at or under floor)``.

    Step k divides row k by the pivot ``p = A_kk`` and eliminates column k from every other row;
    after G steps the tile holds the inverse. Rows past G are the identity's and are not swept.
    """
    offs = tl.arange(0, BLOCK_G)
    rows = offs[:, None]
    cols = offs[None, :]
    logdet = tl.sum(tl.zeros([BLOCK_G], dtype=matrix.dtype), axis=0)
    bad_pivots = tl.sum(tl.zeros([BLOCK_G], dtype=tl.int32), axis=0)
    for k in range(0, G):
        row = tl.sum(tl.where(rows == k, matrix, 0.0), axis=0)
        col = tl.sum(tl.where(cols == k, matrix, 0.0), axis=1)
        pivot = tl.sum(tl.where(offs == k, row, 0.0), axis=0)
        bad_pivots += tl.where(pivot > floor, 0, 1)
        logdet += tl.log(pivot)
        # one reciprocal per step, then multiplies: a division per element would be a division
        # subroutine per element, whose calls cost registers (the fp64 fix-ups spilled around them)
        inverse_pivot = 1.0 / pivot
        scaled_row = tl.where(offs == k, inverse_pivot, row * inverse_pivot)
        matrix = tl.where(cols == k, 0.0, matrix)
        matrix = tl.where(rows == k, scaled_row[None, :], matrix - col[:, None] * scaled_row[None, :])
    return logdet, matrix, bad_pivots


@triton.jit
def logdet_and_inverse(sim, valid, eps, G, BLOCK_G: tl.constexpr, FP64: tl.constexpr):
    """``(log det K, K^{-1})`` of ``K = S + eps I`` on the valid rows, NaN if K cannot be swept: a pivot at
    or under ``reference.pivot_floor`` (too few correct bits in the sweep's dtype).

    ``FP64``: sweep in float64 (the second pass of :mod:`divkernels.ops.fixup`), results in ``sim``'s dtype.
    """
    offs = tl.arange(0, BLOCK_G)
    ridge = tl.where((offs[:, None] == offs[None, :]) & valid[:, None], eps, 0.0)
    largest = tl.max(tl.where(valid, diagonal(sim, BLOCK_G) + eps, 0.0), axis=0)  # max K_kk, valid rows
    if FP64 or sim.dtype == tl.float64:
        floor = largest.to(tl.float64) * (PIVOT_MARGIN * UNIT_64 * G)
        logdet64, inverse64, bad_pivots = gauss_jordan_inverse(sim.to(tl.float64) + ridge.to(tl.float64), floor,
                                                               G, BLOCK_G)
        logdet = logdet64.to(sim.dtype)
        inverse = inverse64.to(sim.dtype)
    else:
        floor = largest * (PIVOT_MARGIN * UNIT_32 * G)
        logdet, inverse, bad_pivots = gauss_jordan_inverse(sim + ridge, floor, G, BLOCK_G)
    logdet = tl.where(bad_pivots > 0, float("nan"), logdet)
    inverse = tl.where(bad_pivots > 0, float("nan"), inverse)
    return logdet, inverse


@triton.jit
def diagonal(tile, BLOCK_G: tl.constexpr):
    """``[BLOCK_G]`` diagonal of a square tile."""
    offs = tl.arange(0, BLOCK_G)
    return tl.sum(tl.where(offs[:, None] == offs[None, :], tile, 0.0), axis=1)


@triton.jit(do_not_specialize=["G", "stride_b"])  # sizes that vary over a run: common.py
def _logdet_forward_kernel(emb_ptr, mask_ptr, logdet_ptr, gains_ptr, inverse_ptr, sim_ptr, norms_ptr, G, D,
                           eps: tl.float64, gamma: tl.float64, stride_b, stride_g, stride_d, KERNEL: tl.constexpr,
                           HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                           PRECISION: tl.constexpr, FIXUP: tl.constexpr, ALIGNED: tl.constexpr):
    """Group ``b``'s logdet, gains, ``K^-1``, ``S`` and norms. ``FIXUP``: only if its logdet is NaN (the
    first launch's fp32 sweep failed), logdet, gains and ``K^-1`` again from the stored ``S`` with a
    float64 sweep (no Gram: nothing but the sweep's tile in registers)."""
    eps = as_acc(eps, ACC)
    gamma = as_acc(gamma, ACC)
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    early = BLOCK_G >= SIM_BEFORE_SWEEP
    if FIXUP:  # the first launch stored S and the norms; sweep S again, only where that sweep failed
        if not sweep_failed(tl.load(logdet_ptr + b)):
            return
        sim = load_square_transposed(square_at(sim_ptr, b, G), G, BLOCK_G)
        # valid after S: read first, one word of it sat in local memory through the sweep (G = 128, sm_90)
        valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
        logdet, inverse = logdet_and_inverse(sim, valid, eps, G, BLOCK_G, True)
    else:
        valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
        gram = gram_matrix(group_start(emb_ptr, b, stride_b, ALIGNED), stride_g, stride_d, valid, D, BLOCK_G,
                           BLOCK_D, ACC, PRECISION)
        sim, norms = similarity_from_gram(gram, valid, gamma, KERNEL, BLOCK_G)
        if early:
            store_square(square_at(sim_ptr, b, G), sim, G, BLOCK_G)
        logdet, inverse = logdet_and_inverse(sim, valid, eps, G, BLOCK_G, False)
    tl.store(logdet_ptr + b, logdet)
    tl.store(gains_ptr + b * G + offs, tl.where(valid, -tl.log(diagonal(inverse, BLOCK_G)), 0.0), mask=offs < G)
    store_square(square_at(inverse_ptr, b, G), inverse, G, BLOCK_G)
    if not FIXUP:
        if not early:
            store_square(square_at(sim_ptr, b, G), sim, G, BLOCK_G)
        tl.store(norms_ptr + b * G + offs, norms, mask=offs < G)


def logdet_forward(emb: torch.Tensor, mask: torch.Tensor | None, eps: float, kernel: str = "cosine",
                   gamma: float | None = None) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernel: ``(logdet [B], gains [B, G], K^-1, S, norms [B, G])``, ``K^-1`` and ``S``
    with padded rows (``common.square_shape``)."""
    batch, group, _ = emb.shape
    acc = accumulation_dtype(emb.dtype)
    logdet = new_output((batch,), acc, emb.device)
    gains = new_output((batch, group), acc, emb.device)
    inverse = new_output(square_shape(batch, group), acc, emb.device)
    sim = new_output(square_shape(batch, group), acc, emb.device)
    norms = new_output((batch, group), acc, emb.device)
    for fixup in fixup_launches(acc):
        launch_forward(emb, mask, eps, kernel, gamma, (logdet, gains, inverse, sim, norms), fixup)
    return logdet, gains, inverse, sim, norms


def launch_forward(emb: torch.Tensor, mask: torch.Tensor | None, eps: float, kernel: str, gamma: float | None,
                   outputs: tuple[torch.Tensor, ...], fixup: bool, acc: torch.dtype | None = None) -> None:
    """One launch of the forward kernel, one program per group, into ``outputs = (logdet [B],
    gains [B, G], K^-1, S, norms [B, G])`` (accumulation dtype, contiguous, ``K^-1`` and ``S`` of
    ``common.square_shape``); ``fixup``: the float64 pass (:mod:`divkernels.ops.fixup`); ``acc``: another
    accumulation dtype (the fused loss's split
    forward launches it too, in float64 when its log-probs are float64)."""
    batch, group, dim = emb.shape
    block_g = group_block(group)
    _logdet_forward_kernel[(batch,)](
        emb, mask, *outputs, group, dim, eps, default_gamma(kernel, gamma, dim), *emb.stride(),
        KERNEL=KERNEL_IDS[kernel], HAS_MASK=mask is not None, BLOCK_G=block_g,
        BLOCK_D=embedding_block(block_g, dim, emb.dtype), ACC=triton_dtype(acc or accumulation_dtype(emb.dtype)),
        PRECISION=dot_precision(emb.dtype), FIXUP=fixup, ALIGNED=rows_aligned(emb), num_warps=num_warps_for(block_g))


class LogdetFunction(torch.autograd.Function):
    """``(logdet, gains)`` with the Triton forward and the shared similarity backward, which forms
    ``dL/dS = g K^-1 + K^-1 diag(h / diag K^-1) K^-1`` in the kernel (two launches forward with the fp32
    fix-up, one backward)."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, mask: torch.Tensor | None, eps: float, kernel: str,
                gamma: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        logdet, gains, inverse, sim, norms = logdet_forward(emb, mask, eps, kernel, gamma)
        ctx.save_for_backward(emb, mask, inverse, sim, norms)
        ctx.kernel, ctx.gamma = kernel, gamma
        ctx.mark_non_differentiable(norms)
        ctx.set_materialize_grads(False)
        return logdet, gains, norms

    @staticmethod
    def backward(ctx, grad_logdet: torch.Tensor | None, grad_gains: torch.Tensor | None,
                 _grad_norms: torch.Tensor | None):
        emb, mask, inverse, sim, norms = ctx.saved_tensors
        if grad_logdet is None and grad_gains is None:
            return None, None, None, None, None
        grad_emb = similarity_backward(grad_logdet, sim, norms, emb, mask, ctx.kernel, ctx.gamma, mode=2,
                                       grad_extra=grad_gains, inverse=inverse)
        return grad_emb, None, None, None, None


@torch.library.custom_op("divkernels::logdet_diversity", mutates_args=())
def logdet_op(emb: torch.Tensor, mask: torch.Tensor | None, eps: float, kernel: str,
              gamma: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logdet [B], gains [B, G], K^-1, S, norms)`` as a custom op for torch.compile."""
    return logdet_forward(emb, mask, eps, kernel, gamma)


@logdet_op.register_fake
def _(emb, mask, eps, kernel, gamma):
    batch, group, _ = emb.shape
    acc = accumulation_dtype(emb.dtype)
    square = emb.new_empty(square_shape(batch, group), dtype=acc)
    return (emb.new_empty((batch,), dtype=acc), emb.new_empty((batch, group), dtype=acc), square,
            torch.empty_like(square), emb.new_empty((batch, group), dtype=acc))


def _logdet_setup(ctx, inputs: tuple, output: tuple) -> None:
    emb, mask, _, ctx.kernel, ctx.gamma = inputs
    _, _, inverse, sim, norms = output
    ctx.save_for_backward(emb, mask, inverse, sim, norms)


def _logdet_op_backward(ctx, grad_logdet: torch.Tensor | None, grad_gains: torch.Tensor | None,
                        *_unused: torch.Tensor | None):
    emb, mask, inverse, sim, norms = ctx.saved_tensors
    if grad_logdet is None and grad_gains is None:
        return None, None, None, None, None
    return (similarity_backward_op(grad_logdet, grad_gains, inverse, sim, norms, emb, mask, ctx.kernel, ctx.gamma, 2),
            None, None, None, None)


logdet_op.register_autograd(_logdet_op_backward, setup_context=_logdet_setup)


def check_factorization(checks: DataChecks, failed: torch.Tensor | Callable[[], torch.Tensor]) -> None:
    """Name the groups (``failed`` ``[B]`` bool) whose ``K = S + eps I`` could not be factored."""
    checks.require(failed,
                   lambda groups: f"the factorization of K = S + eps*I failed for groups {groups}: K is not "
                                  f"positive definite at the working precision (the reference and Triton retry "
                                  f"in float64, the CUDA kernel does not); raise eps or pass float64 emb")


def logdet_diversity(
    emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps: float = reference.DQO_EPS,
    kernel: str = "cosine",
    return_gains: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``logdet_b = log det(S_b + eps I)`` over each group's valid responses: DQO's diversity.

    DQO (arXiv 2509.04784) scores a group by ``log det(L + I)`` with ``L`` the Gram matrix of unit
    embeddings, i.e. cosine ``S`` and ``eps = 1`` (the default); the leave-one-out gain
    ``logdet K - logdet K_-i`` of each response then lies in ``[0, log 2]``.

    Args:
        emb: ``[B, G, D]`` response embeddings. mask: ``[B, G]`` bool or None.
        eps: ridge added to the diagonal, > 0 (default 1, DQO's; small ridges such as 1e-4 make
            gradients scale like 1/eps and an exact duplicate's gain about ``log(2 eps)``).
        kernel: ``"cosine"``, ``"dot"`` or ``"rbf"``.
        return_gains: also return ``gain_i = -log (K^{-1})_ii``, each response's marginal
            contribution to its group's logdet.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: check for NaN/inf, groups with fewer than 2 valid responses and failed
            factorizations (one host sync).

    Returns:
        ``logdet [B]``, or ``(logdet [B], gains [B, G])`` with gains 0 at padding; float32
        (float64 for float64 ``emb``). Differentiable.
    """
    emb, mask = check_emb_and_mask(emb, mask)
    check_scalar("eps", eps, low=0.0, low_open=True)
    check_choice("kernel", kernel, KERNELS)
    batch, group, _ = emb.shape
    resolved = resolve_backend(backend, op="logdet_diversity", device=emb.device, group_size=group,
                               kernels=("triton",))
    checks = DataChecks(check_inputs)  # nothing below computes a check when it is off

    def valid() -> torch.Tensor:
        return reference.valid_mask(mask, batch, group, emb.device)

    checks.group_size(valid, "logdet_diversity")
    if resolved == "triton":
        if torch.compiler.is_compiling():
            logdet, gains, _, _, norms = logdet_op(emb, contiguous(mask), eps, kernel, None)
        else:
            logdet, gains, norms = LogdetFunction.apply(emb, contiguous(mask), eps, kernel, None)
        checks.emb(norms, valid)
    else:
        checks.emb(emb, valid)
        logdet, gains = reference.logdet_diversity(emb, valid(), eps, kernel, return_gains=True)
    check_factorization(checks, lambda: torch.isnan(logdet))
    checks.raise_if_failed()
    return (logdet, gains) if return_gains else logdet
