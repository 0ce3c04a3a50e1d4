"""Property tests over random shapes, masks and degenerate groups (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from helpers import assert_close
from hypothesis import given, settings

import divkernels as dk

LOSSES = ("dpo", "ipo", "orpo", "simpo", "dpo_listwise")
DIVERSITIES = ("none", "deviation", "logdet_gain")
PAIRS = ("all", "best_worst", "divpo")


@st.composite
def groups(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Random groups; some duplicated responses, n > D, tied or all-equal rewards, ragged masks."""
    batch = draw(st.integers(1, 4))
    group = draw(st.integers(2, 9))
    dim = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, group, dim, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):  # duplicate responses: singular similarity matrices
        emb[:, 1] = emb[:, 0] * 3.0
    sizes = [draw(st.integers(2, group)) for _ in range(batch)]
    mask = torch.stack([torch.randperm(group, generator=gen) < size for size in sizes])
    reward_levels = draw(st.sampled_from([1, 2, 3, 100]))  # 1: all-equal rewards, no pairs
    rewards = torch.randint(0, reward_levels, (batch, group), generator=gen).to(torch.float64)
    policy = -torch.rand(batch, group, generator=gen, dtype=torch.float64) * 4 - 1e-3
    ref = -torch.rand(batch, group, generator=gen, dtype=torch.float64) * 4 - 1e-3
    return {"emb": emb, "mask": mask, "rewards": rewards, "policy_logps": policy, "ref_logps": ref}


@settings(max_examples=60, deadline=None)
@given(inputs=groups(), loss=st.sampled_from(LOSSES), diversity=st.sampled_from(DIVERSITIES),
       pairs=st.sampled_from(PAIRS), alpha=st.sampled_from([0.0, 0.1]))
def test_loss_is_finite_and_decomposes_over_groups(inputs: dict[str, torch.Tensor], loss: str, diversity: str,
                                                     pairs: str, alpha: float) -> None:
    emb = inputs["emb"].clone().requires_grad_(True)
    policy = inputs["policy_logps"].clone().requires_grad_(True)
    options = {"loss": loss, "diversity": diversity, "pairs": pairs}
    out = dk.group_preference_loss(policy, inputs["rewards"], emb, inputs["ref_logps"], inputs["mask"],
                                   diversity_alpha=alpha, **options)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(policy.grad).all() and (emb.grad is None or torch.isfinite(emb.grad).all())
    assert all(torch.isfinite(value) for value in out.metrics.values())

    # sum over pairs of the whole batch == sum of each group's own weighted pair-loss sums (DORPO's
    # NLL term is a product of two batch means, so its pair-weighted form decomposes: "pair")
    if loss == "orpo":
        options["orpo_weighting"] = "pair"
        out = dk.group_preference_loss(inputs["policy_logps"], inputs["rewards"], inputs["emb"],
                                       inputs["ref_logps"], inputs["mask"], diversity_alpha=alpha, **options)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(inputs["mask"].shape[0]):
        rows = inputs["mask"][b].nonzero().flatten()
        alone = dk.group_preference_loss(inputs["policy_logps"][b:b + 1, rows], inputs["rewards"][b:b + 1, rows],
                                         inputs["emb"][b:b + 1, rows], inputs["ref_logps"][b:b + 1, rows],
                                         **options)
        total = total + alone.loss.detach() * alone.metrics["pairs"].double()
    batch_sum = (out.loss.detach() + alpha * out.logdet.mean() if alpha else out.loss.detach()) * out.metrics["pairs"]
    assert_close(batch_sum, total, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(inputs=groups(), estimator=st.sampled_from(("passk_analytic", "pkpo", "best_minus_second")),
       k=st.integers(1, 9), scale=st.sampled_from(("std", "none")))
def test_passk_advantages_are_finite_and_zero_at_padding(inputs: dict[str, torch.Tensor], estimator: str, k: int,
                                                         scale: str) -> None:
    """Every pass@k estimator: finite, 0 at padding; passk_analytic sums to 0 per group, pkpo and
    best_minus_second are >= 0 (a response adds to the best of its subsets or nothing)."""
    mask, rewards = inputs["mask"], inputs["rewards"]
    group = mask.shape[1]
    size = None if estimator == "best_minus_second" else min(k, group)
    adv = dk.group_advantages(rewards, mask=mask, estimator=estimator, k=size, scale=scale)
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all()
    if estimator == "passk_analytic":
        assert_close(adv.sum(-1), torch.zeros(mask.shape[0], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    else:
        assert (adv >= 0).all()


@settings(max_examples=40, deadline=None)
@given(inputs=groups(), diversity=st.sampled_from(("none", "darling", "dqo", "deviation")),
       scale=st.sampled_from(("std", "none")))
def test_advantages_are_finite_and_zero_mean_per_group(inputs: dict[str, torch.Tensor], diversity: str,
                                                        scale: str) -> None:
    mask = inputs["mask"]
    adv = dk.group_advantages(inputs["rewards"], inputs["emb"], mask, diversity=diversity, scale=scale)
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all()
    assert_close(adv.sum(-1), torch.zeros(mask.shape[0], dtype=torch.float64), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(inputs=groups())
def test_diversity_measures_are_finite_and_in_range(inputs: dict[str, torch.Tensor]) -> None:
    emb, mask = inputs["emb"], inputs["mask"]
    logdet, gains = dk.logdet_diversity(emb, mask, return_gains=True)
    dev = dk.deviation(emb, mask)
    div = dk.partition_diversity(emb, mask)
    vendi = dk.vendi_score(emb, mask)
    assert torch.isfinite(logdet).all() and torch.isfinite(gains).all()
    # each gain is log of a residual variance in [eps, 1 + eps]: [0, log 2] for DQO's eps = 1
    assert ((gains >= -1e-12) & (gains <= torch.log(torch.tensor(2.0, dtype=torch.float64)) + 1e-12)).all()
    _, small_gains = dk.logdet_diversity(emb, mask, eps=1e-4, return_gains=True)
    assert (small_gains >= torch.log(torch.tensor(1e-4, dtype=torch.float64)) - 1e-9).all()
    assert (small_gains <= torch.log(torch.tensor(1 + 1e-4, dtype=torch.float64)) + 1e-12).all()
    assert ((dev >= -1e-12) & (dev <= 2 + 1e-12)).all() and (div[~mask] == 0).all()
    assert ((div[mask] >= 0.1 - 1e-12) & (div[mask] <= 1)).all()  # DARLING's floor
    sizes = mask.sum(-1).to(torch.float64)
    assert ((vendi >= 1 - 1e-9) & (vendi <= sizes + 1e-9)).all()
