"""Hugging Face / TRL integration of divkernels (installed as ``divkernels.integration``).

* :class:`DiversityPreferenceTrainer` + :class:`DiversityPreferenceConfig`: DDPO / DORPO / DivPO /
  logdet-regularized preference training on groups of responses; :func:`pairs_to_groups` for
  TRL's chosen/rejected datasets.
* :class:`DarlingReward`, :class:`DiversityBonusReward`, :class:`PasskReward`: reward functions for TRL's
  ``GRPOTrainer``.
* :class:`HFPairJudge`, :class:`ServedPairJudge`, :func:`judge_groups`: DARLING's learned equivalence
  judge (:mod:`divkernels.integration.judge`; ``python -m divkernels.integration.judge train`` fine-tunes one).
* :class:`LinearLogpsGRPOTrainer`: TRL's ``GRPOTrainer`` with its log-probs and entropies (entropy bonus,
  high-entropy token mask) from :func:`divkernels.linear_token_logps`, without the logits.
* :class:`DiversityCallback`: diversity / pass@k tracking for any ``Trainer``.
* :class:`SentenceEncoder`, :func:`pool_hidden_states`: embedding sources.
* :mod:`divkernels.integration.verl` (imported on its own, needs verl): ``DiversityRewardManager``,
  DARLING / DQO / deviation for verl's PPO/GRPO trainer.
* ``python -m divkernels.integration.train``: the trainer from the command line (one process, DDP,
  FSDP2 and ZeRO-3 through ``accelerate launch --config_file integration/configs/*.yaml``).

Needs the ``train`` extra (transformers, trl, accelerate, sentence-transformers).
"""

from divkernels.integration.callback import DiversityCallback, diversity_metrics, sample_completions
from divkernels.integration.embeddings import SentenceEncoder, pool_hidden_states
from divkernels.integration.groups import GroupPreferenceCollator, pairs_to_groups
from divkernels.integration.grpo import LinearLogpsGRPOTrainer
from divkernels.integration.judge import HFPairJudge, ServedPairJudge, judge_groups
from divkernels.integration.models import attention_implementation, load_causal_lm
from divkernels.integration.preference import DiversityPreferenceConfig, DiversityPreferenceTrainer
from divkernels.integration.rewards import DarlingReward, DiversityBonusReward, PasskReward

__all__ = [
    "DarlingReward",
    "DiversityBonusReward",
    "DiversityCallback",
    "DiversityPreferenceConfig",
    "DiversityPreferenceTrainer",
    "GroupPreferenceCollator",
    "HFPairJudge",
    "LinearLogpsGRPOTrainer",
    "PasskReward",
    "SentenceEncoder",
    "ServedPairJudge",
    "attention_implementation",
    "diversity_metrics",
    "judge_groups",
    "load_causal_lm",
    "pairs_to_groups",
    "pool_hidden_states",
    "sample_completions",
]
