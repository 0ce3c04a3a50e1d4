"""The specification of every op in plain PyTorch (the repository's spec in code, in the sections of this package:
``similarity``, ``diversity``, ``losses``, ``advantages``, ``logps``; constants in ``common``).

Every op of the package is defined here first, as batched tensor code with no Python loop over
groups. These functions are the CPU fallback (``backend="reference"``) and the ground truth that
every kernel is tested against. They validate nothing: the public functions in ``divkernels.ops``
check their inputs once and then call either these or a kernel.

Shapes: ``B`` groups (one per prompt), ``G`` responses per group (padded to the largest group),
``D`` embedding size. ``valid`` is the ``[B, G]`` bool mask of real responses. Padded entries of
any input may hold anything (NaN included): they are replaced by finite placeholders before any
arithmetic, so they change no value and no gradient.

Precision: similarities are accumulated in float32 (float64 for float64 inputs) without TF32; the
``G x G`` linear algebra (Cholesky, inverse, eigenvalues) runs in float64 for every input dtype.
It is ``B * G^2`` numbers, so this costs little, and it makes the fp64 retry that the kernels do
on a failed fp32 factorization unnecessary: every group is factored as the retry would factor it.

Numerics (what the kernels follow too): float32 Gram matrices never go through TF32 (at
``cond(K) ~ 1e6`` a TF32 Gram matrix puts errors of ~5e-2 into ``log det K``; bf16/fp16 inputs are
exact in TF32, so they may use it); the cosine and RBF diagonal is exactly 1, not the rounded
``|e_i|^2 / |e_i|^2`` of the Gram matrix; a float32 factorization that fails is retried in float64.
"""

from __future__ import annotations

from divkernels.reference.advantages import (  # noqa: F401
    LOG_RATIO_CLAMP,
    advantages_from_diversity,
    darling_rewards,
    default_scale,
    group_advantages,
    policy_gradient_loss,
)
from divkernels.reference.common import (  # noqa: F401
    ADVANTAGE_STD_EPS,
    DARLING_MIN_DIVERSITY,
    DEVIATION_TIE,
    DIVPO_COUNT_SLACK,
    DIVPO_TIE_RTOL,
    DQO_EPS,
    EMB_NORM_LIMIT,
    LN2,
    NORM_FLOOR,
    PADDED_LOGP,
    PASSK_STD_EPS,
    PIVOT_MARGIN,
    _eye,
    _gram,
    _pair_valid,
    compute_dtype,
    pivot_floor,
    valid_mask,
)
from divkernels.reference.diversity import (  # noqa: F401
    connected_components,
    deviation,
    deviation_from_similarity,
    gains_from_inverse,
    group_sizes,
    logdet_and_inverse,
    logdet_diversity,
    partition_diversity,
    partition_from_equivalence,
    vendi_score,
)
from divkernels.reference.logps import (  # noqa: F401
    POOLINGS,
    linear_logps,
    lm_head_logits,
    pool_hidden_states,
    sequence_logps,
)
from divkernels.reference.losses import (  # noqa: F401
    _first_near_extreme,
    _loss_metrics,
    _loss_pair_counts,
    _loss_weights,
    _one_hot_pair,
    _valid_extremes,
    ddpo_weights,
    deviation_weights,
    divpo_pool_size,
    divpo_pools,
    group_preference_loss,
    implicit_rewards,
    log1mexp,
    mean_offdiagonal_similarity,
    normalized_weights,
    pair_counts_all,
    pair_counts_best_worst,
    pair_counts_divpo,
    pair_counts_explicit,
    pair_losses,
    quality_threshold,
    reward_ranks,
)
from divkernels.reference.passk import PASSK_ESTIMATORS, passk_advantages  # noqa: F401
from divkernels.reference.similarity import (  # noqa: F401
    pairwise_similarity,
)
