"""Partition diversity (DARLING, arXiv 2509.02534): share of the group outside each response's class.

No gradient. On the Triton backend one kernel per call, one program per group: the cosine ``S``
(one read of ``emb``) or the labels, the links ``S >= tau``, their connected components by
``ceil(log2 G)`` squarings of the reachability tile, and the count; nothing else runs.
"""

from __future__ import annotations

import torch

from divkernels import reference
from divkernels.backend import resolve_backend
from divkernels.backends import cuda as cuda_backend
from divkernels.ops.common import (
    accumulation_dtype,
    any_bad,
    as_acc,
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
from divkernels.ops.similarity import (
    gram_matrix,
    similarity_from_gram,
    unusable_norms,
)
from divkernels.ops.tiles import (
    group_start,
    load_valid_rows,
)
from divkernels.validation import (
    DataChecks,
    check_emb_and_mask,
    check_equivalence,
    check_mask,
    check_partition,
    check_same_device,
    check_scalar,
)


@triton.jit
def group_links(emb_ptr, given_ptr, b, valid, G, D, tau, stride_b, stride_g, stride_d, LINKS: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                ALIGNED: tl.constexpr):
    """``(links, bad)`` of group ``b``: ``[BLOCK_G, BLOCK_G]`` bool ``i ~ j``, and 1.0 when a valid
    embedding has NaN/inf (its norm is not finite). ``LINKS`` (:data:`LINK_SOURCES`): 0 cosine
    ``S_ij >= tau`` from ``emb``; 1 equal labels (``given_ptr [B, G]``); 2 a judge's links
    (``given_ptr [B, G, G]`` bool), read for ``i < j`` only: the authors judge each pair once."""
    offs = tl.arange(0, BLOCK_G)
    if LINKS == 1:  # (one return at the end: Triton compiles what follows an early return too)
        labels = tl.load(given_ptr + b * G + offs, mask=offs < G, other=-1)
        links = labels[:, None] == labels[None, :]
        bad = tl.sum(tl.zeros([BLOCK_G], dtype=tl.float32), axis=0)
    elif LINKS == 2:
        rows, cols = offs[:, None], offs[None, :]
        judged = tl.load(given_ptr + b * G * G + rows * G + cols, mask=(rows < cols) & (cols < G), other=0)
        links = judged != 0
        bad = tl.sum(tl.zeros([BLOCK_G], dtype=tl.float32), axis=0)
    else:
        gram = gram_matrix(group_start(emb_ptr, b, stride_b, ALIGNED), stride_g, stride_d, valid, D, BLOCK_G,
                           BLOCK_D, ACC, PRECISION)
        sim, norms = similarity_from_gram(gram, valid, 0.0, 0, BLOCK_G)
        links = sim >= tau
        bad = any_bad(valid & unusable_norms(norms, ACC))
    return links, bad


@triton.jit
def partition_from_links(links, valid, min_diversity, TRANSITIVE: tl.constexpr, STEPS: tl.constexpr,
                         BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    """``div_i = max(#{j != i valid : j not in C_i} / (n - 1), min_diversity)``, 0 at padding.

    ``C_i``: the connected component of i in the (symmetrized) link graph among valid responses,
    what DARLING's union-find computes. Reachability ``R`` (links plus the diagonal) doubles the
    path length it covers per squaring, ``R <- [R R > 0]``; entries are 0/1 and sums <= G, so fp16
    operands on the tensor cores with float32 accumulation are exact (and hold the tile in half the
    registers of tf32). ``TRANSITIVE=False``: direct links only.
    """
    offs = tl.arange(0, BLOCK_G)
    eye = offs[:, None] == offs[None, :]
    pair = valid[:, None] & valid[None, :]
    links = (links | tl.trans(links)) & pair
    if TRANSITIVE:
        reach = tl.where(links | eye, 1.0, 0.0).to(tl.float16)
        for _ in range(STEPS):  # a loop, not unrolled: unrolled squarings overlap in registers (G = 128 spilled)
            reach = tl.where(tl.dot(reach, reach, out_dtype=tl.float32) > 0.5, 1.0, 0.0).to(tl.float16)
        links = reach > 0.5
    distinct = tl.sum(tl.where(pair & ~eye & ~links, 1.0, 0.0), axis=1).to(ACC)
    n = tl.sum(valid.to(ACC), axis=0)
    return tl.where(valid, tl.maximum(distinct / tl.maximum(n - 1.0, 1.0), min_diversity), 0.0)


@triton.jit(do_not_specialize=["G", "stride_b"])  # sizes that vary over a run: common.py
def _partition_kernel(emb_ptr, given_ptr, mask_ptr, div_ptr, bad_ptr, G, D, tau: tl.float64, min_diversity: tl.float64,
                      stride_b, stride_g, stride_d, LINKS: tl.constexpr, HAS_MASK: tl.constexpr,
                      TRANSITIVE: tl.constexpr, STEPS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      ACC: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr, NORMALIZE: tl.constexpr):
    """``div [B, G]`` (``NORMALIZE``: divided by its mean over the group's valid responses, 1 where that
    mean is 0, the fused loss's ``diversity="partition"`` weights; ``reference.normalized_weights``)."""
    tau = as_acc(tau, ACC)
    min_diversity = as_acc(min_diversity, ACC)
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
    links, bad = group_links(emb_ptr, given_ptr, b, valid, G, D, tau, stride_b, stride_g, stride_d, LINKS,
                             BLOCK_G, BLOCK_D, ACC, PRECISION, ALIGNED)
    div = partition_from_links(links, valid, min_diversity, TRANSITIVE, STEPS, BLOCK_G, ACC)
    if NORMALIZE:
        mean = tl.sum(div, axis=0) / tl.maximum(tl.sum(valid.to(ACC), axis=0), 1.0)
        div = tl.where(valid, tl.where(mean > 0.0, div / tl.where(mean > 0.0, mean, 1.0), 1.0), 0.0)
    tl.store(div_ptr + b * G + offs, div, mask=offs < G)
    tl.store(bad_ptr + b, bad)


def closure_steps(group: int) -> int:
    """Squarings of the reachability tile that cover paths of length ``G - 1``: ``ceil(log2 G)``. The
    launches pass the padded tile's (one compiled variant per tile; a squaring past the closure leaves it
    unchanged)."""
    return max(1, (max(group, 2) - 1).bit_length())


# What links two responses, in the kernels' LINKS order: cosine of their embeddings at or above tau,
# equal partition labels, or a judge's [B, G, G] links.
LINK_SOURCES = ("emb", "labels", "equivalence")


def link_source(given: torch.Tensor | None) -> int:
    """``LINKS`` of the given links: None (from ``emb``), ``[B, G]`` labels or ``[B, G, G]`` equivalence."""
    return 0 if given is None else (1 if given.dim() == 2 else 2)


def link_launch_arguments(emb: torch.Tensor | None, given: torch.Tensor | None,
                          group: int) -> tuple[tuple, dict[str, object], torch.dtype]:
    """``(emb, given links, D, strides)``, their compile-time flags and the accumulation dtype, for the
    kernels that call :func:`group_links` (partition, DARLING advantages). ``given``: labels
    ``[B, G]``, or equivalence ``[B, G, G]`` bool, or None."""
    dim = emb.shape[2] if emb is not None else 1
    acc = accumulation_dtype(*((emb.dtype,) if emb is not None else ()))
    block_g = group_block(group)
    if given is not None:
        given = given.contiguous()
    tensors = (emb, given, dim, *(emb.stride() if emb is not None else (0, 0, 0)))
    emb_dtype = emb.dtype if emb is not None else acc
    flags = dict(LINKS=link_source(given), BLOCK_G=block_g, BLOCK_D=embedding_block(block_g, dim, emb_dtype),
                 ACC=triton_dtype(acc), PRECISION=dot_precision(emb.dtype if emb is not None else acc),
                 ALIGNED=emb is not None and rows_aligned(emb))
    return tensors, flags, acc


def partition_forward(emb: torch.Tensor | None, given: torch.Tensor | None, mask: torch.Tensor | None, group: int,
                      tau: float, min_diversity: float, transitive: bool,
                      normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: ``(div [B, G], bad [B])`` (bad: 1.0 where a valid embedding is not finite); ``given``:
    labels or equivalence (:func:`link_launch_arguments`); ``normalize``: ``div`` over its group mean."""
    batch = (emb if emb is not None else given).shape[0]
    (emb, given, dim, *strides), flags, acc = link_launch_arguments(emb, given, group)
    device = (emb if emb is not None else given).device
    div = new_output((batch, group), acc, device)
    bad = new_output((batch,), acc, device)
    _partition_kernel[(batch,)](emb, given, mask, div, bad, group, dim, tau, min_diversity, *strides,
                                HAS_MASK=mask is not None, TRANSITIVE=transitive, STEPS=closure_steps(flags["BLOCK_G"]),
                                NORMALIZE=normalize, num_warps=num_warps_for(flags["BLOCK_G"]), **flags)
    return div, bad


@torch.library.custom_op("divkernels::partition_diversity", mutates_args=())
def partition_op(emb: torch.Tensor | None, given: torch.Tensor | None, mask: torch.Tensor | None, tau: float,
                 min_diversity: float, transitive: bool, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(div [B, G], bad [B])`` as a custom op for torch.compile (no gradient)."""
    group = (emb if emb is not None else given).shape[1]
    return partition_forward(emb, given, mask, group, tau, min_diversity, transitive, normalize)


@partition_op.register_fake
def _(emb, given, mask, tau, min_diversity, transitive, normalize=False):
    source = emb if emb is not None else given
    acc = accumulation_dtype(*((emb.dtype,) if emb is not None else ()))
    return source.new_empty(tuple(source.shape[:2]), dtype=acc), source.new_empty((source.shape[0],), dtype=acc)


def partition_diversity(
    emb: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    tau: float = 0.9,
    partition: torch.Tensor | None = None,
    equivalence: torch.Tensor | None = None,
    min_diversity: float = reference.DARLING_MIN_DIVERSITY,
    transitive: bool = True,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """DARLING's partition diversity: ``div_i = max((n - |C_i|) / (n - 1), min_diversity)``.

    ``C_i`` is response i's equivalence class, as DARLING's reward computes it
    (facebookresearch/darling ``verl/verl/utils/reward_score/partition_reward_vllm_serve.py``:
    union-find over the pairs judged equivalent, so classes are connected components; floor 0.1).
    What links two responses, given as exactly one of:

    * ``equivalence``: ``[B, G, G]`` bool, a judge's verdict on each pair ``i < j`` (the authors'
      learned classifier: :mod:`divkernels.integration.judge`); the lower triangle and the diagonal
      are not read;
    * ``partition``: ``[B, G]`` integer labels, linked when equal;
    * ``emb``: ``[B, G, D]`` embeddings, linked when their cosine similarity is ``>= tau`` (ours: an
      embedding stand-in for the judge).

    Args:
        emb: ``[B, G, D]`` embeddings, or None.
        mask: ``[B, G]`` bool or None.
        tau: cosine threshold of a link (``emb``).
        partition: ``[B, G]`` integer labels, or None.
        equivalence: ``[B, G, G]`` bool links, or None.
        min_diversity: floor on the result (DARLING: 0.1; 0 disables it).
        transitive: classes are connected components of the links (DARLING's union-find); False
            counts only the responses linked to i directly (ours).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"`` (the CUDA kernel takes
            ``partition`` or ``equivalence``).
        check_inputs: check for NaN/inf and groups with fewer than 2 valid responses.

    Returns:
        ``[B, G]`` in [0, 1], float32 (float64 for float64 ``emb``), 0 at padding; no gradient.
    """
    if sum(source is not None for source in (emb, partition, equivalence)) != 1:
        raise ValueError("partition_diversity needs exactly one of emb (thresholded similarity), partition "
                         "(labels) and equivalence (a judge's [B, G, G] links)")
    check_scalar("tau", tau)
    check_scalar("min_diversity", min_diversity, low=0.0, high=1.0)
    if emb is not None:
        emb, mask = check_emb_and_mask(emb, mask)
        batch, group = emb.shape[0], emb.shape[1]
    else:
        if partition is not None:
            if not isinstance(partition, torch.Tensor) or partition.dim() != 2:
                raise ValueError("partition must be a [B, G] tensor of integer labels")
            batch, group = partition.shape
            partition = check_partition(partition, batch, group)
        else:
            equivalence = check_equivalence(equivalence)
            batch, group = equivalence.shape[:2]
        mask = check_mask(mask, batch, group)
        if group < 2:
            raise ValueError(f"partition_diversity needs G >= 2 responses per group, got G={group}")
    device = check_same_device(emb=emb, partition=partition, equivalence=equivalence, mask=mask)
    given = partition if partition is not None else equivalence
    resolved = resolve_backend(backend, op="partition_diversity", device=device, group_size=group,
                               kernels=("triton",) if emb is not None else ("triton", "cuda"))
    checks = DataChecks(check_inputs)  # nothing below computes a check when it is off

    def valid() -> torch.Tensor:
        return reference.valid_mask(mask, batch, group, device)

    checks.group_size(valid, "partition_diversity")
    if resolved == "triton":
        with torch.no_grad():
            emb_in = None if emb is None else emb.detach()
            if torch.compiler.is_compiling():
                div, bad = partition_op(emb_in, given, contiguous(mask), tau, min_diversity, transitive)
            else:
                div, bad = partition_forward(emb_in, given, contiguous(mask), group, tau, min_diversity, transitive)
        if emb is not None:
            checks.emb_flagged(lambda: bad > 0, emb.dtype)
    elif resolved == "cuda":
        div = cuda_backend.partition(given, mask, min_diversity, transitive)
    else:
        checks.emb(emb, valid)
        div = reference.partition_diversity(emb, valid(), tau, partition, None, min_diversity, transitive,
                                            equivalence)
    checks.raise_if_failed()
    return div


def partition_weights(equivalence: torch.Tensor, mask: torch.Tensor | None, backend: str) -> torch.Tensor:
    """The fused loss's ``diversity="partition"`` weights: DARLING's partition diversity of a judge's links
    (floor 0.1, union-find) over its group mean, in one launch of ``backend``'s kernel (the reference's
    ops otherwise). ``[B, G]`` float32, 0 at padding."""
    floor = reference.DARLING_MIN_DIVERSITY
    if backend == "triton":
        mask = contiguous(mask)
        if torch.compiler.is_compiling():
            return partition_op(None, equivalence, mask, 0.0, floor, True, True)[0]
        return partition_forward(None, equivalence, mask, equivalence.shape[1], 0.0, floor, True, True)[0]
    if backend == "cuda":
        return cuda_backend.partition(equivalence, mask, floor, True, normalize=True)
    valid = reference.valid_mask(mask, equivalence.shape[0], equivalence.shape[1], equivalence.device)
    div = reference.partition_diversity(mask=valid, equivalence=equivalence)
    return torch.where(valid, reference.normalized_weights(div, valid), 0.0)
