"""The diversity stage of the fused forward: one group's cosine ``S``, deviation, similarity metrics
and, for ``logdet_gain`` weights or the regularizer, the sweep of ``K = S + eps I`` (logdet, ``K^-1``).

A group's ``S`` is either formed here from ``emb`` (one pass over its rows) or, in the second launch
of a split forward (:func:`divkernels.ops.group_loss.launch.split_forward`), read back from memory
``PAIR_ROWS`` rows at a time."""

from __future__ import annotations

from divkernels.loss_config import scalar_slot
from divkernels.ops.common import tl, triton
from divkernels.ops.deviation import deviation_from_row_sums, deviation_from_similarity
from divkernels.ops.group_loss.pair_math import at_rows, rows_of, scalar
from divkernels.ops.logdet import SIM_BEFORE_SWEEP, diagonal, logdet_and_inverse
from divkernels.ops.similarity import (
    gram_matrix,
    similarity_from_gram,
    unusable_norms,
)
from divkernels.ops.tiles import (
    group_start,
    square_at,
    square_stride,
    store_square,
)

EPS = tl.constexpr(scalar_slot("eps"))  # the ridge of K = S + eps I, in the scalar table


@triton.jit
def group_similarity(b, emb_ptr, valid, D, stride_b, stride_g, stride_d, BLOCK_G: tl.constexpr,
                     BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr):
    """Group ``b``'s cosine ``S`` (``[BLOCK_G, BLOCK_G]``), norms and deviation (``[BLOCK_G]``), and
    its :func:`similarity_metrics`: ``(S, norms, dev, mean_similarity, has_similarity, emb_nonfinite)``."""
    offs = tl.arange(0, BLOCK_G)
    gram = gram_matrix(group_start(emb_ptr, b, stride_b, ALIGNED), stride_g, stride_d, valid, D, BLOCK_G, BLOCK_D,
                       ACC, PRECISION)
    sim, norms = similarity_from_gram(gram, valid, 0.0, 0, BLOCK_G)
    others = valid[:, None] & valid[None, :] & (offs[:, None] != offs[None, :])
    off_diagonal = tl.sum(tl.sum(tl.where(others, sim, 0.0), axis=1), axis=0)
    mean_similarity, has_similarity, emb_nonfinite = similarity_metrics(valid, norms, off_diagonal, ACC)
    return sim, norms, deviation_from_similarity(sim, valid), mean_similarity, has_similarity, emb_nonfinite


@triton.jit
def similarity_metrics(valid, norms, off_diagonal, ACC: tl.constexpr):
    """One group's ``(mean S over valid pairs i != j, 1 if it has such a pair, non-finite valid rows)``
    from the sum of ``S`` over those pairs (``off_diagonal``) and the rows' norms."""
    n = tl.sum(valid.to(ACC), axis=0)
    other_count = n * (n - 1.0)  # valid ordered pairs i != j
    mean_similarity = off_diagonal / tl.maximum(other_count, 1.0)
    has_similarity = tl.where(other_count > 0.0, 1.0, 0.0)
    emb_nonfinite = tl.sum(tl.where(valid & unusable_norms(norms, ACC), 1.0, 0.0), axis=0)
    return mean_similarity, has_similarity, emb_nonfinite


@triton.jit
def stored_row_sums(sim_ptr, columns, valid, G, BLOCK_G: tl.constexpr, PAIR_ROWS: tl.constexpr,
                    ACC: tl.constexpr):
    """From one group's ``S`` in memory (``[G, G]``, rows ``square_stride(G)`` apart), ``PAIR_ROWS`` rows at a time:
    ``(row_sums, off_diagonal)``, ``row_sums[i] = sum_{j in columns} S_ij`` (``[BLOCK_G]``) and the sum of
    ``S_ij`` over valid pairs ``i != j``."""
    offs = tl.arange(0, BLOCK_G)
    row_sums = tl.zeros([BLOCK_G], dtype=ACC)
    off_diagonal = tl.sum(row_sums, axis=0)
    for start in range(0, BLOCK_G, PAIR_ROWS):
        rows = start + tl.arange(0, PAIR_ROWS)
        tile = tl.load(sim_ptr + rows[:, None] * square_stride(G) + offs[None, :],
                       mask=(rows[:, None] < G) & (offs[None, :] < G), other=0.0).to(ACC)
        row_sums += at_rows(tl.sum(tl.where(columns[None, :], tile, 0.0), axis=1), rows, BLOCK_G, PAIR_ROWS)
        valid_i = rows_of(valid.to(tl.int32), rows, BLOCK_G, PAIR_ROWS) > 0
        others = valid_i[:, None] & valid[None, :] & (rows[:, None] != offs[None, :])
        off_diagonal += tl.sum(tl.sum(tl.where(others, tile, 0.0), axis=1), axis=0)
    return row_sums, off_diagonal



