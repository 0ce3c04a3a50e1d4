"""What the fused loss checks beyond the kernels: the metric names a call reports, the in-kernel data
checks' messages (one host sync), the host-side data checks of the calls the forward kernel does not
check itself, and the static checks run once per call signature."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from divkernels.loss_config import STAT, LossConfig
from divkernels.ops.logdet import check_factorization
from divkernels.validation import (
    NONFINITE_MESSAGE,
    POSITIVE_MESSAGE,
    DataChecks,
    GroupLossArguments,
    check_group_loss_arguments,
    emb_message,
    too_few_message,
)


@functools.lru_cache(maxsize=64)
def metric_names(config: LossConfig, has_emb: bool) -> tuple[str, ...]:
    """The metrics a call reports (views of the finalize kernel's vector)."""
    names = ["loss", "pairs", "groups_without_pairs", "rewards/chosen", "rewards/rejected", "rewards/margins",
             "rewards/accuracies", "logps/chosen", "logps/rejected"]
    if config.has_nll:
        names.append("nll_loss")
    if config.loss == "orpo":
        names += ["log_odds_ratio", "log_odds_chosen"]
    if has_emb:
        names += ["diversity/mean_similarity", "diversity/deviation"]
        if config.needs_logdet:
            names.append("diversity/logdet")
    return tuple(names)


# Messages of the data checks (loss_config.CHECK_STATS; the host checks say the same), naming the failing groups.
CHECK_MESSAGES = {
    **{f"bad_{name}": NONFINITE_MESSAGE.replace("{name}", name)
       for name in ("policy_logps", "rewards", "ref_logps", "divpo_scores", "weights", "nll_logps")},
    **{f"bad_{name}": POSITIVE_MESSAGE.replace("{name}", name) for name in ("token_counts", "nll_tokens")},
    "orpo_nonnegative": "loss='orpo' needs mean token log-probs < 0 in policy_logps; groups {groups} have values >= 0",
    "bad_pair_index": "pair_index rows of groups {groups} do not name two different valid responses in [0, {group}) "
                      "(use (-1, -1) for padding rows)",
}
# The order the checks are reported in: inputs first, then what the computation found.
CHECK_ORDER = ("bad_policy_logps", "bad_rewards", "bad_ref_logps", "bad_divpo_scores", "bad_weights",
               "bad_token_counts", "bad_nll_logps", "bad_nll_tokens", "too_few_responses", "orpo_nonnegative",
               "bad_pair_index", "emb_nonfinite", "factorization_failed")


def raise_kernel_checks(totals: torch.Tensor, stats: torch.Tensor, group: int, too_few_reason: str | None,
                        emb_dtype: torch.dtype | None) -> None:
    """The in-kernel data checks: one host sync reads the totals; a failure names its groups."""
    counts = totals.tolist()
    for name in CHECK_ORDER:
        if counts[STAT[name]] > 0:
            groups = stats[:, STAT[name]].nonzero().flatten()[:8].tolist()
            if name == "too_few_responses":
                raise ValueError(too_few_message(too_few_reason or "this call")(groups))
            if name == "factorization_failed":
                checks = DataChecks(True)
                check_factorization(checks, stats[:, STAT[name]] > 0)
                checks.raise_if_failed()
            if name == "emb_nonfinite":
                raise ValueError(emb_message(emb_dtype or torch.float32)(groups))
            raise ValueError(CHECK_MESSAGES[name].format(groups=groups, group=group))



@dataclass
class _Plan:
    """What the static checks found for one signature of a call (see :func:`_checked_arguments`)."""

    pairs: str
    needs_emb_reason: str | None
    device: torch.device


# Signature of a call (options and each tensor's shape, dtype and device) -> its _Plan.
_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 512


def _metadata(value: object) -> object:
    """What the static checks look at in one argument: a tensor's shape, dtype and device."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.shape, value.dtype, value.device
    if isinstance(value, (list, tuple)):
        return tuple(_metadata(item) for item in value)
    return type(value), id(value)


def _checked_arguments(policy_logps: object, rewards: object, emb: object, ref_logps: object, mask: object,
                       pair_index: object, extras: dict[str, object],
                       options: dict[str, object]) -> GroupLossArguments:
    """:func:`check_group_loss_arguments`, run once per signature: the static checks see only
    metadata, so a training loop that repeats a signature pays one dictionary lookup per step (a
    call that fails its checks raises and is never remembered)."""
    try:
        values = tuple(options.values())
        key = (values, tuple(map(type, values)), _metadata(policy_logps), _metadata(rewards), _metadata(emb),
               *(None if value is None else _metadata(value)
                 for value in (ref_logps, mask, pair_index, *extras.values())))
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable option: the checks explain it
        key, plan = None, None
    if plan is None:
        args = check_group_loss_arguments(policy_logps, rewards, emb, ref_logps, mask, pair_index=pair_index,
                                          options=options, **extras)
        plan = _Plan(args.pairs, args.needs_emb_reason, args.device)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
        return args
    encoders = [] if emb is None else list(emb) if isinstance(emb, (list, tuple)) else [emb]
    return GroupLossArguments(policy_logps, rewards, encoders, ref_logps, mask, plan.pairs, pair_index, extras,
                              plan.needs_emb_reason, plan.device)


def _host_data_checks(checks: DataChecks, args: GroupLossArguments, valid: torch.Tensor, loss: str) -> None:
    """The data checks of a call the forward kernel does not check itself (the reference, the CUDA
    extension, several encoders): per-group flags, resolved with one sync by ``checks``."""
    policy_logps, extras, group = args.policy_logps, args.extras, args.policy_logps.shape[1]
    for name, value in (("policy_logps", policy_logps), ("rewards", args.rewards), ("ref_logps", args.ref_logps),
                        *extras.items()):
        if name != "equivalence":  # bool links: nothing to be non-finite
            checks.finite(name, value, valid)
    for k, e in enumerate(args.encoders[1:], start=1):  # the first is checked with the kernel's norms
        checks.emb(e, valid, f"emb[{k}]")
    if args.needs_emb_reason is not None:
        checks.group_size(valid, args.needs_emb_reason)

    def message(name: str) -> Callable[[list[int]], str]:
        return lambda groups: CHECK_MESSAGES[name].format(groups=groups, group=group)

    if loss == "orpo":
        checks.require((valid & (policy_logps >= 0)).any(-1), message("orpo_nonnegative"))
    if args.pair_index is not None:
        checks.require(_bad_pair_rows(args.pair_index, valid), message("bad_pair_index"))
    for name in ("token_counts", "nll_tokens"):
        value = extras.get(name)
        if value is not None:
            checks.require((valid & ~(value > 0)).any(-1), message(f"bad_{name}"))


def _bad_pair_rows(pair_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]``: a row of the group's pairs names no two different valid responses (``(-1, -1)`` rows are padding)."""
    group = valid.shape[1]
    chosen, rejected = pair_index[..., 0], pair_index[..., 1]
    padding = (chosen < 0) & (rejected < 0)
    in_range = (chosen >= 0) & (chosen < group) & (rejected >= 0) & (rejected < group)
    chosen_valid = valid.gather(1, chosen.clamp(0, group - 1).long())
    rejected_valid = valid.gather(1, rejected.clamp(0, group - 1).long())
    good = in_range & chosen_valid & rejected_valid & (chosen != rejected)
    return (~padding & ~good).any(-1)
