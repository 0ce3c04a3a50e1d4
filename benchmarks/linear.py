"""``--suite linear``: sequence log-probs through the LM head, fused (chunked) vs unfused, memory and time.

Providers: ``fused`` (:func:`divkernels.linear_logps`, ``backend="auto"``: the Triton row kernels on
CUDA, the chunked PyTorch path on CPU), ``unfused`` (what TRL's trainers do: ``[N, T, V]`` logits from
the head, ``float().log_softmax``, ``gather``, masked sum) and, on CUDA, ``compile``
(``torch.compile`` of the unfused function). Each measurement is one forward + backward w.r.t.
hidden and weight.

Peak extra memory: on CUDA the allocator's peak over what was allocated before the call; on CPU the
growth of the process's peak RSS (``ru_maxrss``) over one call in a fresh process that holds only
the inputs. Two sweeps per device: the tokens ``N x T`` at a fixed chunk (fused memory should stay
flat while unfused grows), and the chunk at fixed tokens (fused memory should grow with ``chunk x V``).
A third, ``entropy``, differentiates log-probs plus an entropy bonus (``sum logp + 0.01 sum H``, what a
GRPO entropy bonus adds): ``fused`` is :func:`divkernels.linear_logps` with ``return_entropy=True``,
``unfused`` the full logits' log-softmax and entropy, and ``trl`` TRL's own chunked LM-head function
(``trl.kernels.ChunkedLogProbFunction`` with its GRPOTrainer's tile, what that trainer runs; the
``chunk`` column is ours) where TRL is installed.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import divkernels as dk

PROVIDERS = ("fused", "unfused", "compile", "trl")
# Weight of the entropy bonus in the entropy sweep's objective.
ENTROPY_BONUS = 0.01
MIB = 2**20
# The CPU child processes serve every allocation above 64 KiB with its own mmap, freed back at once: glibc
# otherwise raises that threshold as blocks are freed and keeps freed chunk buffers in the heap, so the
# peak RSS would depend on allocation history rather than on what was live.
GLIBC_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclass(frozen=True)
class LinearCase:
    """``count`` sequences (G responses x prompts) of ``length`` tokens, head ``[vocab, width]``."""

    sweep: str
    count: int
    length: int
    width: int
    vocab: int
    dtype: str
    chunk: int

    @property
    def tokens(self) -> int:
        return self.count * self.length

    @property
    def logits_mib(self) -> float:
        """Size of the unfused path's ``[N, T, V]`` logits in the input dtype."""
        return self.tokens * self.vocab * torch.empty((), dtype=getattr(torch, self.dtype)).element_size() / MIB


def cases(device: torch.device) -> list[LinearCase]:
    """The two sweeps at sizes that fit the device: G = 8 responses of T tokens, a 32k (CPU) or 152k
    (GPU, Qwen2's) vocabulary."""
    if device.type == "cuda":
        width, vocab, dtype, lengths, chunks = 4096, 152_064, "bfloat16", (256, 512, 1024, 2048), (64, 256, 1024)
    else:
        width, vocab, dtype, lengths, chunks = 128, 32_000, "float32", (128, 256, 512, 1024), (64, 256, 1024, 4096)
    fixed_chunk, fixed_length = 256, lengths[2]
    token_sweep = [LinearCase("tokens", 8, length, width, vocab, dtype, fixed_chunk) for length in lengths]
    chunk_sweep = [LinearCase("chunk", 8, fixed_length, width, vocab, dtype, chunk) for chunk in chunks
                   if chunk != fixed_chunk]
    entropy_sweep = [LinearCase("entropy", 8, length, width, vocab, dtype, fixed_chunk) for length in lengths]
    return token_sweep + chunk_sweep + entropy_sweep


def unfused_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """TRL's way: logits in the input dtype, log-softmax in float32, gather, masked sum."""
    logits = F.linear(hidden, weight).float()
    token = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return (token * mask).sum(-1)


