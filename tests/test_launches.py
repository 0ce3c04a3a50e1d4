"""Fused in fact: device launches and host syncs per call, counted as ``--suite host`` counts them.

Every aten op that launches a kernel is seen by a ``TorchDispatchMode``; every Triton launch by a
hook on the launcher (here the interpreter runs the kernels, so the numbers are real). The fused
loss's forward + backward (the autograd engine's ``ones_like`` included) takes at most 4 launches
(5 from G = 65, a 128 tile, on, where its forward is split; 6 with a float32 sweep) and no sync in
every loss / diversity / pairs mode; the other ops at most 2 each way; ``check_inputs=True`` adds
one sync.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import random_groups, random_logps, random_pair_index

import divkernels as dk
from divkernels.benchmarks.host import LaunchCounter, triton_launches
from divkernels.ops.common import ENV_POISON
from divkernels.types import DIVERSITIES, LOSSES


@pytest.fixture(autouse=True)
def _no_poisoning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poisoned outputs (a fill launch each) are a test aid; training does not pay for them."""
    monkeypatch.setenv(ENV_POISON, "0")


def count(call) -> tuple[int, int, object]:
    """``(launches, syncs, result)`` of ``call()``."""
    with triton_launches(stub=False) as names, LaunchCounter() as counter:
        result = call()
    count.last = (names, dict(counter.ops))
    return counter.launches + len(names), counter.syncs, result


def _loss_inputs(generator: torch.Generator):
    emb, mask = random_groups(2, 6, 8, generator, dtype=torch.float32)
    emb = torch.nan_to_num(emb).to(torch.bfloat16).requires_grad_()
    policy = random_logps(2, 6, generator, torch.float32).requires_grad_()
    ref = random_logps(2, 6, generator, torch.float32)
    rewards = torch.randn(2, 6, generator=generator)
    return policy, ref, rewards, emb, mask


@pytest.mark.parametrize("pairs", ["all", "best_worst", "divpo", "explicit"])
def test_fused_loss_step_is_at_most_four_launches_and_no_sync(pairs: str, generator: torch.Generator) -> None:
    policy, ref, rewards, emb, mask = _loss_inputs(generator)
    pair_index = random_pair_index(mask, 4, generator) if pairs == "explicit" else None
    links = torch.rand(2, 6, 6, generator=generator) < 0.3  # a judge's links, for diversity="partition"
    for loss, diversity, alpha in itertools.product(LOSSES, DIVERSITIES, (0.0, 0.1)):
        options = dict(loss=loss, diversity=diversity, pairs=pairs, pair_index=pair_index, diversity_alpha=alpha,
                       cpo_alpha=0.5 if loss != "orpo" else 0.0, backend="triton", check_inputs=False,
                       equivalence=links if diversity == "partition" else None)

        def step(options=options):
            policy.grad = emb.grad = None
            out = dk.group_preference_loss(policy, rewards, emb, ref, mask, **options)
            out.loss.backward()
            return out

        step()  # first call: caches
        launches, syncs, out = count(step)
        where = f"{loss}/{diversity}/{pairs}/alpha={alpha}"
        most = 5 if diversity == "partition" else 4  # the partition weights' own launch comes first
        assert launches <= most, f"{where}: {launches} launches {count.last}"
        assert syncs == 0, f"{where}: {syncs} syncs"
        assert policy.grad is not None and torch.isfinite(out.loss)


SWEEP = ["_logdet_forward_kernel", "_logdet_forward_kernel", "_group_loss_forward_kernel",
         "_group_loss_finalize_kernel"]


@pytest.mark.parametrize(("diversity", "alpha", "first"), [
    ("logdet_gain", 0.0, SWEEP), ("deviation", 0.1, SWEEP),
    ("deviation", 0.0, ["_similarity_forward_kernel", "_group_loss_forward_kernel", "_group_loss_finalize_kernel"])])
