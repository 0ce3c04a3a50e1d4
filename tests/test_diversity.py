"""deviation, logdet_diversity (+ gains), partition_diversity and vendi_score."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, random_groups

import divkernels as dk
from divkernels import reference


def _duplicate_group() -> torch.Tensor:
    """e0 = e2 = x-axis, e1 = y-axis: S01 = S12 = 0, S02 = 1."""
    return torch.tensor([[[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]]], dtype=torch.float64)


# ----------------------------------------------------------------------------- deviation


def test_deviation_hand_computed() -> None:
    # dev_0 = ((1 - 0) + (1 - 1)) / 2, dev_1 = ((1 - 0) + (1 - 0)) / 2, dev_2 = dev_0
    assert_close(dk.deviation(_duplicate_group())[0], torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64))


def test_deviation_range_padding_and_permutation(generator: torch.Generator) -> None:
    emb, mask = random_groups(5, 8, 3, generator)
    dev = dk.deviation(emb, mask)
    assert ((dev >= 0) & (dev <= 2)).all()
    assert (dev[~mask] == 0).all()
    for b in range(5):
        rows = mask[b].nonzero().flatten()
        assert_close(dev[b, rows], dk.deviation(emb[b:b + 1, rows])[0])
    perm = torch.randperm(8, generator=generator)
    assert_close(dk.deviation(emb[:, perm], mask[:, perm]), dev[:, perm])
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert_close(dk.deviation(opposite), torch.tensor([[2.0, 2.0]]))


def test_deviation_gradcheck(generator: torch.Generator) -> None:
    emb, mask = random_groups(3, 5, 4, generator, poison_padding=False)
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: reference.deviation(e, mask), (emb,))


def test_deviation_needs_two_valid_responses() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with pytest.raises(ValueError, match=r"deviation needs at least 2 valid responses per group; groups \[1\]"):
        dk.deviation(torch.randn(2, 3, 4), mask)


# ----------------------------------------------------------------------------- logdet


def test_dqo_default_is_logdet_of_s_plus_identity() -> None:
    """DQO's log det(L + I): two orthogonal unit responses give log det(2 I) = 2 log 2; two duplicates
    give log det([[2, 1], [1, 2]]) = log 3, and each duplicate's gain log(3 / 2) stays bounded."""
    orthogonal = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    assert dk.logdet_diversity(orthogonal).item() == pytest.approx(2 * math.log(2.0), rel=1e-12)
    duplicates = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]], dtype=torch.float64)
    logdet, gains = dk.logdet_diversity(duplicates, return_gains=True)
    assert logdet.item() == pytest.approx(math.log(3.0), rel=1e-12)
    assert gains[0].tolist() == pytest.approx([math.log(1.5)] * 2, rel=1e-12)
    bonus = dk.group_advantages(torch.zeros(1, 2, dtype=torch.float64), duplicates, diversity="dqo", alpha=1.0,
                                scale="none")
    assert bonus.abs().max().item() < 1e-12  # equal gains: no advantage either way


