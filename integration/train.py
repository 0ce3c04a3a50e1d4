"""``python -m divkernels.integration.train``: diversity-aware preference training from the command line.

Every :class:`DiversityPreferenceConfig` field is a flag (``--loss_type dpo --diversity deviation
--output_dir out ...``), plus the script's own: ``--model_name_or_path``, ``--dataset`` (a JSON-lines
file of group rows ``{"prompt", "completions", "rewards"}`` or TRL pair rows ``{"prompt", "chosen",
"rejected"}``, or a dataset name for ``datasets.load_dataset``), ``--dataset_split`` and
``--lora_r`` (> 0: LoRA adapters through peft on ``--lora_target_modules``; the reference is then
the base model with the adapters off). The same command runs on one process, under ``torchrun``
(DDP) and under ``accelerate launch --config_file integration/configs/{fsdp2,zero3}.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, HfArgumentParser

from divkernels.integration.groups import pairs_to_groups
from divkernels.integration.models import load_causal_lm
from divkernels.integration.preference import DiversityPreferenceConfig, DiversityPreferenceTrainer


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Model name or local path (AutoModelForCausalLM)."})
    dataset: str = field(metadata={"help": "A .jsonl file of group or pair rows, or a datasets name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a datasets name."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: train every weight)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "peft target_modules: all-linear or comma-separated module names."})


def load_rows(script: ScriptArguments) -> Dataset:
    """The training rows as groups (pair rows go through :func:`pairs_to_groups`)."""
    if Path(script.dataset).suffix in (".jsonl", ".json"):
        rows = load_dataset("json", data_files=script.dataset, split="train")
    else:
        rows = load_dataset(script.dataset, split=script.dataset_split)
    if "chosen" in rows.column_names:
        rows = Dataset.from_list(pairs_to_groups(list(rows)))
    return rows


def main(argv: list[str] | None = None) -> DiversityPreferenceTrainer:
    script, args = HfArgumentParser((ScriptArguments, DiversityPreferenceConfig)).parse_args_into_dataclasses(argv)
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    peft_config = None
    if script.lora_r > 0:
        from peft import LoraConfig

        targets = script.lora_target_modules
        peft_config = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, task_type="CAUSAL_LM",
                                 target_modules=targets if targets == "all-linear" else targets.split(","))
    trainer = DiversityPreferenceTrainer(load_causal_lm(script.model_name_or_path), args,
                                         train_dataset=load_rows(script), processing_class=tokenizer,
                                         peft_config=peft_config)
    trainer.train()
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    main()
