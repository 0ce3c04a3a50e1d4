"""``--suite trainer``: peak memory and seconds per step of a preference trainer, ours against TRL's.

Trainers on the same 4 preference pairs a step (prompt + completion = ``T`` tokens), the same model
(a 2-layer Llama from a config, vocabulary 32,000) and the same settings (SGD, fp32, TRL's defaults
otherwise, gradient checkpointing on):

* ``trl``: TRL's ``DPOTrainer`` (its default LM head; skipped where TRL is not installed);
* ``ours``: :class:`~divkernels.integration.DiversityPreferenceTrainer` as configured by default
  (``fused_linear=None``: log-probs from the LM head's input in chunks, no logits), diversity off;
* ``ours+diversity``: the same with DDPO's deviation weights from the policy's pooled hidden states;
* ``ours-logits``: ``fused_linear=False``, the ``[N, T, V]`` logits formed.

Each case runs ``STEPS`` optimizer steps in a fresh process. Peak memory: on CUDA the allocator's
peak over what was allocated before training; on CPU the growth of the process's peak RSS over the
steps. Seconds per step: the median over the steps after the first.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from divkernels.benchmarks.linear import MIB, peak_rss_mib, run_fresh

TRAINERS = ("trl", "ours", "ours+diversity", "ours-logits")
LENGTHS = (256, 1024, 2048)
STEPS = 3
PAIRS_PER_STEP = 4
RESULTS_NAME = "trainer"


@dataclass(frozen=True)
class TrainerCase:
    """One trainer at ``length`` tokens per sequence on a Llama of ``layers`` x ``width``, ``vocab`` tokens."""

    trainer: str
    length: int
    vocab: int = 32_000
    width: int = 256
    layers: int = 2


def cases(lengths: tuple[int, ...] = LENGTHS) -> list[TrainerCase]:
    return [TrainerCase(trainer, length) for length in lengths for trainer in TRAINERS]


def build_tokenizer(vocab: int) -> Any:
    """The demo's word-level tokenizer over ``vocab`` tokens: pad, bos, eos, then ``w3`` ..."""
    from divkernels.integration import demo

    return demo.build_tokenizer(["<pad>", "<bos>", "<eos>", *(f"w{index}" for index in range(3, vocab))])


def build_model(case: TrainerCase) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(0)
    config = LlamaConfig(vocab_size=case.vocab, hidden_size=case.width, intermediate_size=2 * case.width,
                         num_hidden_layers=case.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=case.length, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def pair_rows(case: TrainerCase, count: int) -> list[dict[str, str]]:
    """``count`` pairs of random words: a prompt of ``T / 4`` tokens and completions that fill ``T`` with
    the EOS token the trainers append."""
    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(f"w{rng.randrange(3, case.vocab)}" for _ in range(words))

    prompt = case.length // 4
    answer = case.length - prompt - 1
    return [{"prompt": text(prompt), "chosen": " " + text(answer), "rejected": " " + text(answer)}
            for _ in range(count)]


def build_trainer(case: TrainerCase, out: str, device: torch.device) -> Any:
    """The trainer of ``case`` on ``STEPS`` steps of ``PAIRS_PER_STEP`` pairs."""
    import copy

    from datasets import Dataset

    model, tokenizer = build_model(case), build_tokenizer(case.vocab)
    rows = pair_rows(case, STEPS * PAIRS_PER_STEP)
    common = {"output_dir": out, "max_steps": STEPS, "per_device_train_batch_size": PAIRS_PER_STEP,
              "learning_rate": 1e-3, "optim": "sgd", "bf16": False, "report_to": [], "save_strategy": "no",
              "logging_steps": 1, "disable_tqdm": True, "use_cpu": device.type == "cpu", "seed": 0,
              "max_length": case.length}
    if case.trainer == "trl":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**common),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    from divkernels.integration import DiversityPreferenceConfig, DiversityPreferenceTrainer, pairs_to_groups

    options = {"ours": {"diversity": "none"}, "ours-logits": {"diversity": "none", "fused_linear": False},
               "ours+diversity": {"diversity": "deviation", "embedding_source": "policy"}}[case.trainer]
    args = DiversityPreferenceConfig(**common, **options)
    return DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs_to_groups(rows)),
                                      processing_class=tokenizer)


