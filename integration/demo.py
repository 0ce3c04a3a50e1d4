"""``python -m divkernels demo``: diversity-aware preference training of a tiny LM, on CPU, offline.

The task has many correct answers: the prompt ``"1 2 ="`` asks for three digits that sum to 12
(75 correct answers). A tiny Llama built from a config (no download) is first fine-tuned on
correct answers drawn from a skewed (Zipf) distribution plus some noise, so it starts out
knowing the task imperfectly and favouring a few answers. Its own samples, scored by a verifier,
become groups of responses, which train three copies of it:

* DPO: every (correct, incorrect) pair of a group, pairs weighted equally;
* DDPO: the same pairs weighted by the chosen response's deviation from the rest of its group
  (embeddings from the bundled all-MiniLM-L6-v2), ``diversity="deviation"``;
* GRPO + DQO: TRL's GRPOTrainer with the verifier reward plus the leave-one-out logdet bonus.

The before/after table reports pass@1, pass@k, the number of distinct correct answers among k
samples and the mean pairwise cosine similarity of the samples; a PNG plot and a JSON file go to
the output folder. Seeded: the same command prints the same table on the same machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

DIGITS = [str(digit) for digit in range(10)]
TOKENS = ["<pad>", "<bos>", "<eos>", "=", *DIGITS]
TARGETS = list(range(6, 21))
ANSWER_LENGTH = 3


def build_tokenizer(tokens: list[str] = TOKENS) -> Any:
    """Word-level tokenizer over ``tokens`` (default: digits, ``=`` and the special tokens ``<pad>``,
    ``<bos>``, ``<eos>``, which come first), whitespace separated."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({token: index for index, token in enumerate(tokens)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def build_model(seed: int) -> Any:
    """A 2-layer, 64-wide Llama (about 84k parameters) from a config; nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(seed)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def prompt_for(target: int) -> str:
    return " ".join(str(target)) + " ="


def is_correct(prompt: str, completion: str, length: int = ANSWER_LENGTH) -> bool:
    """Verifier: exactly ``length`` digits (the demo: three) whose sum is the prompt's target."""
    target = int("".join(token for token in prompt.split() if token in DIGITS))
    digits = completion.split()
    return len(digits) == length and all(d in DIGITS for d in digits) and sum(map(int, digits)) == target


def correctness_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """TRL reward function: 1 for a correct completion, 0 otherwise."""
    return [float(is_correct(p, c)) for p, c in zip(prompts, completions, strict=True)]


def solutions(target: int, length: int = ANSWER_LENGTH) -> list[str]:
    """Every string of ``length`` digits that sum to ``target``, in lexicographic order."""
    return [" ".join(map(str, digits)) for digits in itertools.product(range(10), repeat=length)
            if sum(digits) == target]


