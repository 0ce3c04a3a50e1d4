"""Diversity-aware GRPO advantages and the policy-gradient loss.

On the Triton backend one kernel per call, one program per group, does everything: the
per-response diversity (partition from the cosine links or labels, logdet gains, deviation; one
read of ``emb``), the shaped reward and the per-group normalization. ``darling_reward="minmax"``
needs the batch's reward range first, so it runs the kernel twice (ranges, then advantages).
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
    new_output,
    num_warps_for,
    tl,
    triton,
    triton_dtype,
)
from divkernels.ops.deviation import deviation_from_similarity
from divkernels.ops.fixup import fixup_gram, fixup_launches, sweep_failed
from divkernels.ops.logdet import check_factorization, diagonal, logdet_and_inverse
from divkernels.ops.partition import closure_steps, group_links, link_launch_arguments, partition_from_links
from divkernels.ops.passk import log_factorials, passk_from_shaped
from divkernels.ops.similarity import (
    gram_matrix,
    similarity_from_gram,
    unusable_norms,
)
from divkernels.ops.tiles import (
    group_start,
    load_valid_rows,
)
from divkernels.types import ADVANTAGE_DIVERSITIES, ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES, DARLING_REWARDS
from divkernels.validation import (
    DataChecks,
    check_choice,
    check_emb,
    check_equivalence,
    check_float_tensor,
    check_group_tensor,
    check_mask,
    check_partition,
    check_same_device,
    check_scalar,
)

ADVANTAGE_STD_EPS = tl.constexpr(reference.ADVANTAGE_STD_EPS)


@triton.jit(do_not_specialize=["B", "G", "stride_b", "k"])  # sizes that vary over a run: common.py
def _advantages_kernel(rewards_ptr, emb_ptr, given_ptr, mask_ptr, out_ptr, range_ptr, bad_ptr, lf_ptr, B, G, D, k,
                       alpha: tl.float64, tau: tl.float64, eps: tl.float64, min_diversity: tl.float64, stride_b,
                       stride_g, stride_d, DIVERSITY: tl.constexpr, ESTIMATOR: tl.constexpr, STD: tl.constexpr,
                       PHASE: tl.constexpr,
                       LINKS: tl.constexpr, HAS_MASK: tl.constexpr, TRANSITIVE: tl.constexpr, STEPS: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, ACC: tl.constexpr,
                       OUT: tl.constexpr, PRECISION: tl.constexpr, FIXUP: tl.constexpr, ALIGNED: tl.constexpr):
    """Advantages of group ``b`` (DIVERSITY: 0 none, 1 darling, 2 dqo, 3 deviation).

    ``r' = r`` / ``r * div_i`` / ``r + alpha gain_i`` / ``r + alpha dev_i``, then
    ``A = (r' - mean) / (std + 1e-4)`` over the valid responses (``STD``, unbiased std) or ``r' - mean``
    (ESTIMATOR 0, grpo), or a pass@k advantage of ``r'`` (ESTIMATOR 1-3, :mod:`divkernels.ops.passk`,
    subsets of ``k``, ``lf_ptr`` its table of ``log a!``).
    PHASE 0 does it all; for darling's min-max rewards PHASE 1 writes ``div`` and the group's reward
    range, PHASE 2 reduces the ranges of the whole batch and finishes. ``FIXUP`` (dqo): only if the
    group's advantages hold a NaN (the first launch's fp32 sweep failed), all again with a float64 sweep.
    """
    alpha = as_acc(alpha, OUT)  # weighs a diversity kept in OUT, the rewards' dtype
    tau = as_acc(tau, ACC)
    eps = as_acc(eps, ACC)
    min_diversity = as_acc(min_diversity, OUT)  # the floor of a diversity kept in OUT (labels: ACC is fp32)
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    inside = offs < G
    if FIXUP:  # divkernels.ops.fixup: a NaN among the first launch's advantages
        if not sweep_failed(tl.sum(tl.load(out_ptr + b * G + offs, mask=inside, other=0.0), axis=0)):
            return
    valid = load_valid_rows(mask_ptr, b, G, HAS_MASK, BLOCK_G)
    rewards = tl.load(rewards_ptr + b * G + offs, mask=valid, other=0.0).to(OUT)
    if PHASE == 2:
        measure = tl.load(out_ptr + b * G + offs, mask=inside, other=0.0).to(OUT)
    elif DIVERSITY == 1:
        links, bad = group_links(emb_ptr, given_ptr, b, valid, G, D, tau, stride_b, stride_g, stride_d, LINKS,
                                 BLOCK_G, BLOCK_D, ACC, PRECISION, ALIGNED)
        measure = partition_from_links(links, valid, min_diversity, TRANSITIVE, STEPS, BLOCK_G, OUT)
        tl.store(bad_ptr + b, bad)
    elif DIVERSITY >= 2:
        gram = gram_matrix(group_start(emb_ptr, b, stride_b, ALIGNED), stride_g, stride_d, valid, D, BLOCK_G,
                           BLOCK_D, ACC, PRECISION)
        sim, norms = similarity_from_gram(gram, valid, 0.0, 0, BLOCK_G)
        tl.store(bad_ptr + b, any_bad(valid & unusable_norms(norms, ACC)))
        if DIVERSITY == 2:  # DQO gain: log det K - log det K_-i = -log (K^-1)_ii
            _, inverse = logdet_and_inverse(sim, valid, eps, G, BLOCK_G, FIXUP)
            measure = tl.where(valid, -tl.log(diagonal(inverse, BLOCK_G)), 0.0).to(OUT)
        else:
            measure = deviation_from_similarity(sim, valid).to(OUT)
    else:
        measure = tl.zeros([BLOCK_G], dtype=OUT)
        tl.store(bad_ptr + b, 0.0)
    if PHASE == 1:  # darling with min-max rewards: div now, the batch's range in phase 2
        tl.store(out_ptr + b * G + offs, measure, mask=inside)
        tl.store(range_ptr + 2 * b, tl.min(tl.where(valid, rewards, float("inf")), axis=0))
        tl.store(range_ptr + 2 * b + 1, tl.max(tl.where(valid, rewards, float("-inf")), axis=0))
    else:  # one exit: Triton compiles what follows an early return too
        if DIVERSITY == 1:
            if PHASE == 2:  # min-max scale r over the batch's valid responses (all equal: 1)
                low = tl.full([BLOCK_B], float("inf"), OUT)
                high = tl.full([BLOCK_B], float("-inf"), OUT)
                for start in range(0, B, BLOCK_B):
                    rows = start + tl.arange(0, BLOCK_B)
                    low = tl.minimum(low, tl.load(range_ptr + 2 * rows, mask=rows < B, other=float("inf")).to(OUT))
                    high = tl.maximum(high, tl.load(range_ptr + 2 * rows + 1, mask=rows < B,
                                                    other=float("-inf")).to(OUT))
                low_all = tl.min(low, axis=0)
                spread = tl.max(high, axis=0) - low_all
                rewards = tl.where(spread > 0, (rewards - low_all) / tl.where(spread > 0, spread, 1.0), 1.0)
            shaped = rewards * measure
        else:
            shaped = rewards + alpha * measure
        shaped = tl.where(valid, shaped, 0.0)
        if ESTIMATOR == 0:
            n = tl.sum(valid.to(OUT), axis=0)
            centered = tl.where(valid, shaped - tl.sum(shaped, axis=0) / tl.maximum(n, 1.0), 0.0)
            if STD:
                std = tl.sqrt(tl.sum(centered * centered, axis=0) / tl.maximum(n - 1.0, 1.0))
                centered = centered / (std + ADVANTAGE_STD_EPS)
        else:
            centered = passk_from_shaped(shaped, valid, k, lf_ptr, ESTIMATOR, STD, BLOCK_G, OUT)
        tl.store(out_ptr + b * G + offs, centered, mask=inside)


def uses_embeddings(diversity: str, given: torch.Tensor | None) -> bool:
    """The diversity is measured on ``emb`` (every mode but "none", and darling given labels or a judge's links)."""
    return diversity != "none" and given is None


def advantages_forward(rewards: torch.Tensor, emb: torch.Tensor | None, given: torch.Tensor | None,
                       mask: torch.Tensor | None, diversity: str, alpha: float, tau: float, eps: float,
                       scale: str, min_diversity: float, transitive: bool,
                       darling_reward: str, estimator: str = "grpo", k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [B, G], bad [B])`` in one launch (two for darling with min-max rewards, and for dqo in
    float32: the float64 fix-up of :mod:`divkernels.ops.fixup`)."""
    batch, group = rewards.shape
    out_dtype = reference.compute_dtype(rewards.dtype)
    (emb, given, dim, *strides), flags, acc = link_launch_arguments(
        emb if uses_embeddings(diversity, given) else None, given, group)
    out = new_output((batch, group), out_dtype, rewards.device)
    bad = new_output((batch,), acc, rewards.device)
    two_phase = diversity == "darling" and darling_reward == "minmax"
    ranges = new_output((batch, 2), out_dtype, rewards.device) if two_phase else None
    table = None if estimator == "grpo" else log_factorials(flags["BLOCK_G"], rewards.device)
    arguments = (rewards.contiguous(), emb, given, mask, out, ranges, bad, table, batch, group, dim, k, alpha, tau,
                 eps, min_diversity, *strides)
    constants = dict(DIVERSITY=ADVANTAGE_DIVERSITIES.index(diversity), ESTIMATOR=ADVANTAGE_ESTIMATORS.index(estimator),
                     STD=scale == "std", HAS_MASK=mask is not None,
                     TRANSITIVE=transitive, STEPS=closure_steps(flags["BLOCK_G"]), BLOCK_B=128,
                     OUT=triton_dtype(out_dtype), num_warps=num_warps_for(flags["BLOCK_G"]), **flags)
    if two_phase:
        launches = ((1, False), (2, False))
    else:  # dqo sweeps K: fp32 groups whose sweep fails go again in float64 (ops/fixup.py)
        launches = [(0, fixup) for fixup in (fixup_launches(acc) if diversity == "dqo" else (False,))]
    for phase, fixup in launches:
        _advantages_kernel[(batch,)](*arguments, PHASE=phase, FIXUP=fixup,
                                     **{**constants, **(fixup_gram() if fixup else {})})
    return out, bad


@torch.library.custom_op("divkernels::group_advantages", mutates_args=())
def advantages_op(rewards: torch.Tensor, emb: torch.Tensor | None, given: torch.Tensor | None,
                  mask: torch.Tensor | None, diversity: str, alpha: float, tau: float, eps: float, scale: str,
                  min_diversity: float, transitive: bool, darling_reward: str, estimator: str,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [B, G], bad [B])`` as a custom op for torch.compile (no gradient)."""
    return advantages_forward(rewards, emb, given, mask, diversity, alpha, tau, eps, scale, min_diversity,
                              transitive, darling_reward, estimator, k)


@advantages_op.register_fake
def _(rewards, emb, given, mask, diversity, alpha, tau, eps, scale, min_diversity, transitive, darling_reward,
      estimator, k):
    acc = accumulation_dtype(*((emb.dtype,) if uses_embeddings(diversity, given) else ()))
    return (rewards.new_empty(rewards.shape, dtype=reference.compute_dtype(rewards.dtype)),
            rewards.new_empty((rewards.shape[0],), dtype=acc))


def group_advantages(
    rewards: torch.Tensor,
    emb: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    diversity: str = "none",
    alpha: float = 0.1,
    tau: float = 0.9,
    eps: float = reference.DQO_EPS,
    scale: str | None = None,
    partition: torch.Tensor | None = None,
    equivalence: torch.Tensor | None = None,
    min_diversity: float = reference.DARLING_MIN_DIVERSITY,
    transitive: bool = True,
    darling_reward: str = "raw",
    estimator: str = "grpo",
    k: int | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """Group-normalized advantages with a diversity term, for GRPO-style training.

    Shaped reward ``r'``: ``"none"`` ``r``; ``"darling"`` ``r * div_i`` (DARLING, arXiv 2509.02534:
    the raw quality reward times the partition diversity of :func:`divkernels.partition_diversity`,
    as ``multiplicative=True`` in the authors' ``verl/verl/trainer/ppo/ray_trainer.py``);
    ``"dqo"`` ``r + alpha * gain_i`` (leave-one-out gain of ``log det(S + eps I)``, DQO's ``eps = 1``);
    ``"deviation"`` ``r + alpha * dev_i``. Then ``A = (r' - mean_g r') / (std_g r' + 1e-4)``
    (``scale="std"``, unbiased std over the group's valid responses, as TRL) or ``r' - mean_g r'``
    (``"none"``). ``scale=None`` takes each method's published setting: ``"none"`` for darling (the
    authors' runs, ``verl/math_scripts/darling.batch``, set ``norm_adv_by_std_in_grpo=False``),
    ``"std"`` for the others.

    ``estimator`` replaces that normalization by a pass@k advantage of ``r'`` over subsets of ``k``
    responses (:mod:`divkernels.reference.passk` has the formulas; a group with fewer than ``k``
    valid responses uses ``k = n``): ``"passk_analytic"`` (Pass@k Training, arXiv 2508.10751: the
    analytical advantage, ``scale="std"`` divides by the subsets' std as the paper does),
    ``"pkpo"`` (PKPO, arXiv 2505.15201: the unbiased ``s^(loo-1)`` transform, binary or continuous
    rewards; ``scale`` does not apply) or ``"best_minus_second"`` (verl's ``grpo_passk``: ``max -
    second max`` for the best response, over ``std + 1e-6`` for ``scale="std"``; ``k = G``).
    ``scale=None`` is ``"std"`` for them.

    Args:
        rewards: ``[B, G]`` quality rewards.
        emb: ``[B, G, D]`` embeddings (needed by darling without ``partition``, dqo, deviation).
        mask: ``[B, G]`` bool or None.
        diversity: ``"none"``, ``"darling"``, ``"dqo"`` or ``"deviation"``.
        alpha: weight of the additive bonus (dqo, deviation).
        tau: cosine threshold of a link between two responses (darling).
        eps: ridge of ``K = S + eps I`` (dqo).
        scale: ``"std"``, ``"none"`` (Dr. GRPO) or None (the method's published setting).
        partition: ``[B, G]`` integer labels for darling (responses with equal labels are linked).
        equivalence: ``[B, G, G]`` bool links for darling: a judge's verdict on each pair ``i < j``
            (DARLING's learned classifier, :mod:`divkernels.integration.judge`).
        min_diversity: darling's floor on partition diversity (0.1; 0 disables it).
        transitive: darling's classes are connected components of the links (False: direct links only, ours).
        darling_reward: ``"raw"`` (DARLING) or ``"minmax"`` (ours: rewards min-max scaled over the batch first).
        estimator: ``"grpo"``, ``"passk_analytic"``, ``"pkpo"`` or ``"best_minus_second"``.
        k: subset size of the pass@k estimators, ``1 <= k <= G`` (required by passk_analytic and pkpo;
            best_minus_second takes None or G).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        check_inputs: NaN/inf and group-size checks (one host sync).

    Returns:
        ``[B, G]`` float32 (float64 for float64 rewards), 0 at padding; no gradient.
    """
    check_choice("diversity", diversity, ADVANTAGE_DIVERSITIES)
    if scale is not None:
        check_choice("scale", scale, ADVANTAGE_SCALES)
    check_choice("darling_reward", darling_reward, DARLING_REWARDS)
    check_choice("estimator", estimator, ADVANTAGE_ESTIMATORS)
    check_scalar("alpha", alpha)
    check_scalar("tau", tau)
    check_scalar("min_diversity", min_diversity, low=0.0, high=1.0)
    check_scalar("eps", eps, low=0.0, low_open=True)
    rewards = check_float_tensor("rewards", rewards, 2, "[B, G]")
    batch, group = rewards.shape
    if group < 2:
        raise ValueError(f"rewards must hold G >= 2 responses per group, got G={group}")
    k = check_subset_size(estimator, k, group)
    mask = check_mask(mask, batch, group)
    if partition is not None or equivalence is not None:
        if diversity != "darling":
            given_name = "partition labels are" if partition is not None else "equivalence links are"
            raise ValueError(f"{given_name} only used with diversity='darling'")
        if partition is not None and equivalence is not None:
            raise ValueError("give partition labels or equivalence links, not both")
        if partition is not None:
            partition = check_partition(partition, batch, group)
        else:
            equivalence = check_equivalence(equivalence, batch, group)
    given = partition if partition is not None else equivalence
    if emb is not None:
        emb = check_emb(emb)
        if tuple(emb.shape[:2]) != (batch, group):
            raise ValueError(f"emb has [B, G] = {tuple(emb.shape[:2])} but rewards has ({batch}, {group})")
    if diversity != "none" and emb is None and given is None:
        raise ValueError(f"diversity={diversity!r} needs emb [B, G, D]"
                         + (" or partition labels or equivalence links" if diversity == "darling" else ""))
    device = check_same_device(rewards=rewards, emb=emb, mask=mask, partition=partition, equivalence=equivalence)
    uses_emb = uses_embeddings(diversity, given)
    # the CUDA kernel takes the rewards (times the partition of given links or labels); embeddings: Triton
    cuda = not uses_emb and darling_reward == "raw"
    resolved = resolve_backend(backend, op="group_advantages", device=device, group_size=group,
                               kernels=("triton", "cuda") if cuda else ("triton",))

    checks = DataChecks(check_inputs)  # nothing below computes a check when it is off

    def valid() -> torch.Tensor:
        return reference.valid_mask(mask, batch, group, device)

    checks.finite("rewards", rewards, valid)
    if diversity != "none":
        checks.group_size(valid, f"diversity={diversity!r}")
    if resolved == "triton":
        with torch.no_grad():
            function = advantages_op if torch.compiler.is_compiling() else advantages_forward
            advantages, bad = function(
                rewards, None if emb is None else emb.detach(), given, contiguous(mask), diversity, alpha,
                tau, eps, reference.default_scale(diversity, scale, estimator), min_diversity, transitive,
                darling_reward, estimator, k)
        if uses_emb:
            checks.emb_flagged(lambda: bad > 0, emb.dtype)
    elif resolved == "cuda":
        factor = None if diversity == "none" else cuda_backend.partition(given, mask, min_diversity, transitive)
        advantages = cuda_backend.advantages(rewards, factor, mask, estimator, k,
                                             reference.default_scale(diversity, scale, estimator) == "std")
    else:
        checks.emb(emb if uses_emb else None, valid)
        advantages = reference.group_advantages(rewards, emb if uses_emb else None, valid(), diversity=diversity,
                                                alpha=alpha, tau=tau, eps=eps, scale=scale, partition=partition,
                                                equivalence=equivalence,
                                                min_diversity=min_diversity, transitive=transitive,
                                                darling_reward=darling_reward, estimator=estimator, k=k)
    if diversity == "dqo":
        check_factorization(checks, lambda: advantages.isnan().any(-1))
    checks.raise_if_failed()
    return advantages


def check_subset_size(estimator: str, k: int | None, group: int) -> int:
    """The subset size ``k`` of a pass@k ``estimator`` (1 for grpo, which takes none), checked against ``G``."""
    if estimator == "grpo":
        if k is not None:
            raise ValueError("k is the subset size of the pass@k estimators; estimator='grpo' takes none")
        return 1
    if estimator == "best_minus_second":
        if k is not None and k != group:
            raise ValueError(f"estimator='best_minus_second' is defined for k = G = {group} (verl's grpo_passk), "
                             f"got k={k}; estimator='pkpo' is its unbiased form for smaller k")
        return group
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"estimator={estimator!r} needs k, the subset size of pass@k (an int), got {k!r}")
    if not 1 <= k <= group:
        raise ValueError(f"k must be in [1, G={group}] for estimator={estimator!r}, got k={k}")
    return k


def policy_gradient_loss(
    policy_logps: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    clip: float = 0.2,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Sequence-level clipped-ratio policy-gradient loss (REINFORCE without ``old_logps``).

    ``ratio = exp(pi - pi_old)``; ``loss = -mean_valid min(ratio A, clip(ratio, 1-clip, 1+clip) A)``.
    Without ``old_logps`` the ratio is ``exp(pi - pi.detach())``: value ``-mean(A)``, REINFORCE
    gradient, as TRL's GRPOTrainer with one update per generation.

    Args:
        policy_logps: ``[B, G]`` sequence log-probs (grad flows). advantages: ``[B, G]``.
        old_logps: ``[B, G]`` log-probs of the sampling policy, or None.
        mask: ``[B, G]`` bool or None. clip: ratio clip range, >= 0.
        check_inputs: NaN/inf check of the inputs (one host sync).

    Returns:
        Scalar loss, float32 (float64 for float64 ``policy_logps``).
    """
    check_scalar("clip", clip, low=0.0)
    policy_logps = check_float_tensor("policy_logps", policy_logps, 2, "[B, G]")
    batch, group = policy_logps.shape
    advantages = check_group_tensor("advantages", advantages, batch, group)
    if old_logps is not None:
        old_logps = check_group_tensor("old_logps", old_logps, batch, group)
    mask = check_mask(mask, batch, group)
    device = check_same_device(policy_logps=policy_logps, advantages=advantages, old_logps=old_logps, mask=mask)
    valid = reference.valid_mask(mask, batch, group, device)
    checks = DataChecks(check_inputs)
    for name, value in (("policy_logps", policy_logps), ("advantages", advantages), ("old_logps", old_logps)):
        checks.finite(name, value, valid)
    result = reference.policy_gradient_loss(policy_logps, advantages, old_logps, valid, clip=clip)
    checks.raise_if_failed()
    return result
