"""Triton backend vs the reference: every op, value and gradient.

On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest) on
small shapes; tests marked ``gpu`` repeat the sweep at real sizes and in bf16/fp16 on a CUDA
device. Outputs are NaN-poisoned before the kernels write them (``DIVKERNELS_POISON_OUTPUTS``),
so an unwritten element fails ``assert_matches``.
"""

from __future__ import annotations

import itertools
import math

import oracle
import pytest
import torch
from helpers import (
    assert_matches,
    compare_backends,
    compare_loss,
    random_groups,
    random_logps,
    random_loss_inputs,
    random_pair_index,
)

import divkernels as dk
from divkernels.backend import backend_unavailable_reason
from divkernels.ops.common import ENV_POISON, new_output

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(backend_unavailable_reason("triton", DEVICE) is not None,
                       reason=f"Triton cannot run here: {backend_unavailable_reason('triton', DEVICE)}"),
]
# Triton passes Python floats as fp32: hyperparameters exact in fp32 let fp64 runs agree to ~1e-12.
EXACT = {"beta": 0.25, "orpo_lambda": 0.125, "simpo_gamma": 0.5, "eps": 2.0**-10}
RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
LOSS_CONFIGS = [{"loss": loss, "diversity": diversity, "pairs": pairs}
                for loss, diversity, pairs in itertools.product(("dpo", "ipo", "orpo", "simpo"),
                                                                ("none", "deviation", "logdet_gain"),
                                                                ("all", "best_worst", "divpo"))]


def groups_on_device(batch: int, group: int, dim: int, generator: torch.Generator, dtype: torch.dtype,
                     layout: str = "contiguous") -> tuple[torch.Tensor, torch.Tensor]:
    """Random groups (NaN in padded rows) on DEVICE; ``layout="strided"`` gives non-contiguous emb."""
    emb, mask = random_groups(batch, group, dim, generator, dtype=dtype)
    if layout == "strided":
        wide = torch.zeros(group, batch, 2 * dim, dtype=dtype)
        wide[..., ::2] = emb.transpose(0, 1)
        emb = wide[..., ::2].transpose(0, 1)
        assert not emb.is_contiguous() and emb.stride(-1) == 2
    return emb.to(DEVICE), mask.to(DEVICE)


# ----------------------------------------------------------------------------- diversity ops


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group", [2, 3, 8, 17, 64])
def test_diversity_ops_match_reference(group: int, dtype: torch.dtype, layout: str,
                                       generator: torch.Generator) -> None:
    emb, mask = groups_on_device(3, group, group + 5, generator, dtype, layout)
    rtol = RTOL[dtype]
    for kernel in ("cosine", "dot", "rbf"):
        compare_backends(lambda backend, emb, k=kernel: (dk.pairwise_similarity(emb, mask, kernel=k, backend=backend),),
                         {"emb": emb}, ("emb",), rtol, generator)
        compare_backends(lambda backend, emb, k=kernel: dk.logdet_diversity(emb, mask, eps=EXACT["eps"], kernel=k,
                                                                              return_gains=True, backend=backend),
                         {"emb": emb}, ("emb",), rtol * 10, generator)
    compare_backends(lambda backend, emb: (dk.deviation(emb, mask, backend=backend),), {"emb": emb}, ("emb",), rtol,
                     generator)
    # partition diversity is one division of two integers (or the 0.1 floor): each side rounds once, so
    # they agree to the dtype's unit roundoff (the classes themselves must agree exactly for that)
    compare_backends(lambda backend, emb: (dk.partition_diversity(emb, mask, tau=0.1, backend=backend),),
                     {"emb": emb}, (), torch.finfo(dtype).eps / 2, generator)


