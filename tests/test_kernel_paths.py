"""Every kernel path that runs on CPU, on both kernel backends: Triton (interpreter) and CUDA (host build).

Each test reaches a loop, a tile boundary, a retry or an edge of the input space that the small
shapes of test_triton.py / test_cuda.py do not: embeddings longer than one tile (D = 300: the
Triton D loop and backward grid, the CUDA 32-column Gram chunks and 128-column backward slices),
bf16/fp16 embeddings, G = 128 in the fused loss, the fp64 retry of a group fp32 cannot factor,
inf inputs, all-padded groups, empty batches and G = 129 through ``auto``. Tolerances come from the
arithmetic (helpers.accumulation_rtol): the reference reads the same (rounded) values in float64,
so the kernels may differ only by their own accumulation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from helpers import (
    accumulation_rtol,
    assert_matches,
    assert_rounded,
    condition_number,
    random_groups,
    random_logps,
    random_loss_inputs,
    use_backend,
)

import divkernels as dk
from divkernels import _cuda, backend
from divkernels.backend import backend_unavailable_reason
from divkernels.benchmarks.host import triton_launches
from divkernels.ops import group_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_BACKENDS = ["triton", "cuda"]
# D = 300: three Triton tiles of 128 (G <= 64) or five of 64 (G = 128), ten CUDA Gram chunks of 32 and
# three CUDA backward slices of 128, the last of each partial.
LONG_D = 300
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
pytestmark = pytest.mark.filterwarnings("ignore:.*:RuntimeWarning:triton")


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """A kernel backend that runs here: Triton under the interpreter, CUDA through its host build."""
    name = request.param
    with pytest.MonkeyPatch.context() as patch:
        use_backend(name, DEVICE, patch)
        yield name


def leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone().requires_grad_(True)


def loss_and_grads(backend_name: str, inputs: dict[str, torch.Tensor | None],
                   options: dict[str, object]) -> tuple[dk.LossOutput, dict[str, torch.Tensor | None]]:
    """The fused loss on ``backend_name`` (inputs as given) or on the reference (inputs upcast to
    float64: the same values, exact arithmetic to 1e-16), and the gradients of its loss."""
    upcast = backend_name == "reference"
    emb = inputs["emb"]
    extra = []
    if isinstance(emb, list):  # several encoders: the first one is differentiated
        emb, extra = emb[0], [e.double() if upcast else e for e in emb[1:]]
    inputs = {**inputs, "emb": emb}
    leaves = {name: leaf(value.double() if upcast and value is not None else value)
              for name, value in inputs.items() if name in ("policy_logps", "ref_logps", "emb", "nll_logps")}
    encoders = [leaves["emb"], *extra] if extra else leaves["emb"]
    extra_leaves = {"nll_logps": leaves["nll_logps"]} if "nll_logps" in leaves else {}
    out = dk.group_preference_loss(leaves["policy_logps"], inputs["rewards"].double() if upcast else inputs["rewards"],
                                   encoders, leaves["ref_logps"], inputs["mask"], backend=backend_name,
                                   **extra_leaves, **options)
    present = [name for name, value in leaves.items() if value is not None]
    grads = torch.autograd.grad(out.loss, [leaves[name] for name in present], allow_unused=True)
    return out, dict(zip(present, grads, strict=True))


def check_loss(backend_name: str, inputs: dict[str, torch.Tensor | None], options: dict[str, object],
               rtol: float, metric_atol: float = 0.0) -> None:
    """Loss, metrics, logdet and every gradient of the kernel backend against the float64 reference."""
    got, got_grads = loss_and_grads(backend_name, inputs, options)
    want, want_grads = loss_and_grads("reference", inputs, options)
    # the loss is pair terms of size ~1 minus alpha * mean logdet: it may cancel to far below either
    terms = 1.0 + float(options.get("diversity_alpha", 0.0)) * (0.0 if want.logdet is None
                                                                else want.logdet.abs().max().item())
    assert_matches(got.loss, want.loss, rtol, rtol * terms)
    assert set(got.metrics) == set(want.metrics)
    for name, value in want.metrics.items():
        assert_matches(got.metrics[name], value, rtol, metric_atol)
    if want.logdet is not None:
        assert_matches(got.logdet, want.logdet, rtol)
    assert torch.equal(got.chosen_counts.cpu().double(), want.chosen_counts.cpu().double())
    assert torch.equal(got.rejected_counts.cpu().double(), want.rejected_counts.cpu().double())
    for name, want_grad in want_grads.items():
        got_grad = got_grads[name]
        if want_grad is None:
            assert got_grad is None or (got_grad == 0).all(), name
            continue
        dtype = (inputs[name][0] if isinstance(inputs[name], list) else inputs[name]).dtype
        assert got_grad is not None and got_grad.dtype == dtype, name
        assert_rounded(got_grad, want_grad, rtol)


# ----------------------------------------------------------------------------- long embeddings


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [8, 128])
def test_fused_loss_with_embeddings_longer_than_a_tile(kernel_backend: str, group: int, dtype: torch.dtype,
                                                       generator: torch.Generator) -> None:
    """Gram over several D tiles, the last partial, and d emb written slice by slice (D = 300)."""
    batch = 2 if group == 128 else 3
    logps_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = random_loss_inputs(batch, group, LONG_D, generator, logps_dtype, DEVICE, emb_dtype=dtype)
    eps = 0.5  # large enough that a 1% error in eps moves logdet by ~1e-3 relative
    condition = condition_number(inputs["emb"], inputs["mask"], eps)
    rtol = accumulation_rtol(dtype, LONG_D + group, condition**2)
    for options in ({"loss": "dpo", "diversity": "logdet_gain", "pairs": "all"},
                    {"loss": "orpo", "diversity": "deviation", "pairs": "divpo"}):
        check_loss(kernel_backend, inputs, {**options, "diversity_alpha": 0.5, "eps": eps, "beta": 0.25}, rtol,
                   metric_atol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_diversity_ops_with_embeddings_longer_than_a_tile(dtype: torch.dtype, generator: torch.Generator,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's similarity, deviation and logdet kernels (the CUDA extension has only the fused loss)."""
    use_backend("triton", DEVICE, monkeypatch)
    emb, mask = random_groups(3, 16, LONG_D, generator, dtype=dtype)
    emb = emb.to(DEVICE)
    eps = 0.5
    condition = condition_number(emb, mask, eps)
    rtol = accumulation_rtol(dtype, LONG_D + 16, condition**2)
    for kernel in ("cosine", "dot", "rbf"):
        ops = {
            "similarity": lambda e, b, k=kernel: (dk.pairwise_similarity(e, mask, kernel=k, backend=b),),
            "logdet": lambda e, b, k=kernel: dk.logdet_diversity(e, mask, eps=eps, kernel=k, return_gains=True,
                                                                 backend=b),
        }
        if kernel == "cosine":
            ops["deviation"] = lambda e, b: (dk.deviation(e, mask, backend=b),)
        for name, op in ops.items():
            got_leaf, want_leaf = leaf(emb), leaf(emb.double())
            got, want = op(got_leaf, "triton"), op(want_leaf, "reference")
            weights = [torch.randn(w.shape, generator=generator, dtype=torch.float64) for w in want]
            scale = 1.0 if kernel != "dot" else float(want[0].detach().abs().max())  # dot: raw Gram entries
            for g, w in zip(got, want, strict=True):
                assert_matches(g, w, rtol, rtol * scale), (kernel, name)
            got_grad = torch.autograd.grad(sum((g.double() * w).sum() for g, w in zip(got, weights, strict=True)),
                                           got_leaf)[0]
            want_grad = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights, strict=True)),
                                            want_leaf)[0]
            assert_rounded(got_grad, want_grad, rtol)


