"""Benchmarks of the fused group preference loss (reference/losses.py): DDPO + logdet regularizer and variants."""

from __future__ import annotations

import torch

import divkernels as dk
from divkernels import reference
from divkernels.benchmarks.harness import Case, clear_grads, element_bytes, embeddings

# The fused pipeline of the speed targets (fused DDPO + logdet regularizer).
DDPO_LOGDET = {"loss": "dpo", "diversity": "deviation", "diversity_alpha": 0.1}
VARIANTS = {
    "ddpo+logdet": DDPO_LOGDET,
    "dpo": {"loss": "dpo", "diversity": "none"},
    "dorpo": {"loss": "orpo", "diversity": "deviation"},
    "dqo-weights": {"loss": "dpo", "diversity": "logdet_gain"},
    "divpo": {"loss": "dpo", "diversity": "none", "pairs": "divpo"},
}


def _reference_loss(policy, rewards, emb, ref, **options):
    return reference.group_preference_loss(policy, rewards, emb, ref, **options).loss


def _public_loss(policy, rewards, emb, ref, *, backend, **options):
    return dk.group_preference_loss(policy, rewards, emb, ref, backend=backend, check_inputs=False, **options).loss


def liger_dpo_loss(policy, rewards, emb, ref, *, beta: float = 0.1, **_):
    """Liger-Kernel's DPO loss on the same log-probs: groups of G = 2 as (chosen, rejected) pairs.

    Liger fuses DPO with the LM head (hidden states in, loss out); its loss on log-probs is
    ``LigerFusedLinearDPOFunction.preference_loss_fn``, which is what is timed here. The pair
    ordering by reward is part of the step, as in our op.
    """
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    first = rewards[:, 0] > rewards[:, 1]
    chosen, rejected = torch.where(first, policy[:, 0], policy[:, 1]), torch.where(first, policy[:, 1], policy[:, 0])
    ref_chosen, ref_rejected = torch.where(first, ref[:, 0], ref[:, 1]), torch.where(first, ref[:, 1], ref[:, 0])
    target = policy.new_empty(2 * policy.shape[0], 1)  # Liger reads only its length (2 x pairs)
    return LigerFusedLinearDPOFunction.preference_loss_fn(chosen, rejected, target, ref_chosen, ref_rejected,
                                                          beta=beta)[0]


def needs_embeddings(options: dict) -> bool:
    """Whether a variant reads emb (plain DPO does not: it is timed without it, as Liger is)."""
    return options.get("diversity", "none") != "none" or options.get("diversity_alpha", 0.0) > 0 \
        or options.get("pairs") == "divpo"


def cases(shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype], backward_passes: list[bool],
          variants: list[str]) -> list[Case]:
    result = []
    for name in variants:
        options = VARIANTS[name]
        needs_emb_grad = options.get("diversity_alpha", 0.0) > 0
        for batch, group, dim in shapes:
            for dtype in dtypes:
                for backward in backward_passes:
                    uses_emb = needs_embeddings(options)
                    emb_bytes = batch * group * dim * element_bytes(dtype) if uses_emb else 0
                    # forward reads emb once; backward reads it again and writes d emb
                    floor = emb_bytes * (3 if backward and needs_emb_grad else 1) + 4 * batch * group * 4

                    def make_inputs(device: torch.device, batch=batch, group=group, dim=dim, dtype=dtype,
                                    backward=backward, needs_emb_grad=needs_emb_grad, uses_emb=uses_emb) -> dict:
                        policy = -torch.rand(batch, group, device=device) * 50
                        return {"policy": policy.requires_grad_(backward),
                                "rewards": torch.randn(batch, group, device=device),
                                "emb": (embeddings(batch, group, dim, dtype, device, backward and needs_emb_grad)
                                        if uses_emb else None),
                                "ref": policy.detach() - torch.rand(batch, group, device=device)}

                    def run(op, inputs: dict, backward=backward, options=options) -> None:
                        clear_grads(inputs)
                        loss = op(inputs["policy"], inputs["rewards"], inputs["emb"], inputs["ref"], **options)
                        if backward:
                            loss.backward()

                    result.append(Case("group_loss", name, batch, group, dim, dtype, backward, floor, make_inputs,
                                       run, _public_loss, _reference_loss))
    return result
