"""The reference (the CPU fallback and the kernels' yardstick) against the independent oracle.

``tests/oracle.py`` restates every formula one group and one pair at a time; here the batched
reference must agree with it in float64 (values and, where the formula has one, gradients) on
ragged groups, ties, duplicated responses, collapsed groups and all-equal rewards.
"""

from __future__ import annotations

import itertools

import oracle
import pytest
import torch
from helpers import assert_matches, random_groups, random_logps

import divkernels as dk

# Both sides compute in float64 along different routes (Cholesky vs LU, inverse vs leave-one-out
# determinants): they differ by rounding amplified by the condition of K (<= (G + eps) / eps).
RTOL = 1e-9


def degenerate_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Four groups of G = 6: random ragged, with duplicates, collapsed (all equal), tied rewards (full)."""
    emb, mask = random_groups(4, 6, 5, generator, poison_padding=False)
    emb[1, 2] = emb[1, 0] * 2.5  # a duplicate (cosine 1)
    emb[2] = emb[2, :1]  # collapsed: every response the same
    mask[1:] = True  # group 0 stays ragged
    rewards = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    rewards[2] = 1.0  # all equal: no pairs
    rewards[3] = torch.tensor([1.0, 0.0, 1.0, 2.0, 0.0, 2.0], dtype=torch.float64)  # ties
    return {"emb": emb, "mask": mask, "rewards": rewards, "policy_logps": random_logps(4, 6, generator),
            "ref_logps": random_logps(4, 6, generator)}


@pytest.mark.parametrize("kernel", ["cosine", "dot", "rbf"])
def test_similarity_and_logdet(kernel: str, generator: torch.Generator) -> None:
    inputs = degenerate_inputs(generator)
    emb, mask = inputs["emb"].requires_grad_(True), inputs["mask"]
    assert_matches(dk.pairwise_similarity(emb, mask, kernel=kernel), oracle.pairwise_similarity(emb, mask, kernel),
                   RTOL)
    eps = 0.05
    logdet, gains = dk.logdet_diversity(emb, mask, eps=eps, kernel=kernel, return_gains=True)
    want_logdet, want_gains = oracle.logdet_diversity(emb, mask, eps, kernel)
    assert_matches(logdet, want_logdet, RTOL)
    assert_matches(gains, want_gains, RTOL)
    got = torch.autograd.grad((logdet.sum() + gains.sum()), emb)[0]
    want = torch.autograd.grad((want_logdet.sum() + want_gains.sum()), emb)[0]
    assert_matches(got, want, 1e-7)


def test_deviation_and_partition(generator: torch.Generator) -> None:
    inputs = degenerate_inputs(generator)
    emb, mask = inputs["emb"].requires_grad_(True), inputs["mask"]
    dev = dk.deviation(emb, mask)
    want = oracle.deviation(emb, mask)
    assert_matches(dev, want, RTOL)
    assert_matches(torch.autograd.grad(dev.square().sum(), emb)[0], torch.autograd.grad(want.square().sum(), emb)[0],
                   1e-8)
    for tau, floor, transitive in itertools.product((0.0, 0.3, 0.99), (0.1, 0.0), (True, False)):
        assert_matches(dk.partition_diversity(emb.detach(), mask, tau=tau, min_diversity=floor, transitive=transitive),
                       oracle.partition_diversity(emb.detach(), mask, tau, None, floor, transitive), 1e-12)
    labels = torch.randint(0, 3, (4, 6), generator=generator)
    assert_matches(dk.partition_diversity(mask=mask, partition=labels),
                   oracle.partition_diversity(None, mask, 0.0, labels), 1e-7)


CONFIGS = [{"loss": loss, "diversity": diversity, "pairs": pairs}
           for loss, diversity, pairs in itertools.product(("dpo", "ipo", "orpo", "simpo"),
                                                           ("none", "deviation", "logdet_gain"),
                                                           ("all", "best_worst", "divpo"))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_group_preference_loss(config: dict[str, str], generator: torch.Generator) -> None:
    inputs = degenerate_inputs(generator)
    options = {**config, "beta": 0.3, "orpo_lambda": 0.2, "simpo_gamma": 0.4, "eps": 0.05, "diversity_alpha": 0.3}
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in ("policy_logps", "ref_logps", "emb")}
    got = dk.group_preference_loss(leaves["policy_logps"], inputs["rewards"], leaves["emb"], leaves["ref_logps"],
                                   inputs["mask"], **options).loss
    want = oracle.group_preference_loss(leaves["policy_logps"], inputs["rewards"], leaves["emb"],
                                        leaves["ref_logps"], inputs["mask"], **options)
    assert_matches(got, want, RTOL)
    got_grads = torch.autograd.grad(got, list(leaves.values()), allow_unused=True)
    want_grads = torch.autograd.grad(want, list(leaves.values()), allow_unused=True)
    for name, g, w in zip(leaves, got_grads, want_grads, strict=True):
        if w is None or (name == "ref_logps" and config["loss"] in ("orpo", "simpo")):
            assert g is None or (g == 0).all(), name
        else:
            # A chosen response with the group's least deviation has DDPO weight 0 (d - d_min = 0), and so do
            # its pairs' gradients; at a tie (the duplicate in group 1) the float64 rounding of d - d_min
            # (~u |d| / (mean d - d_min) < 1e-14 here) leaves them at ~1e-16 on one side: an absolute floor
            # far above that and far below any real gradient (>= 1e-4 here).
            assert_matches(g, w, 1e-8, atol=1e-12)


@pytest.mark.parametrize("options", [
    {"deviation_norm": "none", "diversity": "deviation", "min_deviation": 0.4},
    {"deviation_norm": "mean", "diversity": "deviation", "loss": "orpo"},
    {"diversity": "deviation", "min_deviation": 0.2},
    {"diversity": "deviation", "loss": "orpo", "orpo_weighting": "pair"},
    {"diversity": "deviation", "loss": "orpo", "pairs": "divpo"},
    {"diversity": "deviation", "encoders": 2},
    {"diversity": "deviation", "loss": "orpo", "encoders": 3},
    {"pairs": "divpo", "quality_quantile": 0.5},
    {"pairs": "divpo", "quality_quantile": 0.34},
    {"pairs": "divpo", "divpo_pools": "threshold", "quality_quantile": 0.25},
    {"pairs": "divpo", "divpo_pools": "threshold", "divpo_scores": "neg_logp"},
    {"pairs": "divpo", "divpo_scores": "neg_logp"},
    {"pairs": "explicit"},
    {"ref_logps": None},
    {"loss": "ipo", "token_counts": True},
    {"loss": "orpo", "diversity": "deviation", "nll": True},
    {"loss": "simpo", "cpo_alpha": 0.7, "nll": True},
    {"loss": "dpo", "cpo_alpha": 1.0},
])
def test_group_preference_loss_options(options: dict[str, object], generator: torch.Generator) -> None:
    inputs = degenerate_inputs(generator)
    options = dict(options)
    if options.get("divpo_scores") == "neg_logp":
        options["divpo_scores"] = -inputs["policy_logps"]
    if options.get("pairs") == "explicit":
        options["pair_index"] = torch.tensor([[[0, 1], [2, 1], [-1, -1]], [[1, 0], [0, 1], [3, 4]],
                                              [[5, 4], [-1, -1], [-1, -1]], [[3, 3 - 2], [3, 1], [0, 4]]])
    ref = options.pop("ref_logps", inputs["ref_logps"])
    extra = [torch.randn(4, 6, 3 + k, generator=generator, dtype=torch.float64)
             for k in range(options.pop("encoders", 1) - 1)]
    emb = [inputs["emb"], *extra] if extra else inputs["emb"]
    if options.pop("token_counts", False):
        options["token_counts"] = torch.randint(1, 9, (4, 6), generator=generator).double()
    nll_leaf = None
    if options.pop("nll", False):
        tokens = torch.randint(3, 20, (4, 6), generator=generator).double()
        nll_leaf = (inputs["policy_logps"] * tokens - 2.0).clone().requires_grad_(True)
        options.update(nll_logps=nll_leaf, nll_tokens=tokens)
    leaf = inputs["policy_logps"].clone().requires_grad_(True)
    out = dk.group_preference_loss(leaf, inputs["rewards"], emb, ref, inputs["mask"], **options)
    got = out.loss
    pairs: list[tuple[int, int, int]] = []
    want = oracle.group_preference_loss(leaf, inputs["rewards"], inputs["emb"], ref, inputs["mask"],
                                        extra_emb=extra, pair_counts=pairs, **options)
    chosen, rejected = torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64)
    for b, i, j in pairs:
        chosen[b, i] += 1
        rejected[b, j] += 1
    assert torch.equal(out.chosen_counts, chosen) and torch.equal(out.rejected_counts, rejected)
    if nll_leaf is not None:
        assert_matches(torch.autograd.grad(got, nll_leaf, retain_graph=True)[0],
                       torch.autograd.grad(want, nll_leaf, retain_graph=True)[0], 1e-8)
    # K encoders combine by z^(1/K): at a duplicate z is rounding noise ~1e-16, and its K-th root is not
    rtol = max(RTOL, 10 * 1e-16 ** (1 / (len(extra) + 1))) if extra else RTOL
    assert_matches(got, want, rtol)
    assert_matches(torch.autograd.grad(got, leaf)[0], torch.autograd.grad(want, leaf)[0], max(rtol, 1e-8))


@pytest.mark.parametrize("scale", ["std", "none", None])
@pytest.mark.parametrize("diversity", ["none", "darling", "dqo", "deviation"])
def test_group_advantages(diversity: str, scale: str | None, generator: torch.Generator) -> None:
    inputs = degenerate_inputs(generator)
    emb, mask, rewards = inputs["emb"], inputs["mask"], inputs["rewards"]
    for options in ({"alpha": 0.4, "tau": 0.3, "scale": scale},
                    {"alpha": 0.4, "eps": 0.05, "tau": 0.3, "scale": scale, "min_diversity": 0.0,
                     "transitive": False, "darling_reward": "minmax"}):
        got = dk.group_advantages(rewards, emb, mask, diversity=diversity, **options)
        want = oracle.group_advantages(rewards, emb, mask, diversity, **{"eps": 1.0, **options})
        assert_matches(got, want, 1e-8, atol=1e-12)
    if diversity == "darling":
        labels = torch.randint(0, 3, (4, 6), generator=generator)
        got = dk.group_advantages(rewards, mask=mask, diversity=diversity, partition=labels, scale=scale)
        want = oracle.group_advantages(rewards, None, mask, diversity, 0.0, 0.0, 1.0, scale, labels=labels)
        assert_matches(got, want, 1e-8, atol=1e-12)
