"""Test helpers: random response groups, ragged masks and tolerances derived from the arithmetic."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import divkernels as dk

# Relative tolerances by dtype (the project standard): fp64 near rounding, fp32 ~1e-5, bf16 ~1e-2.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# Unit roundoff of float32 (round to nearest) and of float64.
U32 = 2.0**-24
U64 = 2.0**-53


def accumulation_rtol(dtype: torch.dtype, terms: int, condition: float = 1.0) -> float:
    """Relative error bound of a kernel that reads the same values as the float64 reference and
    accumulates ``terms`` products in ``dtype``'s accumulation precision (float64 for float64,
    float32 otherwise: bf16/fp16 products are exact in fp32), amplified by ``condition``.

    ``4 * terms * u * condition``: the deterministic bound ``terms * u`` of a sum, with a factor 4
    for the handful of operations after it (norms, divisions, the elimination's own rounding). A
    1% formula error exceeds it by orders of magnitude at the sizes the tests use.
    """
    unit = U64 if dtype == torch.float64 else U32
    return 4.0 * terms * unit * condition


def condition_number(emb: torch.Tensor, mask: torch.Tensor | None, eps: float) -> float:
    """Largest 2-norm condition number of ``K = S + eps I`` over the groups (cosine ``S``, float64)."""
    from divkernels import reference

    valid = torch.ones(emb.shape[:2], dtype=torch.bool) if mask is None else mask.cpu()
    sim = reference.pairwise_similarity(emb.detach().cpu().double(), valid)
    kernel = sim + eps * torch.diag_embed(valid.double())
    return float(torch.linalg.cond(kernel).max())


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at ``|values|`` (float64 tensor): what rounding to ``dtype`` can move a value by."""
    mantissa = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}[dtype]
    smallest = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float32: 2.0**-149,
                torch.float64: 2.0**-1074}[dtype]
    exponent = torch.floor(torch.log2(values.abs().clamp_min(1e-300)))
    return torch.maximum(torch.exp2(exponent - (mantissa - 1)), torch.full_like(values, smallest))


def rounding_ulps() -> float:
    """How far one conversion to a low precision dtype moves a value, in ulps: half an ulp when it
    rounds to nearest (GPU, C++ host build); a whole ulp under the Triton interpreter, whose
    float32 -> bfloat16/float16 ``.to`` truncates toward zero."""
    import os

    return 1.0 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 0.5


