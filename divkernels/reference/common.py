"""Constants and helpers shared by the reference ops."""

from __future__ import annotations

import torch

# Floor on embedding norms in cosine similarity, as torch.nn.functional.normalize uses.
NORM_FLOOR = 1e-12
# Largest embedding row norm the similarity ops take, per accumulation dtype: 2^60 in float32 (1.2e18),
# 2^508 in float64 (8.4e152). Every Gram entry is then at most 2^120 (Cauchy-Schwarz: |<e_i, e_j>| <=
# |e_i| |e_j|) and every RBF squared distance at most 4 * 2^120, far below float32's 2^128, so no
# accumulation overflows. Larger rows are refused naming emb (cosine is scale-free: divide emb by a constant).
EMB_NORM_LIMIT = {torch.float32: 2.0**60, torch.float64: 2.0**508}
# Added to the group std of GRPO advantages, as TRL's GRPOTrainer does.
ADVANTAGE_STD_EPS = 1e-4
# Added to the group std by the best-minus-second pass@k advantage, as verl's grpo_passk does (epsilon).
PASSK_STD_EPS = 1e-6
# Finite stand-in for padded log-probs: any value < 0 keeps log(1 - exp(pi)) finite.
PADDED_LOGP = -1.0
LN2 = 0.6931471805599453
# DivPO diversity scores this close (relative) to the pool's extreme are ties: first index wins.
DIVPO_TIE_RTOL = 1e-5
# DivPO pool size floor(q n + slack): q * n within this of an integer counts as that integer in every
# precision (q = 0.7 is 0.699999988 in float32, and 0.7 * 100 must give 70 there too).
DIVPO_COUNT_SLACK = 1e-4
# DDPO deviations whose spread (max - min) is at most this are "all equal" (weight 1): the authors
# test exact equality, which would turn float rounding of a collapsed group into weights.
DEVIATION_TIE = 1e-6
# DARLING floors partition diversity at 0.1 (partition_reward_vllm_serve.py: max(r, 0.1)).
DARLING_MIN_DIVERSITY = 0.1
# DQO's ridge: log det(L + I) (arXiv 2509.04784).
DQO_EPS = 1.0
# A pivot of a factorization of K in a precision with unit roundoff u carries an absolute rounding error
# of up to about G u K_kk (the Cholesky backward error bound, Higham, Accuracy and Stability, Thm 10.3),
# at most G u max_k K_kk. A pivot at most PIVOT_MARGIN times that has fewer than 8 correct bits (its log
# is off by up to 1 / 256), so the factorization is declared failed there: float32 sweeps retry in
# float64, and a float64 failure is reported naming eps. Exact duplicates with a tiny eps (1e-6) fall
# below it in float32. (One floor per group, from the largest valid K_kk: a scalar in the kernels.)
PIVOT_MARGIN = 256.0


def pivot_floor(kernel_mat: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B]``: the smallest pivot a factorization in ``dtype`` accepts, ``PIVOT_MARGIN G u max K_kk`` over
    each group's valid rows."""
    largest = torch.where(valid, kernel_mat.diagonal(dim1=-2, dim2=-1), 0.0).amax(-1)
    return PIVOT_MARGIN * kernel_mat.shape[-1] * (torch.finfo(dtype).eps / 2) * largest


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_mask(mask: torch.Tensor | None, batch: int, group: int, device: torch.device) -> torch.Tensor:
    """``[B, G]`` bool mask of real responses; ``None`` means every response is real."""
    if mask is None:
        return torch.ones(batch, group, dtype=torch.bool, device=device)
    return mask


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x x^T`` over the last dim, never through TF32 (see Numerics above: a TF32 Gram puts errors of
    ~5e-2 into ``log det K``). A float32 CUDA matmul may run in TF32 by the process's settings
    (``torch.backends.cuda.matmul.fp32_precision``), which a library must neither read as a promise nor
    change, so there the Gram is formed in float64 and rounded once: every product exact, at least as
    accurate as an IEEE float32 matmul. CPU matmuls and the other dtypes are IEEE already."""
    if x.is_cuda and x.dtype == torch.float32:
        wide = x.double()
        return (wide @ wide.mT).float()
    return x @ x.mT


def _pair_valid(valid: torch.Tensor) -> torch.Tensor:
    return valid[:, :, None] & valid[:, None, :]


def _eye(group: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(group, dtype=torch.bool, device=like.device)
