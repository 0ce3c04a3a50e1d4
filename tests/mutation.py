"""Mutation check: do the tests kill seeded bugs? ``python tests/mutation.py`` (CI runs ``--check``).

Each mutant is one small, plausible bug (a sign flip, a dropped factor, an off-by-one loop or
mask, a skipped retry, a wrong offset, a compile error) in the Python reference, the op wrappers,
a Triton kernel or the C++ kernel math. The runner copies the repository to a temporary folder,
applies one mutant at a time there (the working tree is never touched), runs the checks that
should catch it, and prints killed / survived. Every mutant must be killed; the exit status is 1
if one survives or if the unmutated copy fails its checks.

Checks run with CI's strict mode (``DIVKERNELS_REQUIRE_BUILDS=1``: a skip is a failure, so a
broken build cannot hide behind skips) and one seed for the whole run (printed; ``--seed`` replays).
C++ mutants rebuild the host build of ``csrc/`` (about a minute each) in a temporary cache.

    python tests/mutation.py                 # every mutant
    python tests/mutation.py --only triton   # mutants whose name matches a regex
    python tests/mutation.py --list
    python tests/mutation.py --check         # seconds: every mutant applies, and its checks select tests

``--check`` (in CI) keeps the table from rotting as the code moves: each mutant's text occurs exactly once
in its file, the mutated Python still parses (a mutant must be a bug, not a syntax error), and each
mutant's pytest selection collects at least one test in the unmutated tree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """Replace ``old`` (which must occur exactly once in ``path``) by ``new``; ``checks`` must fail."""

    name: str
    path: str
    old: str
    new: str
    checks: tuple[str, ...]  # pytest node ids / options, or "!command" for a shell command


def pytest_checks(*args: str) -> tuple[str, ...]:
    return args


KP = "tests/test_kernel_paths.py"
TE = "tests/test_trl_equivalence.py"
MUTANTS = [
    # ------------------------------------------------------------------ the reference (Python)
    Mutant("reference: deviation divides by n, not n - 1", "divkernels/reference/diversity.py",
           "dev = (n[:, None] - row_sum) / (n[:, None] - 1.0).clamp_min(1.0)",
           "dev = (n[:, None] - row_sum) / n[:, None].clamp_min(1.0)",
           ("tests/test_oracle.py", "tests/test_diversity.py")),
    Mutant("reference: ridge 1% off (eps)", "divkernels/reference/diversity.py",
           "kernel_mat = sim.to(torch.float64) + eps * torch.diag_embed",
           "kernel_mat = sim.to(torch.float64) + 1.01 * eps * torch.diag_embed",
           ("tests/test_oracle.py", "tests/test_diversity.py")),
    Mutant("reference: gain sign flipped", "divkernels/reference/diversity.py",
           "return -torch.log(inverse.diagonal(dim1=-2, dim2=-1))",
           "return torch.log(inverse.diagonal(dim1=-2, dim2=-1))",
           ("tests/test_oracle.py", "tests/test_diversity.py")),
    Mutant("reference: IPO target 1/beta instead of 1/(2 beta)", "divkernels/reference/losses.py",
           "return (diff - 1.0 / (2.0 * beta)) ** 2", "return (diff - 1.0 / beta) ** 2",
           ("tests/test_oracle.py", "tests/test_group_loss.py")),
    Mutant("reference: ORPO NLL sign flipped", "divkernels/reference/losses.py",
           "return -policy[:, :, None] - orpo_lambda", "return policy[:, :, None] - orpo_lambda",
           ("tests/test_oracle.py", "tests/test_group_loss.py")),
    Mutant("reference: DivPO quantile q instead of 1 - q", "divkernels/reference/losses.py",
           "position = (1.0 - quality_quantile) * (n - 1)", "position = quality_quantile * (n - 1)",
           ("tests/test_oracle.py", "tests/test_group_loss.py")),
    Mutant("reference: advantage std biased (n, not n - 1)", "divkernels/reference/advantages.py",
           "std = torch.sqrt((centered**2).sum(-1) / (n - 1.0).clamp_min(1.0))",
           "std = torch.sqrt((centered**2).sum(-1) / n.clamp_min(1.0))",
           ("tests/test_oracle.py", "tests/test_advantages.py")),
    Mutant("reference: DARLING adds diversity instead of multiplying", "divkernels/reference/advantages.py",
           "return torch.where(valid, quality * partition_div, 0.0)",
           "return torch.where(valid, quality + partition_div, 0.0)",
           ("tests/test_advantages.py", "tests/test_oracle.py")),
    Mutant("reference: DDPO weights keep the minimum deviation", "divkernels/reference/losses.py",
           "scaled = torch.where(spread > DEVIATION_TIE, (dev - low) /",
           "scaled = torch.where(spread > DEVIATION_TIE, dev /",
           ("tests/test_group_loss.py", "-k", "three_response or authors_transform")),
    Mutant("reference: DORPO weight outside the log-sigmoid", "divkernels/reference/losses.py",
           "odds = weights[:, :, None] * odds", "odds = 1.0 * odds",
           ("tests/test_group_loss.py", "-k", "dorpo")),
    Mutant("reference: DivPO deviation over the whole group in ranked pools", "divkernels/reference/losses.py",
           "top_scores, bottom_scores = deviation_from_similarity(sim, top), deviation_from_similarity(sim, bottom)",
           "top_scores, bottom_scores = deviation_from_similarity(sim, valid), deviation_from_similarity(sim, valid)",
           ("tests/test_group_loss.py", "-k", "divpo_selection")),
    Mutant("reference: DARLING classes not closed transitively", "divkernels/reference/diversity.py",
           "for _ in range(max(1, math.ceil(math.log2(max(group, 2))))):", "for _ in range(0):",
           ("tests/test_advantages.py", "-k", "connected")),
    Mutant("reference: DARLING floor dropped", "divkernels/reference/diversity.py",
           ".clamp_min(1.0)).clamp_min(min_diversity), 0.0)", ".clamp_min(1.0)), 0.0)",
           ("tests/test_advantages.py", "-k", "darling")),
    Mutant("reference: DARLING advantages scaled by std by default", "divkernels/reference/advantages.py",
           'return "none" if diversity == "darling" else "std"', 'return "std"',
           ("tests/test_advantages.py", "-k", "darling")),
    Mutant("reference: DQO ridge 1e-4 by default", "divkernels/reference/common.py",
           "DQO_EPS = 1.0", "DQO_EPS = 1e-4",
           ("tests/test_diversity.py", "-k", "dqo_default")),
    Mutant("reference: IPO without its length normalization", "divkernels/reference/losses.py",
           "logratio = logratio / token_counts", "logratio = logratio",
           ("tests/test_oracle.py",)),
    Mutant("reference: policy-gradient clip upper bound 1 + 2 clip", "divkernels/reference/advantages.py",
           "ratio.clamp(1.0 - clip, 1.0 + clip)", "ratio.clamp(1.0 - clip, 1.0 + 2 * clip)",
           ("tests/test_advantages.py",)),
    Mutant("reference: empty batch divides by B = 0", "divkernels/reference/losses.py",
           "total = total - diversity_alpha * logdet.to(dtype).sum() / max(batch, 1)",
           "total = total - diversity_alpha * logdet.to(dtype).mean()",
           (f"{KP}::test_empty_batch_on_the_reference",)),
    # ------------------------------------------------------------------ validation
    Mutant("validation: data checks never recorded", "divkernels/validation.py",
           "        if self.enabled:\n            self._flags.append(bad_groups() if",
           "        if False:\n            self._flags.append(bad_groups() if",
           ("tests/test_group_loss.py", "-k", "data_errors")),
    Mutant("validation: inf passes the finite check", "divkernels/validation.py",
           "return (~torch.isfinite(value) & valid).any(-1)", "return (torch.isnan(value) & valid).any(-1)",
           (KP, "-k", "non_finite and cuda")),
    # ------------------------------------------------------------------ Triton kernels
    Mutant("triton: Gram keeps only the last D tile", "divkernels/ops/similarity.py",
           "gram += tl.dot(rows, tl.trans(rows), input_precision",
           "gram = tl.dot(rows, tl.trans(rows), input_precision",
           (KP, "-k", "longer and triton")),
    Mutant("triton: fp64 Gram skips column 0", "divkernels/ops/similarity.py",
           "for d in range(0, D):", "for d in range(1, D):",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("triton: backward ignores its D offset", "divkernels/ops/similarity.py",
           "offs_d = start + tl.arange(0, BLOCK_D)", "offs_d = tl.arange(0, BLOCK_D)",
           (KP, "-k", "longer and triton")),
    Mutant("triton: fp64 backward skips the last response", "divkernels/ops/similarity.py",
           "for k in range(c0, tl.minimum(c0 + BLOCK_K, G)):",
           "for k in range(c0, tl.minimum(c0 + BLOCK_K, G) - 1):",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("triton: backward loads padded rows (mask dropped)", "divkernels/ops/similarity.py",
           "mask=valid_cols[:, None] & in_d[None, :], other=0.0)",
           "mask=in_d[None, :], other=0.0)",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("triton: cosine backward projection over n instead of n^2", "divkernels/ops/similarity.py",
           "term = tl.where(raw >= NORM_FLOOR, row_sum, 0.0) / (norms * norms)",
           "term = tl.where(raw >= NORM_FLOOR, row_sum, 0.0) / norms",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("triton: fused loss skips the fp64 fix-up", "divkernels/ops/group_loss/launch.py",
           'if constants["NEED_LOGDET"] and acc == torch.float32 and not constants["DIVERSITY_STORED"]:', "if False:",
           (KP, "-k", "retries")),
    Mutant("triton: split forward skips its logdet launch's fp64 fix-up", "divkernels/ops/group_loss/launch.py",
           "for fixup in logdet_op.fixup_launches(acc):", "for fixup in (False,):",
           (KP, "-k", "retries")),
    Mutant("triton: logdet fix-up reads S from a shifted start", "divkernels/ops/logdet.py",
           "sim = load_square_transposed(square_at(sim_ptr, b, G), G, BLOCK_G)",
           "sim = load_square_transposed(square_at(sim_ptr, b, G) + G, G, BLOCK_G)",
           ("tests/test_triton.py", "-k", "retry")),
    Mutant("triton: padded S stored with unpadded rows", "divkernels/ops/similarity.py",
           "    store_rows(ptr, tile, G, square_stride(G), BLOCK_G)",
           "    store_rows(ptr, tile, G, G, BLOCK_G)",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("triton: emb's group start rounded though its stride is not aligned", "divkernels/ops/common.py",
           "return emb.stride(0) % ROW_ALIGN == 0 and emb.stride(1) % ROW_ALIGN == 0",
           "return True", ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("triton: fused loss fix-up redoes the groups that did not fail", "divkernels/ops/group_loss/finalize.py",
           "                if logdet != logdet:", "                if logdet == logdet:",
           (KP, "-k", "retries")),
    Mutant("triton: split forward reads K^-1's diagonal with the row stride", "divkernels/ops/group_loss/diversity.py",
           "offs * (square_stride(G) + 1)", "offs * square_stride(G)",
           (KP, "-k", "split_forward")),
    Mutant("triton: split forward's row sums miss the last row block", "divkernels/ops/group_loss/diversity.py",
           "    for start in range(0, BLOCK_G, PAIR_ROWS):\n"
           "        rows = start + tl.arange(0, PAIR_ROWS)\n        tile = tl.load(sim_ptr",
           "    for start in range(0, BLOCK_G - PAIR_ROWS, PAIR_ROWS):\n"
           "        rows = start + tl.arange(0, PAIR_ROWS)\n        tile = tl.load(sim_ptr",
           (KP, "-k", "split_forward or largest_group")),
    Mutant("triton: split forward's mean similarity counts the diagonal", "divkernels/ops/group_loss/diversity.py",
           "others = valid_i[:, None] & valid[None, :] & (rows[:, None] != offs[None, :])",
           "others = valid_i[:, None] & valid[None, :]",
           (KP, "-k", "split_forward")),
    Mutant("triton: split forward's DivPO pools by the whole group's deviation",
           "divkernels/ops/group_loss/forward_kernel.py",
           "top_score = deviation_from_row_sums(top_sums, top)", "top_score = dev",
           (KP, "-k", "split_forward")),
    Mutant("triton: split forward reads scratch S from the wrong group", "divkernels/ops/group_loss/diversity.py",
           "row_sums, off_diagonal = stored_row_sums(square_at(sim_ptr, b, G),",
           "row_sums, off_diagonal = stored_row_sums(sim_ptr,",
           (KP, "-k", "split_forward")),
    Mutant("triton: fp64 retry with a 1% larger ridge", "divkernels/ops/logdet.py",
           "sim.to(tl.float64) + ridge.to(tl.float64)", "sim.to(tl.float64) + 1.01 * ridge.to(tl.float64)",
           (KP, "-k", "retries")),
    Mutant("triton: ridge 1% off, caught in fp32", "divkernels/ops/logdet.py",
           "valid[:, None], eps, 0.0)", "valid[:, None], eps * 1.01, 0.0)",
           (KP, "-k", "longer and fp32")),
    Mutant("triton: DPO pair gradient sign flipped", "divkernels/ops/group_loss/pair_math.py",
           "loss = softplus(-u)\n        dloss = -sigmoid(-u)\n    elif LOSS == 1:",
           "loss = softplus(-u)\n        dloss = sigmoid(-u)\n    elif LOSS == 1:",
           ("tests/test_triton.py", "-k", "group_loss_matches")),
    Mutant("triton: ORPO NLL gradient sign flipped", "divkernels/ops/group_loss/forward_kernel.py",
           "grad -= weighted_count", "grad += weighted_count",
           (KP, "-k", "every_option and triton")),
    Mutant("triton: DivPO chooses the least diverse", "divkernels/ops/group_loss/pair_math.py",
           "chosen = first_near_extreme(top_score, top, 1.0, BLOCK_G)",
           "chosen = first_near_extreme(top_score, top, -1.0, BLOCK_G)",
           ("tests/test_group_loss.py", "-k", "divpo_selection and triton")),
    Mutant("triton: DDPO weights divide by the mean, not mean - min", "divkernels/ops/group_loss/pair_math.py",
           "(dev - low) / tl.where(spread, mean - low, 1.0)", "(dev - low) / tl.where(spread, mean, 1.0)",
           ("tests/test_group_loss.py", "-k", "three_response and triton")),
    Mutant("triton: DORPO weight left out of the log-sigmoid", "divkernels/ops/group_loss/pair_math.py",
           "odds = weight_i[:, None] * u", "odds = u",
           ("tests/test_group_loss.py", "-k", "dorpo and triton")),
    Mutant("triton: DivPO bottom pool one too large", "divkernels/ops/group_loss/pair_math.py",
           "valid & (rank < size)", "valid & (rank <= size)",
           ("tests/test_group_loss.py", "-k", "divpo_selection and triton")),
    Mutant("triton: DivPO rejected by the top pool's deviation", "divkernels/ops/group_loss/forward_kernel.py",
           "bottom_score = deviation_from_similarity(sim, bottom)",
           "bottom_score = deviation_from_similarity(sim, top)",
           ("tests/test_group_loss.py", "-k", "divpo_selection and triton")),
    Mutant("triton: weights normalized by n - 1", "divkernels/ops/group_loss/pair_math.py",
           "mean = tl.sum(tl.where(valid, raw, 0.0), axis=0) / tl.maximum(n, 1.0)",
           "mean = tl.sum(tl.where(valid, raw, 0.0), axis=0) / tl.maximum(n - 1.0, 1.0)",
           ("tests/test_triton.py", "-k", "group_loss_matches")),
    # ------------------------------------------------------------------ op wrappers (Python)
    Mutant("ops: reference gradient sign flipped", "divkernels/ops/group_loss/backward.py",
           "tl.store(grad_ref_ptr + b * G + offs, (-grad).to(", "tl.store(grad_ref_ptr + b * G + offs, (grad).to(",
           ("tests/test_triton.py", "-k", "group_loss_matches")),
    Mutant("ops: regularizer gradient drops alpha", "divkernels/ops/group_loss/backward.py",
           "config.diversity_alpha / max(batch, 1), config.cpo_alpha, **constants)",
           "1.0 / max(batch, 1), config.cpo_alpha, **constants)",
           ("tests/test_triton.py", "-k", "group_loss_matches")),
    Mutant("ops: logdet gain gradient sign flipped", "divkernels/ops/similarity.py",
           "sym += w * (column_k[:, None] * row_k[None, :]",
           "sym -= w * (column_k[:, None] * row_k[None, :]",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("ops: DORPO NLL term not scaled by the mean weight", "divkernels/ops/group_loss/finalize.py",
           "loss += pick(total, COL_WEIGHT_SUM, BLOCK_S) / per_pair * nll", "loss += nll",
           (KP, "-k", "every_option and triton")),
    Mutant("ops: no gradient reaches nll_logps", "divkernels/ops/group_loss/backward.py",
           "return grads[\"policy\"], grads[\"ref\"], grad_emb, grads[\"nll\"]",
           "return grads[\"policy\"], grads[\"ref\"], grad_emb, None",
           (KP, "-k", "every_option and triton")),
    Mutant("triton: IPO slope ignores the completion length", "divkernels/ops/group_loss/pair_math.py",
           "slope = 1.0 / length", "slope = tl.full(policy.shape, 1.0, policy.dtype)",
           (KP, "-k", "every_option and triton")),
    Mutant("triton: pair section's chosen rows shifted by one", "divkernels/ops/group_loss/pair_math.py",
           "    if PAIR_ROWS == BLOCK_G:\n        return vector\n    offs = tl.arange(0, BLOCK_G)\n"
           "    return tl.sum(tl.where(rows[:, None] == offs[None, :]",
           "    if PAIR_ROWS == BLOCK_G:\n        return vector\n    offs = tl.arange(0, BLOCK_G)\n"
           "    return tl.sum(tl.where(rows[:, None] + 1 == offs[None, :]",
           (KP, "-k", "largest_group and triton")),
    Mutant("triton: pair section skips its last row chunk", "divkernels/ops/group_loss/forward_kernel.py",
           "    for start in range(0, BLOCK_G, PAIR_ROWS):\n        rows = start + tl.arange(0, PAIR_ROWS)\n"
           "        if PAIRS",
           "    for start in range(0, BLOCK_G - PAIR_ROWS, PAIR_ROWS):\n"
           "        rows = start + tl.arange(0, PAIR_ROWS)\n        if PAIRS",
           (KP, "-k", "largest_group and triton")),
    Mutant("triton: rejected counts summed along the wrong axis", "divkernels/ops/group_loss/forward_kernel.py",
           "rejected_count += tl.sum(counts, axis=0)", "rejected_count += tl.sum(counts, axis=1)",
           (KP, "-k", "every_option and triton")),
    Mutant("ops: deviation backward divides by n", "divkernels/ops/similarity.py",
           "per_row = tl.load(grad_ptr + b * G + offs, mask=valid, other=0.0).to(ACC) / tl.maximum(n - 1.0, 1.0)",
           "per_row = tl.load(grad_ptr + b * G + offs, mask=valid, other=0.0).to(ACC) / tl.maximum(n, 1.0)",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("ops: fused loss divides by B = 0 on an empty batch", "divkernels/ops/group_loss/finalize.py",
           "stats, totals, loss, metrics, batch, float(max(batch, 1)),",
           "stats, totals, loss, metrics, batch, float(batch),",
           (KP, "-k", "empty_batch and triton")),
    # ------------------------------------------------------------------ fused in fact (launches, caches, custom ops)
    Mutant("ops: host data checks computed with check_inputs=False", "divkernels/ops/group_loss/api.py",
           "    if checks.enabled:\n        _host_data_checks(checks, args, valid(), options[\"loss\"])",
           "    if True:\n        _host_data_checks(checks, args, valid(), options[\"loss\"])",
           ("tests/test_launches.py",)),
    Mutant("ops: per-signature check cache ignores the dtype", "divkernels/ops/group_loss/checks.py",
           "        return value.shape, value.dtype, value.device", "        return value.shape, value.device",
           ("tests/test_group_loss.py", "-k", "static_errors")),
    Mutant("library: similarity backward fake has the wrong shape", "divkernels/ops/similarity.py",
           "    return emb.new_empty(emb.shape)\n", "    return emb.new_empty(emb.shape[:2])\n",
           ("tests/test_library.py", "-k", "similarity_ops")),
    Mutant("library: loss op's autograd drops the reference gradient", "divkernels/ops/group_loss/custom_ops.py",
           "    return policy, None, ref, emb_grad, None, None, None, None, None, nll, None, None, None, None",
           "    return policy, None, None, emb_grad, None, None, None, None, None, nll, None, None, None, None",
           ("tests/test_library.py", "-k", "loss_step_equals_eager")),
    Mutant("triton: no float64 fix-up launch", "divkernels/ops/logdet.py",
           "return (False, True) if acc == torch.float32 else (False,)", "return (False,)",
           ("tests/test_triton.py", "-k", "retry")),
    Mutant("triton: fix-up launch skips the flagged groups", "divkernels/ops/logdet.py",
           "        if first == first:\n            return", "        if first != first:\n            return",
           ("tests/test_triton.py", "-k", "retry")),
    Mutant("triton: chunked backward keeps only the last chunk's diagonal sums", "divkernels/ops/similarity.py",
           "row_sum += sums", "row_sum = sums",
           ("tests/test_triton.py", "-k", "column_chunks")),
    Mutant("triton: backward drops the transposed half of dL/dS", "divkernels/ops/similarity.py",
           "sym += tl.load(base + cols[None, :] * stride_si", "sym *= tl.load(base + cols[None, :] * stride_si",
           ("tests/test_triton.py", "-k", "column_chunks")),
    Mutant("triton: logdet backward's rank-1 terms skip the transpose", "divkernels/ops/similarity.py",
           "+ row_k_t[:, None] * column_k_t[None, :])", "+ row_k[None, :] * column_k_t[None, :])",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("triton: fp64 backward reads masked-out rows of emb", "divkernels/ops/similarity.py",
           "mask=tl.where(valid_k, in_d, False),", "mask=in_d,",
           ("tests/test_triton.py", "-k", "diversity_ops_match")),
    Mutant("triton: logdet backward weights masked-out gains", "divkernels/ops/similarity.py",
           "w = (tl.load(grad_extra_ptr + b * G + k, mask=valid_k, other=0.0)",
           "w = (tl.load(grad_extra_ptr + b * G + k, mask=k < G, other=0.0)",
           ("tests/test_triton.py", "-k", "masked_gains")),
    Mutant("triton: bf16 backward drops the low half of A", "divkernels/ops/similarity.py",
           "return (tl.dot(hi, rows, out_dtype=ACC) + tl.dot(lo, rows, out_dtype=ACC)) * scale",
           "return tl.dot(hi, rows, out_dtype=ACC) * scale",
           ("tests/test_triton.py", "-k", "half_backward")),
    Mutant("triton: partition closure squares once", "divkernels/ops/partition.py",
           "    return max(1, (max(group, 2) - 1).bit_length())", "    return 1",
           ("tests/test_triton.py", "-k", "long_chain")),
    Mutant("triton: advantage std biased (n, not n - 1)", "divkernels/ops/advantages.py",
           "tl.sum(centered * centered, axis=0) / tl.maximum(n - 1.0, 1.0)",
           "tl.sum(centered * centered, axis=0) / tl.maximum(n, 1.0)",
           ("tests/test_triton.py", "-k", "advantages_match")),
    Mutant("triton: darling min-max range misses the last groups", "divkernels/ops/advantages.py",
           "low = tl.minimum(low, tl.load(range_ptr + 2 * rows, mask=rows < B,",
           "low = tl.minimum(low, tl.load(range_ptr + 2 * rows, mask=rows < B - 1,",
           ("tests/test_triton.py", "-k", "minmax")),
    # ------------------------------------------------------------------ CUDA kernel math (host build)
    Mutant("cuda: backward ignores the column offset d0", "csrc/group_math.h",
           "for (int64_t c0 = d0; c0 < end; c0 += kChunk) {", "for (int64_t c0 = 0; c0 < end - d0; c0 += kChunk) {",
           (KP, "-k", "longer and cuda")),
    Mutant("cuda: Gram register block drops its last row", "csrc/group_math.h",
           "for (int r = 0; r < kBlock; ++r)\n        for (int q = 0; q < kBlock; ++q) {",
           "for (int r = 0; r < kBlock - 1; ++r)\n        for (int q = 0; q < kBlock; ++q) {",
           ("tests/test_cuda.py", "-k", "fused_loss_matches")),
    Mutant("cuda: backward writes only the first row of each register block", "csrc/group_math.h",
           "if (i < G) grad_emb[(b * G + i) * D + d] = static_cast<E>(acc[r]);",
           "if (i < G && r == 0) grad_emb[(b * G + i) * D + d] = static_cast<E>(acc[r]);",
           (KP, "-k", "longer and cuda")),
    Mutant("cuda: Gram keeps only the last chunk", "csrc/group_math.h",
           "if (i < G && j < G) ws.S[i * G + j] += acc[r][q];", "if (i < G && j < G) ws.S[i * G + j] = acc[r][q];",
           ("tests/test_cuda.py", "-k", "fused_loss_matches")),
    Mutant("cuda: Cholesky skips the last column of the update", "csrc/group_math.h",
           "for (int m = 0; m < k; ++m) d -= double(ws.W[k * G + m])",
           "for (int m = 0; m + 1 < k; ++m) d -= double(ws.W[k * G + m])",
           ("tests/test_cuda.py", "-k", "group_sizes")),
    Mutant("cuda: ridge 1% off (eps)", "csrc/group_math.h",
           "? T(eps) : T(0));", "? T(eps * 1.01) : T(0));",
           ("tests/test_cuda.py", "-k", "fused_loss_matches and fp64")),
    Mutant("cuda: ORPO NLL gradient sign flipped", "csrc/group_math.h",
           "if (p.loss == kLossOrpo && !dorpo) grad -= weighted;",
           "if (p.loss == kLossOrpo && !dorpo) grad += weighted;",
           (KP, "-k", "every_option and cuda")),
    Mutant("cuda: DivPO threshold at the q quantile instead of 1 - q", "csrc/group_math.h",
           "const T position = T(1.0 - p.quality_quantile)", "const T position = T(p.quality_quantile)",
           ("tests/test_group_loss.py", "-k", "divpo_threshold and cuda")),
    Mutant("cuda: DivPO bottom pool one too large", "csrc/group_math.h",
           "return ws.rank[i] < k ? -1 : 0;", "return ws.rank[i] <= k ? -1 : 0;",
           ("tests/test_group_loss.py", "-k", "divpo_selection and cuda")),
    Mutant("cuda: DivPO rejected response drawn from the top pool", "csrc/group_math.h",
           "divpo_pool(ws, i, threshold, p) == -1; }", "divpo_pool(ws, i, threshold, p) == 1; }",
           ("tests/test_group_loss.py", "-k", "divpo_selection and cuda")),
    Mutant("cuda: DivPO pool's maximum over every response", "csrc/group_math.h",
           "if (member && (!any || sign * score[i] > best))", "if (!any || sign * score[i] > best)",
           ("tests/test_group_loss.py", "-k", "divpo and cuda")),
    Mutant("cuda: DDPO weights keep the minimum deviation", "csrc/group_math.h",
           "? (dev[i] - low) / (mean - low) : T(1);", "? dev[i] / (mean - low) : T(1);",
           ("tests/test_group_loss.py", "-k", "three_response and cuda")),
    Mutant("cuda: DORPO weight left out of the log-sigmoid", "csrc/group_math.h",
           "*loss = T(p.orpo_lambda) * softplus(-w * u);", "*loss = T(p.orpo_lambda) * softplus(-u);",
           ("tests/test_group_loss.py", "-k", "dorpo and cuda")),
    Mutant("cuda: 16-byte loads at the wrong column", "csrc/group_math.h",
           "c = (k % kVectors) * kPerVector;\n    const int64_t d = d0 + c;",
           "c = (k % kVectors);\n    const int64_t d = d0 + c;",
           ("tests/test_cuda.py", "-k", "fused_loss_matches and D72")),
    Mutant("cuda: Gram prefetch fetches this chunk again", "csrc/group_math.h",
           "fetch(d0 + kChunk);  // in flight", "fetch(d0);  // in flight",
           ("tests/test_cuda.py", "-k", "fused_loss_matches and D72")),
    Mutant("cuda: Gram prefetch stages the wrong column", "csrc/group_math.h",
           "for (int v = 0; v < kPerVector; ++v) ws.W[i * ld + c + v]",
           "for (int v = 0; v < kPerVector; ++v) ws.W[i * ld + v]",
           ("tests/test_cuda.py", "-k", "fused_loss_matches and D72")),
    Mutant("cuda: cosine backward projection sign flipped", "csrc/group_math.h",
           "if (i == j) a -= ws.dev[i] / (ws.norms[i] * ws.norms[i]);",
           "if (i == j) a += ws.dev[i] / (ws.norms[i] * ws.norms[i]);",
           ("tests/test_cuda.py", "-k", "fused_loss_matches")),
    Mutant("cuda: IPO chosen log-ratio not per token", "csrc/group_math.h",
           "const T u = (pi - ws.ref[i]) / ws.length[i] -", "const T u = (pi - ws.ref[i]) -",
           (KP, "-k", "every_option and cuda")),
    Mutant("cuda: NLL token count ignores nll_tokens", "csrc/group_math.h",
           "sums[kNllTokens] += ws.row_count[i] * ws.nll_token[i];", "sums[kNllTokens] += ws.row_count[i];",
           (KP, "-k", "every_option and cuda")),
    Mutant("cuda: compile error in the shared header", "csrc/group_math.h",
           "constexpr int kMaxGroup = 128;", "constexpr int kMaxGroup = 128",
           ("tests/test_cuda.py", "-x")),
    Mutant("cuda: compile error in a .cu launcher (only nvcc sees it)", "csrc/group_loss.cu",
           "if (a.B == 0) return a.outputs;", "if (a.B == 0) return a.outputs",
           ("!.ci/nvcc_check",)),
    # ------------------------------------------------------------------ the trainer against TRL
    Mutant("trainer: ORPO's NLL over the completion only", "integration/preference.py",
           'nll = {"nll_logps": groups["nll_logps"], "nll_tokens": groups["nll_tokens"]}',
           'nll = {"nll_logps": groups["completion_logps"], "nll_tokens": groups["completion_tokens"]}',
           (TE, "-k", "orpo and defaults")),
    Mutant("trainer: IPO without token counts", "integration/preference.py",
           'token_counts=groups["completion_tokens"] if args.loss_type == "ipo" else None',
           "token_counts=None",
           (TE, "-k", "ipo")),
    Mutant("trainer: dropout left on", "integration/preference.py",
           "        if args.disable_dropout:", "        if False:",
           (TE, "-k", "dpo and defaults")),
    Mutant("trainer: DPO entropy over the chosen responses only", "integration/preference.py",
           'values["entropy"] = weighted("entropy_sum", chosen + rejected, chosen_tokens + rejected_tokens)',
           'values["entropy"] = weighted("entropy_sum", chosen, chosen_tokens)',
           (TE, "-k", "dpo and defaults")),
    Mutant("trainer: CPO's logits/* without the last position", "integration/preference.py",
           "cells = num_pairs * length * vocab", "cells = num_pairs * (length - 1) * vocab",
           (TE, "-k", "simpo")),
    Mutant("tokenization: DPO's EOS text not appended", "integration/tokenization.py",
           "texts = [completion if completion.endswith(eos) else completion + eos for completion in completions]",
           "texts = list(completions)",
           (TE, "-k", "dpo and defaults")),
    Mutant("tokenization: ORPO/CPO's BOS rule dropped", "integration/tokenization.py",
           "if bos is not None and (not prompt_ids or prompt_ids[0] != bos):", "if False:",
           (TE, "-k", "orpo and defaults")),
    Mutant("linear: Triton online log-sum-exp forgets to rescale the running sum", "divkernels/ops/linear_logps.py",
           "total = total * rescale + tl.sum(e, axis=0)", "total = total + tl.sum(e, axis=0)",
           ("tests/test_linear_logps.py",)),
    Mutant("linear: Triton backward drops the temperature", "divkernels/ops/linear_logps.py",
           "scale = tl.load(grad_ptr + row).to(ACC) * inv_temperature", "scale = tl.load(grad_ptr + row).to(ACC)",
           ("tests/test_linear_logps.py",)),
    Mutant("linear: PyTorch backward loses the one-hot term", "divkernels/ops/linear_logps.py",
           "dz.scatter_add_(-1, targets[:, None], scale)", "dz.scatter_add_(-1, targets[:, None], 0 * scale)",
           ("tests/test_linear_logps.py",)),
    Mutant("linear: dW accumulation skips the last vocabulary slice", "divkernels/ops/linear_logps.py",
           "for start in range(0, grad_weight.shape[0], WEIGHT_GRAD_ROWS):",
           "for start in range(0, grad_weight.shape[0] - WEIGHT_GRAD_ROWS, WEIGHT_GRAD_ROWS):",
           ("tests/test_linear_logps.py",)),
    Mutant("linear: the entropy statistic uses the unscaled sum", "divkernels/ops/linear_logps.py",
           "tl.store(entropy_ptr + row, lse - weighted / total)", "tl.store(entropy_ptr + row, lse - weighted)",
           ("tests/test_linear_logps.py",)),
    Mutant("hidden loss: ORPO NLL over the scored tokens instead of nll_mask", "divkernels/ops/hidden_loss.py",
           'loss_options["nll_logps"] = sequence_logps(token_logps, nll, "sum")',
           'loss_options["nll_logps"] = sequence_logps(token_logps, counted, "sum")',
           ("tests/test_linear_logps.py",)),
    Mutant("fused trainer: mean logit not divided by V", "integration/preference.py",
           'stats["mean_logit_sum"] = (row_logit_sums[:, :-1] / vocab * completion).sum(-1)',
           'stats["mean_logit_sum"] = (row_logit_sums[:, :-1] * completion).sum(-1)',
           (TE, "-k", "fused_linear and dpo")),
    Mutant("peft: the reference keeps the adapters on", "integration/preference.py",
           "with torch.no_grad(), adapters_disabled(model):", "with torch.no_grad():",
           ("tests/test_integration.py", "-k", "peft")),
    Mutant("zero3: the reference model is not partitioned", "integration/preference.py",
           "if accelerator.distributed_type == DistributedType.DEEPSPEED:", "if False:",
           ("tests/test_integration.py", "-k", "zero3")),
    Mutant("rewards: groups not gathered across processes", "integration/rewards.py",
           "emb, rows = gather_rows(local, counts)", "emb, rows = local, slice(0, local.shape[0])",
           ("tests/test_integration.py", "-k", "split_across")),
    Mutant("verl: a retried member counts twice", "integration/verl.py",
           "            return group.members[member]\n        index = len(group.quality)",
           "            pass\n        index = len(group.quality)",
           ("tests/test_verl.py", "-k", "retries or streaming")),
    Mutant("verl: packed rows taken in batch order, not by group", "integration/verl.py",
           "packed[rows, slots] = emb[positions]", "packed[rows, slots] = emb[:len(positions)]",
           ("tests/test_verl.py", "-k", "score_groups")),
    Mutant("verl: DARLING without its floor", "integration/verl.py",
           "min_diversity=settings.min_diversity,", "min_diversity=0.0,",
           ("tests/test_verl.py", "-k", "score_groups")),
    Mutant("verl: the measure of a singleton is not neutral", "integration/verl.py",
           'neutral = 1.0 if settings.diversity == "darling" else 0.0', "neutral = 0.0",
           ("tests/test_verl.py", "-k", "score_groups or waits")),
    # hostile inputs (tests/test_bad_inputs.py)
    Mutant("inputs: int8 pair indices not widened", "divkernels/validation.py",
           "return value if value.dtype in (torch.int32, torch.int64) else value.to(torch.int64)", "return value",
           ("tests/test_bad_inputs.py",)),
    Mutant("triton: explicit pair index narrowed to int32", "divkernels/ops/group_loss/pair_math.py",
           "    rejected = tl.load(pair_index_ptr + 2 * p + 1)\n",
           "    rejected = tl.load(pair_index_ptr + 2 * p + 1).to(tl.int32)\n", ("tests/test_bad_inputs.py",)),
    Mutant("reference: explicit pairs past G counted", "divkernels/reference/losses.py",
           "real = (chosen >= 0) & (rejected >= 0) & (chosen < group) & (rejected < group)",
           "real = (chosen >= 0) & (rejected >= 0)", ("tests/test_bad_inputs.py",)),
    Mutant("reference: importance log-ratio not clamped", "divkernels/reference/advantages.py",
           "ratio = torch.exp((policy - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))",
           "ratio = torch.exp(policy - old)", ("tests/test_bad_inputs.py",)),
    Mutant("inputs: checks read meta tensors", "divkernels/validation.py",
           "        if any(flag.device.type == \"meta\" for flag in self._flags):\n            return",
           "        if False:\n            return", ("tests/test_bad_inputs.py",)),
    Mutant("triton: any positive pivot accepted (no pivot floor)", "divkernels/ops/logdet.py",
           "bad_pivots += tl.where(pivot > floor, 0, 1)", "bad_pivots += tl.where(pivot > 0.0, 0, 1)",
           ("tests/test_bad_inputs.py", "-k", "duplicates")),
    Mutant("reference: any positive pivot accepted (no pivot floor)", "divkernels/reference/diversity.py",
           "failed = (info != 0) | ~(chol.diagonal(dim1=-2, dim2=-1) ** 2 > floor[:, None]).all(-1)",
           "failed = info != 0",
           ("tests/test_bad_inputs.py", "-k", "duplicates")),
    Mutant("cuda: any positive pivot accepted (no pivot floor)", "csrc/group_math.h",
           "if (!(d > min_pivot)) {", "if (!(d > 0.0)) {", ("tests/test_bad_inputs.py", "-k", "duplicates")),
    Mutant("inputs: emb rows checked for NaN/inf only, not the norm limit", "divkernels/validation.py",
           "return (~(norms <= emb_norm_limit(value.dtype)) & valid).any(-1)",
           "return (~torch.isfinite(norms) & valid).any(-1)", ("tests/test_bad_inputs.py",)),
    Mutant("triton: kernels check emb norms for NaN/inf only", "divkernels/ops/similarity.py",
           "        usable = norms <= NORM_LIMIT_32\n",
           "        usable = (norms == norms) & (norms < float(\"inf\"))\n",
           ("tests/test_bad_inputs.py",)),
    Mutant("cuda: emb norms checked for NaN/inf only", "csrc/group_math.h",
           "!(norm <= limit)", "!(norm == norm && norm < T(INFINITY))", ("tests/test_bad_inputs.py",)),
    Mutant("metrics: vendi_score checks after the eigensolver", "divkernels/metrics.py",
           "    checks.raise_if_failed()  # before the eigensolver", "    pass  # before the eigensolver",
           ("tests/test_bad_inputs.py",)),
]


def copy_repository(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files, laid out as the editable install maps them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # pyproject maps integration/ and benchmarks/ to divkernels.integration / divkernels.benchmarks
    for package in ("integration", "benchmarks"):
        (destination / "divkernels" / package).symlink_to(Path("..") / package)


NO_TESTS = 5  # pytest's exit status when the selection matched no test: a broken mutant entry, not a kill


def anchor_problems(mutants: list[Mutant], root: Path) -> list[str]:
    """Mutants whose text does not occur exactly once in their file under ``root``, or whose mutated
    Python file does not parse."""
    problems = []
    for mutant in mutants:
        text = (root / mutant.path).read_text()
        count = text.count(mutant.old)
        if count != 1:
            problems.append(f"mutant {mutant.name!r}: its text occurs {count} times in {mutant.path} (must be once)")
        elif mutant.path.endswith(".py"):
            try:
                compile(text.replace(mutant.old, mutant.new), mutant.path, "exec")
            except SyntaxError as error:
                problems.append(f"mutant {mutant.name!r}: the mutated {mutant.path} does not parse ({error})")
    return problems


# Run in one interpreter (imports once): how many tests each pytest selection collects.
COLLECT = """
import json, sys
import pytest

