"""Linear log-probs (ops/linear_logps.py) and the group loss from hidden states (ops/hidden_loss.py).

Both backends (the Triton row kernels, under the interpreter on CPU, and the chunked PyTorch path)
against the unfused float64 reference (reference.linear_logps: all logits at once): forward and the
gradients of hidden, weight and bias, over ragged masks, T = 1, several vocabulary tiles with a
partial last one, several chunks, temperature and bias, bf16/fp32/fp64; then the errors.
"""

from __future__ import annotations

import pytest
import torch

import divkernels as dk
from divkernels import reference
from divkernels.ops import linear_logps as linear_module
from divkernels.ops.linear_logps import default_chunk_size, linear_token_logps

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]
# Triton runs on CUDA tensors on a GPU machine and under the interpreter on CPU tensors elsewhere.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16 logits are rounded to bf16 by the head's GEMM (as a bf16 model's are): ~2^-9 of |z| per token.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def make_inputs(generator: torch.Generator, count: int, length: int, width: int, vocab: int, dtype: torch.dtype,
                *, bias: bool = True) -> dict[str, torch.Tensor | None]:
    hidden = torch.randn(count, length, width, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64).to(dtype)
    mask = torch.rand(count, length, generator=generator) < 0.7
    mask[0] = True  # one full row, one row with no token
    if count > 2:
        mask[1] = False
    targets = torch.randint(0, vocab, (count, length), generator=generator)
    targets[~mask] = -100  # TRL's ignore index outside the mask
    bias_value = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype) if bias else None
    return {"hidden": hidden.to(DEVICE).requires_grad_(), "weight": weight.to(DEVICE).requires_grad_(),
            "targets": targets.to(DEVICE), "mask": mask.to(DEVICE),
            "bias": bias_value.to(DEVICE).requires_grad_() if bias else None}


