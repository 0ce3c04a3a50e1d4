"""The public function of the fused loss: checks once, picks the backend once, then runs the
custom ops (kernel backends) or the reference."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from divkernels import reference
from divkernels.backend import backend_unavailable_reason, resolve_backend
from divkernels.backends import cuda as cuda_backend
from divkernels.loss_config import FIELD_NAMES, METRIC, STAT, LossConfig, LossTensors, takes_loss_options, with_defaults
from divkernels.ops.common import accumulation_dtype, contiguous, poison_outputs
from divkernels.ops.deviation import deviation
from divkernels.ops.group_loss.checks import (
    _checked_arguments,
    _host_data_checks,
    metric_names,
    raise_kernel_checks,
)
from divkernels.ops.group_loss.custom_ops import GroupPreferenceLossFunction, group_loss_forward_op
from divkernels.ops.logdet import check_factorization
from divkernels.ops.partition import partition_weights
from divkernels.types import LossOutput, MetricVector
from divkernels.validation import DataChecks, GroupLossArguments, check_group_loss_arguments


@torch._dynamo.assume_constant_result  # under torch.compile: made once while tracing
def _call_config(*fields: object) -> tuple[str, tuple[str, ...], bool]:
    """``(LossConfig key, metric names, needs logdet)`` of one call's fields (the last: emb given)."""
    return _cached_config(fields)


@functools.lru_cache(maxsize=256)  # eager: a training loop repeats its fields, one tuple hash per step
def _cached_config(fields: tuple) -> tuple[str, tuple[str, ...], bool]:
    config = LossConfig(*fields[:-1])
    return config.key, metric_names(config, fields[-1]), config.needs_logdet


def _within_cuda_limits(resolved: str, group: int, policy: torch.Tensor, emb: torch.Tensor | None,
                        device: torch.device) -> str:
    """``resolved``, or the Triton kernels (the reference without Triton) where the CUDA kernels cannot
    hold the group in shared memory (float64 at G > ~100: :func:`divkernels.backends.cuda.fits`)."""
    if resolved != "cuda":
        return resolved
    acc = accumulation_dtype(policy.dtype, *((emb.dtype,) if emb is not None else ()))
    if cuda_backend.fits(group, acc, device):
        return resolved
    return "triton" if backend_unavailable_reason("triton", device) is None else "reference"


def _run(args: GroupLossArguments, options: dict, check_inputs: bool) -> LossOutput:
    """:func:`group_preference_loss` after its static checks, eager and under ``torch.compile`` alike:
    the kernel backends run as the custom ops (:mod:`.custom_ops`, with their registered autograd;
    opaque to the compiler), the reference as the PyTorch it is. The Triton forward resolves its own
    data checks (one sync, inside the op); the other backends' go through ``DataChecks`` (one sync
    eager, device-side asserts while compiling); pass ``check_inputs=False`` for CUDA graphs."""
    emb, extras, mask = args.emb, args.extras, args.mask
    batch, group = args.policy_logps.shape
    resolved = resolve_backend(options["backend"], op="group_preference_loss", device=args.device, group_size=group,
                               kernels=("triton", "cuda"), dim=None if emb is None else emb.shape[-1],
                               emb_dtype=None if emb is None else emb.dtype)
    resolved = _within_cuda_limits(resolved, group, args.policy_logps, emb, args.device)
    # the Triton forward checks one embedding tensor itself (stat columns, one sync in raise_kernel_checks)
    in_kernel_checks = check_inputs and resolved == "triton" and len(args.encoders) <= 1
    checks = DataChecks(check_inputs and not in_kernel_checks)

    def valid() -> torch.Tensor:
        return reference.valid_mask(mask, batch, group, args.device)

    if checks.enabled:
        _host_data_checks(checks, args, valid(), options["loss"])
    if resolved == "reference":
        output = _run_reference(args, options, checks, valid())
    else:
        weights = _kernel_weights(args, resolved, valid, options)
        key, names, needs_logdet = _call_config(
            *_config_fields(options, args, weights is not None, in_kernel_checks, resolved), emb is not None)
        store_state = (emb is not None and emb.requires_grad and torch.is_grad_enabled()
                       and options["diversity_alpha"] > 0)
        tensors = (args.policy_logps, args.rewards, args.ref_logps, emb, contiguous(mask), args.pair_index,
                   extras["divpo_scores"], None if weights is None else weights.detach(), extras["token_counts"],
                   extras["nll_logps"], extras["nll_tokens"])
        run = group_loss_forward_op if torch.compiler.is_compiling() else _eager_forward
        loss, vector, stats, _, chosen_counts, rejected_counts = run(*tensors, key, store_state,
                                                                     args.needs_emb_reason or "")[:6]
        logdet = _logdet_column(stats, emb) if needs_logdet else None
        output = LossOutput(loss, MetricVector(vector, METRIC, names), logdet, chosen_counts, rejected_counts)
        _check_kernel_outputs(checks, output, stats, emb, in_kernel_checks)
    checks.raise_if_failed()
    return output


