"""Pass@k advantages (``group_advantages(estimator=...)``): the reference against a brute-force oracle that
enumerates every subset of size k (tests/oracle.py: ``passk_group``), the papers' closed forms, and every
backend against the reference within a tolerance derived from the arithmetic."""

from __future__ import annotations

import math
from collections.abc import Iterator

import oracle
import pytest
import torch
from helpers import U32, accumulation_rtol, use_backend

import divkernels as dk
from divkernels import reference

ESTIMATORS = ("passk_analytic", "pkpo", "best_minus_second")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["triton", "cuda"])
def kernel_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """A kernel backend that runs here: Triton under the interpreter, CUDA through its host build."""
    with pytest.MonkeyPatch.context() as patch:
        use_backend(request.param, DEVICE, patch)
        yield request.param


def reward_kinds(batch: int, group: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """0/1 rewards, continuous ones, three levels (many ties) and all-equal groups."""
    return {"binary": (torch.rand(batch, group, generator=generator) < 0.4).double(),
            "continuous": torch.rand(batch, group, generator=generator, dtype=torch.float64),
            "levels": torch.randint(0, 3, (batch, group), generator=generator).double(),
            "equal": torch.full((batch, group), 0.7, dtype=torch.float64),
            # one low reward per group: every subset of 2 or more holds a 0.7, so passk_analytic is exactly 0
            "saturated": torch.full((batch, group), 0.7, dtype=torch.float64).index_fill(1, torch.tensor([1]), 0.1)}


def ragged(batch: int, group: int, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(batch, group, generator=generator) < 0.75
    mask[0] = True
    mask[:, 0] = True
    return mask


def subset_sizes(estimator: str, group: int) -> list[int | None]:
    return [None] if estimator == "best_minus_second" else list(range(1, group + 1))


@pytest.mark.parametrize("group", [2, 3, 5, 8, 12])
def test_reference_equals_the_subset_enumeration(group: int, generator: torch.Generator) -> None:
    """Every estimator, every k, both scales, ragged groups (a group smaller than k uses k = n), ties and
    all-equal groups: the reference's closed forms equal the definitions enumerated over all k-subsets."""
    mask = ragged(4, group, generator)
    for kind, rewards in reward_kinds(4, group, generator).items():
        for estimator in ESTIMATORS:
            for k in subset_sizes(estimator, group):
                for scale in ("std", "none"):
                    got = dk.group_advantages(rewards, mask=mask, estimator=estimator, k=k, scale=scale,
                                              backend="reference")
                    want = oracle.passk_advantages(rewards, mask, estimator, k or group, scale)
                    bound = tolerance(rewards, mask, estimator, k or group, scale, torch.float64)
                    assert (got - want).abs().max() <= bound, (kind, estimator, k, scale)
                    if kind == "equal" and estimator != "pkpo":
                        assert (got == 0).all(), (estimator, k, scale)
                    if kind == "saturated" and estimator == "passk_analytic" and k >= 2 and scale == "std":
                        assert (got == 0).all(), (k, scale)


def test_passk_analytic_is_the_papers_closed_form() -> None:
    """Pass@k Training (arXiv 2508.10751): 0/1 rewards, ``R = 1 - C(n_neg, k) / C(n, k)``,
    ``sigma = sqrt(R (1 - R))``; a correct response gets ``(1 - R) / sigma``, a wrong one
    ``(1 - R - C(n_neg - 1, k - 1) / C(n - 1, k - 1)) / sigma``."""
    for n, correct, k in ((10, 3, 4), (16, 1, 8), (8, 5, 2), (12, 6, 12 - 6)):
        rewards = torch.tensor([[1.0] * correct + [0.0] * (n - correct)], dtype=torch.float64)
        wrong = n - correct
        success = 1 - math.comb(wrong, k) / math.comb(n, k)
        sigma = math.sqrt(success * (1 - success))
        got = dk.group_advantages(rewards, estimator="passk_analytic", k=k)[0]
        assert got[0].item() == pytest.approx((1 - success) / sigma, rel=1e-12)
        hit = math.comb(wrong - 1, k - 1) / math.comb(n - 1, k - 1)
        assert got[-1].item() == pytest.approx((1 - success - hit) / sigma, rel=1e-12)


def test_pkpo_with_k_equal_to_g_is_best_minus_second(generator: torch.Generator) -> None:
    """PKPO's ``s^(loo-1)`` at ``k = n`` (one subset: max - max of the rest) is verl's best-minus-second
    without the std, and PKPO at ``k = 1`` is ``g / n`` (eq. 33 without a baseline)."""
    rewards = torch.rand(5, 7, generator=generator, dtype=torch.float64)
    pkpo = dk.group_advantages(rewards, estimator="pkpo", k=7)
    plain = dk.group_advantages(rewards, estimator="best_minus_second", scale="none")
    torch.testing.assert_close(pkpo, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dk.group_advantages(rewards, estimator="pkpo", k=1), rewards / 7)


def test_pkpo_is_an_unbiased_transform_of_binary_rewards() -> None:
    """Summed over a group, PKPO's transform is ``k`` times the unbiased pass@k estimate minus its
    leave-one-out ``(k-1)`` baseline: for 0/1 rewards each correct response's share is the chance that it
    is the only correct one of a subset, ``C(n_neg, k-1) / C(n, k)``."""
    for n, correct, k in ((8, 3, 4), (10, 1, 3), (6, 6, 2)):
        rewards = torch.tensor([[1.0] * correct + [0.0] * (n - correct)], dtype=torch.float64)
        got = dk.group_advantages(rewards, estimator="pkpo", k=k)[0]
        share = math.comb(n - correct, k - 1) / math.comb(n, k)
        torch.testing.assert_close(got, torch.tensor([share] * correct + [0.0] * (n - correct), dtype=torch.float64))


def tolerance(rewards: torch.Tensor, mask: torch.Tensor, estimator: str, k: int, scale: str,
              dtype: torch.dtype) -> float:
    """Absolute bound of a kernel's error: a sum of ``G^2`` rounded terms (``accumulation_rtol``) times the
    largest value it is made of, the rewards' range, over the std it is divided by (the subsets' std
    for passk_analytic, the group's for best_minus_second; 1 for pkpo)."""
    group = rewards.shape[1]
    size = max(1.0, float(rewards.abs().max()))
    divisor = 1.0
    if scale == "std" and estimator != "pkpo":
        want = oracle.passk_advantages(rewards, mask, estimator, k, "none")
        scaled = oracle.passk_advantages(rewards, mask, estimator, k, "std")
        ratio = (want.abs() / scaled.abs().clamp_min(1e-300)).where(scaled != 0, torch.inf)
        divisor = min(1.0, float(ratio.min())) if torch.isfinite(ratio).any() else 1.0
    return accumulation_rtol(dtype, group * group) * size / divisor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_equal_the_reference(kernel_backend: str, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Triton and the CUDA kernel against the reference, every estimator and k, ragged groups, both scales."""
    group = 9
    mask = ragged(3, group, generator)
    for kind, rewards in reward_kinds(3, group, generator).items():
        rewards = rewards.to(dtype)
        for estimator in ESTIMATORS:
            for k in subset_sizes(estimator, group)[::2] + ([group] if estimator != "best_minus_second" else []):
                for scale in ("std", "none"):
                    got = dk.group_advantages(rewards.to(DEVICE), mask=mask.to(DEVICE), estimator=estimator, k=k,
                                              scale=scale, backend=kernel_backend).cpu()
                    want = dk.group_advantages(rewards.double(), mask=mask, estimator=estimator, k=k, scale=scale,
                                               backend="reference")
                    assert got.dtype == reference.compute_dtype(dtype)
                    bound = tolerance(rewards.double(), mask, estimator, k or group, scale, dtype)
                    assert (got.double() - want).abs().max() <= bound, (kind, estimator, k, scale)
                    if kind == "equal" and estimator != "pkpo":
                        assert (got == 0).all()
                    if kind == "saturated" and estimator == "passk_analytic" and k >= 2 and scale == "std":
                        assert (got == 0).all(), "every subset has the same maximum: std 0, no advantage"


def test_kernels_compose_with_darlings_partition(kernel_backend: str, generator: torch.Generator) -> None:
    """A pass@k estimator of DARLING's shaped reward ``r * div`` (labels: the CUDA kernel takes them too)."""
    rewards = torch.rand(4, 6, generator=generator)
    labels = torch.randint(0, 3, (4, 6), generator=generator)
    for estimator, k in (("pkpo", 3), ("passk_analytic", 2), ("grpo", None)):
        got = dk.group_advantages(rewards.to(DEVICE), diversity="darling", partition=labels.to(DEVICE),
                                  estimator=estimator, k=k, backend=kernel_backend).cpu()
        div = dk.partition_diversity(partition=labels, backend="reference").double()
        shaped = rewards.double() * div
        if estimator == "grpo":
            want = shaped - shaped.mean(-1, keepdim=True)
        else:
            want = oracle.passk_advantages(shaped, None, estimator, k, "std")
        assert (got.double() - want).abs().max() <= accumulation_rtol(torch.float32, 36, condition=50.0)


def test_grpo_estimator_on_the_cuda_kernel_matches_trl(generator: torch.Generator,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA kernel's GRPO normalization: TRL's ``(r - mean) / (std + 1e-4)``."""
    use_backend("cuda", torch.device("cuda" if torch.cuda.is_available() else "cpu"), monkeypatch)
    rewards = torch.rand(3, 5, generator=generator)
    if torch.cuda.is_available():
        rewards = rewards.cuda()
    got = dk.group_advantages(rewards, backend="cuda").cpu().double()
    want = torch.tensor(oracle.grpo_advantages(rewards.cpu().double().tolist()), dtype=torch.float64)
    assert (got - want).abs().max() <= accumulation_rtol(torch.float32, 5, condition=1e4) + 4 * U32


def test_subset_size_errors() -> None:
    rewards = torch.rand(2, 4)
    with pytest.raises(ValueError, match="needs k"):
        dk.group_advantages(rewards, estimator="pkpo")
    with pytest.raises(ValueError, match=r"k must be in \[1, G=4\]"):
        dk.group_advantages(rewards, estimator="passk_analytic", k=5)
    with pytest.raises(ValueError, match=r"k must be in \[1, G=4\]"):
        dk.group_advantages(rewards, estimator="passk_analytic", k=0)
    with pytest.raises(ValueError, match="takes none"):
        dk.group_advantages(rewards, k=2)
    with pytest.raises(ValueError, match="defined for k = G = 4"):
        dk.group_advantages(rewards, estimator="best_minus_second", k=2)
    with pytest.raises(ValueError, match="estimator"):
        dk.group_advantages(rewards, estimator="passk")
