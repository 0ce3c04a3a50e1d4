"""pairwise_similarity: formula, padding, invariances, gradients and errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, random_groups

import divkernels as dk
from divkernels import reference


def test_hand_computed_cosine_dot_rbf() -> None:
    emb = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]], dtype=torch.float64)
    cosine = dk.pairwise_similarity(emb)
    c = 1 / math.sqrt(2)
    assert_close(cosine[0], torch.tensor([[1, c, 0], [c, 1, c], [0, c, 1]], dtype=torch.float64))
    dot = dk.pairwise_similarity(emb, kernel="dot")
    assert_close(dot[0], torch.tensor([[1, 1, 0], [1, 2, 2], [0, 2, 4]], dtype=torch.float64))
    rbf = dk.pairwise_similarity(emb, kernel="rbf", gamma=0.5)
    sq = torch.tensor([[0, 1, 5], [1, 0, 2], [5, 2, 0]], dtype=torch.float64)
    assert_close(rbf[0], torch.exp(-0.5 * sq))
    default_gamma = dk.pairwise_similarity(emb, kernel="rbf")
    assert_close(default_gamma[0], torch.exp(-sq / 2))  # gamma = 1 / D, D = 2


@pytest.mark.parametrize("kernel", ["cosine", "dot", "rbf"])
def test_padding_is_identity_and_changes_nothing(kernel: str, generator: torch.Generator) -> None:
    emb, mask = random_groups(4, 6, 5, generator)
    sim = dk.pairwise_similarity(emb, mask, kernel=kernel)
    assert torch.isfinite(sim).all()
    eye = torch.eye(6, dtype=torch.bool)
    padded = ~(mask[:, :, None] & mask[:, None, :])
    assert_close(sim[padded], eye.expand(4, 6, 6)[padded].to(sim.dtype))
    for b in range(4):
        rows = mask[b].nonzero().flatten()
        alone = dk.pairwise_similarity(emb[b:b + 1, rows], kernel=kernel)
        assert_close(sim[b][rows][:, rows], alone[0])


def test_cosine_is_scale_invariant_and_has_unit_diagonal(generator: torch.Generator) -> None:
    emb, mask = random_groups(3, 5, 7, generator, poison_padding=False)
    scale = torch.rand(3, 5, 1, generator=generator, dtype=torch.float64) * 100 + 0.01
    assert_close(dk.pairwise_similarity(emb * scale, mask), dk.pairwise_similarity(emb, mask))
    diagonal = dk.pairwise_similarity(emb.float(), mask).diagonal(dim1=-2, dim2=-1)
    assert torch.equal(diagonal, torch.ones_like(diagonal))


@pytest.mark.parametrize("kernel", ["cosine", "dot", "rbf"])
def test_permuting_responses_permutes_rows_and_columns(kernel: str, generator: torch.Generator) -> None:
    emb, mask = random_groups(2, 7, 4, generator)
    perm = torch.randperm(7, generator=generator)
    sim = dk.pairwise_similarity(emb, mask, kernel=kernel)
    permuted = dk.pairwise_similarity(emb[:, perm], mask[:, perm], kernel=kernel)
    assert_close(permuted, sim[:, perm][:, :, perm])


def test_non_contiguous_and_low_precision_inputs(generator: torch.Generator) -> None:
    emb, mask = random_groups(3, 4, 6, generator, poison_padding=False)
    wide = torch.zeros(3, 4, 12, dtype=emb.dtype)
    wide[..., ::2] = emb
    strided = wide[..., ::2].transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous() and strided.stride(-1) == 1
    assert_close(dk.pairwise_similarity(wide[..., ::2], mask), dk.pairwise_similarity(emb, mask))
    assert_close(dk.pairwise_similarity(strided, mask), dk.pairwise_similarity(emb, mask))
    half = dk.pairwise_similarity(emb.to(torch.bfloat16), mask)
    assert half.dtype == torch.float32
    assert_close(half, dk.pairwise_similarity(emb.to(torch.bfloat16).double(), mask), rtol=1e-5, atol=1e-5)


def test_zero_embedding_gives_finite_values_and_gradients() -> None:
    emb = torch.zeros(1, 3, 4, dtype=torch.float64)
    emb[0, 1] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    emb.requires_grad_(True)
    sim = dk.pairwise_similarity(emb)
    sim.sum().backward()
    assert torch.isfinite(sim).all() and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("kernel", ["cosine", "dot", "rbf"])
def test_gradcheck(kernel: str, generator: torch.Generator) -> None:
    emb, mask = random_groups(2, 4, 3, generator, poison_padding=False)
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: reference.pairwise_similarity(e, mask, kernel), (emb,))
    assert torch.autograd.gradgradcheck(lambda e: reference.pairwise_similarity(e, mask, kernel), (emb,))


def test_nan_in_a_valid_response_is_an_error_naming_the_group(generator: torch.Generator) -> None:
    emb, mask = random_groups(3, 4, 5, generator, ragged=False)
    emb[2, 1, 3] = torch.inf
    with pytest.raises(ValueError, match=r"emb has NaN or inf.* groups \[2\]"):
        dk.pairwise_similarity(emb, mask)
    assert not torch.isfinite(dk.pairwise_similarity(emb, mask, check_inputs=False)[2]).all()


@pytest.mark.parametrize(("emb", "error", "match"), [
    ([[[1.0]]], TypeError, "emb must be a torch.Tensor"),
    (torch.ones(2, 3, dtype=torch.float32), ValueError, "emb must be 3-D"),
    (torch.ones(2, 1, 4), ValueError, "G >= 2"),
    (torch.ones(2, 3, 0), ValueError, "D >= 1"),
    (torch.ones(2, 3, 4, dtype=torch.int64), TypeError, "floating dtype"),
    (torch.ones(2, 3, 4, dtype=torch.complex64), TypeError, "floating dtype"),
])
def test_bad_emb(emb: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        dk.pairwise_similarity(emb)


def test_bad_mask_kernel_gamma_and_devices() -> None:
    emb = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        dk.pairwise_similarity(emb, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        dk.pairwise_similarity(emb, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="kernel='l2' is not valid; choose one of 'cosine', 'dot', 'rbf'"):
        dk.pairwise_similarity(emb, kernel="l2")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        dk.pairwise_similarity(emb, kernel="rbf", gamma=0.0)
    with pytest.raises(ValueError, match="inputs must be on one device"):
        dk.pairwise_similarity(emb, torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="backend='fast' is not valid"):
        dk.pairwise_similarity(emb, backend="fast")