# ----------------------------------------------------------------------------- largest group


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_fused_loss_at_the_largest_group(kernel_backend: str, dtype: torch.dtype, generator: torch.Generator) -> None:
    """G = 128, the in-kernel limit, every loss, ragged: one 128 x 128 tile / shared-memory workspace."""
    inputs = random_loss_inputs(2, 128, 40, generator, dtype, DEVICE)
    eps = 0.5
    rtol = accumulation_rtol(dtype, 40 + 128, condition_number(inputs["emb"], inputs["mask"], eps) ** 2)
    for loss, diversity, pairs in (("dpo", "logdet_gain", "all"), ("ipo", "deviation", "best_worst"),
                                   ("orpo", "none", "divpo"), ("simpo", "deviation", "all")):
        options = {"loss": loss, "diversity": diversity, "pairs": pairs, "diversity_alpha": 0.25, "eps": eps,
                   "beta": 0.25, "orpo_lambda": 0.125, "simpo_gamma": 0.5}
        check_loss(kernel_backend, inputs, options, rtol, metric_atol=rtol)


OPTION_VARIANTS = [
    {"loss": "dpo", "diversity": "deviation"},  # DDPO, the authors' min-max weights
    {"loss": "orpo", "diversity": "deviation"},  # DORPO: weight inside the log-sigmoid, NLL by mean weight
    {"loss": "orpo", "diversity": "logdet_gain", "orpo_weighting": "pair"},
    {"loss": "orpo", "diversity": "none", "pairs": "divpo"},
    {"loss": "dpo", "diversity": "deviation", "deviation_norm": "mean", "min_deviation": 0.25},
    {"loss": "ipo", "diversity": "deviation", "deviation_norm": "none"},
    {"loss": "dpo", "pairs": "divpo", "quality_quantile": 0.5},
    {"loss": "simpo", "pairs": "divpo", "divpo_pools": "threshold", "quality_quantile": 0.5},
    {"loss": "dpo", "pairs": "divpo", "divpo_scores": True},
    {"loss": "orpo", "diversity": "deviation", "weights": True},
    {"loss": "dpo", "diversity": "deviation", "encoders": 2},
    {"loss": "orpo", "diversity": "deviation", "encoders": 3, "pairs": "divpo"},
    {"loss": "ipo", "diversity": "deviation", "token_counts": True},  # TRL's length-normalized IPO
    {"loss": "orpo", "diversity": "deviation", "nll": True},  # TRL's prompt+completion token-mean NLL
    {"loss": "simpo", "cpo_alpha": 1.0, "nll": True},  # TRL's CPOTrainer simpo
    {"loss": "dpo", "diversity": "logdet_gain", "cpo_alpha": 0.5},
]


