"""The CUDA extension (``csrc/``) behind the fused loss's backend contract.

Same contract as the Triton forward in :mod:`divkernels.ops.group_loss`: ``forward(inputs, config,
store_state) -> ForwardOutputs``, so the op picks one of the two in one place and finalizes and
differentiates both the same way. The extension is built and loaded by :mod:`divkernels._cuda`.
"""

from __future__ import annotations

import torch

from divkernels import _cuda, reference
from divkernels.loss_config import CUDA_INPUTS, ForwardOutputs, LossConfig, LossTensors
from divkernels.ops.common import poison_outputs
from divkernels.types import ADVANTAGE_ESTIMATORS

# Shared memory per block that the host build stands in for: an H100's / H200's opt-in maximum.
HOST_SHARED_BYTES = 227 * 1024


def shared_limit(device: torch.device) -> int:
    """Largest dynamic shared memory per block that ``device`` grants (opt-in), in bytes."""
    if device.type != "cuda":
        return HOST_SHARED_BYTES
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


@torch._dynamo.assume_constant_result  # under torch.compile: decided once while tracing, like the backend
def fits(group: int, acc: torch.dtype, device: torch.device) -> bool:
    """Whether the CUDA kernels can hold a group of ``group`` responses in ``acc``: each block keeps the
    group's ``G x G`` matrices in shared memory (``csrc/group_math.h: workspace_elements``). float64 at
    G = 128 needs 263 KB, more than any GPU's 227 KiB per block: such calls run on the Triton kernels
    (which keep the tile in registers), the same math; float32 fits at every G <= 128."""
    key = (group, acc, device.type, device.index)
    if key not in _FITS:  # per call it is a dict lookup: the extension and the device are asked once
        element = torch.finfo(acc).bits // 8
        _FITS[key] = _cuda.extension(device).shared_bytes(group, element) <= shared_limit(device)
    return _FITS[key]


_FITS: dict[tuple[int, torch.dtype, str, int | None], bool] = {}


def forward(inputs: LossTensors, config: LossConfig, store_state: bool, acc: torch.dtype) -> ForwardOutputs:
    """The fused forward through ``csrc/group_loss.cu`` (one thread block per group)."""
    def small(tensor: torch.Tensor | None) -> torch.Tensor | None:  # [B, G] inputs: acc dtype, contiguous
        return None if tensor is None else tensor.detach().to(acc).contiguous()

    emb = inputs.emb
    if emb is not None:  # the extension pairs float64 accumulation with float64 emb only
        emb = emb.detach().to(torch.float64) if acc == torch.float64 else emb.detach()
    group = inputs.policy.shape[1]
    counts = None if inputs.pair_index is None else reference.pair_counts_explicit(inputs.pair_index, group)
    given = {"emb": emb, "mask": inputs.mask, "counts": small(counts),
             **{name: small(getattr(inputs, name)) for name in CUDA_INPUTS if name not in ("emb", "mask", "counts")}}
    extension = _cuda.extension(inputs.policy.device)
    stats, grad_policy, sim, norms, inverse, chosen, rejected = extension.group_loss_forward(
        [given[name] for name in CUDA_INPUTS], config.kernel_values(config.needs_logdet, store_state), inputs.poison)
    return ForwardOutputs(stats, grad_policy, chosen, rejected, sim, norms, inverse)


def similarity_backward(sim: torch.Tensor, norms: torch.Tensor, inverse: torch.Tensor, emb: torch.Tensor,
                        mask: torch.Tensor | None, grad_loss: torch.Tensor, factor: float) -> torch.Tensor:
    """``dL/d emb`` of the logdet regularizer, ``dL/dS = factor * grad_loss * K^-1``, through
    ``csrc/similarity_backward.cu`` (the scale is read on the device: no op forms ``dL/dS``)."""
    rows = emb.detach().to(sim.dtype) if sim.dtype == torch.float64 else emb.detach()
    grad = _cuda.extension(emb.device).similarity_backward(inverse, sim, norms, rows, mask,
                                                           grad_loss.detach().to(sim.dtype).reshape(1), factor,
                                                           poison_outputs())
    return grad if grad.dtype == emb.dtype else grad.to(emb.dtype)


def partition(given: torch.Tensor, mask: torch.Tensor | None, min_diversity: float, transitive: bool,
              normalize: bool = False) -> torch.Tensor:
    """DARLING's partition diversity ``[B, G]`` float32 through ``csrc/partition.cu`` (one thread block per
    group) from a judge's links (bool ``[B, G, G]``) or labels (integer ``[B, G]``); ``normalize``: over
    its group mean (the fused loss's partition weights)."""
    equivalence = given.contiguous() if given.dim() == 3 else None
    labels = given.to(torch.int64).contiguous() if given.dim() == 2 else None
    mask = None if mask is None else mask.contiguous()
    return _cuda.extension(given.device).partition_diversity(equivalence, labels, mask, min_diversity, transitive,
                                                             normalize)


def advantages(rewards: torch.Tensor, factor: torch.Tensor | None, mask: torch.Tensor | None, estimator: str, k: int,
               standardize: bool) -> torch.Tensor:
    """Advantages ``[B, G]`` of the shaped rewards ``rewards * factor`` (or ``rewards``) through
    ``csrc/advantages.cu`` (one thread block per group): ``estimator`` of ``ADVANTAGE_ESTIMATORS`` over
    subsets of ``k``; float64 for float64 rewards, float32 otherwise."""
    dtype = reference.compute_dtype(rewards.dtype)
    rewards = rewards.detach().to(dtype).contiguous()
    factor = None if factor is None else factor.detach().to(dtype).contiguous()
    mask = None if mask is None else mask.contiguous()
    extension = _cuda.extension(rewards.device)
    return extension.group_advantages(rewards, factor, mask, ADVANTAGE_ESTIMATORS.index(estimator), k, standardize)