def assert_rounded(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """``actual`` (a kernel output stored in a low precision dtype) is ``expected`` (float64) up to
    a computation error ``rtol * max|expected|`` and then one conversion to ``actual.dtype``:
    elementwise ``|a - e| <= rounding_ulps() * ulp + rtol * max|e|`` (``ulp`` at the larger of |a|
    and |e|, in case rounding crossed a power of two). A 1% error in a bf16 value exceeds one ulp
    (<= 0.78%) and half an ulp (<= 0.39%)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), "non-finite values differ (unwritten output?)"
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if not e.numel():
        return
    bound = rounding_ulps() * ulp(torch.maximum(a.abs(), e.abs()), actual.dtype) + rtol * e.abs().max()
    excess = (a - e).abs() - bound
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (f"element {worst}: {a[worst].item():.6e} vs {e[worst].item():.6e}, "
                                f"beyond {rounding_ulps()} ulp of {actual.dtype} + {rtol:.1e} * max|expected|")


def ragged_mask(batch: int, group: int, generator: torch.Generator, min_size: int = 2) -> torch.Tensor:
    """``[B, G]`` bool mask with between ``min_size`` and ``G`` real responses per group, at random
    positions (not a prefix), and group 0 always full."""
    sizes = torch.randint(min_size, group + 1, (batch,), generator=generator)
    sizes[0] = group
    order = torch.rand(batch, group, generator=generator).argsort(-1)
    ranks = order.argsort(-1)
    return ranks < sizes[:, None]


def random_groups(batch: int, group: int, dim: int, generator: torch.Generator, *,
                  dtype: torch.dtype = torch.float64, ragged: bool = True,
                  poison_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``emb [B, G, D]`` and mask; padded rows hold NaN so any leak shows."""
    emb = torch.randn(batch, group, dim, generator=generator, dtype=torch.float64)
    mask = ragged_mask(batch, group, generator) if ragged else torch.ones(batch, group, dtype=torch.bool)
    if poison_padding:
        emb = torch.where(mask[..., None], emb, torch.nan)
    return emb.to(dtype), mask


def random_logps(batch: int, group: int, generator: torch.Generator, dtype: torch.dtype = torch.float64,
                 scale: float = 5.0) -> torch.Tensor:
    """Negative log-probs in (-scale, 0)."""
    return -torch.rand(batch, group, generator=generator, dtype=torch.float64).mul(scale).add(1e-3).to(dtype)


def random_loss_inputs(batch: int, group: int, dim: int, generator: torch.Generator, dtype: torch.dtype,
                       device: torch.device, emb_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Ragged groups for the fused loss on ``device``: emb (``emb_dtype``, default ``dtype``), mask,
    and policy/ref log-probs and rewards in ``dtype``, NaN in padded responses so any leak shows."""
    emb, mask = random_groups(batch, group, dim, generator, dtype=emb_dtype or dtype)
    return {
        "emb": emb.to(device),
        "mask": mask.to(device),
        "policy_logps": torch.where(mask, random_logps(batch, group, generator, dtype), torch.nan).to(device),
        "ref_logps": torch.where(mask, random_logps(batch, group, generator, dtype), torch.nan).to(device),
        "rewards": torch.where(mask, torch.randn(batch, group, generator=generator, dtype=dtype),
                               torch.nan).to(device),
    }


def random_pair_index(valid: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, count, 2]`` (chosen, rejected) indices of valid responses; ``(-1, -1)`` padding rows
    where the draw picked the same response twice."""
    chosen = torch.multinomial(valid.double(), count, replacement=True, generator=generator)
    rejected = torch.multinomial(valid.double(), count, replacement=True, generator=generator)
    rejected = torch.where(rejected == chosen, -1, rejected)
    chosen = torch.where(rejected < 0, -1, chosen)
    return torch.stack([chosen, rejected], -1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None) -> None:
    """``|actual - expected| <= atol + rtol |expected|`` with the tolerance of ``dtype``."""
    rtol = RTOL[dtype or expected.dtype] if rtol is None else rtol
    atol = rtol if atol is None else atol
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    """``max|actual - expected| <= rtol * max|expected| + atol`` (the norm-wise relative error),
    with NaN/inf in exactly the same places; NaN never passes by accident. ``atol`` is
    for quantities that are 0 in exact arithmetic, where both sides are rounding noise."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), "non-finite values differ (unwritten output?)"
    if not finite.any():
        return
    scale = expected[finite].abs().max().clamp_min(1e-30)
    error = (actual[finite] - expected[finite]).abs().max()
    assert error <= rtol * scale + atol, f"relative error {(error / scale).item():.3e} > {rtol:.1e}"


def compare_backends(op: Callable[..., tuple[torch.Tensor, ...]], tensors: dict[str, torch.Tensor],
                     differentiable: tuple[str, ...], rtol: float, generator: torch.Generator,
                     atol: float = 0.0, backend: str = "triton", against: str = "reference") -> None:
    """Run ``op(backend=..., **tensors)`` with ``backend`` and ``against``; compare every output and
    the gradient of a random linear functional of the outputs w.r.t. each name in ``differentiable``."""
    results = {}
    weights: list[torch.Tensor] | None = None
    for which in (backend, against):
        leaves = {name: value.detach().clone().requires_grad_(name in differentiable) if value is not None else None
                  for name, value in tensors.items()}
        outputs = op(backend=which, **leaves)
        if weights is None:
            weights = [torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)
                       for out in outputs]
        grads: tuple[torch.Tensor, ...] = ()
        scored = [(out.double() * w).sum() for out, w in zip(outputs, weights, strict=True) if out.requires_grad]
        if scored and differentiable:
            grads = torch.autograd.grad(sum(scored), [leaves[name] for name in differentiable], allow_unused=True)
        results[which] = (outputs, grads)
    for got, want in zip(results[backend][0], results[against][0], strict=True):
        assert_matches(got, want, rtol, atol)
    for got, want in zip(results[backend][1], results[against][1], strict=True):
        if want is None:
            assert got is None or (got == 0).all()
        else:
            assert got is not None and got.dtype == want.dtype
            assert_matches(got, want, rtol, atol)


def loss_outputs(output: dk.LossOutput) -> tuple[torch.Tensor, ...]:
    """The loss, every metric (sorted by name) and the logdet of a :class:`LossOutput`."""
    extra = () if output.logdet is None else (output.logdet,)
    return (output.loss, *(output.metrics[name] for name in sorted(output.metrics)), *extra)


def compare_loss(inputs: dict[str, torch.Tensor], options: dict[str, object], rtol: float,
                 generator: torch.Generator, atol: float = 0.0, backend: str = "triton",
                 against: str = "reference") -> None:
    """``group_preference_loss`` on two backends: outputs and gradients w.r.t. the log-probs and emb."""
    mask, rewards = inputs["mask"], inputs["rewards"]

    def op(backend: str, policy_logps: torch.Tensor, ref_logps: torch.Tensor | None,
           emb: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return loss_outputs(dk.group_preference_loss(policy_logps, rewards, emb, ref_logps, mask, backend=backend,
                                                     **options))

    tensors = {name: inputs.get(name) for name in ("policy_logps", "ref_logps", "emb")}
    differentiable = tuple(name for name, value in tensors.items() if value is not None)
    compare_backends(op, tensors, differentiable, rtol, generator, atol, backend=backend, against=against)


def use_backend(name: str, device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip unless backend ``name`` runs on ``device``: on CPU Triton runs under the interpreter and the
    CUDA backend through its host build (``DIVKERNELS_CUDA_HOST_EMULATION``, set for the test). CI's
    strict mode turns such a skip into a failure."""
    from divkernels import _cuda
    from divkernels.backend import backend_unavailable_reason

    if name == "cuda" and device.type == "cpu":
        monkeypatch.setenv(_cuda.ENV_HOST_EMULATION, "1")
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"backend={name!r} cannot run here: {reason}")
