"""The torch.library custom ops: ``opcheck`` on every registered op, and ``torch.compile(fullgraph=True)``
of a training step through the public API (no graph break), equal to eager mode.

On CPU the kernels run through the Triton interpreter (or the CUDA host build for the CUDA backend's
group loss), inside the ops, so these tests need no GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, random_groups, random_logps

import divkernels as dk
from divkernels.loss_config import LossConfig
from divkernels.ops.advantages import advantages_op
from divkernels.ops.deviation import deviation_op
from divkernels.ops.group_loss import group_loss_backward_op, group_loss_forward_op
from divkernels.ops.logdet import logdet_op
from divkernels.ops.partition import partition_op
from divkernels.ops.similarity import similarity_backward_op, similarity_op

pytestmark = pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="needs torch.library.opcheck")


def _groups(generator: torch.Generator, dtype: torch.dtype = torch.float64, grad: bool = True):
    emb, mask = random_groups(3, 6, 8, generator, dtype=dtype)
    return emb.requires_grad_(grad), mask


def _loss_config(**changes: object) -> LossConfig:
    fields = dict(loss="dpo", diversity="deviation", pairs="all", beta=0.1, orpo_lambda=0.1, simpo_gamma=0.5,
                  deviation_norm="minmax", min_deviation=0.0, diversity_alpha=0.1, eps=1.0, quality_quantile=0.25,
                  orpo_weighting="dorpo", divpo_pools="ranked", given_weights=False, cpo_alpha=0.0,
                  check_inputs=False, needs_two=True, kernel_backend="triton")
    fields.update(changes)
    return LossConfig(**fields)


def test_opcheck_similarity_ops(generator: torch.Generator) -> None:
    emb, mask = _groups(generator)
    torch.library.opcheck(similarity_op, (emb, mask, "cosine", None))
    clean = torch.nan_to_num(emb.detach()).requires_grad_()  # no mask: no NaN padding
    torch.library.opcheck(similarity_op, (clean, None, "rbf", 0.5))
    torch.library.opcheck(deviation_op, (emb, mask))
    torch.library.opcheck(logdet_op, (emb, mask, 1.0, "cosine", None))
    sim, norms = similarity_op(emb.detach(), mask, "cosine", None)
    grad = torch.randn(sim.shape, generator=generator, dtype=sim.dtype)
    torch.library.opcheck(similarity_backward_op, (grad, None, None, sim, norms, emb.detach(), mask, "cosine",
                                                   None, 0))


def test_opcheck_forward_only_ops(generator: torch.Generator) -> None:
    emb, mask = _groups(generator, grad=False)
    rewards = torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, mask.shape, generator=generator)
    torch.library.opcheck(partition_op, (emb, None, mask, 0.3, 0.1, True))
    torch.library.opcheck(partition_op, (None, labels, mask, 0.9, 0.1, False))
    for diversity in ("none", "darling", "dqo", "deviation"):
        torch.library.opcheck(advantages_op, (rewards, emb, None, mask, diversity, 0.1, 0.3, 1.0, "std", 0.1,
                                              True, "raw", "grpo", 1))
    torch.library.opcheck(advantages_op, (rewards, emb, None, mask, "darling", 0.1, 0.3, 1.0, "none", 0.1, True,
                                          "minmax", "grpo", 1))
    for estimator, k in (("passk_analytic", 2), ("pkpo", 3), ("best_minus_second", rewards.shape[1])):
        torch.library.opcheck(advantages_op, (rewards, None, None, mask, "none", 0.1, 0.3, 1.0, "std", 0.1, True,
                                              "raw", estimator, k))


@pytest.mark.parametrize("config", [
    _loss_config(),
    _loss_config(loss="orpo", diversity="none", diversity_alpha=0.0, needs_two=False),
    _loss_config(loss="ipo", diversity="logdet_gain", check_inputs=True),
    _loss_config(loss="simpo", diversity="none", pairs="divpo", cpo_alpha=0.5),
], ids=["dpo-deviation-logdet", "orpo", "ipo-gain-checked", "simpo-divpo-cpo"])
def test_opcheck_group_loss_ops(config: LossConfig, generator: torch.Generator) -> None:
    emb, mask = _groups(generator)
    policy = random_logps(3, 6, generator, torch.float64).requires_grad_()
    ref = random_logps(3, 6, generator, torch.float64).requires_grad_()
    rewards = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    store = config.diversity_alpha > 0
    args = (policy, rewards, ref, emb, mask, None, None, None, None, None, None, config.key, store, "this call")
    torch.library.opcheck(group_loss_forward_op, args)
    outputs = group_loss_forward_op(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    _, _, _, totals, chosen_counts, _, grad_sum, sim, norms, inverse = outputs
    state = (sim, norms, inverse) if store else (None, None, None)
    torch.library.opcheck(group_loss_backward_op, (torch.ones((), dtype=torch.float64), grad_sum, chosen_counts,
                                                   totals, emb.detach() if store else None, mask, *state, config.key,
                                                   True, True, False, torch.float64, torch.float64, None))


def _loss_step(backend: str, check_inputs: bool):
    def step(policy, ref, rewards, emb, mask):
        out = dk.group_preference_loss(policy, rewards, emb, ref, mask, diversity="deviation", diversity_alpha=0.1,
                                       backend=backend, check_inputs=check_inputs)
        return out.loss, out.metrics["rewards/margins"], out.logdet
    return step


@pytest.mark.parametrize(("backend", "check_inputs"), [("triton", False), ("triton", True), ("reference", False)])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_compile_of_a_loss_step_equals_eager(backend: str, check_inputs: bool, compiler: str,
                                                       generator: torch.Generator) -> None:
    _compare_compiled_loss_step(backend, check_inputs, compiler, generator)


def _compare_compiled_loss_step(backend: str, check_inputs: bool, compiler: str, generator: torch.Generator) -> None:
    """Loss, a metric, logdet and the gradients of a compiled step equal the eager step's."""
    torch._dynamo.reset()
    emb, mask = _groups(generator, torch.float32)
    policy = torch.where(mask, random_logps(3, 6, generator, torch.float32), -1.0).requires_grad_()
    ref = torch.where(mask, random_logps(3, 6, generator, torch.float32), -1.0).requires_grad_()
    rewards = torch.randn(3, 6, generator=generator)
    step = _loss_step(backend, check_inputs)
    eager = step(policy, ref, rewards, emb, mask)
    eager_grads = torch.autograd.grad(eager[0], (policy, ref, emb))
    compiled = torch.compile(step, fullgraph=True, backend=compiler)(policy, ref, rewards, emb, mask)
    compiled_grads = torch.autograd.grad(compiled[0], (policy, ref, emb))
    for got, want in zip((*compiled, *compiled_grads), (*eager, *eager_grads), strict=True):
        assert_close(got, want, rtol=1e-5)