def option_inputs(options: dict[str, object], generator: torch.Generator) -> tuple[dict, dict, float]:
    """``(inputs, options, rtol)`` of one OPTION_VARIANTS entry: float64, ragged groups of up to 12,
    with the tensors the variant names (DivPO scores, weights, token counts, NLL sums, encoders)."""
    inputs = random_loss_inputs(4, 12, 9, generator, torch.float64, DEVICE)
    options = dict(options)
    if options.pop("divpo_scores", False):
        options["divpo_scores"] = torch.randn(4, 12, generator=generator, dtype=torch.float64).to(DEVICE)
    if options.pop("weights", False):
        options["weights"] = torch.rand(4, 12, generator=generator, dtype=torch.float64).mul(2).to(DEVICE)
    if options.pop("token_counts", False):
        options["token_counts"] = torch.randint(1, 9, (4, 12), generator=generator).double().to(DEVICE)
    if options.pop("nll", False):
        tokens = torch.randint(3, 20, (4, 12), generator=generator).double().to(DEVICE)
        inputs["nll_logps"] = inputs["policy_logps"] * tokens - 1.5
        options["nll_tokens"] = tokens
    encoders = options.pop("encoders", 1)
    if encoders > 1:
        extra = [torch.randn(4, 12, 5 + k, generator=generator, dtype=torch.float64).to(DEVICE)
                 for k in range(encoders - 1)]
        inputs["emb"] = [inputs["emb"], *extra]
    options = {"beta": 0.25, "orpo_lambda": 0.125, "diversity_alpha": 0.25, **options}
    # several encoders combine by z^(1/K): rounding noise ~1e-16 at a minimum deviation becomes ~1e-16^(1/K)
    rtol = max(1e-9, 10 * 1e-16 ** (1 / encoders)) if encoders > 1 else 1e-9
    return inputs, options, rtol