def test_logdet_orthogonal_and_two_vector_cases() -> None:
    eps = 1e-3
    emb = torch.eye(4, dtype=torch.float64)[None] * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:, None]
    logdet, gains = dk.logdet_diversity(emb, eps=eps, return_gains=True)
    assert_close(logdet, torch.tensor([4 * math.log(1 + eps)], dtype=torch.float64))
    assert_close(gains, torch.full((1, 4), math.log(1 + eps), dtype=torch.float64))
    c = 0.6
    pair = torch.tensor([[[1.0, 0.0], [c, math.sqrt(1 - c * c)]]], dtype=torch.float64)
    det = (1 + eps) ** 2 - c * c
    logdet, gains = dk.logdet_diversity(pair, eps=eps, return_gains=True)
    assert_close(logdet, torch.tensor([math.log(det)], dtype=torch.float64))
    assert_close(gains, torch.full((1, 2), math.log(det / (1 + eps)), dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["cosine", "dot", "rbf"])
def test_logdet_and_gains_match_brute_force_on_the_valid_block(kernel: str, generator: torch.Generator) -> None:
    eps = 1e-2
    emb, mask = random_groups(4, 6, 5, generator)
    logdet, gains = dk.logdet_diversity(emb, mask, eps=eps, kernel=kernel, return_gains=True)
    assert (gains[~mask] == 0).all()
    for b in range(4):
        rows = mask[b].nonzero().flatten()
        sim = dk.pairwise_similarity(emb[b:b + 1, rows], kernel=kernel)[0]
        block = sim + eps * torch.eye(len(rows), dtype=sim.dtype)
        assert_close(logdet[b], torch.logdet(block))
        for k, row in enumerate(rows):
            keep = [i for i in range(len(rows)) if i != k]
            assert_close(gains[b, row], torch.logdet(block) - torch.logdet(block[keep][:, keep]))


def test_logdet_degenerate_groups_are_finite() -> None:
    duplicates = torch.ones(2, 5, 3)
    many_in_low_dim = torch.randn(2, 16, 2)
    for emb in (duplicates, many_in_low_dim, duplicates.to(torch.bfloat16)):
        logdet, gains = dk.logdet_diversity(emb, return_gains=True)
        assert torch.isfinite(logdet).all() and torch.isfinite(gains).all()
        emb = emb.float().requires_grad_(True)
        dk.logdet_diversity(emb).sum().backward()
        assert torch.isfinite(emb.grad).all()
    # duplicates: K = 1 1^T + eps I has eigenvalues n + eps and eps (n - 1 times)
    logdet = dk.logdet_diversity(torch.ones(1, 5, 3, dtype=torch.float64), eps=1e-4)
    assert_close(logdet, torch.tensor([math.log(5 + 1e-4) + 4 * math.log(1e-4)], dtype=torch.float64))


@pytest.mark.parametrize("return_gains", [False, True])
def test_logdet_gradcheck(return_gains: bool, generator: torch.Generator) -> None:
    emb, mask = random_groups(2, 5, 4, generator, poison_padding=False)
    emb.requires_grad_(True)

    def fn(e: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return reference.logdet_diversity(e, mask, 1e-2, "cosine", return_gains)

    assert torch.autograd.gradcheck(fn, (emb,))


def test_logdet_errors() -> None:
    with pytest.raises(ValueError, match="eps must be > 0"):
        dk.logdet_diversity(torch.randn(1, 3, 4), eps=0.0)
    with pytest.raises(ValueError, match="logdet_diversity needs at least 2 valid responses"):
        dk.logdet_diversity(torch.randn(1, 3, 4), torch.tensor([[True, False, False]]))


def test_failed_factorization_is_nan_and_an_error_naming_the_group() -> None:
    sim = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]], dtype=torch.float64)
    valid = torch.ones(2, 2, dtype=torch.bool)
    logdet, inverse, failed = reference.logdet_and_inverse(sim - 1e-4 * torch.eye(2), valid, 1e-4)
    assert failed.tolist() == [False, True]
    assert torch.isnan(logdet[1]) and torch.isnan(inverse[1]).all() and abs(logdet[0].item()) < 1e-10
    from divkernels.ops.logdet import check_factorization
    from divkernels.validation import DataChecks

    checks = DataChecks(True)
    check_factorization(checks, failed)
    with pytest.raises(ValueError, match=r"factorization of K = S \+ eps\*I failed for groups \[1\]"):
        checks.raise_if_failed()


# ----------------------------------------------------------------------------- partition


def test_partition_by_threshold_and_by_labels() -> None:
    emb = _duplicate_group()
    assert_close(dk.partition_diversity(emb, tau=0.9)[0], torch.tensor([0.5, 1.0, 0.5]))
    labels = torch.tensor([[0, 0, 1, 2]])
    mask = torch.tensor([[True, True, True, False]])
    div = dk.partition_diversity(mask=mask, partition=labels)
    assert_close(div, torch.tensor([[0.5, 0.5, 1.0, 0.0]]))


def test_partition_errors_and_no_grad() -> None:
    emb = torch.randn(2, 3, 4, requires_grad=True)
    assert not dk.partition_diversity(emb).requires_grad
    with pytest.raises(ValueError, match="exactly one of emb"):
        dk.partition_diversity(emb, partition=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of emb"):
        dk.partition_diversity()
    with pytest.raises(TypeError, match="partition must have an integer dtype"):
        dk.partition_diversity(partition=torch.zeros(2, 3))


# ----------------------------------------------------------------------------- vendi


def test_vendi_duplicates_orthogonal_and_padding() -> None:
    assert_close(dk.vendi_score(torch.ones(1, 4, 3, dtype=torch.float64)), torch.ones(1, dtype=torch.float64))
    orthogonal = torch.eye(5, dtype=torch.float64)[None]
    assert_close(dk.vendi_score(orthogonal), torch.tensor([5.0], dtype=torch.float64))
    mask = torch.tensor([[True, True, True, False, False]])
    assert_close(dk.vendi_score(orthogonal, mask), torch.tensor([3.0], dtype=torch.float64))
    # eig(S / 3) = (2/3, 1/3, 0) -> exp(entropy) = 3 / 2^(2/3)
    assert_close(dk.vendi_score(_duplicate_group()), torch.tensor([3 / 2 ** (2 / 3)], dtype=torch.float64))


def test_distinct_n() -> None:
    assert dk.distinct_n(["a b c", "a b d"], n=2) == 3 / 4
    assert dk.distinct_n(["a"], n=2) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        dk.distinct_n(["a"], n=0)