def _eager_forward(*inputs: object) -> tuple[torch.Tensor, ...]:
    """The forward op's first six outputs, eager: its steps through :class:`GroupPreferenceLossFunction`
    (``inputs``: the op's arguments)."""
    *tensors, key, store_state, too_few_reason = inputs
    policy, _, ref, emb, *_, nll_logps, _ = tensors
    config = LossConfig.from_key(key)
    given = LossTensors(*tensors, poison_outputs())
    loss = GroupPreferenceLossFunction.apply(policy, ref, emb, nll_logps, given, config, store_state)
    metrics, stats, totals, chosen_counts, rejected_counts = given.aux
    if config.check_inputs:
        raise_kernel_checks(totals, stats, policy.shape[1], too_few_reason or None,
                            None if emb is None else emb.dtype)
    return loss, metrics, stats, totals, chosen_counts, rejected_counts


def _run_reference(args: GroupLossArguments, options: dict, checks: DataChecks, valid: torch.Tensor) -> LossOutput:
    """The reference backend: :func:`divkernels.reference.group_preference_loss` and its data checks."""
    checks.emb(args.emb, valid)
    reference_options = {k: v for k, v in options.items() if k not in ("pairs", "backend")}
    output = reference.group_preference_loss(args.policy_logps, args.rewards, args.encoders or None,
                                             args.ref_logps, valid, pairs=args.pairs, pair_index=args.pair_index,
                                             **reference_options, **args.extras)
    if output.logdet is not None:
        check_factorization(checks, lambda: torch.isnan(output.logdet))
    return output


def _config_fields(options: dict, args: GroupLossArguments, given_weights: bool, in_kernel_checks: bool,
                   resolved: str) -> tuple:
    """:class:`LossConfig`'s fields, in order, for one call."""
    values = {**options, "pairs": args.pairs, "given_weights": given_weights, "check_inputs": in_kernel_checks,
              "needs_two": args.needs_emb_reason is not None, "kernel_backend": resolved}
    return tuple(values[name] for name in FIELD_NAMES)


def _kernel_weights(args: GroupLossArguments, resolved: str, valid: torch.Tensor | Callable[[], torch.Tensor],
                    options: dict) -> torch.Tensor | None:
    """The weights the kernels take as given: the caller's, the partition weights of a judge's links
    (the partition op's kernel on the same backend), or the DDPO weights combined over several encoders
    (the kernels weigh one encoder's deviation themselves); None otherwise."""
    if args.extras["weights"] is None and options["diversity"] == "partition":
        return partition_weights(args.extras["equivalence"], args.mask, resolved)
    if len(args.encoders) <= 1:
        return args.extras["weights"]
    kernel = "triton" if resolved == "triton" else "auto"
    devs = [deviation(e.detach(), args.mask, backend=kernel, check_inputs=False) for e in args.encoders]
    return reference.deviation_weights(devs, valid() if callable(valid) else valid, options["deviation_norm"],
                                       options["min_deviation"])