class Count:
    def __init__(self):
        self.items, self.skipped = 0, False
    def pytest_collectreport(self, report):
        self.skipped = self.skipped or report.skipped
    def pytest_collection_finish(self, session):
        self.items = len(session.items)

counts = []
for args in json.loads(sys.argv[1]):
    plugin = Count()
    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[plugin])
    counts.append([plugin.items, plugin.skipped])
print("COUNTS", json.dumps(counts))
"""


def selection_problems(mutants: list[Mutant], root: Path) -> list[str]:
    """Mutants whose pytest selection (their checks but the shell commands) collects no test. A test
    module that skips itself here (an extra that is not installed: verl) is reported, not failed; CI
    checks those mutants again in the environment that has it (``--only``)."""
    def selection(mutant: Mutant) -> tuple[str, ...]:
        return tuple(check for check in mutant.checks if not check.startswith("!"))

    selections = sorted({selection(m) for m in mutants} - {()})
    result = subprocess.run([sys.executable, "-c", COLLECT, json.dumps(selections)], cwd=root,
                            capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("COUNTS ")]
    if not lines:
        return [f"collecting the mutants' tests failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"]
    counts = dict(zip(selections, json.loads(lines[-1].removeprefix("COUNTS ")), strict=True))
    problems = []
    for mutant in mutants:
        items, skipped = counts.get(selection(mutant), (1, False))
        if items == 0 and skipped:
            print(f"mutant {mutant.name!r}: not checked here (its test module skips itself)")
        elif items == 0:
            problems.append(f"mutant {mutant.name!r}: its checks {' '.join(mutant.checks)} select no test")
    return problems


def run_checks(copy: Path, checks: tuple[str, ...], env: dict[str, str], seed: int,
               log: Path) -> tuple[bool, float]:
    """Run the checks in the copy; ``(all passed, seconds)``. Output goes to ``log``. A pytest
    selection that matches no test raises: it would otherwise count as a kill."""
    start = time.monotonic()
    with log.open("a") as out:
        commands = [check[1:] for check in checks if check.startswith("!")]
        pytest_args = [check for check in checks if not check.startswith("!")]
        runs = [[sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--seed={seed}",
                 *pytest_args]] if pytest_args else []
        runs += [["bash", "-c", command] for command in commands]
        for command in runs:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            result = subprocess.run(command, cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT)
            if result.returncode == NO_TESTS and command[:3] == [sys.executable, "-m", "pytest"]:
                raise RuntimeError(f"no test matches {' '.join(command[3:])} (see {log})")
            if result.returncode != 0:
                return False, time.monotonic() - start
    return True, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run the mutants whose name matches this regex")
    parser.add_argument("--seed", type=int, default=None, help="test seed (default: fresh, printed)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and logs")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant applies and selects tests (seconds; CI runs it)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or re.search(args.only, m.name)]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name:70s} {mutant.path}")
        return 0
    if args.check:
        problems = anchor_problems(mutants, ROOT) or selection_problems(mutants, ROOT)
        print("\n".join(problems) if problems else f"{len(mutants)} mutants: each applies once and selects tests")
        return 1 if problems else 0
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    work = Path(tempfile.mkdtemp(prefix="divkernels-mutation-"))
    copy = work / "repo"
    copy_repository(copy)
    env = {**os.environ, "PYTHONPATH": str(copy), "DIVKERNELS_REQUIRE_BUILDS": "1",
           "DIVKERNELS_CACHE": str(work / "cache"), "HYPOTHESIS_PROFILE": "ci"}
    env.pop("DIVKERNELS_TEST_SEED", None)
    where = subprocess.run([sys.executable, "-c", "import divkernels, divkernels.integration as i; "
                            "print(divkernels.__file__, i.__file__)"], cwd=copy, env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    if not all(path.startswith(str(copy)) for path in where):
        print(f"the copy does not shadow the installed package: {where}", file=sys.stderr)
        return 1
    print(f"{len(mutants)} mutants, seed {seed}, copy in {copy}")
    problems = anchor_problems(mutants, copy)
    if problems:
        print("\n".join(problems))
        return 1

    baseline = sorted({check for mutant in mutants for check in mutant.checks
                       if check.startswith("!") or check.endswith(".py") or "::" in check})
    passed, seconds = run_checks(copy, tuple(baseline), env, seed, work / "baseline.log")
    print(f"baseline (unmutated copy): {'passed' if passed else 'FAILED'} in {seconds:.0f} s")
    if not passed:
        print((work / "baseline.log").read_text()[-4000:])
        return 1

    survived = []
    for index, mutant in enumerate(mutants):
        target = copy / mutant.path
        original = target.read_text()
        target.write_text(original.replace(mutant.old, mutant.new))
        try:
            log = work / f"mutant-{index:02d}.log"
            passed, seconds = run_checks(copy, mutant.checks, env, seed, log)
        finally:
            target.write_text(original)
        verdict = "SURVIVED" if passed else "killed"
        print(f"{verdict:9s} {seconds:6.0f} s  {mutant.name}", flush=True)
        if passed:
            survived.append(mutant.name)
    print(f"\n{len(mutants) - len(survived)} of {len(mutants)} mutants killed (seed {seed})")
    for name in survived:
        print(f"  survived: {name}")
    if args.keep:
        print(f"logs and copy kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