def unfused_entropy_objective(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
    """The unfused log-probs plus the entropy bonus, per sequence, from the full ``[N, T, V]`` logits."""
    log_probs = F.linear(hidden, weight).float().log_softmax(-1)
    token = log_probs.gather(-1, targets[..., None])[..., 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return ((token + ENTROPY_BONUS * entropy) * mask).sum(-1)


def trl_entropy_objective() -> Callable[..., torch.Tensor]:
    """TRL's chunked LM head (``trl.kernels.ChunkedLogProbFunction``: the valid rows, log-probs and entropy) with
    the vocabulary tile its GRPOTrainer uses (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``, 32768 in TRL
    1.16; its tiles are 4096 tokens by that many vocabulary columns)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)

    def objective(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        logps, entropy, *_ = ChunkedLogProbFunction.apply(hidden[mask], weight, None, targets[mask], 1.0, chunk, None,
                                                          1.0, ("log_probs", "entropy"))
        per_token = logps + ENTROPY_BONUS * entropy
        return hidden.new_zeros(mask.shape, dtype=logps.dtype).masked_scatter(mask, per_token).sum(-1)

    return objective


def make_inputs(case: LinearCase, device: torch.device) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, case.dtype)
    hidden = (torch.randn(case.count, case.length, case.width, generator=generator) / case.width**0.5).to(device, dtype)
    weight = torch.randn(case.vocab, case.width, generator=generator).to(device, dtype)
    targets = torch.randint(0, case.vocab, (case.count, case.length), generator=generator).to(device)
    mask = torch.ones(case.count, case.length, dtype=torch.bool, device=device)
    mask[:, : case.length // 4] = False  # the prompt
    return hidden.requires_grad_(), weight.requires_grad_(), targets, mask


def provider_function(provider: str, case: LinearCase) -> Callable[..., torch.Tensor]:
    if case.sweep == "entropy":
        return entropy_function(provider, case)
    if provider == "fused":
        return lambda hidden, weight, targets, mask: dk.linear_logps(hidden, weight, targets, mask,
                                                                     chunk_size=case.chunk, check_inputs=False)
    if provider == "unfused":
        return unfused_logps
    if provider == "compile":
        return torch.compile(unfused_logps)
    raise ValueError(f"unknown provider {provider!r}")


def entropy_function(provider: str, case: LinearCase) -> Callable[..., torch.Tensor]:
    """``[N]`` log-probs plus ``ENTROPY_BONUS`` times the masked entropy, by ``provider``."""
    if provider == "fused":
        def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
            logps, entropy = dk.linear_logps(hidden, weight, targets, mask, chunk_size=case.chunk,
                                             return_entropy=True, check_inputs=False)
            return logps + ENTROPY_BONUS * entropy.sum(-1)
        return fused
    if provider == "unfused":
        return unfused_entropy_objective
    if provider == "compile":
        return torch.compile(unfused_entropy_objective)
    if provider == "trl":
        return trl_entropy_objective()
    raise ValueError(f"unknown provider {provider!r}")


def providers_of(case: LinearCase, device: torch.device) -> list[str]:
    """The providers of ``case`` on ``device``: compile on CUDA only, TRL's function in the entropy sweep
    where TRL is installed."""
    chosen = [p for p in ("fused", "unfused", "compile") if device.type == "cuda" or p != "compile"]
    if case.sweep == "entropy":
        import importlib.util

        if importlib.util.find_spec("trl") is not None:
            chosen.append("trl")
    return chosen


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_fresh(command: list[str], *, interpreter: bool = True) -> tuple[dict[str, object] | None, str]:
    """Run ``python <command>`` in a new process with glibc's malloc set as above (``interpreter=False``:
    without ``TRITON_INTERPRET``): ``(the JSON object its last line prints, "")`` or ``(None, the error)``."""
    env = {key: value for key, value in os.environ.items() if interpreter or key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=False,
                            env={**env, **GLIBC_MALLOC})
    if result.returncode != 0:
        return None, (result.stderr.strip().splitlines() or ["failed"])[-1][-300:]
    return json.loads(result.stdout.strip().splitlines()[-1]), ""


def measure_one(case: LinearCase, provider: str, device: torch.device, repeats: int) -> dict[str, object]:
    """Peak extra memory of the first forward + backward, then the median time of ``repeats`` more."""
    function = provider_function(provider, case)
    # the first call imports and initializes what the provider uses: on tiny inputs, before the baseline
    tiny = LinearCase(case.sweep, 1, 4, case.width, 64, case.dtype, 2)
    function(*make_inputs(tiny, device)).sum().backward()
    inputs = make_inputs(case, device)

    def step() -> None:
        inputs[0].grad = inputs[1].grad = None
        function(*inputs).sum().backward()

    if device.type == "cuda":
        if provider == "compile":
            step()  # compile outside the memory measurement
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
    else:
        before = peak_rss_mib()
        step()
        peak = peak_rss_mib() - before
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {**asdict(case), "tokens": case.tokens, "logits_mib": round(case.logits_mib, 1), "provider": provider,
            "peak_extra_mib": round(peak, 1), "median_ms": round(statistics.median(times), 3) if times else None,
            "error": None}


_CHILD = """
import json, sys, torch
from divkernels.benchmarks import linear
case, provider, device, repeats = json.loads(sys.argv[1])
print(json.dumps(linear.measure_one(linear.LinearCase(**case), provider, torch.device(device), repeats)))
"""


def measure_in_fresh_process(case: LinearCase, provider: str, device: torch.device, repeats: int) -> dict[str, object]:
    """:func:`measure_one` in a new Python process, so that no earlier case's memory is in its peak."""
    row, error = run_fresh(["-c", _CHILD, json.dumps([asdict(case), provider, str(device), repeats])])
    if row is None:
        return {**asdict(case), "tokens": case.tokens, "logits_mib": round(case.logits_mib, 1), "provider": provider,
                "peak_extra_mib": None, "median_ms": None, "error": error}
    return row


def run(device: torch.device, repeats: int, log: Callable[[str], None],
        selected: list[LinearCase] | None = None) -> list[dict[str, object]]:
    """Every case of :func:`cases` (or ``selected``) with every provider that runs on ``device``."""
    rows = []
    for case in selected if selected is not None else cases(device):
        for provider in providers_of(case, device):
            row = measure_in_fresh_process(case, provider, device, repeats)
            rows.append(row)
            log(f"{case.sweep:<6} N*T={case.tokens:<6} V={case.vocab} chunk={case.chunk:<5} {provider:<8} "
                f"peak extra {row['peak_extra_mib']} MiB, {row['median_ms']} ms")
    return rows


def table(rows: list[dict[str, object]]) -> str:
    """Markdown: per case, each provider's peak extra memory and time, and the unfused / fused ratios."""
    lines = ["| sweep | N x T | V | chunk | logits (MiB) | provider | peak extra MiB | ms | memory / fused |",
             "|---|---|---|---|---|---|---|---|---|"]
    fused = {(r["sweep"], r["tokens"], r["chunk"]): r["peak_extra_mib"] for r in rows if r["provider"] == "fused"}
    for row in rows:
        base = fused.get((row["sweep"], row["tokens"], row["chunk"]))
        ratio = f"{row['peak_extra_mib'] / base:.1f}x" if base and row["peak_extra_mib"] is not None else ""
        lines.append(f"| {row['sweep']} | {row['tokens']} | {row['vocab']} | {row['chunk']} | {row['logits_mib']} | "
                     f"{row['provider']} | {row['peak_extra_mib']} | {row['median_ms']} | {ratio} |")
    return "\n".join(lines)


def entropy_table(rows: list[dict[str, object]]) -> str:
    """Markdown of the entropy sweep: per token count, each provider's peak extra memory and time."""
    entropy = [row for row in rows if row["sweep"] == "entropy"]
    providers = [p for p in PROVIDERS if any(row["provider"] == p for row in entropy)]
    lines = ["| N x T tokens | chunk | logits alone (MiB) | " + " | ".join(f"{p} peak extra MiB" for p in providers)
             + " | " + " | ".join(f"{p} ms" for p in providers) + " |",
             "|---" * (3 + 2 * len(providers)) + "|"]
    for tokens in sorted({row["tokens"] for row in entropy}):
        by = {row["provider"]: row for row in entropy if row["tokens"] == tokens}
        first = next(iter(by.values()))
        memory = " | ".join(str(by[p]["peak_extra_mib"]) for p in providers)
        times = " | ".join(f"{by[p]['median_ms']:.0f}" if by[p]["median_ms"] is not None else "" for p in providers)
        lines.append(f"| {tokens} | {first['chunk']} | {first['logits_mib']:.0f} | {memory} | {times} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, object]], env: dict, path: Path) -> Path:
    """Peak extra memory vs tokens (fixed chunk) and vs chunk (fixed tokens), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, sweep, key, label in ((axes[0], "tokens", "tokens", "N x T tokens (chunk fixed)"),
                                    (axes[1], "chunk", "chunk", "chunk rows (N x T fixed)")):
        for provider in PROVIDERS:
            points = sorted((r[key], r["peak_extra_mib"]) for r in rows if r["provider"] == provider
                            and r["peak_extra_mib"] is not None
                            and (r["sweep"] == sweep or (sweep == "chunk" and _on_chunk_sweep(r, rows))))
            if points:
                axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=provider)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("peak extra MiB (fwd + bwd)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fused = {r["tokens"]: r["peak_extra_mib"] for r in rows if r["sweep"] == "tokens" and r["provider"] == "fused"}
    for provider in PROVIDERS[1:]:
        points = sorted((r["tokens"], r["peak_extra_mib"] / fused[r["tokens"]]) for r in rows
                        if r["sweep"] == "tokens" and r["provider"] == provider and r["peak_extra_mib"]
                        and fused.get(r["tokens"]))
        if points:
            axes[2].plot([x for x, _ in points], [y for _, y in points], marker="o", label=f"{provider} / fused")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("N x T tokens (chunk fixed)")
    axes[2].set_ylabel("peak extra memory ratio")
    axes[2].grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=8)
    figure.suptitle(f"linear log-probs, V = {rows[0]['vocab']}, {rows[0]['dtype']}, {env['device']}", fontsize=9)
    figure.tight_layout()
    target = path.with_name(path.name + "-memory.png")
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def _on_chunk_sweep(row: dict[str, object], rows: list[dict[str, object]]) -> bool:
    """The token-sweep case at the chunk sweep's token count and chunk belongs to the chunk sweep too."""
    chunk_tokens = {r["tokens"] for r in rows if r["sweep"] == "chunk"}
    return row["sweep"] == "tokens" and row["tokens"] in chunk_tokens
