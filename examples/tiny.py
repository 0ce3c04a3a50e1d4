"""What every example shares: the tiny model (a 2-layer Llama over digit tokens, built from a config and
saved locally, so nothing is downloaded) and the shipped groups file of the demo's task ("1 2 =" asks
for three digits that sum to 12; reward 1 for a correct completion)."""

from __future__ import annotations

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