def test_largest_groups_add_one_launch(diversity: str, alpha: float, first: list[str],
                                       generator: torch.Generator) -> None:
    """At a 128 tile (G = 65-128) the forward with embeddings is split (group_loss.split_forward): the similarity
    forward first, or the logdet forward and, in float32, its float64 fix-up launch (then the plain finalize
    kernel), so a step takes at most 5 launches (6 with a sweep), still without a sync."""
    emb, mask = random_groups(2, 128, 8, generator, dtype=torch.float32)
    emb = torch.nan_to_num(emb).to(torch.bfloat16).requires_grad_()
    policy = random_logps(2, 128, generator, torch.float32).requires_grad_()
    rewards = torch.randn(2, 128, generator=generator)
    ref = policy.detach() - 0.1

    def step():
        policy.grad = emb.grad = None
        out = dk.group_preference_loss(policy, rewards, emb, ref, mask, diversity=diversity,
                                       pairs="divpo", diversity_alpha=alpha, backend="triton", check_inputs=False)
        out.loss.backward()
        return out

    step()
    launches, syncs, out = count(step)
    names = count.last[0]
    assert names[:len(first)] == first, names
    assert launches <= len(first) + 2 and syncs == 0, count.last  # + ones_like and the backward kernel
    assert torch.isfinite(out.loss)


def test_checked_loss_adds_one_sync(generator: torch.Generator) -> None:
    policy, ref, rewards, emb, mask = _loss_inputs(generator)

    def step():
        policy.grad = emb.grad = None
        out = dk.group_preference_loss(policy, rewards, emb, ref, mask, diversity="deviation", diversity_alpha=0.1,
                                       backend="triton", check_inputs=True)
        out.loss.backward()

    step()
    launches, syncs, _ = count(step)
    assert syncs == 1 and launches <= 4, count.last


@pytest.mark.parametrize("op", ["pairwise_similarity", "deviation", "logdet_diversity"])
def test_differentiable_ops_take_one_launch_each_way(op: str, generator: torch.Generator) -> None:
    """One launch each way; the logdet's fp32 forward adds its float64 fix-up launch (logdet.fixup_launches)."""
    emb, mask = random_groups(2, 6, 8, generator, dtype=torch.float32)
    emb.requires_grad_()
    function = getattr(dk, op)
    outputs = function(emb, mask, backend="triton", check_inputs=False)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [torch.rand_like(o) for o in outputs]
    forward, forward_syncs, outputs = count(lambda: function(emb, mask, backend="triton", check_inputs=False))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    backward, backward_syncs, _ = count(lambda: torch.autograd.backward(outputs, grads))
    assert (forward, backward, forward_syncs, backward_syncs) == (2 if op == "logdet_diversity" else 1, 1, 0, 0)


@pytest.mark.parametrize("diversity", ["none", "darling", "dqo", "deviation"])
def test_forward_only_ops_take_one_launch(diversity: str, generator: torch.Generator) -> None:
    emb, mask = random_groups(2, 6, 8, generator, dtype=torch.float32)
    rewards = torch.randn(2, 6, generator=generator)
    launches, syncs, _ = count(lambda: dk.group_advantages(rewards, emb, mask, diversity=diversity, backend="triton",
                                                           check_inputs=False))
    assert (launches, syncs) == (2 if diversity == "dqo" else 1, 0), count.last  # dqo: + the float64 fix-up
    launches, syncs, _ = count(lambda: dk.group_advantages(rewards, emb, mask, diversity="darling",
                                                           darling_reward="minmax", backend="triton",
                                                           check_inputs=False))
    assert (launches, syncs) == (2, 0)
    launches, syncs, _ = count(lambda: dk.partition_diversity(emb, mask, backend="triton", check_inputs=False))
    assert (launches, syncs) == (1, 0), count.last


@pytest.mark.parametrize(("estimator", "k"), [("passk_analytic", 3), ("pkpo", 2), ("best_minus_second", None)])
def test_passk_advantages_take_one_launch(estimator: str, k: int | None, generator: torch.Generator) -> None:
    """A pass@k estimator is a branch of the advantages kernel: one launch, no sync (its ``log a!`` table is
    made once per size and device), with DARLING's labels too."""
    rewards = torch.rand(2, 6, generator=generator)
    mask = torch.rand(2, 6, generator=generator) < 0.8
    labels = torch.randint(0, 3, (2, 6), generator=generator)
    for options in ({}, {"diversity": "darling", "partition": labels}):
        def call(options: dict = options) -> torch.Tensor:
            return dk.group_advantages(rewards, None, mask, estimator=estimator, k=k, backend="triton",
                                       check_inputs=False, **options)
        call()  # the table
        launches, syncs, _ = count(call)
        assert (launches, syncs) == (1, 0), count.last