def reference_and_grads(inputs: dict, seed_grad: torch.Tensor, **options) -> tuple[torch.Tensor, list]:
    leaves = [None if inputs[name] is None else inputs[name].detach().double().requires_grad_()
              for name in ("hidden", "weight", "bias")]
    value = reference.linear_logps(leaves[0], leaves[1], inputs["targets"], inputs["mask"], bias=leaves[2], **options)
    grads = torch.autograd.grad((value * seed_grad).sum(), [leaf for leaf in leaves if leaf is not None])
    return value, list(grads)


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.double(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("count", "length", "width", "vocab", "chunk"), [
    (3, 5, 8, 37, 4),  # several chunks, a partial last chunk, V not a power of two
    (2, 1, 16, 50, None),  # T = 1, the default chunk (one)
    (4, 3, 8, 16, 1),  # one row per chunk
])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_unfused_reference(backend: str, dtype: torch.dtype, count: int, length: int, width: int, vocab: int,
                                   chunk: int | None, reduction: str, generator: torch.Generator,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_module, "MAX_BLOCK_V", 16)  # several vocabulary tiles, a partial last one
    inputs = make_inputs(generator, count, length, width, vocab, dtype)
    options = {"temperature": 0.7, "reduction": reduction}
    got = dk.linear_logps(**inputs, chunk_size=chunk, backend=backend, **options)
    assert got.shape == (count,) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    seed_grad = torch.randn(count, generator=generator, dtype=torch.float64).to(DEVICE)
    want, want_grads = reference_and_grads(inputs, seed_grad, **options)
    assert_matches(got, want, dtype, "logps")
    if reduction == "mean" and count > 2:
        assert got[1].item() == 0.0  # no token in the mask
    grads = torch.autograd.grad((got * seed_grad.to(got.dtype)).sum(), [inputs["hidden"], inputs["weight"],
                                                                         inputs["bias"]])
    for name, grad, want_grad in zip(("hidden", "weight", "bias"), grads, want_grads, strict=True):
        assert grad.dtype == dtype
        assert_matches(grad, want_grad, dtype, f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_entropy_and_its_gradient_match_unfused(backend: str, dtype: torch.dtype, generator: torch.Generator,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``return_entropy=True``: each token's entropy of the same softmax (temperature, bias, several chunks and
    vocabulary tiles), and the gradients of ``sum g logp + sum g_H H`` (an entropy bonus) w.r.t. hidden, weight
    and bias, against the unfused float64 reference."""
    monkeypatch.setattr(linear_module, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(linear_module, "ENTROPY_ROWS", 3)  # the PyTorch rows: several blocks per chunk, a partial one
    inputs = make_inputs(generator, 3, 5, 8, 37, dtype)
    options = {"temperature": 0.7, "reduction": "sum"}
    logps, entropy = dk.linear_logps(**inputs, chunk_size=4, backend=backend, return_entropy=True, **options)
    assert entropy.shape == (3, 5) and entropy.dtype == logps.dtype
    assert (entropy[~inputs["mask"]] == 0).all()
    seed = torch.randn(3, generator=generator, dtype=torch.float64).to(DEVICE)
    seed_h = torch.randn(3, 5, generator=generator, dtype=torch.float64).to(DEVICE)
    leaves = [inputs["hidden"], inputs["weight"], inputs["bias"]]
    exact = [leaf.detach().double().requires_grad_(True) for leaf in leaves]
    want_logps, want_entropy = reference.linear_logps(exact[0], exact[1], inputs["targets"], inputs["mask"],
                                                      bias=exact[2], return_entropy=True, **options)
    assert_matches(logps, want_logps, dtype, "logps")
    assert_matches(entropy, want_entropy, dtype, "entropy")
    objective = lambda lp, h: (lp * seed.to(lp.dtype)).sum() + (h * seed_h.to(h.dtype)).sum()  # noqa: E731
    grads = torch.autograd.grad(objective(logps, entropy), leaves)
    want_grads = torch.autograd.grad(objective(want_logps, want_entropy), exact, retain_graph=True)
    for name, grad, want_grad in zip(("hidden", "weight", "bias"), grads, want_grads, strict=True):
        assert_matches(grad, want_grad, dtype, f"d {name} with the entropy")
    # the entropy alone (no log-prob gradient upstream) reaches the head too
    (grad_weight,) = torch.autograd.grad(
        dk.linear_logps(**inputs, chunk_size=4, backend=backend, return_entropy=True, **options)[1].sum(),
        [inputs["weight"]])
    (want_weight,) = torch.autograd.grad(want_entropy.sum(), [exact[1]])
    assert_matches(grad_weight, want_weight, dtype, "d weight of the entropy alone")


def test_reference_gradcheck(generator: torch.Generator) -> None:
    inputs = make_inputs(generator, 2, 3, 4, 7, torch.float64)

    def function(hidden, weight, bias):
        return reference.linear_logps(hidden, weight, inputs["targets"], inputs["mask"], bias=bias,
                                      temperature=1.3, reduction="mean")

    assert torch.autograd.gradcheck(function, (inputs["hidden"], inputs["weight"], inputs["bias"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_full_sequences_without_bias(backend: str, generator: torch.Generator) -> None:
    """mask=None: every token counts (targets must then all be in range); no bias."""
    inputs = make_inputs(generator, 2, 4, 8, 21, torch.float64, bias=False)
    inputs["targets"] = torch.randint(0, 21, (2, 4), generator=generator).to(DEVICE)
    got = dk.linear_logps(inputs["hidden"], inputs["weight"], inputs["targets"], backend=backend)
    want = reference.linear_logps(inputs["hidden"], inputs["weight"], inputs["targets"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), inputs["weight"])
    (want_grad,) = torch.autograd.grad(want.sum(), inputs["weight"])
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_statistics(backend: str, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per token: log-prob, entropy and first argmax (ties included), as from the full logits."""
    monkeypatch.setattr(linear_module, "MAX_BLOCK_V", 16)
    inputs = make_inputs(generator, 3, 4, 8, 40, torch.float64)
    inputs["weight"].data[33] = inputs["weight"].data[5]  # a tie across tiles: the first index wins
    inputs["bias"].data[33] = inputs["bias"].data[5] = 50.0
    token = linear_token_logps(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["mask"],
                               bias=inputs["bias"], temperature=2.0, chunk_size=5, stats=True, backend=backend)
    logits = reference.lm_head_logits(inputs["hidden"], inputs["weight"], inputs["bias"], 2.0)
    log_probs = logits.log_softmax(-1)
    safe = torch.where(inputs["mask"], inputs["targets"], 0)
    want = torch.where(inputs["mask"], log_probs.gather(-1, safe[..., None])[..., 0], 0.0)
    torch.testing.assert_close(token.logps, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token.entropy, -(log_probs.exp() * log_probs).sum(-1), rtol=1e-10, atol=1e-10)
    assert torch.equal(token.argmax, logits.argmax(-1))
    assert (token.argmax == 5).all()


def test_chunking_changes_nothing_and_default_chunk(generator: torch.Generator) -> None:
    inputs = make_inputs(generator, 3, 5, 8, 37, torch.float64)
    results = [dk.linear_logps(**inputs, chunk_size=chunk, backend="reference") for chunk in (1, 4, 15, 64)]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=1e-13, atol=1e-13)
    assert default_chunk_size(10_000, 152_064) == 256  # 2^26 / 152k = 441 -> 256 rows
    assert default_chunk_size(10, 152_064) == 10
    assert default_chunk_size(10_000, 1 << 30) == 1