@pytest.mark.parametrize("options", OPTION_VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_matches_the_reference(kernel_backend: str, options: dict[str, object],
                                            generator: torch.Generator) -> None:
    """Each method's default and each named variant, float64, ragged groups of up to 12."""
    check_loss(kernel_backend, *option_inputs(options, generator))


@pytest.fixture
def split_everywhere() -> Iterator[None]:
    """Every Triton loss forward with embeddings split in two launches at any G, as it is from
    ``SPLIT_FORWARD_FROM`` (128) on (``group_loss.split_forward``)."""
    caches = (group_loss._forward_constants, group_loss._fixup_constants)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(group_loss.launch, "SPLIT_FORWARD_FROM", 1)
        for cache in caches:
            cache.cache_clear()
        yield
    for cache in caches:
        cache.cache_clear()


# no sweep: the split's first launch is the similarity forward
SPLIT_VARIANTS = [*OPTION_VARIANTS, {"loss": "dpo", "diversity": "deviation", "diversity_alpha": 0.0},
                  {"loss": "orpo", "diversity": "none", "pairs": "divpo", "diversity_alpha": 0.0}]


@pytest.mark.triton
@pytest.mark.parametrize("options", SPLIT_VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_split_forward_matches_the_reference(options: dict[str, object], generator: torch.Generator,
                                             split_everywhere: None) -> None:
    """The split forward (the similarity or logdet forward, then the group forward reading S, norms,
    K^-1 and logdet back a block of rows at a time) in every variant: loss, metrics, logdet and every
    gradient as the reference; with emb not needing a gradient (S and K^-1 in scratch), the loss
    and metrics."""
    with pytest.MonkeyPatch.context() as patch:
        use_backend("triton", DEVICE, patch)
        inputs, options, rtol = option_inputs(options, generator)
        with triton_launches(stub=False) as names:
            check_loss("triton", inputs, options, rtol)
        sweeps = options.get("diversity") == "logdet_gain" or options["diversity_alpha"] > 0
        first = "_logdet_forward_kernel" if sweeps else "_similarity_forward_kernel"
        assert first in names and "_group_loss_forward_kernel" in names, names
        detached = {**inputs, "emb": [e.detach() for e in inputs["emb"]] if isinstance(inputs["emb"], list)
                    else inputs["emb"].detach()}
        got = dk.group_preference_loss(detached["policy_logps"], detached["rewards"], detached["emb"],
                                       detached["ref_logps"], detached["mask"], backend="triton",
                                       **({"nll_logps": detached["nll_logps"]} if "nll_logps" in detached else {}),
                                       **options)
        want, _ = loss_and_grads("reference", inputs, options)
        assert_matches(got.loss, want.loss, rtol)
        for name, value in want.metrics.items():
            assert_matches(got.metrics[name], value, rtol)


def test_cuda_and_triton_agree_in_fp32(generator: torch.Generator) -> None:
    """Two fp32 kernels with different accumulation orders: each within its bound of fp64, so of each other."""
    for name in KERNEL_BACKENDS:
        with pytest.MonkeyPatch.context() as patch:
            use_backend(name, DEVICE, patch)
    inputs = random_loss_inputs(3, 16, LONG_D, generator, torch.float32, DEVICE)
    eps = 0.5
    rtol = 2 * accumulation_rtol(torch.float32, LONG_D + 16, condition_number(inputs["emb"], inputs["mask"], eps) ** 2)
    options = {"loss": "dpo", "diversity": "logdet_gain", "pairs": "all", "diversity_alpha": 0.5, "eps": eps}
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        if DEVICE.type == "cpu":
            patch.setenv(_cuda.ENV_HOST_EMULATION, "1")
        for name in KERNEL_BACKENDS:
            results[name] = loss_and_grads(name, inputs, options)
    (cuda, cuda_grads), (triton, triton_grads) = results["cuda"], results["triton"]
    assert_matches(cuda.loss, triton.loss, rtol)
    for name, value in triton.metrics.items():
        assert_matches(cuda.metrics[name], value, rtol, rtol)
    for name, value in triton_grads.items():
        assert_matches(cuda_grads[name], value, rtol)


# ----------------------------------------------------------------------------- retry


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("group", [6, 128])
def test_fused_loss_retries_a_group_in_fp64(group: int, generator: torch.Generator,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 duplicates with eps = 1e-9 (1 + 1e-9 == 1 in fp32): K is singular in fp32, and Triton's
    fused loss sweeps that group again in fp64, as the logdet op does. Weights, logdet, the loss
    and the gradient through the regularizer all come from the retried sweep; at G = 128 the fp32
    sweep is the split forward's first launch (the logdet forward) and the retry that op's own fix-up
    launch, from the stored S, before the group kernel reads logdet and K^-1."""
    use_backend("triton", DEVICE, monkeypatch)
    dim = 12 if group < 12 else group + 32  # D > G: the fp32 S of the random rows stays positive definite
    inputs = random_loss_inputs(3, group, dim, generator, torch.float32, DEVICE)
    emb, mask = inputs["emb"].clone(), inputs["mask"].clone()
    mask[:2] = True
    emb[:2] = torch.randn(2, group, dim, generator=generator).to(DEVICE)
    # exact duplicates (one-hot rows scaled by powers of two: every cosine exactly 1 in fp32)
    emb[0] = 0.0
    emb[0, :, 0] = 2.0 ** (torch.arange(group) % 5 - 1.0)  # group 0: every response the same
    emb[1, :2] = 0.0
    emb[1, 0, 3], emb[1, 1, 3] = 1.0, 4.0  # group 1: one duplicate
    inputs.update(emb=emb, mask=mask)
    for name in ("policy_logps", "ref_logps", "rewards"):
        inputs[name] = inputs[name].nan_to_num(-0.5)
    options = {"diversity": "logdet_gain", "diversity_alpha": 0.5, "eps": 1e-9}
    got, got_grads = loss_and_grads("triton", inputs, options)
    want, want_grads = loss_and_grads("reference", inputs, options)
    n = int(inputs["mask"][0].sum())
    # collapsed group: K = 11^T + eps I, logdet = log(n + eps) + (n - 1) log(eps); the float64 diagonal
    # 1 + eps carries ~1e-16 of rounding, ~1e-7 of eps
    assert want.logdet[0].item() == pytest.approx(math.log(n + 1e-9) + (n - 1) * math.log(1e-9), rel=1e-7)
    assert_matches(got.logdet, want.logdet, 1e-6)
    assert_matches(got.loss, want.loss, 1e-5)
    assert_matches(got_grads["policy_logps"], want_grads["policy_logps"], 1e-5)


def test_cuda_fp32_cannot_factor_what_fp32_cannot_represent() -> None:
    """The CUDA kernel has no fp64 retry: a group singular in fp32 is a clear error, never a number;
    with float64 embeddings the same group factors."""
    with pytest.MonkeyPatch.context() as patch:
        use_backend("cuda", DEVICE, patch)
        emb = torch.zeros(2, 2, 4, device=DEVICE)
        emb[:, :, 0] = 1.0
        policy = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], device=DEVICE)
        rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEVICE)
        with pytest.raises(ValueError, match=r"factorization of K = S \+ eps\*I failed for groups \[0, 1\]"):
            dk.group_preference_loss(policy, rewards, emb, diversity="logdet_gain", eps=1e-9, backend="cuda")
        out = dk.group_preference_loss(policy.double(), rewards.double(), emb.double(), diversity="logdet_gain",
                                       eps=1e-9, backend="cuda")
        # det K = (1 + eps)^2 - 1 = eps (2 + eps); K's entries carry rounding ~1e-16, i.e. ~1e-7 of eps
        assert out.logdet[0].item() == pytest.approx(math.log(2 + 1e-9) + math.log(1e-9), rel=1e-7)


# ----------------------------------------------------------------------------- bad and empty inputs


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["emb", "policy_logps", "ref_logps", "rewards"])
def test_non_finite_inputs_name_the_group(kernel_backend: str, where: str, value: float,
                                          generator: torch.Generator) -> None:
    inputs = random_loss_inputs(3, 4, 6, generator, torch.float32, DEVICE)
    inputs["mask"] = torch.ones_like(inputs["mask"])
    inputs = {name: tensor.nan_to_num(0.0) if tensor.is_floating_point() else tensor for name, tensor in inputs.items()}
    inputs[where] = inputs[where].clone()
    inputs[where][1, 2] = value
    with pytest.raises(ValueError, match=rf"{where} has NaN or inf.* in valid responses of groups \[1\]"):
        dk.group_preference_loss(inputs["policy_logps"], inputs["rewards"], inputs["emb"], inputs["ref_logps"],
                                 inputs["mask"], diversity="deviation", diversity_alpha=0.1, backend=kernel_backend)


def test_all_padded_group(kernel_backend: str, generator: torch.Generator) -> None:
    """A group with no valid response takes part in nothing; unchecked diversity ops treat it as the reference does."""
    inputs = random_loss_inputs(3, 5, 7, generator, torch.float64, DEVICE)
    mask = inputs["mask"].clone()
    mask[1] = False
    inputs["mask"] = mask
    for name in ("emb", "policy_logps", "ref_logps", "rewards"):
        inputs[name] = torch.where(mask[..., None] if name == "emb" else mask, inputs[name], torch.nan)
    check_loss(kernel_backend, inputs, {"loss": "dpo", "pairs": "all"}, 1e-12)
    with pytest.raises(ValueError, match=r"needs at least 2 valid responses per group; groups \[1\]"):
        dk.group_preference_loss(inputs["policy_logps"], inputs["rewards"], inputs["emb"], inputs["ref_logps"], mask,
                                 diversity="deviation", backend=kernel_backend)
    options = {"diversity": "logdet_gain", "diversity_alpha": 0.5, "eps": 0.5, "check_inputs": False}
    check_loss(kernel_backend, inputs, options, 1e-12)
    if kernel_backend == "triton":
        emb = inputs["emb"]
        for op in (lambda e, b: (dk.pairwise_similarity(e, mask, backend=b),),
                   lambda e, b: (dk.deviation(e, mask, backend=b, check_inputs=False),),
                   lambda e, b: dk.logdet_diversity(e, mask, return_gains=True, eps=0.5, backend=b,
                                                    check_inputs=False)):
            for got, want in zip(op(emb, "triton"), op(emb, "reference"), strict=True):
                assert_matches(got, want, 1e-12)


def test_empty_batch(kernel_backend: str) -> None:
    """B = 0: every op returns empty results (the loss 0, no NaN) and a backward that runs."""
    emb = torch.randn(0, 4, 8, device=DEVICE, requires_grad=True)
    policy = torch.zeros(0, 4, device=DEVICE, requires_grad=True)
    rewards = torch.zeros(0, 4, device=DEVICE)
    for options in ({"diversity": "none"}, {"diversity": "logdet_gain", "diversity_alpha": 0.5},
                    {"diversity": "deviation", "pairs": "divpo", "loss": "orpo"}):
        out = dk.group_preference_loss(policy, rewards, emb, policy.detach(), backend=kernel_backend, **options)
        assert out.loss.item() == 0.0 and out.metrics["pairs"].item() == 0
        assert all(math.isfinite(value) for value in out.log_dict().values())
        out.loss.backward()
        assert emb.grad is None or emb.grad.shape == emb.shape
    if kernel_backend == "triton":
        assert dk.pairwise_similarity(emb, backend="triton").shape == (0, 4, 4)
        assert dk.deviation(emb, backend="triton").shape == (0, 4)
        logdet, gains = dk.logdet_diversity(emb, backend="triton", return_gains=True)
        assert logdet.shape == (0,) and gains.shape == (0, 4)
        assert dk.partition_diversity(emb.detach(), backend="triton").shape == (0, 4)
        for diversity in ("none", "darling", "dqo", "deviation"):
            assert dk.group_advantages(rewards, emb.detach(), diversity=diversity, backend="triton").shape == (0, 4)


def test_empty_batch_on_the_reference() -> None:
    emb = torch.randn(0, 4, 8, requires_grad=True)
    rewards = torch.zeros(0, 4)
    for diversity in ("none", "darling", "dqo", "deviation"):
        assert dk.group_advantages(rewards, emb.detach(), diversity=diversity, backend="reference").shape == (0, 4)
    out = dk.group_preference_loss(torch.zeros(0, 4), rewards, emb, diversity="logdet_gain", diversity_alpha=0.5,
                                   backend="reference")
    assert out.loss.item() == 0.0
    assert dk.policy_gradient_loss(torch.zeros(0, 4), rewards).item() == 0.0


def test_group_of_129_falls_back_through_auto_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                             generator: torch.Generator) -> None:
    """On a CUDA device ``auto`` sends G > 128 to the reference and warns once per G; naming a kernel raises."""
    backend._warn_large_group.cache_clear()
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match="G=129 > 128 responses exceed the kernels' limit"):
        assert backend.resolve_backend("auto", op="deviation", device=cuda, group_size=129,
                                       kernels=("triton",)) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per G
        assert backend.resolve_backend("auto", op="deviation", device=cuda, group_size=129,
                                       kernels=("triton",)) == "reference"
    assert backend.resolve_backend("auto", op="deviation", device=cuda, group_size=128,
                                   kernels=("triton",)) != "reference" or backend_unavailable_reason(
                                       "triton", cuda) is not None
    emb, mask = random_groups(2, 129, 6, generator)
    policy, rewards = random_logps(2, 129, generator), torch.randn(2, 129, generator=generator, dtype=torch.float64)
    with pytest.raises(dk.BackendUnavailableError, match="G=129 exceeds the in-kernel limit of 128"):
        dk.group_preference_loss(policy, rewards, emb, mask=mask, backend="triton")
    out = dk.group_preference_loss(policy, rewards, emb, mask=mask, diversity="deviation")  # auto: reference on CPU
    assert torch.isfinite(out.loss)
