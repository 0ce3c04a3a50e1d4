"""Pass@k advantages inside the advantages kernel (:mod:`divkernels.reference.passk` is the spec).

One program holds its group's shaped rewards as a ``[BLOCK_G]`` vector: the ascending ranks come
from a ``[BLOCK_G, BLOCK_G]`` comparison tile, and each subset count ``C(a, b)`` from a float64 table
of ``log a!`` (:func:`log_factorials`, read where needed): a ratio of two counts is one float64 ``exp``
of a difference of table entries, then rounded to the output dtype, so a count never overflows
(``C(128, 64) ~ 2.4e37``) and no ratio loses more than that one rounding.
"""

from __future__ import annotations

import functools
import math

import torch

from divkernels import reference
from divkernels.ops.common import tl, triton

PASSK_STD_EPS = tl.constexpr(reference.PASSK_STD_EPS)


@functools.lru_cache(maxsize=16)
def log_factorials(size: int, device: torch.device) -> torch.Tensor:
    """``[size + 1]`` float64 ``log a!`` for ``a = 0 .. size``, made once per size and device."""
    return torch.tensor([math.lgamma(a + 1.0) for a in range(size + 1)], dtype=torch.float64, device=device)


@triton.jit
def log_binomial(lf_ptr, top, bottom):
    """``log C(top, bottom)`` (float64) of int tensors, and whether ``0 <= bottom <= top`` (else 0 counts)."""
    bottom = bottom + tl.zeros_like(top)  # one shape for the mask and the three reads
    inside = (bottom >= 0) & (bottom <= top)
    value = (tl.load(lf_ptr + top, mask=inside, other=0.0) - tl.load(lf_ptr + bottom, mask=inside, other=0.0)
             - tl.load(lf_ptr + (top - bottom), mask=inside, other=0.0))
    return value, inside


@triton.jit
def binomial_ratio(lf_ptr, top, bottom, log_denominator, OUT: tl.constexpr):
    """``C(top, bottom) / exp(log_denominator)`` in ``OUT`` (0 outside the binomial's domain)."""
    value, inside = log_binomial(lf_ptr, top, bottom)
    return tl.where(inside, tl.exp(value - log_denominator), 0.0).to(OUT)


@triton.jit
def passk_from_shaped(shaped, valid, k, lf_ptr, ESTIMATOR: tl.constexpr, STD: tl.constexpr,
                      BLOCK_G: tl.constexpr, OUT: tl.constexpr):
    """``[BLOCK_G]`` advantages of ESTIMATOR (1 passk_analytic, 2 pkpo, 3 best_minus_second) from the
    group's shaped rewards (0 at padding)."""
    offs = tl.arange(0, BLOCK_G)
    n = tl.sum(valid.to(tl.int32), axis=0)
    g = tl.where(valid, shaped, 0.0)
    if ESTIMATOR == 3:
        out = best_minus_second(g, valid, n, offs, STD, OUT)
    else:
        # below[p, q]: q ranks below p (ascending, ties by index); both valid
        pair = valid[:, None] & valid[None, :]
        lower = (g[None, :] < g[:, None]) | ((g[None, :] == g[:, None]) & (offs[None, :] < offs[:, None]))
        below = pair & lower
        rank = tl.sum(below.to(tl.int32), axis=1)
        size = tl.maximum(tl.minimum(k, n), 1)
        low = tl.min(tl.where(valid, g, float("inf")), axis=0)
        d = tl.where(valid, g - low, 0.0)
        log_subsets, _ = log_binomial(lf_ptr, n, size)
        if ESTIMATOR == 2:  # PKPO s^(loo-1): sum_{q below p} C(q, k-2) (d_p - d_q) / C(n, k); g / n at k = 1
            weight = binomial_ratio(lf_ptr, rank, size - 2, log_subsets, OUT)
            spread = tl.sum(tl.where(below, weight[None, :] * (d[:, None] - d[None, :]), 0.0), axis=1)
            out = tl.where(size == 1, g / tl.maximum(n, 1).to(OUT), spread)
        else:
            out = passk_analytic(g, d, valid, rank, size, n, log_subsets, lf_ptr, offs, STD, OUT)
    return tl.where(valid, out, 0.0)


@triton.jit
def passk_analytic(g, d, valid, rank, size, n, log_subsets, lf_ptr, offs, STD: tl.constexpr, OUT: tl.constexpr):
    """Pass@k Training's advantage: (mean max of the subsets holding p - mean max of all) / std of all."""
    top = tl.where(valid, binomial_ratio(lf_ptr, rank, size - 1, log_subsets, OUT), 0.0)  # P(max is p)
    mean_all = tl.sum(top * d, axis=0)
    # the variance of the subsets' maxima from e = d - max d: exactly 0 when all subsets share one maximum
    # (every p with w_p > 0 then holds the group's max, e_p = 0); one vector, no G x G tile (the reference
    # sums 1/2 w_p w_q (d_p - d_q)^2, the same number); the cancellation in E[e^2] - E[e]^2 is at most a
    # factor n / k, as the group's maximum alone carries w = k / n
    e = tl.where(valid, d - tl.max(tl.where(valid, d, float("-inf")), axis=0), 0.0)
    mean_e = tl.sum(top * e, axis=0)
    variance = tl.maximum(tl.sum(top * e * e, axis=0) - mean_e * mean_e, 0.0)
    log_holding, _ = log_binomial(lf_ptr, n - 1, size - 1)
    own = binomial_ratio(lf_ptr, rank, size - 1, log_holding, OUT) * d
    higher = binomial_ratio(lf_ptr, rank - 1, size - 2, log_holding, OUT) * d  # C(q-1, k-2) d_q / C(n-1, k-1)
    # above[p, q]: q ranks above p (compared afresh: the rank tile is not kept alive)
    later = (g[None, :] == g[:, None]) & (offs[None, :] > offs[:, None])
    above = valid[None, :] & ((g[None, :] > g[:, None]) | later)
    out = own + tl.sum(tl.where(above, higher[None, :], 0.0), axis=1) - mean_all
    if STD:
        std = tl.sqrt(variance)
        out = tl.where(std > 0, out / tl.where(std > 0, std, 1.0), 0.0)
    return out


@triton.jit
def best_minus_second(g, valid, n, offs, STD: tl.constexpr, OUT: tl.constexpr):
    """verl's grpo_passk: max - second max at the first maximum (over std + 1e-6, unbiased std)."""
    top = tl.max(tl.where(valid, g, float("-inf")), axis=0)
    best = tl.min(tl.where(valid & (g == top), offs, 2**30), axis=0)
    second = tl.max(tl.where(valid & (offs != best), g, float("-inf")), axis=0)
    gap = tl.where(n >= 2, top - second, 0.0)
    if STD:
        count = n.to(OUT)
        centered = tl.where(valid, g - tl.sum(g, axis=0) / tl.maximum(count, 1.0), 0.0)
        std = tl.sqrt(tl.sum(centered * centered, axis=0) / tl.maximum(count - 1.0, 1.0))
        gap = gap / (std + PASSK_STD_EPS)
    return tl.where(offs == best, gap, 0.0).to(OUT)