@triton.jit
def group_diversity(
    b, emb_ptr, sim_ptr, norms_ptr, inverse_ptr, logdet_ptr, valid, G, D, stride_b, stride_g, stride_d, params_ptr,
    MODE: tl.constexpr, HAS_EMB: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, PAIR_ROWS: tl.constexpr, SWEEP_FP64: tl.constexpr, DIVERSITY_STORED: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Group ``b``'s ``(dev, residual, logdet, mean_similarity, has_similarity, emb_nonfinite, S)``:
    deviation ``[BLOCK_G]``, ``1 / K^-1_ii`` (1 without a sweep), the metrics, and the ``S`` tile
    DivPO's ranked pools read (a stand-in where it is not formed here). ``SWEEP_FP64``: sweep ``K`` in
    float64 (the finalize kernel's fix-up of a group whose float32 sweep failed, its logdet NaN)."""
    offs = tl.arange(0, BLOCK_G)
    dev = tl.zeros([BLOCK_G], dtype=ACC)
    residual = tl.full([BLOCK_G], 1.0, ACC)
    logdet = tl.sum(dev, axis=0)
    mean_similarity = logdet
    has_similarity = logdet
    emb_nonfinite = logdet
    sim = dev  # no S tile formed here (no emb, or a stored S)
    if HAS_EMB and DIVERSITY_STORED:
        # from the split forward's first launch (split_forward); S read back a block of rows at a time
        row_sums, off_diagonal = stored_row_sums(square_at(sim_ptr, b, G), valid, valid, G, BLOCK_G, PAIR_ROWS, ACC)
        dev = deviation_from_row_sums(row_sums, valid)
        norms = tl.load(norms_ptr + b * G + offs, mask=offs < G, other=1.0)
        mean_similarity, has_similarity, emb_nonfinite = similarity_metrics(valid, norms, off_diagonal, ACC)
        if MODE.need_logdet:
            logdet = tl.load(logdet_ptr + b)
            residual = 1.0 / tl.load(square_at(inverse_ptr, b, G) + offs * (square_stride(G) + 1), mask=offs < G,
                                     other=1.0)
    elif HAS_EMB:
        sim, norms, dev, mean_similarity, has_similarity, emb_nonfinite = group_similarity(
            b, emb_ptr, valid, D, stride_b, stride_g, stride_d, BLOCK_G, BLOCK_D, ACC, PRECISION, ALIGNED)
        # S stored before the sweep from SIM_BEFORE_SWEEP on, unless DivPO's ranked pools read it after
        late = BLOCK_G < SIM_BEFORE_SWEEP or (MODE.pairs == 2 and MODE.divpo_ranked)
        if MODE.store_state and not late:
            store_square(square_at(sim_ptr, b, G), sim, G, BLOCK_G)
        if MODE.need_logdet:
            logdet, inverse = logdet_and_inverse(sim, valid, scalar(params_ptr, EPS, ACC), G, BLOCK_G, SWEEP_FP64)
            residual = 1.0 / diagonal(inverse, BLOCK_G)
            if MODE.store_state:
                store_square(square_at(inverse_ptr, b, G), inverse, G, BLOCK_G)
        if MODE.store_state and late:
            store_square(square_at(sim_ptr, b, G), sim, G, BLOCK_G)
        if MODE.store_state:
            tl.store(norms_ptr + b * G + offs, norms, mask=offs < G)
    return dev, residual, logdet, mean_similarity, has_similarity, emb_nonfinite, sim