def sft_examples(count: int, rng: random.Random, noise: float = 0.2, *, targets: list[int] = TARGETS,
                 length: int = ANSWER_LENGTH, skew: float = 1.1) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: correct answers Zipf-distributed (exponent ``skew``) over a shuffled
    solution list (a few answers dominate, as after ordinary fine-tuning), and a share ``noise`` of
    random digit strings."""
    ranked = {target: rng.sample(solutions(target, length), len(solutions(target, length))) for target in targets}
    examples = []
    for _ in range(count):
        target = rng.choice(targets)
        if rng.random() < noise:
            completion = " ".join(rng.choice(DIGITS) for _ in range(length))
        else:
            answers = ranked[target]
            weights = [1.0 / (rank + 1) ** skew for rank in range(len(answers))]
            completion = rng.choices(answers, weights)[0]
        examples.append((prompt_for(target), completion))
    return examples


def train_sft(model: Any, tokenizer: Any, examples: list[tuple[str, str]], *, steps: int, batch_size: int = 64,
              lr: float = 3e-3, seed: int = 0) -> None:
    """Supervised fine-tuning on the completion tokens (plain loop: the model is tiny)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, batch_size)
        texts = [f"<bos> {prompt} {completion} <eos>" for prompt, completion in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = encoded["input_ids"].clone()
        for row, (prompt, _) in enumerate(batch):
            labels[row, :len(prompt.split()) + 1] = -100  # <bos> and the prompt: one token per word
        labels[encoded["attention_mask"] == 0] = -100
        loss = model(**encoded, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def sample_groups(model: Any, tokenizer: Any, group_size: int, rounds: int, seed: int) -> list[dict[str, Any]]:
    """Offline preference data: ``rounds`` groups of ``group_size`` samples per prompt, verifier rewards."""
    from divkernels.integration.callback import sample_completions

    torch.manual_seed(seed)
    rows = []
    for _ in range(rounds):
        prompts = [f"<bos> {prompt_for(target)}" for target in TARGETS]
        samples = sample_completions(model, tokenizer, prompts, group_size, max_new_tokens=ANSWER_LENGTH + 1)
        for target, completions in zip(TARGETS, samples, strict=True):
            prompt = prompt_for(target)
            # a leading space: prompt + completion tokenize as prompt then completion, in TRL and here
            rows.append({"prompt": f"<bos> {prompt}", "completions": [" " + c.strip() for c in completions],
                         "rewards": [float(is_correct(prompt, c)) for c in completions]})
    return rows


def evaluate(model: Any, tokenizer: Any, embed: Any, k: int, seed: int) -> dict[str, float]:
    """pass@1, pass@k, distinct correct answers among k, and diversity of k samples per prompt."""
    from divkernels.integration.callback import diversity_metrics, sample_completions

    torch.manual_seed(seed)
    prompts = [f"<bos> {prompt_for(target)}" for target in TARGETS]
    samples = sample_completions(model, tokenizer, prompts, k, max_new_tokens=ANSWER_LENGTH + 1)
    return diversity_metrics(samples, embed, prompts=[prompt.removeprefix("<bos> ") for prompt in prompts],
                             verifier=is_correct)


def train_preference(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, diversity: str, steps: int,
                     out: Path, encoder: Any, seed: int) -> list[dict[str, float]]:
    """DPO (``diversity="none"``) or DDPO (``"deviation"``) with DiversityPreferenceTrainer."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from divkernels.integration import DiversityPreferenceConfig, DiversityPreferenceTrainer

    args = DiversityPreferenceConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
        lr_scheduler_type="constant", beta=0.5, loss_type="dpo", diversity=diversity, logging_steps=max(1, steps // 5),
        save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        bf16=False, gradient_checkpointing=False)  # a tiny fp32 model: neither pays off
    trainer = DiversityPreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                         processing_class=tokenizer, encoder=encoder)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()
    return trainer.state.log_history


def train_grpo_dqo(model: Any, tokenizer: Any, *, steps: int, out: Path, encoder: Any, seed: int,
                   group_size: int) -> list[dict[str, float]]:
    """GRPO with the verifier reward plus the DQO leave-one-out logdet bonus (TRL's GRPOTrainer)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from divkernels.integration import DiversityBonusReward

    prompts = [f"<bos> {prompt_for(target)}" for target in TARGETS] * 64
    args = GRPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4 * group_size,
                      num_generations=group_size, max_completion_length=ANSWER_LENGTH + 1, learning_rate=1e-3,
                      lr_scheduler_type="constant", beta=0.0, logging_steps=max(1, steps // 5), save_strategy="no",
                      report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                      reward_weights=[1.0, 1.0])
    bonus = DiversityBonusReward("dqo", num_generations=group_size, alpha=0.05, embed=encoder)
    trainer = GRPOTrainer(model=model, reward_funcs=[correctness_reward, bonus], args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()
    return trainer.state.log_history


def _quiet() -> None:
    import os
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not torch.cuda.is_available():  # DeepSpeed, when installed, announces its CPU fallback otherwise
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import datasets
    except ImportError:
        pass
    else:
        datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def plot(results: dict[str, dict[str, float]], path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pass@1", "pass@1"), ("pass@k", f"pass@{k}"), ("distinct_correct@k", f"distinct correct of {k}"),
              ("mean_similarity", f"mean pairwise similarity of {k}"), ("vendi", f"Vendi score of {k}")]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6))
    names = list(results)
    colors = ["0.6", "tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple"][:len(names)]
    for axis, (key, title) in zip(axes, panels, strict=True):
        values = [results[name][key] for name in names]
        bars = axis.bar(names, values, color=colors)
        axis.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize=8)
        axis.set_ylim(0, max(values) * 1.18 if max(values) > 0 else 1)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", rotation=30)
    figure.suptitle(f"divkernels demo: diversity-aware preference training of a tiny LM (k = {k} samples per prompt)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(out: Path, *, scale: float = 1.0, seed: int = 0, grpo: bool = True, k: int = 16,
        log: Any = print) -> dict[str, dict[str, float]]:
    """The whole demo; ``scale`` multiplies every step count (CI uses a small one)."""
    _quiet()
    from divkernels.integration import SentenceEncoder

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    steps = {name: max(2, math.ceil(count * scale)) for name, count in
             (("sft", 1500), ("preference", 100), ("grpo", 60))}
    tokenizer = build_tokenizer()
    encoder = SentenceEncoder(device="cpu")
    base = build_model(seed)
    log(f"[1/4] fine-tuning a {sum(p.numel() for p in base.parameters()) / 1e3:.0f}k-parameter Llama on the "
        f"task ({steps['sft']} steps)")
    train_sft(base, tokenizer, sft_examples(20000, random.Random(seed)), steps=steps["sft"], seed=seed)
    results = {"SFT (before)": evaluate(base, tokenizer, encoder, k, seed + 1)}
    log("[2/4] sampling groups of 8 responses per prompt and scoring them with the verifier")
    rows = sample_groups(base, tokenizer, group_size=8, rounds=4, seed=seed + 2)
    correct = sum(sum(row["rewards"]) for row in rows) / sum(len(row["rewards"]) for row in rows)
    log(f"      {len(rows)} groups, {correct:.0%} of the responses correct")
    histories = {}
    for name, diversity in (("DPO", "none"), ("DDPO", "deviation")):
        log(f"[3/4] {name}: {steps['preference']} steps of DiversityPreferenceTrainer (diversity={diversity!r})")
        model = build_model(seed)
        model.load_state_dict(base.state_dict())
        histories[name] = train_preference(model, tokenizer, rows, diversity=diversity, steps=steps["preference"],
                                           out=out / name.lower(), encoder=encoder, seed=seed)
        results[name] = evaluate(model, tokenizer, encoder, k, seed + 1)
    if grpo:
        log(f"[4/4] GRPO + DQO bonus: {steps['grpo']} steps of TRL's GRPOTrainer")
        model = build_model(seed)
        model.load_state_dict(base.state_dict())
        histories["GRPO+DQO"] = train_grpo_dqo(model, tokenizer, steps=steps["grpo"], out=out / "grpo", encoder=encoder,
                                               seed=seed, group_size=8)
        results["GRPO+DQO"] = evaluate(model, tokenizer, encoder, k, seed + 1)
    log("\n" + table(results, k))
    plot(results, out / "demo.png", k)
    (out / "results.json").write_text(json.dumps({"results": results, "k": k, "scale": scale, "seed": seed,
                                                  "histories": histories}, indent=1))
    log(f"\nplot: {out / 'demo.png'}   numbers: {out / 'results.json'}   ({time.time() - start:.0f} s)")
    return results


# The committed results of the run the README's demo table shows (``demo --readme README.md`` writes both).
RESULTS_FILE = Path(__file__).resolve().parent / "demo_results.json"
README_BEGIN, README_END = "<!-- demo table: generated by `python -m divkernels demo --readme README.md` -->", \
    "<!-- end of demo table -->"


def readme_block(results: dict[str, Any]) -> str:
    """The README's demo block: the run's settings and its table."""
    return (f"{README_BEGIN}\n(seed {results['seed']}, k = {results['k']} samples per prompt, {len(TARGETS)} prompts, "
            f"scale {results['scale']})\n\n{table(results['results'], results['k'])}\n{README_END}")


def replace_readme_block(readme: Path, block: str, begin: str, end: str) -> None:
    """Replace the text from the line ``begin`` to the line ``end`` of ``readme`` with ``block``."""
    text = readme.read_text()
    start, stop = text.index(begin), text.index(end) + len(end)
    readme.write_text(text[:start] + block + text[stop:])


def write_readme_table(readme: Path, results: dict[str, Any]) -> None:
    """Replace the demo block of ``readme`` with :func:`readme_block` of ``results``."""
    replace_readme_block(readme, readme_block(results), README_BEGIN, README_END)


def table(results: dict[str, dict[str, float]], k: int) -> str:
    header = (f"| model | pass@1 | pass@{k} | distinct correct of {k} | mean pairwise similarity | vendi |\n"
              "|---|---|---|---|---|---|")
    lines = [f"| {name} | {m['pass@1']:.3f} | {m['pass@k']:.3f} | {m['distinct_correct@k']:.2f} | "
             f"{m['mean_similarity']:.3f} | {m['vendi']:.2f} |" for name, m in results.items()]
    return "\n".join([header, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m divkernels demo", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="folder for demo.png and results.json (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model, the data, the training and the sampling (default: %(default)s)")
    parser.add_argument("--no-grpo", action="store_true", help="skip the GRPO + DQO run")
    parser.add_argument("--readme", type=Path, default=None, metavar="README",
                        help="after the run, write its table into README's demo block and its results.json "
                             "to integration/demo_results.json (what the README's numbers come from)")
    args = parser.parse_args(argv)
    run(args.out, scale=args.scale, seed=args.seed, grpo=not args.no_grpo)
    if args.readme is not None:
        RESULTS_FILE.write_text((args.out / "results.json").read_text())
        write_readme_table(args.readme, json.loads(RESULTS_FILE.read_text()))
    return 0