def test_non_contiguous_inputs(generator: torch.Generator) -> None:
    inputs = make_inputs(generator, 3, 4, 8, 19, torch.float64)
    hidden = inputs["hidden"].detach().transpose(0, 1).contiguous().transpose(0, 1)
    weight = inputs["weight"].detach().t().contiguous().t()
    targets = inputs["targets"].t().contiguous().t()
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not targets.is_contiguous()
    got = dk.linear_logps(hidden, weight, targets, inputs["mask"], bias=inputs["bias"], backend="reference")
    want = reference.linear_logps(hidden, weight, targets, inputs["mask"], bias=inputs["bias"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_weight_gradient_accumulates_in_float32_across_chunks(generator: torch.Generator,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights over several chunks: dW sums chunk products in float32 (slices of vocabulary rows)."""
    monkeypatch.setattr(linear_module, "WEIGHT_GRAD_ROWS", 8)
    inputs = make_inputs(generator, 8, 8, 16, 20, torch.bfloat16)
    got = dk.linear_logps(**inputs, chunk_size=2, backend="reference")
    (grad,) = torch.autograd.grad(got.sum(), inputs["weight"])
    _, want = reference_and_grads(inputs, torch.ones(8, dtype=torch.float64, device=DEVICE))
    assert_matches(grad, want[1], torch.bfloat16, "d weight")


# ------------------------------------------------------------------ errors


def test_errors_name_the_argument(generator: torch.Generator) -> None:
    inputs = make_inputs(generator, 2, 3, 4, 9, torch.float32)
    hidden, weight, targets, mask = inputs["hidden"], inputs["weight"], inputs["targets"], inputs["mask"]
    call = lambda **changes: dk.linear_logps(**{**inputs, **changes}, backend="reference")  # noqa: E731
    bad_target = targets.clone()
    bad_target[0, 0] = 9  # row 0 is all in the mask
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 9\).*sequences \[0\]"):
        call(targets=bad_target)
    with pytest.raises(ValueError, match="targets must be token ids"):
        call(targets=torch.where(mask, -1, targets))
    with pytest.raises(TypeError, match="targets must hold int64"):
        call(targets=targets.float())
    with pytest.raises(ValueError, match="targets must be"):
        call(targets=targets[:, :2])
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        call(weight=weight.double())
    with pytest.raises(ValueError, match="weight must be"):
        call(weight=torch.randn(9, 5))
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        call(hidden=hidden[0])
    with pytest.raises(TypeError, match="hidden must have a floating dtype"):
        call(hidden=torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask must be a bool"):
        call(mask=mask.float())
    with pytest.raises(ValueError, match="bias must be"):
        call(bias=torch.randn(8))
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="max")
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0)
    for position in ((0, 1), (1, 2)):  # inside the mask or outside it: both reach dW
        poisoned = hidden.detach().clone()
        poisoned[position] = float("nan")
        with pytest.raises(ValueError, match=rf"hidden, weight or bias hold NaN/inf.*\[{position[0]}\]"):
            call(hidden=poisoned)
    with pytest.raises(dk.BackendUnavailableError):
        dk.linear_logps(**inputs, backend="cuda")


# ------------------------------------------------------------------ the group loss from hidden states


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss", "extra"), [
    ("dpo", {"diversity": "deviation", "diversity_alpha": 0.1}),
    ("orpo", {"diversity": "deviation"}),
])
def test_group_loss_from_hidden_equals_loss_of_unfused_logps(backend: str, loss: str, extra: dict,
                                                             generator: torch.Generator) -> None:
    """Ragged groups (a padded response), pooled embeddings from the same hidden states, ORPO's NLL over
    another token mask: the same loss and gradients as the group loss of the unfused log-probs."""
    batch, group, length, width, vocab = 2, 3, 4, 8, 23
    flat = make_inputs(generator, batch * group, length, width, vocab, torch.float64)
    hidden = flat["hidden"].detach().view(batch, group, length, width).requires_grad_()
    weight = flat["weight"]
    targets = torch.randint(0, vocab, (batch, group, length), generator=generator).to(DEVICE)
    mask = (torch.rand(batch, group, length, generator=generator) < 0.7).to(DEVICE)
    mask[..., -1] = True
    nll_mask = mask.clone()
    nll_mask[..., 0] = True
    group_mask = torch.tensor([[True, True, True], [True, True, False]], device=DEVICE)
    rewards = torch.randn(batch, group, generator=generator, dtype=torch.float64).to(DEVICE)
    reduction = "mean" if loss == "orpo" else "sum"
    ref_logps = None if loss == "orpo" else torch.randn(batch, group, generator=generator,
                                                        dtype=torch.float64).to(DEVICE)
    options = {"loss": loss, **extra}
    fused = dk.group_preference_loss_from_hidden(
        hidden, weight, targets, mask, rewards, None, ref_logps, group_mask, reduction=reduction, pooling="mean",
        nll_mask=nll_mask if loss == "orpo" else None, chunk_size=5, backend=backend, **options)

    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    rows = (batch * group, length)
    token_mask = mask & group_mask[..., None]
    policy = reference.linear_logps(leaves[0].view(*rows, width), leaves[1], targets.view(rows),
                                    token_mask.view(rows), reduction=reduction).view(batch, group)
    emb = reference.pool_hidden_states(leaves[0].view(*rows, width), token_mask.view(rows)).view(batch, group, width)
    nll = {}
    if loss == "orpo":
        nll_tokens = nll_mask & group_mask[..., None]
        nll = {"nll_logps": reference.linear_logps(leaves[0].view(*rows, width), leaves[1], targets.view(rows),
                                                   nll_tokens.view(rows)).view(batch, group),
               "nll_tokens": nll_tokens.sum(-1).clamp_min(1).double()}
    unfused = dk.group_preference_loss(policy, rewards, emb, ref_logps, group_mask, backend="reference", **nll,
                                       **options)
    torch.testing.assert_close(fused.loss, unfused.loss, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(fused.loss, [hidden, weight])
    want = torch.autograd.grad(unfused.loss, leaves)
    for name, g, w in zip(("hidden", "weight"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)


def test_group_loss_from_hidden_errors(generator: torch.Generator) -> None:
    hidden = torch.randn(2, 3, 4, 8, generator=generator)
    weight = torch.randn(11, 8, generator=generator)
    targets = torch.randint(0, 11, (2, 3, 4), generator=generator)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    rewards = torch.randn(2, 3, generator=generator)
    call = dk.group_preference_loss_from_hidden
    with pytest.raises(ValueError, match="hidden must be 4-D"):
        call(hidden[0], weight, targets, mask, rewards)
    with pytest.raises(ValueError, match="targets must be"):
        call(hidden, weight, targets[..., :3], mask, rewards)
    with pytest.raises(TypeError, match="mask must be a bool"):
        call(hidden, weight, targets, mask.float(), rewards)
    with pytest.raises(ValueError, match="emb or pooling"):
        call(hidden, weight, targets, mask, rewards, torch.randn(2, 3, 5), pooling="mean")
    with pytest.raises(ValueError, match="pooling"):
        call(hidden, weight, targets, mask, rewards, pooling="max")
    with pytest.raises(ValueError, match="group_mask"):
        call(hidden, weight, targets, mask, rewards, group_mask=torch.ones(2, 2, dtype=torch.bool))


# (batch, tokens, hidden, vocab, chunk): a real vocabulary on a GPU; on CPU (the interpreter) one just
# over two 8192-wide tiles, so that the test's own code runs here too.
VOCAB_SIZES = [(2, 6, 16, 2 * 8192 + 5, 5),
               pytest.param(4, 256, 256, 32_000, 384, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("batch", "tokens", "hidden", "vocab", "chunk"), VOCAB_SIZES)
def test_gpu_vocabulary_scale(batch: int, tokens: int, hidden: int, vocab: int, chunk: int, dtype: torch.dtype,
                              generator: torch.Generator) -> None:
    """At a real vocabulary (8192-wide tiles, 16 warps, several chunks): forward and every gradient
    against the float64 reference, outputs poisoned before the kernels write them."""
    inputs = make_inputs(generator, batch, tokens, hidden, vocab, dtype)
    got = dk.linear_logps(**inputs, chunk_size=chunk, backend="triton")
    seed_grad = torch.randn(batch, generator=generator, dtype=torch.float64).to(DEVICE)
    want, want_grads = reference_and_grads(inputs, seed_grad)
    assert_matches(got, want, dtype, "logps")
    grads = torch.autograd.grad((got * seed_grad.to(got.dtype)).sum(), [inputs["hidden"], inputs["weight"],
                                                                         inputs["bias"]])
    for name, grad, want_grad in zip(("hidden", "weight", "bias"), grads, want_grads, strict=True):
        assert_matches(grad, want_grad, dtype, f"d {name}")
