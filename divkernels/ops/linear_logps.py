"""Sequence log-probs through the LM head without the ``[N, T, V]`` logits (reference/logps.py).

The ``M = N * T`` token rows go through the head in chunks of ``C`` rows; one ``[C, V]`` buffer of
logits is all that ever exists:

* forward, per chunk: ``Z = hidden_c W^T + b`` (one GEMM in the input dtype, fp32 accumulation), then
  the row kernel reads each row's ``V`` logits in tiles with an online log-sum-exp in fp32
  (running max ``m``, ``s = sum exp(z - m)``): ``logp = z_y - (m + log s)``, ``z = Z / temperature``.
  It keeps ``lse`` per token (4 bytes): all the backward needs besides the inputs.
* backward, per chunk: the upstream gradient is per sequence and exists only once the loss over
  whole groups does (the group loss couples all G log-probs), so unlike Liger-Kernel's pair losses
  the gradient cannot be formed during the forward. The chunk's logits are recomputed (one GEMM),
  the row kernel overwrites them in place with ``d logp / d Z = g (onehot(y) - softmax(z)) / temperature``
  and two GEMMs give ``d hidden_c = dZ W`` and ``d W += dZ^T hidden_c``. Four GEMMs per token in all
  (the unfused path: three), for memory ``O(C V)`` instead of ``O(N T V)``.

``backend="triton"`` runs the row kernels in Triton; ``"reference"`` runs the same chunked scheme with
PyTorch row math (the CPU path). :func:`divkernels.reference.linear_logps` is the unfused ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from divkernels.backend import resolve_backend
from divkernels.ops.common import accumulation_dtype, as_acc, new_output, next_power_of_2, tl, triton, triton_dtype
from divkernels.reference import sequence_logps
from divkernels.validation import DataChecks, check_choice, check_float_tensor, check_same_device, check_scalar

REDUCTIONS = ("sum", "mean")
# Default chunk: the largest power-of-two row count whose [C, V] logits hold at most this many
# elements (128 MiB in bf16), e.g. 256 rows at V = 152k: big enough for GEMMs at full speed.
CHUNK_ELEMENTS = 1 << 26
# Largest vocabulary tile of one row-kernel loop step (fp32 registers: 32 per thread at 8 warps).
MAX_BLOCK_V = 8192
# Rows of a chunk whose entropy terms the PyTorch path forms at once (its [rows, V] temporaries).
ENTROPY_ROWS = 64
# Rows of dW accumulated per GEMM when dW is kept in fp32 for half-precision weights: bounds the
# half-precision product that is added to it (rows x H) instead of a whole [V, H] temporary.
WEIGHT_GRAD_ROWS = 8192


@triton.jit
def _token_forward_kernel(logits_ptr, targets_ptr, logp_ptr, lse_ptr, entropy_ptr, argmax_ptr, V, stride_row,
                          inv_temperature: tl.float64, STATS: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """One row: ``lse = log sum_v exp(z_v)`` online over tiles, ``logp = z_y - lse``; with ``STATS`` the
    entropy ``lse - sum_v p_v z_v`` (``t = sum exp(z - m) z`` rescaled like ``s``) and the first argmax."""
    inv_temperature = as_acc(inv_temperature, ACC)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    running_max = tl.full([], float("-inf"), ACC)
    total = tl.zeros([], ACC)
    weighted = tl.zeros([], ACC)
    best = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inside = cols < V
        z = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(ACC) * inv_temperature
        tile_max = tl.max(z, axis=0)
        new_max = tl.maximum(running_max, tile_max)
        rescale = tl.exp(running_max - new_max)
        e = tl.exp(z - new_max)
        total = total * rescale + tl.sum(e, axis=0)
        if STATS:
            weighted = weighted * rescale + tl.sum(e * tl.where(inside, z, 0.0), axis=0)
            best = tl.where(tile_max > running_max, start + tl.argmax(z, axis=0), best)
        running_max = new_max
    lse = running_max + tl.log(total)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(row_ptr + target).to(ACC) * inv_temperature
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    if STATS:
        tl.store(entropy_ptr + row, lse - weighted / total)
        tl.store(argmax_ptr + row, best.to(tl.int64))


@triton.jit
def _token_backward_kernel(logits_ptr, targets_ptr, lse_ptr, grad_ptr, entropy_ptr, grad_entropy_ptr, V, stride_row,
                           inv_temperature: tl.float64, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
                           ACC: tl.constexpr):
    """One row, in place: ``Z_v <- g / temperature * ([v = y] - p_v)``, ``p_v = exp(z_v - lse)``; with
    ``ENTROPY`` also the entropy's ``- g_H / temperature * p_v (z_v - lse + H)`` (``dH/dz_v = -p_v (log p_v + H)``)."""
    inv_temperature = as_acc(inv_temperature, ACC)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    scale = tl.load(grad_ptr + row).to(ACC) * inv_temperature
    lse = tl.load(lse_ptr + row).to(ACC)
    target = tl.load(targets_ptr + row)
    if ENTROPY:
        entropy_scale = tl.load(grad_entropy_ptr + row).to(ACC) * inv_temperature
        shift = tl.load(entropy_ptr + row).to(ACC) - lse  # log p_v + H = z_v - lse + H
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inside = cols < V
        z = tl.load(row_ptr + cols, mask=inside, other=0.0).to(ACC) * inv_temperature
        p = tl.exp(z - lse)
        grad = tl.where(cols == target, scale, 0.0) - scale * p
        if ENTROPY:
            grad -= entropy_scale * p * (z + shift)
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def _row_launch(vocab: int) -> dict[str, int]:
    block_v = min(MAX_BLOCK_V, max(16, next_power_of_2(vocab)))
    return {"BLOCK_V": block_v, "num_warps": max(1, min(16, block_v // 512))}


@dataclass
class TokenOutputs:
    """Per-token results: of one chunk or of all ``M`` rows inside, ``[N, T]`` from :func:`linear_token_logps`
    (float32, float64 for float64 inputs; argmax int64)."""

    logps: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None = None
    argmax: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> TokenOutputs:
        pick = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return TokenOutputs(self.logps[start:stop], self.lse[start:stop], pick(self.entropy), pick(self.argmax))


def triton_rows_forward(logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float,
                        out: TokenOutputs) -> None:
    """Fill ``out`` (views of ``C`` rows) from a ``[C, V]`` logits chunk with the row kernel."""
    rows, vocab = logits.shape
    stats = out.entropy is not None
    _token_forward_kernel[(rows,)](
        logits, targets, out.logps, out.lse, out.entropy if stats else out.logps, out.argmax if stats else targets,
        vocab, logits.stride(0), inv_temperature, STATS=stats, ACC=triton_dtype(out.logps.dtype), **_row_launch(vocab))


def triton_rows_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                         inv_temperature: float, entropy: torch.Tensor | None = None,
                         grad_entropy: torch.Tensor | None = None) -> None:
    """Overwrite a ``[C, V]`` logits chunk with ``d (sum_t g_t logp_t + sum_t g_H,t H_t) / d Z`` (the entropy
    term when ``grad_entropy`` is given)."""
    rows, vocab = logits.shape
    with_entropy = grad_entropy is not None
    _token_backward_kernel[(rows,)](logits, targets, lse, grad, entropy if with_entropy else lse,
                                    grad_entropy if with_entropy else grad, vocab, logits.stride(0), inv_temperature,
                                    ENTROPY=with_entropy, ACC=triton_dtype(lse.dtype), **_row_launch(vocab))


def torch_rows_forward(logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float,
                       out: TokenOutputs) -> None:
    """:func:`triton_rows_forward` in PyTorch; the chunk buffer is scratch, so it is scaled in place."""
    z = logits if logits.dtype == out.logps.dtype else logits.to(out.logps.dtype)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    lse = torch.logsumexp(z, -1)
    out.logps.copy_(z.gather(-1, targets[:, None])[:, 0] - lse)
    out.lse.copy_(lse)
    if out.entropy is not None:  # H = lse - sum_v p_v z_v, a few rows at a time (one small softmax temporary)
        for start in range(0, z.shape[0], ENTROPY_ROWS):
            rows = slice(start, start + ENTROPY_ROWS)
            out.entropy[rows] = lse[rows] - torch.linalg.vecdot(torch.softmax(z[rows], -1), z[rows])
        out.argmax.copy_(z.argmax(-1))


def torch_rows_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                        inv_temperature: float, entropy: torch.Tensor | None = None,
                        grad_entropy: torch.Tensor | None = None) -> None:
    """:func:`triton_rows_backward` in PyTorch, in place (one float32 copy for half-precision chunks)."""
    scale = (grad * inv_temperature)[:, None]
    dz = logits if logits.dtype == lse.dtype else logits.to(lse.dtype)
    dz.mul_(inv_temperature).sub_(lse[:, None])  # log p
    if grad_entropy is not None:  # -p (g_H / T (log p + H) + g / T), a few rows at a time (one small temporary)
        entropy_scale = (grad_entropy * inv_temperature)[:, None]
        for start in range(0, dz.shape[0], ENTROPY_ROWS):
            rows = slice(start, start + ENTROPY_ROWS)
            p = dz[rows].exp()
            dz[rows].add_(entropy[rows, None]).mul_(entropy_scale[rows]).add_(scale[rows]).mul_(p).neg_()
    else:
        dz.exp_().mul_(-scale)
    dz.scatter_add_(-1, targets[:, None], scale)
    if dz is not logits:
        logits.copy_(dz)


ROW_KERNELS = {"triton": (triton_rows_forward, triton_rows_backward),
               "reference": (torch_rows_forward, torch_rows_backward)}


def default_chunk_size(rows: int, vocab: int) -> int:
    """Rows per chunk: the largest power of two with ``C * V <= CHUNK_ELEMENTS`` (at least 1, at most ``rows``)."""
    fit = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return max(1, min(rows, 1 << (fit.bit_length() - 1)))


def _head_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                buffer: torch.Tensor) -> torch.Tensor:
    """``hidden W^T + b`` written into ``buffer`` (the one ``[C, V]`` logits buffer)."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=buffer)
    return torch.addmm(bias, hidden, weight.t(), out=buffer)


def chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                    inv_temperature: float, chunk_size: int, backend: str, stats: bool) -> TokenOutputs:
    """Per-token outputs of ``M`` rows (``hidden [M, H]``, ``targets [M]`` in range), chunk by chunk."""
    rows = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    out = TokenOutputs(new_output((rows,), acc, hidden.device), new_output((rows,), acc, hidden.device))
    if stats:
        out.entropy = new_output((rows,), acc, hidden.device)
        out.argmax = new_output((rows,), torch.int64, hidden.device)
    rows_forward = ROW_KERNELS[backend][0]
    buffer = hidden.new_empty((min(chunk_size, rows), weight.shape[0]))
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        logits = _head_chunk(hidden[start:stop], weight, bias, buffer[: stop - start])
        rows_forward(logits, targets[start:stop], inv_temperature, out.rows(start, stop))
    return out


def _add_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """``grad_weight += grad_logits^T hidden``; a float32 accumulator of half-precision factors takes the
    product in slices of vocabulary rows (no ``[V, H]`` temporary)."""
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
        return
    for start in range(0, grad_weight.shape[0], WEIGHT_GRAD_ROWS):
        stop = start + WEIGHT_GRAD_ROWS
        grad_weight[start:stop] += grad_logits[:, start:stop].t() @ hidden


def chunked_backward(grad_tokens: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor, inv_temperature: float,
                     chunk_size: int, backend: str, needs: tuple[bool, bool, bool],
                     entropy: torch.Tensor | None = None, grad_entropy: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_t grad_tokens_t logp_t (+ sum_t grad_entropy_t H_t)`` w.r.t. ``(hidden [M, H],
    weight, bias)`` (None where ``needs`` is False). dW and db accumulate in float32 for half-precision
    weights over several chunks."""
    rows = hidden.shape[0]
    rows_backward = ROW_KERNELS[backend][1]
    several = rows > chunk_size
    accumulate = torch.float32 if several and weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if needs[1] else None
    grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if needs[2] else None
    buffer = hidden.new_empty((min(chunk_size, rows), weight.shape[0]))
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        grad_logits = _head_chunk(hidden[start:stop], weight, bias, buffer[: stop - start])
        rows_backward(grad_logits, targets[start:stop], lse[start:stop], grad_tokens[start:stop], inv_temperature,
                      *((entropy[start:stop], grad_entropy[start:stop]) if grad_entropy is not None else ()))
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            _add_weight_grad(grad_weight, grad_logits, hidden[start:stop])
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0, dtype=accumulate)
    cast = lambda t: None if t is None else t.to(weight.dtype)  # noqa: E731
    return grad_hidden, cast(grad_weight), cast(grad_bias)