def test_fullgraph_compile_of_the_diversity_ops_equals_eager(generator: torch.Generator) -> None:
    torch._dynamo.reset()
    emb, mask = _groups(generator, torch.float32)
    rewards = torch.randn(mask.shape, generator=generator)

    def step(emb, mask, rewards):
        sim = dk.pairwise_similarity(emb, mask, backend="triton")
        dev = dk.deviation(emb, mask, backend="triton")
        logdet, gains = dk.logdet_diversity(emb, mask, return_gains=True, backend="triton")
        part = dk.partition_diversity(emb, mask, tau=0.3, backend="triton")
        adv = dk.group_advantages(rewards, emb, mask, diversity="dqo", backend="triton")
        total = (sim * sim).sum() + dev.sum() + logdet.sum() + gains.sum()
        return total, part, adv

    eager = step(emb, mask, rewards)
    eager_grad = torch.autograd.grad(eager[0], emb)[0]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(emb, mask, rewards)
    compiled_grad = torch.autograd.grad(compiled[0], emb)[0]
    for got, want in zip((*compiled, compiled_grad), (*eager, eager_grad), strict=True):
        assert_close(got, want, rtol=1e-5)


def test_fullgraph_compile_on_every_loss_backend(loss_backend: str, generator: torch.Generator) -> None:
    """The CUDA extension (host build on CPU) behind the same custom ops, checks as device asserts."""
    _compare_compiled_loss_step(loss_backend, True, "aot_eager", generator)


def test_compiled_data_checks_still_raise(generator: torch.Generator) -> None:
    """Inside the graph the checks cannot sync: the kernels' checks raise from inside the op, the
    reference's as device-side asserts; a NaN reward is never a silent number."""
    torch._dynamo.reset()
    emb, mask = _groups(generator, torch.float32, grad=False)
    policy = random_logps(3, 6, generator, torch.float32)
    rewards = torch.randn(3, 6, generator=generator)
    rewards[1, 0] = torch.nan
    mask = torch.ones_like(mask)
    for backend in ("triton", "reference"):
        def step(policy, rewards, emb, backend=backend):
            return dk.group_preference_loss(policy, rewards, emb, diversity="deviation", backend=backend).loss
        with pytest.raises((ValueError, RuntimeError), match="rewards has NaN or inf"):
            torch.compile(step, fullgraph=True, backend="aot_eager")(policy, rewards, emb)