def _logdet_column(stats: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """``[B]`` logdet from the per-group stats, in ``emb``'s accumulation dtype (the stats are in the call's)."""
    logdet, dtype = stats.select(1, STAT["logdet"]), reference.compute_dtype(emb.dtype)
    return logdet if logdet.dtype == dtype else logdet.to(dtype)


def _check_kernel_outputs(checks: DataChecks, output: LossOutput, stats: torch.Tensor, emb: torch.Tensor | None,
                          in_kernel_checks: bool) -> None:
    """The checks of a kernel call the forward kernel did not resolve itself: NaN/inf in ``emb`` (from the
    kernel's norms) and a failed factorization (a NaN logdet)."""
    if in_kernel_checks:
        return
    if emb is not None:  # first: a non-finite emb is why its factorization failed
        checks.emb_flagged(lambda: stats[:, STAT["emb_nonfinite"]] > 0, emb.dtype)
    if output.logdet is not None:
        check_factorization(checks, lambda: torch.isnan(output.logdet))



@takes_loss_options
def group_preference_loss(
    policy_logps: torch.Tensor,
    rewards: torch.Tensor,
    emb: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    pair_index: torch.Tensor | None = None,
    divpo_scores: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    nll_logps: torch.Tensor | None = None,
    nll_tokens: torch.Tensor | None = None,
    equivalence: torch.Tensor | None = None,
    check_inputs: bool = True,
    backend: str = "auto",
    **options: object,
) -> LossOutput:
    """Preference loss over a batch of response groups, with diversity-weighted pairs.

    With ``(i, j)`` the (chosen, rejected) pairs inside each group, ``P`` their number, ``l`` the
    pair loss of ``loss`` and ``w_i`` the diversity weight of the chosen response (a constant):
    ``sum w_i l_ij / P + cpo_alpha * NLL - diversity_alpha * mean_b logdet_b``; for ``loss="orpo"``
    with the default ``orpo_weighting="dorpo"`` (DORPO, Chung et al. 2025, arXiv 2503.17126, the
    authors' ``models/dorpo_trainer.py``; with ``w = 1`` TRL's ORPO):
    ``mean_P(w_i) * NLL - lambda mean_P log sigmoid(w_i u_ij)``; for ``loss="dpo_listwise"`` (the DPO
    paper's Plackett-Luce form) ``sum_i w_i log(1 + sum_j C_ij e^(-beta (z_i - z_j))) / P``, each chosen
    response against all it is preferred to at once (docs/passk.md). ``NLL`` is the token-mean negative
    log-likelihood of the pairs' chosen sequences (``nll_logps`` / ``nll_tokens``; by default
    ``mean_P(-policy_logps)``). The formulas and the code they follow are in
    :func:`divkernels.reference.group_preference_loss`.

    Args:
        policy_logps: ``[B, G]`` sequence log-probs of the policy: summed token log-probs for dpo,
            ipo and dpo_listwise, mean token log-probs for orpo and simpo (the op does not renormalize).
        rewards: ``[B, G]`` quality scores that order the pairs; no grad.
        emb: ``[B, G, D]`` response embeddings, or a sequence of them from several encoders (DDPO
            weights then combine their deviations as the authors do, :func:`divkernels.reference.ddpo_weights`;
            the first serves everything else). Needed for diversity weights, DivPO selection by
            deviation and the logdet regularizer; gradients reach it through the regularizer.
        ref_logps: ``[B, G]`` reference-model log-probs for dpo/ipo; None means reference-free
            (0). orpo and simpo do not use it.
        mask: ``[B, G]`` bool, True for real responses; None means all real.
        pair_index: ``[B, P, 2]`` integer (chosen, rejected) indices for ``pairs="explicit"``;
            ``(-1, -1)`` rows are padding.
        divpo_scores: ``[B, G]`` diversity scores for DivPO instead of deviation (e.g.
            ``-policy_logps``, DivPO's "model probability" criterion).
        weights: ``[B, G]`` weights of the chosen responses to use as given (constants), instead of
            computing them from ``diversity``.
        token_counts: ``[B, G]`` completion token counts, > 0; ``loss="ipo"`` divides each
            log-ratio by its count, as TRL's DPOTrainer does (``policy_logps`` stay summed).
        nll_logps: ``[B, G]`` summed log-probs of every predicted token of each sequence, prompt
            included (TRL's ORPO/CPO NLL is over prompt and completion); differentiable.
        nll_tokens: ``[B, G]`` the number of those tokens, > 0.
        equivalence: ``[B, G, G]`` bool, a judge's links (pairs ``i < j``) for ``diversity="partition"``:
            the chosen response's weight is its partition diversity
            (:func:`divkernels.partition_diversity`) normalized to mean 1 over the group (ours).
        check_inputs: NaN/inf, group-size and pair-index checks (one host sync); False skips.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Options (keyword-only; declared in :class:`divkernels.loss_config.LossConfig`):
        {options}

    Returns:
        :class:`LossOutput`: ``.loss`` scalar (float32, float64 for float64 logps),
        ``.metrics`` and ``.logdet`` (``[B]`` when computed).
    """
    options = {**with_defaults(options), "backend": backend}
    extras = {"divpo_scores": divpo_scores, "weights": weights, "token_counts": token_counts,
              "nll_logps": nll_logps, "nll_tokens": nll_tokens, "equivalence": equivalence}
    if torch.compiler.is_compiling():
        args = check_group_loss_arguments(policy_logps, rewards, emb, ref_logps, mask, pair_index=pair_index,
                                          options=options, **extras)
    else:
        args = _checked_arguments(policy_logps, rewards, emb, ref_logps, mask, pair_index, extras, options)
    return _run(args, options, check_inputs)
