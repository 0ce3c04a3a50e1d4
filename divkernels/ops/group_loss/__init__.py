"""Group-wise preference loss with diversity weights: DPO/IPO/ORPO/SimPO x DDPO/DORPO/DivPO/DQO.

The fused op, four launches for a forward and backward (the autograd engine's ``ones_like``
included; five from G = 65, a 128 tile, on with embeddings) and no host sync with ``check_inputs=False``:

1. forward, one program per group: stream ``emb[b]`` once for the Gram matrix, form cosine ``S``
   and deviation, sweep ``K = S + eps I`` for logdet and ``K^{-1}`` (when ``logdet_gain`` weights
   or the regularizer need them), select the pairs (all / best-worst / DivPO / explicit rows of
   ``pair_index``), weight them, and write the group's partial sums (loss, metrics, data checks),
   the gradient of its pair losses w.r.t. the log-probs and its pair counts. At a 128 tile this is
   two launches (:func:`split_forward`): the similarity or logdet op's forward kernel writes ``S``,
   norms (``K^-1``, logdet), and the group kernel reads them back;
2. finalize, one program: sum the partial sums over the batch and write the loss, every metric
   (one float32 vector; the metrics are views of it) and the totals the backward needs. With a
   float32 logdet it first redoes, with a float64 sweep, the groups whose float32 sweep failed
   (logdet NaN), so the float64 tile stays out of step 1's registers;
3. backward, one program per (group, slice of D): scale the saved per-response gradient by the
   upstream gradient (and the NLL term's), write the gradients of the policy, reference and NLL
   log-probs in their dtypes, and, when ``emb`` needs one, the regularizer's
   ``dL/dS = -alpha / B * g * K^{-1}`` through the shared similarity backward (reading ``emb`` once).

With ``C_ij`` the pair counts, ``w_i`` the (constant) weights and ``u_ij`` the pair logit
(``beta (z_i - z_j)`` for DPO with ``z = pi - ref``, ...), the pair part of the loss is
``sum C w l(u) / #pairs``, so ``d/d pi_k = slope_k (sum_j M_kj - sum_i M_ik) / #pairs`` with
``M = C w dl/du`` and ``slope = du_ij / d pi_i`` (``beta``, ``1 / T_i`` for IPO,
``d log_odds / d pi = 1 / (1 - e^pi)``, ...). The CUDA extension implements step 1 with the same
outputs (:mod:`divkernels.backends.cuda`); steps 2 and 3 are shared. Saved for backward:
``O(B G)`` gradients, plus ``S``, ``K^{-1}`` and norms (``O(B G^2)``) only when ``emb`` needs a
gradient.

Modules, in the order of the math: ``pair_math`` (pair losses, selections, weights), ``diversity``
(``S``, deviation, the sweep), ``forward_kernel`` (step 1 as named stages), ``finalize`` (step 2),
``backward`` (step 3), ``launch`` (Triton launch constants, the split forward, either backend's
forward), ``custom_ops`` (registration and autograd), ``checks`` and ``api`` (the public function).
"""

from __future__ import annotations

from divkernels.ops.group_loss.api import group_preference_loss
from divkernels.ops.group_loss.backward import _backward_constants, fused_backward
from divkernels.ops.group_loss.checks import CHECK_MESSAGES, CHECK_ORDER, metric_names, raise_kernel_checks
from divkernels.ops.group_loss.custom_ops import (
    GroupPreferenceLossFunction,
    group_loss_backward_op,
    group_loss_forward_op,
)
from divkernels.ops.group_loss.finalize import finalize
from divkernels.ops.group_loss.launch import (
    FORWARDS,
    SPLIT_FORWARD_FROM,
    _fixup_constants,
    _forward_constants,
    fused_forward,
    pair_rows,
    split_forward,
    triton_forward,
)

__all__ = [
    "CHECK_MESSAGES", "CHECK_ORDER", "FORWARDS", "SPLIT_FORWARD_FROM", "GroupPreferenceLossFunction",
    "_backward_constants", "_fixup_constants", "_forward_constants", "finalize", "fused_backward", "fused_forward",
    "group_loss_backward_op", "group_loss_forward_op", "group_preference_loss", "metric_names", "pair_rows",
    "raise_kernel_checks", "split_forward", "triton_forward",
]