def measure(case: TrainerCase, device: torch.device) -> dict[str, object]:
    """Peak extra memory over ``STEPS`` steps and the median seconds per step after the first."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(case, out, device)
        trainer.add_callback(Clock())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = peak_rss_mib()
        stamps.append(time.perf_counter())
        trainer.train()
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
        else:
            peak = peak_rss_mib() - before
    steps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    loss = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {**asdict(case), "pairs_per_step": PAIRS_PER_STEP, "steps": len(steps), "peak_extra_mib": round(peak, 1),
            "seconds_per_step": round(statistics.median(steps[1:] or steps), 3), "first_loss": loss[0],
            "error": None}


def measure_in_fresh_process(case: TrainerCase, device: torch.device) -> dict[str, object]:
    """:func:`measure` in a new Python process, so that no earlier case's memory is in its peak."""
    if case.trainer == "trl" and importlib.util.find_spec("trl") is None:
        return {**asdict(case), "error": "skipped: trl is not installed"}
    row, error = run_fresh(["-m", "divkernels.benchmarks.trainer", json.dumps(asdict(case)), str(device)],
                           interpreter=False)
    return row if row is not None else {**asdict(case), "error": error}


def run(device: torch.device, log: Callable[[str], None], selected: list[TrainerCase] | None = None) -> list[dict]:
    rows = []
    for case in selected if selected is not None else cases():
        row = measure_in_fresh_process(case, device)
        log(f"{case.trainer:>15} T={case.length:<5} " + (row["error"] or f"{row['peak_extra_mib']:9.1f} MiB "
                                                         f"{row['seconds_per_step']:8.3f} s/step"))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per trainer and T, with the ratios to TRL's DPOTrainer at the same T."""
    trl = {row["length"]: row for row in rows if row["trainer"] == "trl" and not row.get("error")}
    lines = ["| T | trainer | peak extra MiB | vs TRL | s / step | vs TRL |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['length']} | {row['trainer']} | {row['error']} | | | |")
            continue
        base = trl.get(row["length"], {})
        memory, speed = (f"{row[key] / base[key]:.2f}x" if base.get(key) else "-"  # no ratio to nothing
                         for key in ("peak_extra_mib", "seconds_per_step"))
        lines.append(f"| {row['length']} | {row['trainer']} | {row['peak_extra_mib']:.0f} | {memory} | "
                     f"{row['seconds_per_step']:.2f} | {speed} |")
    return "\n".join(lines)


def readme_block(results: dict) -> str:
    """The benchmarks/README.md block of a committed result file: where it ran, then :func:`table`."""
    return (f"Measured on {results['device']} (torch {results['torch']}, transformers {results['transformers']}, "
            f"trl {results['trl']}, commit {str(results['commit'])[:12]}, {results['date'][:10]}):\n\n"
            + table(results["rows"]))


def plot(rows: list[dict], env: dict, path: Path) -> Path:
    """Peak extra memory and seconds per step against T, one line per trainer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for trainer in TRAINERS:
        mine = [row for row in rows if row["trainer"] == trainer and not row.get("error")]
        if mine:
            lengths = [row["length"] for row in mine]
            memory.plot(lengths, [row["peak_extra_mib"] for row in mine], marker="o", label=trainer)
            speed.plot(lengths, [row["seconds_per_step"] for row in mine], marker="o", label=trainer)
    memory.set(xlabel="tokens per sequence T", ylabel="peak extra memory (MiB)", title="memory")
    speed.set(xlabel="tokens per sequence T", ylabel="seconds per step", title="time")
    memory.legend()
    figure.suptitle(f"preference trainers, {PAIRS_PER_STEP} pairs a step, on {env['device']}")
    figure.tight_layout()
    out = path.with_name(path.name + "-trainer.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m divkernels.benchmarks.trainer",
                                     description="Measure one trainer case (a JSON TrainerCase) and print its row "
                                     "as JSON: what `python -m divkernels.benchmarks --suite trainer` runs per case.")
    parser.add_argument("case", help='e.g. \'{"trainer": "ours", "length": 256}\'')
    parser.add_argument("device", nargs="?", default="cpu")
    arguments = parser.parse_args()
    print(json.dumps(measure(TrainerCase(**json.loads(arguments.case)), torch.device(arguments.device))))
