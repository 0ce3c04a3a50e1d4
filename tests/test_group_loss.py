"""group_preference_loss: hand-computed cases, TRL equivalence, pair modes, invariances, errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    accumulation_rtol,
    assert_close,
    assert_matches,
    assert_rounded,
    condition_number,
    random_groups,
    random_logps,
)

import divkernels as dk
from divkernels import reference

METRICS = {"loss", "pairs", "groups_without_pairs", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracies", "logps/chosen", "logps/rejected"}


def softplus_neg(h: float) -> float:
    """-log sigmoid(h) = log(1 + exp(-h))."""
    return math.log1p(math.exp(-h))


def _three_responses() -> dict[str, torch.Tensor]:
    """e0 = e2 (duplicates), e1 orthogonal; rewards 3 > 2 > 1; policy - ref = (0.5, 0, -0.5)."""
    return {
        "emb": torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]], dtype=torch.float64),
        "rewards": torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64),
        "policy_logps": torch.tensor([[-1.5, -4.0, -3.5]], dtype=torch.float64),
        "ref_logps": torch.tensor([[-2.0, -4.0, -3.0]], dtype=torch.float64),
    }


def test_ddpo_three_response_group_computed_on_paper(loss_backend: str) -> None:
    group_loss = functools.partial(dk.group_preference_loss, backend=loss_backend)
    # dev = (0.5, 1, 0.5). DDPO (the authors' min-max transform): w = (d - d_min) / (mean d - d_min)
    # = (0, 3, 0). Pairs (0,1), (0,2), (1,2) with beta = 1: h = 0.5, 1.0, 0.5, so only (1,2) counts:
    # loss = (0 + 0 + 3 l(0.5)) / 3.
    inputs = _three_responses()
    out = group_loss(**inputs, loss="dpo", diversity="deviation", beta=1.0)
    assert out.loss.item() == pytest.approx(softplus_neg(0.5), rel=1e-12)
    assert out.metrics["pairs"].item() == 3
    assert out.metrics["diversity/deviation"].item() == pytest.approx(2 / 3)
    assert out.metrics["diversity/mean_similarity"].item() == pytest.approx(1 / 3)
    # implicit rewards beta (pi - ref) = (0.5, 0, -0.5); chosen over pairs: (0.5 + 0.5 + 0) / 3
    assert out.metrics["rewards/chosen"].item() == pytest.approx(1 / 3)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-1 / 3)
    assert out.metrics["rewards/margins"].item() == pytest.approx(2 / 3)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(1.0)
    # our mean normalization: w = d / mean d = (0.75, 1.5, 0.75)
    mean = group_loss(**inputs, loss="dpo", diversity="deviation", deviation_norm="mean", beta=1.0)
    expected = (0.75 * (softplus_neg(0.5) + softplus_neg(1.0)) + 1.5 * softplus_neg(0.5)) / 3
    assert mean.loss.item() == pytest.approx(expected, rel=1e-12)
    assert mean.loss.item() == pytest.approx(0.4338730, rel=1e-6)


def test_ddpo_weights_follow_the_authors_transform() -> None:
    """Two encoders: per-encoder min-max to [0, 1], geometric mean, divided by its group mean
    (transform_scores); a group of equal deviations gets weight 1 everywhere."""
    valid = torch.ones(1, 3, dtype=torch.bool)
    first = torch.tensor([[0.2, 0.6, 1.0]], dtype=torch.float64)  # z = (0, 0.5, 1)
    second = torch.tensor([[0.3, 0.1, 0.5]], dtype=torch.float64)  # z = (0.5, 0, 1)
    g = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # sqrt(z1 z2)
    assert_close(reference.ddpo_weights([first, second], valid)[0], g / g.mean())
    assert_close(reference.ddpo_weights(first, valid)[0], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    assert_close(reference.ddpo_weights(torch.full((1, 3), 0.4, dtype=torch.float64), valid), torch.ones(1, 3))
    # all combined scores equal but not 0.5: the authors' w = score + 1 = 2 g (no renormalization)
    crossed = reference.ddpo_weights([torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])],
                                     torch.ones(1, 2, dtype=torch.bool))
    assert_close(crossed, torch.zeros(1, 2))


def test_dorpo_puts_the_weight_inside_the_log_sigmoid(loss_backend: str) -> None:
    """DORPO (models/dorpo_trainer.py, Revision ver 2): mean(w_c) * NLL - lambda mean log sigmoid(w_c delta)."""
    group_loss = functools.partial(dk.group_preference_loss, backend=loss_backend)
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]], dtype=torch.float64)
    policy = torch.tensor([[-0.5, -1.5, -1.0]], dtype=torch.float64)
    rewards = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    lam = 0.25  # exact in float32 (Triton takes scalars as float32)
    w = [0.0, 3.0, 0.0]  # min-max deviation weights of (0.5, 1, 0.5)

    def log_odds(p: float) -> float:
        return p - math.log1p(-math.exp(p))

    pairs = [(0, 1), (0, 2), (1, 2)]
    p = policy[0].tolist()
    nll = sum(-p[i] for i, _ in pairs) / 3
    odds = sum(-math.log(1 / (1 + math.exp(-w[i] * (log_odds(p[i]) - log_odds(p[j]))))) for i, j in pairs) / 3
    expected = (sum(w[i] for i, _ in pairs) / 3) * nll + lam * odds
    out = group_loss(policy, rewards, emb, loss="orpo", diversity="deviation", orpo_lambda=lam)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    pair = group_loss(policy, rewards, emb, loss="orpo", diversity="deviation", orpo_lambda=lam,
                                    orpo_weighting="pair")
    expected_pair = sum(w[i] * (-p[i] - lam * math.log(1 / (1 + math.exp(-(log_odds(p[i]) - log_odds(p[j]))))))
                        for i, j in pairs) / 3
    assert pair.loss.item() == pytest.approx(expected_pair, rel=1e-12)


def test_raw_deviation_and_floor(loss_backend: str) -> None:
    group_loss = functools.partial(dk.group_preference_loss, backend=loss_backend)
    inputs = _three_responses()
    raw = group_loss(**inputs, diversity="deviation", deviation_norm="none", beta=1.0)
    expected = (0.5 * (softplus_neg(0.5) + softplus_neg(1.0)) + 1.0 * softplus_neg(0.5)) / 3
    assert raw.loss.item() == pytest.approx(expected, rel=1e-12)
    floored = group_loss(**inputs, diversity="deviation", deviation_norm="mean", min_deviation=1.0,
                                       beta=1.0)
    expected = (1.0 * (softplus_neg(0.5) + softplus_neg(1.0)) + 1.5 * softplus_neg(0.5)) / 3
    assert floored.loss.item() == pytest.approx(expected, rel=1e-12)
    minmax_floored = group_loss(**inputs, diversity="deviation", min_deviation=0.5, beta=1.0)
    expected = (0.5 * (softplus_neg(0.5) + softplus_neg(1.0)) + 3.0 * softplus_neg(0.5)) / 3
    assert minmax_floored.loss.item() == pytest.approx(expected, rel=1e-12)


def test_logdet_gain_weights_computed_on_paper(loss_backend: str) -> None:
    group_loss = functools.partial(dk.group_preference_loss, backend=loss_backend)
    # K = [[1+e, 0, 1], [0, 1+e, 0], [1, 0, 1+e]]; (K^-1)_00 = (1+e) / ((1+e)^2 - 1), (K^-1)_11 = 1/(1+e)
    eps = 2.0**-7  # exact in float32 (Triton takes scalars as float32)
    inputs = _three_responses()
    out = group_loss(**inputs, diversity="logdet_gain", eps=eps, beta=1.0)
    residual = [((1 + eps) ** 2 - 1) / (1 + eps), 1 + eps, ((1 + eps) ** 2 - 1) / (1 + eps)]
    w = [r / (sum(residual) / 3) for r in residual]
    expected = (w[0] * (softplus_neg(0.5) + softplus_neg(1.0)) + w[1] * softplus_neg(0.5)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    logdet = math.log((1 + eps) * ((1 + eps) ** 2 - 1))
    assert out.metrics["diversity/logdet"].item() == pytest.approx(logdet, rel=1e-6)
    assert out.logdet.item() == pytest.approx(logdet, rel=1e-10)


def test_single_pair_without_diversity_equals_trl_losses() -> None:
    chosen, rejected, ref_chosen, ref_rejected, beta = -3.0, -5.0, -3.5, -4.0, 0.3
    policy = torch.tensor([[chosen, rejected]], dtype=torch.float64)
    ref = torch.tensor([[ref_chosen, ref_rejected]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    trl_losses = {
        "dpo": -F.logsigmoid(torch.tensor(beta * logits, dtype=torch.float64)).item(),
        "ipo": (logits - 1 / (2 * beta)) ** 2,
    }
    for name, expected in trl_losses.items():
        out = dk.group_preference_loss(policy, rewards, ref_logps=ref, loss=name, beta=beta)
        assert out.loss.item() == pytest.approx(expected, rel=1e-12)
        assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * (chosen - ref_chosen))
        assert out.metrics["rewards/rejected"].item() == pytest.approx(beta * (rejected - ref_rejected))
    mean_chosen, mean_rejected, lam = -0.4, -1.3, 0.2
    mean_logps = torch.tensor([[mean_chosen, mean_rejected]], dtype=torch.float64)
    log_odds = (mean_chosen - mean_rejected) - (math.log1p(-math.exp(mean_chosen))
                                                - math.log1p(-math.exp(mean_rejected)))
    orpo = dk.group_preference_loss(mean_logps, rewards, loss="orpo", orpo_lambda=lam)
    assert orpo.loss.item() == pytest.approx(-mean_chosen - lam * math.log(1 / (1 + math.exp(-log_odds))), rel=1e-12)
    assert orpo.metrics["rewards/chosen"].item() == pytest.approx(lam * mean_chosen)
    simpo = dk.group_preference_loss(mean_logps, rewards, loss="simpo", beta=2.0, simpo_gamma=0.5)
    assert simpo.loss.item() == pytest.approx(softplus_neg(2.0 * (mean_chosen - mean_rejected) - 0.5), rel=1e-12)


def test_orpo_is_stable_near_zero_log_prob() -> None:
    policy = torch.tensor([[-1e-9, -2.0]], dtype=torch.float32, requires_grad=True)
    out = dk.group_preference_loss(policy, torch.tensor([[1.0, 0.0]]), loss="orpo")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(policy.grad).all()
    # log(1 - exp(-1e-9)) = log(1e-9) to first order
    assert reference.log1mexp(torch.tensor(-1e-9)).item() == pytest.approx(math.log(1e-9), rel=1e-6)


def test_pair_modes(generator: torch.Generator) -> None:
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    policy = random_logps(2, 4, generator)
    all_pairs = dk.group_preference_loss(policy, rewards, pairs="all")
    assert all_pairs.metrics["pairs"].item() == 5  # ties (0.9, 0.9) and the all-equal group give none
    assert all_pairs.metrics["groups_without_pairs"].item() == 1
    best_worst = dk.group_preference_loss(policy, rewards, pairs="best_worst", beta=1.0)
    assert best_worst.metrics["pairs"].item() == 1
    h = (policy[0, 1] - policy[0, 0]).item()  # first argmax (index 1) vs argmin (index 0)
    assert best_worst.loss.item() == pytest.approx(softplus_neg(h), rel=1e-12)
    explicit = torch.tensor([[[1, 0], [3, 0], [1, 2], [3, 2], [2, 0]], [[-1, -1]] * 5])
    via_index = dk.group_preference_loss(policy, rewards, pair_index=explicit)
    assert_close(via_index.loss, all_pairs.loss)
    repeated = torch.tensor([[[1, 0], [1, 0]], [[-1, -1], [-1, -1]]])
    twice = dk.group_preference_loss(policy, rewards, pairs="explicit", pair_index=repeated)
    once = dk.group_preference_loss(policy, rewards, pairs="explicit", pair_index=repeated[:, :1])
    assert twice.metrics["pairs"].item() == 2
    assert_close(twice.loss, once.loss)


def test_all_equal_rewards_give_zero_loss_and_metrics() -> None:
    policy = torch.randn(3, 4, dtype=torch.float64).abs().neg().requires_grad_(True)
    out = dk.group_preference_loss(policy, torch.ones(3, 4), emb=torch.randn(3, 4, 5), diversity="deviation")
    assert out.loss.item() == 0.0
    assert out.metrics["pairs"].item() == 0 and out.metrics["groups_without_pairs"].item() == 3
    out.loss.backward()
    assert (policy.grad == 0).all()


def test_divpo_selection(loss_backend: str) -> None:
    """Ranked pools (DivPO; Chung et al.'s 4_data_prep_for_divpo.py): with q = 0.5 the top three
    rewards {0, 1, 2} and the bottom three {3, 4, 5}; diversity is measured inside each pool: e2
    points away from e0, e1 (chosen); e4 is the closest to the rest of its pool (rejected), while
    over the whole group e5 (next to e0 and e1) would be the least diverse."""
    group_loss = functools.partial(dk.group_preference_loss, backend=loss_backend)
    emb = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, -1.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.05]]],
                       dtype=torch.float64)
    whole_group = dk.deviation(emb)[0]
    assert whole_group[5] < whole_group[4] < whole_group[3]
    rewards = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    policy = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]], dtype=torch.float64)
    out = group_loss(policy, rewards, emb, pairs="divpo", quality_quantile=0.5, beta=1.0)
    assert out.metrics["pairs"].item() == 1
    assert out.loss.item() == pytest.approx(softplus_neg(-3.0 - -5.0), rel=1e-12)
    # q = 0.25 (the default): pools of floor(6 / 4) = 1, the best against the worst
    smallest = group_loss(policy, rewards, emb, pairs="divpo", beta=1.0)
    assert smallest.loss.item() == pytest.approx(softplus_neg(-1.0 - -6.0), rel=1e-12)
    # "model probability" scores (-logp): the most improbable of the top pool (2) against the most
    # probable of the bottom pool (3)
    by_prob = group_loss(policy, rewards, pairs="divpo", divpo_scores=-policy, quality_quantile=0.5,
                                       beta=1.0)
    assert by_prob.loss.item() == pytest.approx(softplus_neg(-3.0 - -4.0), rel=1e-12)


def test_divpo_threshold_pools_and_ties(loss_backend: str) -> None:
    """Our earlier variant: the chosen pool is at or above the 1 - q quantile, the rejected pool is all
    the rest, deviation over the whole group. Top half = {0, 3}; the more diverse of them is 3; of
    the rest {1, 2} the less diverse is 2."""
    group_loss = functools.partial(dk.group_preference_loss, backend=loss_backend)
    emb = torch.tensor([[[1.0, 0.1], [1.0, -0.3], [1.0, 0.05], [-1.0, 0.5]]], dtype=torch.float64)
    rewards = torch.tensor([[0.9, 0.1, 0.2, 0.7]], dtype=torch.float64)
    policy = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=torch.float64)
    options = {"pairs": "divpo", "divpo_pools": "threshold", "quality_quantile": 0.5, "beta": 1.0}
    out = group_loss(policy, rewards, emb, **options)
    dev = dk.deviation(emb)[0]
    assert dev[3] > dev[0] and dev[2] < dev[1] and dev[2] < dev[3]
    assert out.loss.item() == pytest.approx(softplus_neg(-4.0 - -3.0), rel=1e-12)
    # q = 0.25: the threshold is the 0.75 quantile (0.7 + 0.25 * 0.2 = 0.75), so only response 0 is
    # chosen-pool; the least diverse of the other three is 2
    quarter = group_loss(policy, rewards, emb, **{**options, "quality_quantile": 0.25})
    assert quarter.loss.item() == pytest.approx(softplus_neg(-1.0 - -3.0), rel=1e-12)
    # e0 and e3 = -2 e0 swapped for duplicates (e3 = 2 e0): equal deviation; rounding must not pick
    # between them, the first index wins
    duplicates = torch.tensor([[[-1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [-2.0, 0.0]]])
    tied = group_loss(torch.tensor([[-1.0, -2.0, -3.0, -5.0]]), torch.tensor([[0.9, 0.1, 0.2, 0.8]]),
                                    duplicates, **options)
    assert tied.loss.item() == pytest.approx(softplus_neg(-1.0 - -3.0), rel=1e-6)
    # pools of two in ranked mode: the two in-pool deviations are equal, the first index wins
    ranked = group_loss(policy, rewards, emb, pairs="divpo", quality_quantile=0.5, beta=1.0)
    assert ranked.loss.item() == pytest.approx(softplus_neg(-1.0 - -2.0), rel=1e-12)


def test_divpo_equal_rewards_make_no_pair(loss_backend: str) -> None:
    group_loss = functools.partial(dk.group_preference_loss, backend=loss_backend)
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    out = group_loss(-torch.rand(2, 4, dtype=torch.float64), rewards, torch.randn(2, 4, 3),
                                   pairs="divpo", quality_quantile=0.5)
    assert out.metrics["pairs"].item() == 1 and out.metrics["groups_without_pairs"].item() == 1


def test_quality_threshold_matches_torch_quantile(generator: torch.Generator) -> None:
    rewards = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    mask = torch.ones(6, 9, dtype=torch.bool)
    mask[1:, 5:] = False
    for q in (0.1, 0.5, 0.8):
        threshold = reference.quality_threshold(rewards, mask, q)
        for b in range(6):
            expected = torch.quantile(rewards[b][mask[b]], 1 - q)
            assert threshold[b].item() == pytest.approx(expected.item(), rel=1e-12)


CONFIGS = [
    {"loss": loss, "diversity": diversity, "pairs": pairs}
    for loss in ("dpo", "ipo", "orpo", "simpo")
    for diversity in ("none", "deviation", "logdet_gain")
    for pairs in ("all", "best_worst", "divpo")
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_padding_and_permutation_invariance(config: dict[str, str], generator: torch.Generator) -> None:
    batch, group, dim = 4, 6, 5
    emb, mask = random_groups(batch, group, dim, generator)
    policy = torch.where(mask, random_logps(batch, group, generator), torch.nan).requires_grad_(True)
    ref = torch.where(mask, random_logps(batch, group, generator), torch.nan)
    rewards = torch.where(mask, torch.randn(batch, group, generator=generator, dtype=torch.float64), torch.nan)
    emb.requires_grad_(True)
    out = dk.group_preference_loss(policy, rewards, emb, ref, mask, diversity_alpha=0.05, **config)
    out.loss.backward()
    assert torch.isfinite(out.loss) and (policy.grad[~mask] == 0).all() and (emb.grad[~mask] == 0).all()
    assert torch.isfinite(policy.grad).all() and torch.isfinite(emb.grad).all()

    # Permuting responses inside each group changes nothing (no ties in continuous rewards).
    perm = torch.randperm(group, generator=generator)
    permuted = dk.group_preference_loss(policy.detach()[:, perm], rewards[:, perm], emb.detach()[:, perm],
                                        ref[:, perm], mask[:, perm], diversity_alpha=0.05, **config)
    assert_close(permuted.loss, out.loss)
    for name, value in out.metrics.items():
        assert_close(permuted.metrics[name], value, rtol=1e-5)

    # Packing each group's valid responses to the front with a smaller G changes nothing.
    order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)
    width = int(mask.sum(-1).max())
    take = order[:, :width]
    packed = dk.group_preference_loss(policy.detach().gather(1, take), rewards.gather(1, take),
                                      emb.detach().gather(1, take[..., None].expand(-1, -1, dim)),
                                      ref.gather(1, take), mask.gather(1, take), diversity_alpha=0.05, **config)
    assert_close(packed.loss, out.loss)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c["pairs"] == "all"], ids=lambda c: "-".join(c.values()))
def test_gradcheck(config: dict[str, str], generator: torch.Generator) -> None:
    emb, mask = random_groups(2, 4, 3, generator, poison_padding=False)
    policy = random_logps(2, 4, generator).requires_grad_(True)
    ref = random_logps(2, 4, generator).requires_grad_(True)
    rewards = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    emb.requires_grad_(True)

    # Diversity weights are constants (reference/losses.py), so emb is checked where its gradient is defined:
    # through the logdet regularizer with unweighted pairs.
    def fn(p: torch.Tensor, r: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return reference.group_preference_loss(p, rewards, e, r, mask, diversity_alpha=0.1, eps=1e-2,
                                               **config).loss

    inputs = (policy, ref, emb) if config["diversity"] == "none" else (policy, ref, emb.detach())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("diversity", ["deviation", "logdet_gain"])
def test_diversity_weights_are_constants(diversity: str, generator: torch.Generator) -> None:
    emb, mask = random_groups(3, 5, 4, generator)
    policy = random_logps(3, 5, generator).requires_grad_(True)
    rewards = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    weighted = emb.clone().requires_grad_(True)
    dk.group_preference_loss(policy, rewards, weighted, mask=mask, diversity=diversity).loss.backward()
    assert weighted.grad is None or (weighted.grad == 0).all()
    regularized = emb.clone().requires_grad_(True)
    dk.group_preference_loss(policy, rewards, regularized, mask=mask, diversity=diversity,
                             diversity_alpha=0.2).loss.backward()
    only_logdet = emb.clone().requires_grad_(True)
    (-0.2 * dk.logdet_diversity(only_logdet, mask).mean()).backward()
    assert_close(regularized.grad, only_logdet.grad)


def test_regularizer_adds_minus_alpha_mean_logdet(generator: torch.Generator) -> None:
    emb, mask = random_groups(3, 5, 4, generator)
    policy, rewards = random_logps(3, 5, generator), torch.randn(3, 5, generator=generator, dtype=torch.float64)
    base = dk.group_preference_loss(policy, rewards, emb, mask=mask)
    regularized = dk.group_preference_loss(policy, rewards, emb, mask=mask, diversity_alpha=0.3)
    logdet = dk.logdet_diversity(emb, mask)
    assert_close(regularized.loss, base.loss - 0.3 * logdet.mean())
    assert_close(regularized.logdet, logdet)
    assert base.logdet is None and "diversity/logdet" not in base.metrics


def test_metrics_are_detached_fp32_scalars(generator: torch.Generator) -> None:
    emb, mask = random_groups(3, 5, 4, generator)
    policy = random_logps(3, 5, generator).requires_grad_(True)
    out = dk.group_preference_loss(policy, torch.randn(3, 5, dtype=torch.float64), emb.requires_grad_(True),
                                   mask=mask, diversity="logdet_gain")
    assert METRICS | {"diversity/mean_similarity", "diversity/deviation", "diversity/logdet"} == set(out.metrics)
    for value in out.metrics.values():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad
    no_emb = dk.group_preference_loss(policy, torch.randn(3, 5, dtype=torch.float64), mask=mask)
    assert set(no_emb.metrics) == METRICS
    logged = out.log_dict(prefix="train/")
    assert logged["train/pairs"] == out.metrics["pairs"].item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_fp32_loss_and_input_dtype_grads(dtype: torch.dtype,
                                                                    generator: torch.Generator) -> None:
    """fp32 arithmetic on the rounded inputs: within fp32 accumulation of the float64 result on the
    same values; d emb is that gradient rounded once to emb's dtype."""
    emb, mask = random_groups(2, 4, 8, generator, dtype=dtype)
    policy = random_logps(2, 4, generator, dtype=torch.float32)
    rewards = torch.randn(2, 4, generator=generator)
    options = {"diversity": "deviation", "diversity_alpha": 0.1, "eps": 0.5}
    leaves = {"low": (emb.clone().requires_grad_(True), policy.clone().requires_grad_(True)),
              "exact": (emb.double().requires_grad_(True), policy.double().requires_grad_(True))}
    outs = {}
    for name, (e, p) in leaves.items():
        outs[name] = dk.group_preference_loss(p, rewards, e, mask=mask, **options)
        outs[name].loss.backward()
    (low_emb, low_policy), (exact_emb, exact_policy) = leaves["low"], leaves["exact"]
    assert outs["low"].loss.dtype == torch.float32 and low_emb.grad.dtype == dtype
    assert low_policy.grad.dtype == torch.float32
    rtol = accumulation_rtol(torch.float32, 8 + 4, condition_number(emb, mask, 0.5) ** 2)
    assert_matches(outs["low"].loss, outs["exact"].loss, rtol)
    assert_matches(low_policy.grad, exact_policy.grad, rtol)
    assert_rounded(low_emb.grad, exact_emb.grad, rtol)


# ----------------------------------------------------------------------------- errors


def _inputs(batch: int = 2, group: int = 3) -> dict[str, torch.Tensor]:
    return {"policy_logps": -torch.rand(batch, group) - 0.1, "rewards": torch.randn(batch, group)}


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"loss": "kto"}, ValueError, "loss='kto' is not valid; choose one of 'dpo', 'ipo', 'orpo', 'simpo'"),
    ({"diversity": "vendi"}, ValueError, "diversity='vendi' is not valid; choose one of 'none', 'deviation'"),
    ({"pairs": "random"}, ValueError, "pairs='random' is not valid"),
    ({"deviation_norm": "max"}, ValueError, "deviation_norm='max' is not valid"),
    ({"backend": "jax"}, ValueError, "backend='jax' is not valid; choose one of 'auto', 'reference'"),
    ({"beta": 0.0}, ValueError, "beta must be > 0"),
    ({"beta": float("nan")}, ValueError, "beta must be a finite number"),
    ({"eps": -1e-4}, ValueError, "eps must be > 0"),
    ({"diversity_alpha": -1.0}, ValueError, "diversity_alpha must be >= 0"),
    ({"quality_quantile": 1.0}, ValueError, "quality_quantile must be < 1"),
    ({"diversity": "deviation"}, ValueError, "diversity='deviation' needs emb"),
    ({"diversity_alpha": 0.1}, ValueError, "diversity_alpha > 0 needs emb"),
    ({"pairs": "divpo"}, ValueError, "pairs='divpo' without divpo_scores needs emb"),
    ({"pairs": "explicit"}, ValueError, "pairs='explicit' needs pair_index"),
    ({"pairs": "best_worst", "pair_index": torch.zeros(2, 1, 2, dtype=torch.long)}, ValueError,
     "cannot be combined with pairs='best_worst'"),
    ({"pair_index": torch.zeros(2, 1, 2)}, TypeError, "pair_index must have an integer dtype"),
    ({"pair_index": torch.zeros(2, 2, dtype=torch.long)}, ValueError, r"pair_index must have shape \[B, P, 2\]"),
    ({"divpo_scores": torch.zeros(2, 3)}, ValueError, "divpo_scores is only used with pairs='divpo'"),
    ({"ref_logps": torch.zeros(2, 4)}, ValueError, r"ref_logps has shape \(2, 4\)"),
    ({"emb": torch.zeros(3, 3, 4)}, ValueError, r"emb has \[B, G\] = \(3, 3\)"),
    ({"rewards": torch.zeros(2, 3, dtype=torch.int32)}, TypeError, "rewards must have a floating dtype"),
    ({"mask": torch.ones(2, 3, dtype=torch.int64)}, TypeError, "mask must have dtype torch.bool"),
    ({"emb": torch.zeros(2, 3, 4, device="meta")}, ValueError, "inputs must be on one device"),
])
def test_static_errors(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    # a valid call of the same shapes first: the per-signature check cache must not let a bad one through
    dk.group_preference_loss(**_inputs())
    with pytest.raises(error, match=match):
        dk.group_preference_loss(**{**_inputs(), **kwargs})


def test_g_below_two_is_an_error() -> None:
    with pytest.raises(ValueError, match="G >= 2"):
        dk.group_preference_loss(**_inputs(group=1))


@pytest.mark.parametrize(("update", "match"), [
    ({"policy_logps": torch.tensor([[-1.0, -2.0, -3.0], [-1.0, torch.nan, -3.0]])},
     r"policy_logps has NaN or inf in valid responses of groups \[1\]"),
    ({"ref_logps": torch.tensor([[-1.0, -torch.inf, -3.0], [-1.0, -2.0, -3.0]])}, r"ref_logps has NaN .* \[0\]"),
    ({"rewards": torch.tensor([[1.0, 2.0, 3.0], [torch.inf, 0.0, 1.0]])}, r"rewards has NaN .* \[1\]"),
    ({"emb": torch.tensor([[[1.0, 0.0]] * 3, [[1.0, 0.0], [torch.nan, 1.0], [0.0, 1.0]]])}, r"emb has NaN .* \[1\]"),
    ({"emb": torch.randn(2, 3, 2), "diversity": "deviation", "mask": torch.tensor([[True] * 3, [True, False, False]])},
     r"diversity='deviation' needs at least 2 valid responses per group; groups \[1\]"),
    ({"pair_index": torch.tensor([[[0, 1]], [[1, 5]]])}, r"pair_index rows of groups \[1\]"),
    ({"pair_index": torch.tensor([[[0, 0]], [[1, 2]]])}, r"pair_index rows of groups \[0\]"),
    ({"pair_index": torch.tensor([[[0, 1]], [[1, -1]]])}, r"pair_index rows of groups \[1\]"),
    ({"pair_index": torch.tensor([[[0, 2]], [[0, 1]]]), "mask": torch.tensor([[True, True, False], [True] * 3])},
     r"pair_index rows of groups \[0\]"),
    ({"loss": "orpo", "policy_logps": torch.tensor([[-1.0, 0.0, -3.0], [-1.0, -2.0, -3.0]])},
     r"loss='orpo' needs mean token log-probs < 0 in policy_logps; groups \[0\]"),
])
def test_data_errors_name_the_group(update: dict[str, object], match: str) -> None:
    inputs = {**_inputs(), **update}
    with pytest.raises(ValueError, match=match):
        dk.group_preference_loss(**inputs)
    if "pair_index" not in update and update.get("loss") != "orpo" and "mask" not in update:
        dk.group_preference_loss(**inputs, check_inputs=False)  # unchecked: computes whatever it gets


def test_nan_in_padding_is_ignored() -> None:
    mask = torch.tensor([[True, True, False]])
    policy = torch.tensor([[-1.0, -2.0, torch.nan]])
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [torch.nan, torch.inf]]])
    out = dk.group_preference_loss(policy, torch.tensor([[1.0, 0.0, torch.nan]]), emb, mask=mask,
                                   diversity="logdet_gain", loss="orpo")
    assert torch.isfinite(out.loss)