class LinearTokenLogpsFunction(torch.autograd.Function):
    """``[M]`` token log-probs of ``hidden [M, H]`` under the head, and with ``stats`` every row's entropy
    (differentiable too) and argmax; every row's log-sum-exp (no grad). Forward saves ``lse [M]`` (and the
    entropy) besides the inputs."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                inv_temperature: float, chunk_size: int, backend: str, stats: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        out = chunked_forward(hidden, weight, bias, targets, inv_temperature, chunk_size, backend, stats)
        ctx.save_for_backward(hidden, weight, bias, targets, out.lse, out.entropy)
        ctx.settings = (inv_temperature, chunk_size, backend)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (out.lse, out.argmax) if t is not None))
        return out.logps, out.lse, out.entropy, out.argmax

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor | None, _grad_lse: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None, _grad_argmax: torch.Tensor | None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if (grad_logps is None and grad_entropy is None) or not any(needs):
            return (None,) * 8
        grad_logps = torch.zeros_like(lse) if grad_logps is None else grad_logps.contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.contiguous()
        grads = chunked_backward(grad_logps, hidden, weight, bias, targets, lse, *ctx.settings, needs=needs,
                                 entropy=entropy, grad_entropy=grad_entropy)
        return (*grads, None, None, None, None, None)


def _check_inputs(hidden: object, weight: object, targets: object, mask: object, bias: object, temperature: float,
                  chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = check_float_tensor("hidden", hidden, 3, "[N, T, H]")
    weight = check_float_tensor("weight", weight, 2, "[V, H]")
    count, length, width = hidden.shape
    if weight.shape[1] != width:
        raise ValueError(f"weight must be [V, H] with H = {width} (hidden's last dim), got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        bias = check_float_tensor("bias", bias, 1, "[V]")
        if bias.shape[0] != weight.shape[0] or bias.dtype != hidden.dtype:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}] of dtype {hidden.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor [N, T] of token ids, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must hold int64 (or int32) token ids, got {targets.dtype}")
    if tuple(targets.shape) != (count, length):
        raise ValueError(f"targets must be [N, T] = [{count}, {length}], got {tuple(targets.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor [N, T] or None, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != (count, length):
            raise ValueError(f"mask must be [N, T] = [{count}, {length}], got {tuple(mask.shape)}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, mask=mask, bias=bias)
    check_scalar("temperature", temperature, low=0.0, low_open=True)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return targets.to(torch.int64), bias


def token_outputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    stats: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> TokenOutputs:
    """:func:`linear_token_logps` before masking: outside ``mask`` the log-probs are those of a placeholder
    token, for callers that mask (or weight) the tokens themselves, so that it happens once."""
    targets, bias = _check_inputs(hidden, weight, targets, mask, bias, temperature, chunk_size)
    count, length, width = hidden.shape
    vocab = weight.shape[0]
    resolved = resolve_backend(backend, op="linear_logps", device=hidden.device, group_size=0, kernels=("triton",))
    rows = count * length
    # Tokens outside the mask may hold anything (-100, padding): clamped into range they read some column,
    # and the caller's mask gives them no gradient. Ids out of range inside the mask fail the check below.
    safe_targets = targets.clamp(0, vocab - 1).reshape(rows).contiguous()
    chunk = min(chunk_size or default_chunk_size(rows, vocab), max(rows, 1))
    logps, lse, entropy, argmax = LinearTokenLogpsFunction.apply(
        hidden.reshape(rows, width), weight, bias, safe_targets, 1.0 / temperature, chunk, resolved, stats)
    shape = lambda t: None if t is None else t.view(count, length)  # noqa: E731
    logps, lse, entropy, argmax = shape(logps), shape(lse), shape(entropy), shape(argmax)
    if check_inputs:
        # every row's lse, masked or not: a NaN row outside the mask still reaches dW through the GEMMs
        checks = DataChecks(True)
        out_of_range = (targets < 0) | (targets >= vocab)
        checks.require((out_of_range if mask is None else out_of_range & mask).any(-1),
                       lambda rows: f"targets must be token ids in [0, {vocab}) (weight's V) where mask is True; "
                                    f"sequences {rows} have ids out of range")
        checks.require((~torch.isfinite(lse)).any(-1),
                       lambda rows: f"hidden, weight or bias hold NaN/inf: the logits of sequences {rows} are "
                                    "not finite")
        checks.raise_if_failed()
    return TokenOutputs(logps, lse, entropy, argmax)


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    stats: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> TokenOutputs:
    """Per-token log-probs ``[N, T]`` of :func:`linear_logps` (0 where ``mask`` is False) and log-sum-exps,
    and with ``stats`` each token's entropy (differentiable; every position's) and argmax (what TRL's
    metrics read from the logits)."""
    out = token_outputs(hidden, weight, targets, mask, bias=bias, temperature=temperature, chunk_size=chunk_size,
                        stats=stats, backend=backend, check_inputs=check_inputs)
    if mask is not None:
        out.logps = torch.where(mask, out.logps, 0.0)
    return out


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "sum",
    chunk_size: int | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs under the LM head without materializing the logits.

    ``logp_n = sum_t mask_nt log softmax((h_nt W^T + b) / temperature)[y_nt]`` (``reduction="mean"``:
    divided by the number of masked tokens; 0 for none). The temperature divides the head's whole
    output, bias included, as TRL divides ``model(...).logits``. Peak extra memory is one
    ``[chunk_size, V]`` logits buffer (plus a float32 copy of it on the PyTorch path for half-precision
    inputs, and the temporaries of ``logsumexp`` there) and ``O(N T)``
    per-token values; the backward adds the gradients of ``hidden`` and ``weight`` (dW in float32
    for half-precision weights when there are several chunks). What Liger-Kernel's fused linear
    losses do for (chosen, rejected) pairs, for any sequences, so that a group loss can follow.

    Args:
        hidden: ``[N, T, H]`` last hidden states (bf16/fp16/fp32/fp64); any strides.
        weight: ``[V, H]`` LM head (``model.get_output_embeddings().weight``), hidden's dtype.
        targets: ``[N, T]`` int64 (or int32) ids of the token each position predicts, in ``[0, V)``
            where ``mask`` is True; anything (e.g. -100) elsewhere.
        mask: ``[N, T]`` bool, the tokens that count (completion tokens); None: all.
        bias: ``[V]`` LM-head bias or None.
        temperature: > 0; the logits are divided by it.
        reduction: ``"sum"`` or ``"mean"`` over the masked tokens.
        chunk_size: token rows per chunk; None: the largest power of two with ``chunk * V <= 2^26``.
        return_entropy: also return each token's entropy ``H_nt = -sum_v p_v log p_v`` of the same
            softmax (temperature included), from the same chunked pass (the online log-sum-exp carries
            ``sum_v p_v z_v``), differentiable: its backward adds ``-g_H p_v (log p_v + H)`` to the
            recomputed chunk's logit gradient, still without ``[N, T, V]`` (an entropy bonus or
            entropy-based token masking without the logits). 4 more bytes saved per token.
        backend: ``"auto"`` (Triton on CUDA, else the chunked PyTorch path), ``"triton"`` or
            ``"reference"`` (chunked PyTorch).
        check_inputs: check that targets are in range where ``mask`` is True and that every row's
            logits are finite (NaN/inf anywhere in ``hidden``, ``weight`` or ``bias``); one host sync.

    Returns:
        ``[N]`` float32 (float64 for float64 ``hidden``); differentiable w.r.t. hidden, weight, bias. With
        ``return_entropy``: ``(logps [N], entropy [N, T])``, the entropy 0 where ``mask`` is False.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    token = token_outputs(hidden, weight, targets, mask, bias=bias, temperature=temperature, chunk_size=chunk_size,
                          stats=bool(return_entropy), backend=backend, check_inputs=check_inputs)
    logps = sequence_logps(token.logps, mask, reduction)  # masks the tokens
    if not return_entropy:
        return logps
    return logps, token.entropy if mask is None else torch.where(mask, token.entropy, 0.0)

