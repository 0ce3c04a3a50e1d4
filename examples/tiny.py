"""What every example shares: the tiny model (a 2-layer Llama over digit tokens, built from a config and
saved locally, so nothing is downloaded) and the shipped groups file of the demo's task ("1 2 =" asks
for three digits that sum to 12; reward 1 for a correct completion)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from divkernels.integration import demo

GROUPS_FILE = Path(__file__).resolve().parent / "data" / "groups.jsonl"


def save_tiny_model(folder: str | Path, seed: int = 0) -> str:
    """Save the demo's tiny model and tokenizer to ``folder`` (once) and return its path, for
    ``--model_name_or_path``."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        demo.build_model(seed).save_pretrained(folder)
        demo.build_tokenizer().save_pretrained(folder)
    return str(folder)


def arguments(doc: str | None, output_dir: str, max_steps: int, argv: list[str] | None,
              extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--output_dir`` and ``--max_steps`` of an example (its docstring as the help), and what ``extra``
    adds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=output_dir)
    parser.add_argument("--max_steps", type=int, default=max_steps)
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def train_flags(model: str, args: argparse.Namespace, batch_size: int = 4) -> list[str]:
    """The flags every preference example passes to ``python -m divkernels.integration.train``: the
    shipped groups, fp32 on CPU, a log line every 2 steps, nothing saved but the final model."""
    return ["--model_name_or_path", model, "--dataset", str(GROUPS_FILE), "--output_dir", args.output_dir,
            "--per_device_train_batch_size", str(batch_size), "--max_steps", str(args.max_steps),
            "--logging_steps", "2", "--bf16", "False", "--report_to", "none", "--save_strategy", "no"]
