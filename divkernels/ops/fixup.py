"""The float64 fix-up, one mechanism for every kernel that sweeps ``K = S + eps I`` in float32: the
logdet op, the fused loss and the DQO advantages.

A float32 Gauss-Jordan sweep fails on a near-singular ``K`` (a pivot under
``reference.pivot_floor``); the sweep then leaves NaN in the group's output, a device-side flag.
A second pass, in a later launch, reads that flag and sweeps again in float64 only the groups that
failed; every other group costs one load. No host sync either way, and the float64 tile never
occupies the first launch's registers. The pieces, shared by the three kernels:

- :func:`fixup_launches`: whether a second pass follows (float32 only);
- :func:`sweep_failed`: the flag, read in the second pass;
- :func:`fixup_gram`: how the second pass builds the Gram when it has no stored ``S`` to read;
- :func:`fixup_options`: launch options of the fused loss's one-program pass.

The logdet op and the advantages run the second pass as a second launch of their own kernel with
``FIXUP=True`` (one program per group, which returns at once unless its group failed). The fused
loss runs it inside its finalize launch (``group_loss/finalize.py``), which redoes a failed group's
whole forward before it sums the batch: the same flag and the same float64 sweep, one launch fewer.
"""

from __future__ import annotations

import functools

import torch

from divkernels.ops.common import MIN_BLOCK, tl, triton


def fixup_launches(acc: torch.dtype) -> tuple[bool, ...]:
    """``FIXUP`` of each launch of a kernel that sweeps ``K``: ``(False,)`` in float64; ``(False, True)``
    in float32, where the second pass sweeps again in float64 the groups that failed."""
    return (False, True) if acc == torch.float32 else (False,)


@triton.jit
def sweep_failed(flag):
    """Whether a group's first sweep failed: its flag (a logdet, or the sum of a group's outputs: a
    NaN anywhere makes the sum NaN) is NaN."""
    return flag != flag


@functools.cache
def narrowest_fp32_dot() -> int:
    """The narrowest float32 ``tl.dot`` (K dimension) that the installed Triton compiles for NVIDIA
    GPUs: 8 from Triton 3.7 on, 16 before."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size

        fp32 = tl.float32
        return max(8, int(min_dot_size(GPUTarget("cuda", 90, 32))(fp32, fp32)[2]))
    except Exception:  # another backend or layout of Triton: the width every version accepts
        return MIN_BLOCK


def fixup_gram() -> dict[str, object]:
    """``PRECISION`` and ``BLOCK_D`` of a float64 pass that builds the Gram from ``emb``: an IEEE float32
    dot (bf16/fp16 ``emb`` upcast), ``emb`` read in the narrowest float32 slices Triton compiles. The
    products are exact either way (8/11-bit mantissas in a 24-bit one); next to the float64 tiles the
    tensor-core operand tiles spilled 160 bytes in the advantages kernel at G = 128, and 16 float32
    columns 16 bytes in the fused loss's pass at G = 64 (fp32 DivPO, 255 registers, sm_90); 8 leave none
    (benchmarks/README.md). The pass runs rarely, so its speed does not matter. (Float64 ``emb`` never
    takes a second pass.)"""
    return {"PRECISION": "ieee", "BLOCK_D": narrowest_fp32_dot()}


def fixup_options(block_g: int) -> dict[str, int]:
    """Launch options of the fused loss's fix-up + finalize kernel. It is one program (grid ``(1,)``)
    that redoes a failed group's whole forward with a float64 sweep, so blocks per SM do not matter,
    and its float64 tiles are twice the forward's bytes: 4 warps up to G = 16 and 8 at G = 32-64, with
    ``maxnreg`` 255 so that ptxas does not cap the registers for occupancy (with the forward's 1 / 4
    warps, or with its own cap of 128 at 4 warps, it spilled 8-24 bytes there: benchmarks/README.md).
    It does not run at G = 128, where the split forward's logdet launch takes the second pass itself;
    a whole group forward with a float64 128 x 128 tile in one program spilled 320-432 bytes there."""
    return {"num_warps": 4 if block_g <= 16 else 8, "maxnreg": 255}