def test_largest_in_kernel_group(generator: torch.Generator) -> None:
    """G = 128, the in-kernel limit: the sweep runs over a full 128 x 128 tile."""
    emb, mask = groups_on_device(2, 128, 40, generator, torch.float64)  # 3 fp64 D slices
    compare_backends(lambda backend, emb: dk.logdet_diversity(emb, mask, eps=EXACT["eps"], return_gains=True,
                                                              backend=backend),
                     {"emb": emb}, ("emb",), 1e-8, generator)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logdet_backward_ignores_the_gradient_of_masked_gains(dtype: torch.dtype, generator: torch.Generator) -> None:
    """The gains of masked-out responses are constant zeros, so what flows into them must not reach
    ``emb``, even when it is not finite (``gains.log()`` gives -inf there, and an inf gradient): the
    kernel's ``emb`` gradient equals the reference's with those entries zeroed (the reference itself
    turns an inf there into NaN through its Cholesky inverse's backward)."""
    emb, mask = groups_on_device(3, 8, 12, generator, dtype)
    # groups 1 and 2 may draw full: group 0 (always full) loses a response, NaN as padding holds
    mask[0, 3] = False
    emb[0, 3] = float("nan")
    assert not mask.all()
    upstream = torch.randn(3, 8, generator=generator, dtype=dtype).to(DEVICE)
    grads = {}
    for backend, into_masked in (("triton", float("inf")), ("reference", 0.0)):
        leaf = emb.detach().clone().requires_grad_(True)
        logdet, gains = dk.logdet_diversity(leaf, mask, eps=EXACT["eps"], return_gains=True, backend=backend)
        torch.autograd.backward((logdet.sum(), gains), (torch.ones((), dtype=dtype, device=DEVICE),
                                                        upstream.masked_fill(~mask, into_masked)), inputs=[leaf])
        grads[backend] = leaf.grad[mask]
    assert_matches(grads["triton"], grads["reference"], RTOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_backward_in_column_chunks_at_the_largest_group(dtype: torch.dtype, generator: torch.Generator) -> None:
    """G = 128: ``d emb = A emb`` takes A 32 columns at a time (``emb_backward``), summing the diagonal
    term over the chunks; every way a gradient reaches S (dL/dS, deviation, logdet + gains) and every
    kernel, against the reference (fp32, the tl.dot path; test_largest_in_kernel_group runs the fp64
    rank-1 path of the logdet backward at G = 128)."""
    emb, mask = groups_on_device(2, 128, 24, generator, dtype)
    rtol = RTOL[dtype]
    for kernel in ("cosine", "dot", "rbf"):
        compare_backends(lambda backend, emb, k=kernel: (dk.pairwise_similarity(emb, mask, kernel=k, backend=backend),),
                         {"emb": emb}, ("emb",), rtol, generator)
        if kernel != "dot":  # a dot kernel of 128 responses in 24 dimensions is singular
            compare_backends(lambda backend, emb, k=kernel: dk.logdet_diversity(emb, mask, eps=0.5, kernel=k,
                                                                                  return_gains=True, backend=backend),
                             {"emb": emb}, ("emb",), rtol * 100, generator)
    compare_backends(lambda backend, emb: (dk.deviation(emb, mask, backend=backend),), {"emb": emb}, ("emb",), rtol,
                     generator)


@pytest.mark.parametrize("diversity", ["none", "darling", "dqo", "deviation"])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_match_reference(diversity: str, scale: str, generator: torch.Generator) -> None:
    """Against the independent oracle: the shaping and normalization after the kernels are shared with
    the reference, so comparing the two backends would test only the kernels."""
    emb, mask = groups_on_device(4, 8, 12, generator, torch.float64)
    rewards = torch.randn(4, 8, generator=generator, dtype=torch.float64).to(DEVICE)
    options = {"scale": scale, "tau": 0.1, "eps": EXACT["eps"], "alpha": 0.25}
    got = dk.group_advantages(rewards, emb, mask, diversity=diversity, backend="triton", **options)
    want = oracle.group_advantages(rewards.cpu(), emb.cpu().nan_to_num(), mask.cpu(), diversity, **options)
    assert_matches(got, want, RTOL[torch.float64], atol=1e-12)


def test_partition_closure_follows_a_long_chain() -> None:
    """Responses on an arc, each linked only to its neighbours: one component with ``transitive``
    (a path of G - 1 links needs every squaring of the reachability tile), neighbours only without."""
    group = 11
    angles = torch.arange(group, dtype=torch.float64) * math.radians(20.0)
    emb = torch.stack([angles.cos(), angles.sin()], -1)[None].to(DEVICE)
    tau = math.cos(math.radians(25.0))  # neighbours (20 degrees) linked, two apart (40) not
    chain = dk.partition_diversity(emb, tau=tau, min_diversity=0.0, backend="triton")
    assert torch.equal(chain.cpu(), torch.zeros(1, group, dtype=torch.float64))
    direct = dk.partition_diversity(emb, tau=tau, min_diversity=0.0, transitive=False, backend="triton")
    neighbours = torch.full((group,), 2.0, dtype=torch.float64)
    neighbours[[0, -1]] = 1.0
    assert_matches(direct, ((group - 1 - neighbours) / (group - 1))[None], 1e-12, atol=1e-12)


@pytest.mark.parametrize("transitive", [True, False])
def test_darling_with_labels_and_minmax_rewards_match_the_oracle(transitive: bool,
                                                                   generator: torch.Generator) -> None:
    """Labels instead of embeddings (one kernel path) and the two-launch min-max reward path."""
    emb, mask = groups_on_device(5, 9, 12, generator, torch.float64)
    labels = torch.randint(0, 3, (5, 9), generator=generator).to(DEVICE)
    rewards = torch.randn(5, 9, generator=generator, dtype=torch.float64).to(DEVICE)
    valid_last = mask[-1].nonzero().flatten()  # the batch's extremes sit in the last group: the range
    rewards[-1, valid_last[0]], rewards[-1, valid_last[-1]] = -20.0, 20.0  # reduction must see all of it
    got = dk.partition_diversity(partition=labels, mask=mask, transitive=transitive, backend="triton")
    want = oracle.partition_diversity(None, mask.cpu(), 0.9, labels=labels.cpu(), transitive=transitive)
    assert_matches(got, want, RTOL[torch.float32], atol=1e-7)
    for source in ("labels", "emb"):
        options = {"scale": None, "tau": 0.1, "eps": EXACT["eps"], "alpha": 0.25, "transitive": transitive,
                   "darling_reward": "minmax"}
        partition = labels if source == "labels" else None
        got = dk.group_advantages(rewards, None if partition is not None else emb, mask, diversity="darling",
                                  partition=partition, backend="triton", **options)
        want = oracle.group_advantages(rewards.cpu(), emb.cpu().nan_to_num(), mask.cpu(), "darling",
                                       labels=None if partition is None else labels.cpu(), **options)
        assert_matches(got, want, RTOL[torch.float64], atol=1e-12)


@pytest.mark.parametrize("case", ["darling-raw", "darling-minmax", "deviation"])
def test_float64_rewards_keep_their_constants_in_float64(case: str) -> None:
    """Labels or float32 embeddings give no float64 operand, yet float64 rewards' advantages carry
    DARLING's floor 0.1 and the weight alpha = 0.1 themselves, not float32's 0.10000000149 (a 1.5e-8
    relative error). The diversity here is exact in any dtype: one class (every response at the floor),
    or one-hot embeddings whose deviations are 3/4 and 1."""
    rewards = torch.tensor([[0.0, 1.0, 3.0, 7.0, 2.0]], dtype=torch.float64, device=DEVICE)
    diversity, _, darling_reward = case.partition("-")
    if diversity == "darling":
        labels, emb, measure = torch.zeros(1, 5, dtype=torch.long), None, torch.full((1, 5), 0.1, dtype=torch.float64)
        quality = rewards.cpu() / 7.0 if darling_reward == "minmax" else rewards.cpu()
        shaped = quality * measure
    else:
        labels, emb, darling_reward = None, torch.eye(4)[[0, 0, 1, 2, 3]][None].to(DEVICE), "raw"
        shaped = rewards.cpu() + 0.1 * torch.tensor([[0.75, 0.75, 1.0, 1.0, 1.0]], dtype=torch.float64)
    got = dk.group_advantages(rewards, emb, None, diversity=diversity, alpha=0.1, scale="none", backend="triton",
                              partition=None if labels is None else labels.to(DEVICE), darling_reward=darling_reward)
    assert got.dtype == torch.float64
    assert_matches(got, shaped - shaped.mean(), 16 * 2.0**-53)  # a handful of float64 roundings


# ----------------------------------------------------------------------------- fused loss


def _loss_inputs(batch: int, group: int, dim: int, generator: torch.Generator,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return random_loss_inputs(batch, group, dim, generator, dtype, DEVICE)


@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda c: "-".join(c.values()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_loss_matches_reference(config: dict[str, str], dtype: torch.dtype,
                                      generator: torch.Generator) -> None:
    inputs = _loss_inputs(4, 8, 12, generator, dtype)
    options = {**config, "diversity_alpha": 0.5, "beta": EXACT["beta"], "orpo_lambda": EXACT["orpo_lambda"],
               "simpo_gamma": EXACT["simpo_gamma"], "eps": EXACT["eps"]}
    # Metrics such as the mean similarity of random embeddings are ~0: their fp32 rounding
    # (~1e-8 on a cosine scale of 1) gets an absolute floor instead of a relative bound.
    compare_loss(inputs, options, RTOL[dtype] * 10, generator, atol=1e-6 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("group", [2, 3, 17, 64])
def test_group_loss_group_sizes(group: int, generator: torch.Generator) -> None:
    inputs = _loss_inputs(3, group, group + 3, generator, torch.float64)
    for config in ({"loss": "dpo", "diversity": "deviation", "pairs": "all"},
                   {"loss": "orpo", "diversity": "logdet_gain", "pairs": "divpo"}):
        compare_loss(inputs, {**config, "diversity_alpha": 0.25, **EXACT}, 1e-8, generator)


def test_group_loss_variants(generator: torch.Generator) -> None:
    """Explicit pairs, DivPO scores, no reference model, no emb, raw/floored deviation weights."""
    inputs = _loss_inputs(3, 6, 10, generator, torch.float64)
    valid = inputs["mask"].cpu()
    pair_index = random_pair_index(valid, 4, generator).to(DEVICE)
    scores = torch.randn(3, 6, generator=generator, dtype=torch.float64).to(DEVICE)
    variants = [
        {"pair_index": pair_index, "diversity": "deviation"},
        {"pairs": "divpo", "divpo_scores": scores, "quality_quantile": 0.25},
        {"deviation_norm": "none", "min_deviation": 0.75, "diversity": "deviation"},
        {"diversity": "logdet_gain", "diversity_alpha": 0.0},
    ]
    for options in variants:
        compare_loss(inputs, {**EXACT, **options}, 1e-9, generator)
    compare_loss({**inputs, "ref_logps": None}, dict(EXACT), 1e-9, generator)
    compare_loss({**inputs, "emb": None}, dict(EXACT), 1e-9, generator)


# ----------------------------------------------------------------------------- degenerate groups


def test_degenerate_groups_match_reference(generator: torch.Generator) -> None:
    """Duplicated responses (singular S), n > D, G = 2, all-equal rewards."""
    duplicates = torch.randn(2, 1, 6, generator=generator, dtype=torch.float64).expand(2, 5, 6).contiguous()
    low_rank = torch.randn(2, 17, 3, generator=generator, dtype=torch.float64)
    pair = torch.randn(4, 2, 5, generator=generator, dtype=torch.float64)
    # At exact duplicates every gradient w.r.t. emb is 0 (cosine at its maximum): both backends give
    # rounding noise, amplified by |K^-1| ~ 1/eps for logdet; those cases get an absolute floor.
    for emb, atol in ((duplicates, 1e-9), (low_rank, 0.0), (pair, 0.0)):
        emb = emb.to(DEVICE)
        batch, group = emb.shape[:2]
        compare_backends(lambda backend, emb: dk.logdet_diversity(emb, eps=EXACT["eps"], return_gains=True,
                                                                  backend=backend),
                         {"emb": emb}, ("emb",), 1e-8, generator, atol=atol)
        compare_backends(lambda backend, emb: (dk.deviation(emb, backend=backend),), {"emb": emb}, ("emb",), 1e-9,
                         generator, atol=atol)
        inputs = {"emb": emb, "mask": None, "policy_logps": random_logps(batch, group, generator).to(DEVICE),
                  "ref_logps": random_logps(batch, group, generator).to(DEVICE),
                  "rewards": torch.ones(batch, group, dtype=torch.float64, device=DEVICE)}
        compare_loss(inputs, {"diversity": "logdet_gain", "diversity_alpha": 0.5, **EXACT}, 1e-8, generator, atol)


def test_fp32_duplicates_stay_close_to_fp64() -> None:
    """fp32 sweep on exact duplicates (cond ~ 1/eps) stays finite and within the measured error
    (reference/__init__.py, Numerics)."""
    emb = torch.randn(3, 1, 16).expand(3, 8, 16).contiguous().to(DEVICE)
    logdet, gains = dk.logdet_diversity(emb, return_gains=True, backend="triton")
    ref_logdet, ref_gains = dk.logdet_diversity(emb.double(), return_gains=True, backend="reference")
    assert torch.isfinite(logdet).all() and torch.isfinite(gains).all()
    assert_matches(logdet, ref_logdet, 2e-3)
    assert_matches(gains, ref_gains, 2e-3)


@pytest.mark.parametrize(("dtype", "delta"), [(torch.bfloat16, 2.0**-10), (torch.float16, 2.0**-13)])
def test_half_backward_keeps_the_bits_of_a_that_the_half_dtype_drops(dtype: torch.dtype, delta: float) -> None:
    """``d emb = A emb`` takes half-precision operands on the tensor cores, with the fp32 ``A`` split into
    two half parts. Two equal rows and ``A = [[1 + delta, -1], [-1, 1 + delta]]`` (``delta`` below the
    half dtype's resolution at 1) cancel to exactly ``delta * e``: a kernel that rounded ``A`` to the
    half dtype would return 0."""
    row = torch.tensor([1.0, -2.0, 0.5, 4.0] * 4)
    emb = torch.stack([row, row]).unsqueeze(0).to(dtype).to(DEVICE).requires_grad_(True)
    sim = dk.pairwise_similarity(emb, kernel="dot", backend="triton")
    # dL/dS = W, so A = W + W^T: W_ii = (1 + delta) / 2, W_ij = -1/2
    weights = torch.tensor([[(1 + delta) / 2, -0.5], [-0.5, (1 + delta) / 2]], device=DEVICE).unsqueeze(0)
    (grad,) = torch.autograd.grad((sim * weights).sum(), emb)
    want = (delta * row).to(dtype).to(DEVICE)
    assert torch.equal(grad[0, 0], want) and torch.equal(grad[0, 1], want), grad


# The interpreter's numpy warns on the fp32 sweep's log(0) that the fp64 retry then replaces.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp64_retry_rescues_a_group_fp32_cannot_factor(dtype: torch.dtype) -> None:
    """eps = 1e-9 vanishes next to 1 in fp32: duplicates make K exactly singular there. The fp32
    sweep's NaN flags that group and the fix-up launch sweeps it again in fp64 (the logdet op's from
    the stored S); the other groups keep their fp32 result. The same for the DQO gains inside the
    advantages kernel, whose fix-up builds the Gram from bf16 ``emb`` on the float32 path
    (``fixup.fixup_gram``). Every value here is exact in bf16."""
    emb = torch.zeros(3, 2, 4, device=DEVICE, dtype=dtype)
    emb[0, :, 0] = 1.0  # exact duplicates: S = [[1, 1], [1, 1]] exactly
    emb[1, 0, 0] = 1.0
    emb[1, 1, 1] = 1.0  # orthogonal
    emb[2, :, 2] = 2.0  # duplicates again: a flagged group after an unflagged one
    logdet, gains = dk.logdet_diversity(emb, eps=1e-9, return_gains=True, backend="triton")
    assert torch.isfinite(logdet).all() and torch.isfinite(gains).all()
    assert logdet[0].item() == pytest.approx(math.log(2e-9), rel=1e-6)
    assert logdet[1].item() == pytest.approx(0.0, abs=1e-6)
    want_logdet, want_gains = dk.logdet_diversity(emb.double(), eps=1e-9, return_gains=True, backend="reference")
    torch.testing.assert_close(logdet.double(), want_logdet, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gains.double(), want_gains, rtol=1e-6, atol=1e-6)
    rewards = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 1.0]], device=DEVICE)
    got = dk.group_advantages(rewards, emb, diversity="dqo", alpha=0.5, eps=1e-9, backend="triton")
    want = dk.group_advantages(rewards.double(), emb.double(), diversity="dqo", alpha=0.5, eps=1e-9,
                               backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_nan_input_is_reported_by_the_kernel_flags() -> None:
    emb = torch.randn(3, 4, 5, device=DEVICE)
    emb[1, 2, 0] = torch.nan
    rewards = torch.randn(3, 4, device=DEVICE)
    policy = -torch.rand(3, 4, device=DEVICE)
    calls = [
        lambda: dk.pairwise_similarity(emb, backend="triton"),
        lambda: dk.deviation(emb, backend="triton"),
        lambda: dk.logdet_diversity(emb, backend="triton"),
        lambda: dk.partition_diversity(emb, backend="triton"),
        lambda: dk.group_advantages(rewards, emb, diversity="dqo", backend="triton"),
        lambda: dk.group_preference_loss(policy, rewards, emb, diversity="deviation", backend="triton"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"emb has NaN or inf.* in valid responses of groups \[1\]"):
            call()
    unchecked = dk.logdet_diversity(emb, backend="triton", check_inputs=False)
    assert torch.isnan(unchecked[1]) and torch.isfinite(unchecked[[0, 2]]).all()


def test_poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_POISON, "1")
    assert torch.isnan(new_output((2, 3), torch.float32, DEVICE)).all()
    monkeypatch.setenv(ENV_POISON, "0")
    assert new_output((2, 3), torch.float32, DEVICE).shape == (2, 3)


# ----------------------------------------------------------------------------- GPU sweep


# The GPU sweep's sizes; the first, small enough for the interpreter, runs on CPU too, so that the
# test's own code is checked before a GPU sees it.
SWEEP_SIZES = [(2, 16, 24), *[pytest.param(*size, marks=pytest.mark.gpu)
                              for size in ((64, 16, 1024), (16, 64, 512), (4, 128, 256), (256, 2, 384))]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "group", "dim"), SWEEP_SIZES)
def test_gpu_sweep(batch: int, group: int, dim: int, dtype: torch.dtype, generator: torch.Generator) -> None:
    # one draw: emb, mask and the log-probs agree on which responses are padding (NaN there)
    inputs = random_loss_inputs(batch, group, dim, generator, torch.float32, DEVICE, emb_dtype=dtype)
    emb, mask = inputs["emb"], inputs["mask"]
    rtol = RTOL[dtype]
    compare_backends(lambda backend, emb: (dk.pairwise_similarity(emb, mask, backend=backend),), {"emb": emb},
                     ("emb",), rtol, generator)
    compare_backends(lambda backend, emb: (dk.deviation(emb, mask, backend=backend),), {"emb": emb}, ("emb",),
                     rtol, generator)
    compare_backends(lambda backend, emb: dk.logdet_diversity(emb, mask, eps=1e-2, return_gains=True,
                                                              backend=backend),
                     {"emb": emb}, ("emb",), max(rtol, 1e-3), generator)
    for config in LOSS_CONFIGS[::4]:
        compare_loss(inputs, {**config, "diversity_alpha": 0.1, "eps": 1e-2}, max(rtol, 1e-3), generator)


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda() -> None:
    emb = torch.randn(2, 4, 8, device="cuda", requires_grad=True)
    assert "Function" in type(dk.pairwise_similarity(emb).grad_fn).__name__
