"""Listwise DPO (``loss="dpo_listwise"``): the reference against the Plackett-Luce formula written per group
(tests/oracle.py: ``listwise_dpo_loss``), its float64 gradient by gradcheck, its reductions (one pair per group:
DPO; a strict ranking of two: DPO), and every backend against the reference."""

from __future__ import annotations

import oracle
import pytest
import torch
from helpers import accumulation_rtol, random_logps, use_backend

import divkernels as dk
from divkernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs(batch: int, group: int, generator: torch.Generator, ties: bool = True) -> dict[str, torch.Tensor]:
    policy = random_logps(batch, group, generator)
    ref = policy + 0.3 * torch.randn(batch, group, generator=generator, dtype=torch.float64)
    rewards = (torch.randint(0, 3, (batch, group), generator=generator).double() if ties
               else torch.rand(batch, group, generator=generator, dtype=torch.float64))
    mask = torch.rand(batch, group, generator=generator) < 0.8
    mask[0] = True
    rewards[1] = 0.5  # one group of equal rewards: no term, not counted
    return {"policy": policy, "ref": ref, "rewards": rewards, "mask": mask}


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_reference_equals_the_plackett_luce_formula(beta: float, generator: torch.Generator) -> None:
    x = inputs(5, 7, generator)
    weights = torch.rand(5, 7, generator=generator, dtype=torch.float64) + 0.5
    for given in (None, weights):
        out = reference.group_preference_loss(x["policy"], x["rewards"], None, x["ref"], x["mask"],
                                              loss="dpo_listwise", beta=beta, weights=given)
        want = oracle.listwise_dpo_loss(x["policy"], x["ref"], x["rewards"], x["mask"], beta, given)
        assert out.loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_reference_gradient_is_the_formulas(generator: torch.Generator) -> None:
    """fp64 gradcheck of the reference, and its gradient equals the formula's (autograd through the oracle)."""
    x = inputs(3, 6, generator)
    policy = x["policy"].clone().requires_grad_(True)
    ref = x["ref"].clone().requires_grad_(True)

    def loss(policy: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return reference.group_preference_loss(policy, x["rewards"], None, ref, x["mask"], loss="dpo_listwise",
                                               beta=0.7).loss

    assert torch.autograd.gradcheck(loss, (policy, ref))
    got = torch.autograd.grad(loss(policy, ref), (policy, ref))
    want = torch.autograd.grad(oracle.listwise_dpo_loss(policy, ref, x["rewards"], x["mask"], 0.7), (policy, ref))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_one_pair_per_group_is_dpo(generator: torch.Generator) -> None:
    """With one pair per group (best-worst) each term is DPO's ``-log sigmoid(beta (z_c - z_r))``, and the
    mean over groups is DPO's mean over pairs; a strict ranking of two responses is DPO too."""
    x = inputs(4, 5, generator, ties=False)
    for pairs in ("best_worst",):
        listwise = dk.group_preference_loss(x["policy"], x["rewards"], None, x["ref"], x["mask"],
                                            loss="dpo_listwise", pairs=pairs, backend="reference")
        dpo = dk.group_preference_loss(x["policy"], x["rewards"], None, x["ref"], x["mask"], loss="dpo", pairs=pairs,
                                       backend="reference")
        assert listwise.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-12)
    two = {name: value[:, :2] for name, value in x.items()}
    two["mask"] = None
    two["rewards"] = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    listwise = dk.group_preference_loss(two["policy"], two["rewards"], None, two["ref"], loss="dpo_listwise")
    dpo = dk.group_preference_loss(two["policy"], two["rewards"], None, two["ref"], loss="dpo")
    assert listwise.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-12)


@pytest.fixture(params=["triton", "cuda"])
def kernel_backend(request: pytest.FixtureRequest):
    with pytest.MonkeyPatch.context() as patch:
        use_backend(request.param, DEVICE, patch)
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_equal_the_reference(kernel_backend: str, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Loss, metrics and the gradients of policy and ref, with DDPO weights from embeddings and without."""
    x = inputs(4, 9, generator)
    emb = torch.randn(4, 9, 16, generator=generator, dtype=dtype)
    for diversity, pairs in (("none", "all"), ("deviation", "all"), ("none", "best_worst"), ("deviation", "divpo")):
        results = []
        runs = ((kernel_backend, DEVICE, dtype), ("reference", torch.device("cpu"), torch.float64))
        for backend, device, kind in runs:
            policy = x["policy"].to(device, kind).requires_grad_(True)
            ref = x["ref"].to(device, kind).requires_grad_(True)
            vectors = None if diversity == "none" else emb.to(device, kind)
            out = dk.group_preference_loss(policy, x["rewards"].to(device, kind), vectors, ref, x["mask"].to(device),
                                           loss="dpo_listwise", diversity=diversity, pairs=pairs, beta=0.5,
                                           backend=backend)
            grads = torch.autograd.grad(out.loss, (policy, ref))
            results.append((out.loss.detach().double().cpu(), *(g.double().cpu() for g in grads),
                            out.metrics["pairs"].cpu(), out.metrics["rewards/chosen"].double().cpu()))
        got, want = results
        rtol = accumulation_rtol(dtype, 9 * 9, condition=10.0)
        scale = max(1.0, float(want[0].abs()))
        assert (got[0] - want[0]).abs() <= rtol * scale, (diversity, pairs)
        for g, w in zip(got[1:3], want[1:3], strict=True):
            assert (g - w).abs().max() <= rtol * max(1.0, float(w.abs().max())), (diversity, pairs)
        assert got[3] == want[3]
        assert (got[4] - want[4]).abs() <= rtol * max(1.0, float(want[4].abs()))
