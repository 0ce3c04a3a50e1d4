"""group_advantages and policy_gradient_loss."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, random_groups, random_logps, use_backend

import divkernels as dk


def _trl_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """TRL GRPOTrainer's formula on full groups: (r - mean) / (std + 1e-4), unbiased std."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + 1e-4)


def test_plain_advantages_match_trl(generator: torch.Generator) -> None:
    rewards = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    assert_close(dk.group_advantages(rewards), _trl_grpo_advantages(rewards))
    assert_close(dk.group_advantages(rewards, scale="none"), rewards - rewards.mean(-1, keepdim=True))


def test_ragged_groups_equal_their_valid_block(generator: torch.Generator) -> None:
    emb, mask = random_groups(4, 7, 5, generator)
    rewards = torch.where(mask, torch.randn(4, 7, generator=generator, dtype=torch.float64), torch.nan)
    for diversity in ("none", "dqo", "deviation"):
        adv = dk.group_advantages(rewards, emb, mask, diversity=diversity, alpha=0.3)
        assert (adv[~mask] == 0).all()
        for b in range(4):
            rows = mask[b].nonzero().flatten()
            alone = dk.group_advantages(rewards[b:b + 1, rows], emb[b:b + 1, rows], diversity=diversity, alpha=0.3)
            assert_close(adv[b, rows], alone[0])


def test_all_equal_rewards_give_zero_advantages() -> None:
    assert (dk.group_advantages(torch.ones(3, 4)) == 0).all()


def test_dqo_and_deviation_bonuses(generator: torch.Generator) -> None:
    emb, _ = random_groups(3, 6, 4, generator, ragged=False)
    rewards = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    _, gains = dk.logdet_diversity(emb, eps=1e-3, return_gains=True)
    assert_close(dk.group_advantages(rewards, emb, diversity="dqo", alpha=0.5, eps=1e-3),
                 _trl_grpo_advantages(rewards + 0.5 * gains))
    dev = dk.deviation(emb)
    assert_close(dk.group_advantages(rewards, emb, diversity="deviation", alpha=0.5, scale="none"),
                 rewards + 0.5 * dev - (rewards + 0.5 * dev).mean(-1, keepdim=True))


def test_darling_multiplies_the_raw_reward_by_partition_diversity() -> None:
    """DARLING (the authors' verl fork): r * (n - |class|) / (n - 1), floored at 0.1; published runs
    use no std scaling, which scale=None (the default) takes for darling."""
    rewards = torch.tensor([[1.0, 3.0, 2.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 2]])
    div = torch.tensor([[2 / 3, 2 / 3, 1.0, 1.0]], dtype=torch.float64)  # classes of size 2, 2, 1, 1
    shaped = rewards * div  # (2/3, 2, 2, 5)
    adv = dk.group_advantages(rewards, diversity="darling", partition=labels)
    assert_close(adv, shaped - shaped.mean())
    std = dk.group_advantages(rewards, diversity="darling", partition=labels, scale="std")
    assert_close(std, (shaped - shaped.mean()) / (shaped.std() + 1e-4))
    # one class: every diversity is 0, floored at 0.1; min_diversity=0 keeps the 0
    same = torch.zeros(1, 4, dtype=torch.long)
    floored = dk.partition_diversity(partition=same)
    assert_close(floored, torch.full((1, 4), 0.1))
    assert_close(dk.partition_diversity(partition=same, min_diversity=0.0), torch.zeros(1, 4))
    # our earlier variant: quality min-max scaled over the batch first (all-equal rewards: 1)
    minmax = dk.group_advantages(rewards, diversity="darling", partition=labels, darling_reward="minmax")
    scaled = (rewards - 1.0) / 4.0 * div
    assert_close(minmax, scaled - scaled.mean())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_darling_classes_are_connected_components(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain e0 ~ e1 ~ e2 ~ e3 (neighbours at cos 0.92, the rest below tau = 0.9) is one class, as
    union-find makes it; transitive=False counts only direct neighbours."""
    use_backend(backend, torch.device("cpu"), monkeypatch)
    angles = torch.tensor([0.0, 0.4, 0.8, 1.2, 3.0], dtype=torch.float64)
    emb = torch.stack([angles.cos(), angles.sin()], -1)[None]
    chain = dk.partition_diversity(emb, tau=0.9, backend=backend)
    assert_close(chain, torch.tensor([[0.25, 0.25, 0.25, 0.25, 1.0]], dtype=torch.float64))
    direct = dk.partition_diversity(emb, tau=0.9, transitive=False, backend=backend)
    assert_close(direct, torch.tensor([[0.75, 0.5, 0.5, 0.75, 1.0]], dtype=torch.float64))
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5]], dtype=torch.float64)
    shaped = rewards * torch.tensor([[0.25, 0.25, 0.25, 0.25, 1.0]], dtype=torch.float64)
    assert_close(dk.group_advantages(rewards, emb, diversity="darling", tau=0.9, backend=backend),
                 shaped - shaped.mean())


def test_advantage_errors() -> None:
    rewards = torch.randn(2, 3)
    with pytest.raises(ValueError, match="diversity='dqo' needs emb"):
        dk.group_advantages(rewards, diversity="dqo")
    with pytest.raises(ValueError, match="diversity='grpo' is not valid; choose one of 'none', 'darling'"):
        dk.group_advantages(rewards, diversity="grpo")
    with pytest.raises(ValueError, match="scale='mad' is not valid"):
        dk.group_advantages(rewards, scale="mad")
    with pytest.raises(ValueError, match="partition labels are only used with diversity='darling'"):
        dk.group_advantages(rewards, partition=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rewards has NaN or inf in valid responses of groups \[0\]"):
        dk.group_advantages(torch.tensor([[torch.nan, 1.0, 2.0], [0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"diversity='deviation' needs at least 2 valid responses .* \[1\]"):
        dk.group_advantages(rewards, torch.randn(2, 3, 4), torch.tensor([[True] * 3, [False, True, False]]),
                            diversity="deviation")


def test_policy_gradient_loss_value_and_gradient(generator: torch.Generator) -> None:
    policy = random_logps(3, 4, generator).requires_grad_(True)
    adv = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, True, True]])
    loss = dk.policy_gradient_loss(policy, adv, mask=mask)
    assert loss.item() == pytest.approx(-(adv[mask].mean()).item())
    loss.backward()
    assert_close(policy.grad, torch.where(mask, -adv / mask.sum(), 0.0))


def test_policy_gradient_loss_clips_the_ratio() -> None:
    policy = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss = dk.policy_gradient_loss(policy, adv, old, clip=0.2)
    ratio = torch.e
    # positive advantage: min(e * 1, 1.2 * 1) = 1.2 (clipped, no grad); negative: min(-e, -1.2) = -e
    assert loss.item() == pytest.approx(-(1.2 - ratio) / 2)
    loss.backward()
    assert policy.grad[0, 0].item() == 0.0 and policy.grad[0, 1].item() == pytest.approx(ratio / 2)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        dk.policy_gradient_loss(policy, adv, clip=-0.1)
