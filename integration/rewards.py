"""Diversity-aware reward functions for TRL's ``GRPOTrainer(reward_funcs=[...])``.

TRL calls each reward function on the process's own completions and later groups the gathered
rewards as ``rewards.view(-1, num_generations)``: the completions of one prompt are
``num_generations`` consecutive rows of the global batch, which may span processes. These
functions embed their local completions, gather the embeddings (and prompts, to check the layout)
from every process, compute each group's diversity, and return the local rows:

* :class:`DarlingReward` wraps a quality reward: ``quality * partition diversity`` (DARLING, Li
  et al. 2025, arXiv 2509.02534, as the authors' verl fork combines them); use it instead of the
  quality reward. DARLING's published runs do not scale advantages by the group std: set TRL's
  ``GRPOConfig(scale_rewards=False)`` (verl: ``algorithm.norm_adv_by_std_in_grpo=False``).
* :class:`DiversityBonusReward` is an additive bonus ``alpha * gain_i`` (``kind="dqo"``: leave-one-out
  logdet gain, DQO) or ``alpha * dev_i`` (``kind="deviation"``); list it next to the quality reward.

Both log the batch's mean diversity through TRL's ``log_metric`` hook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import divkernels as dk
from divkernels import reference
from divkernels.integration.distributed import gather_objects, gather_rows, row_counts
from divkernels.integration.embeddings import SentenceEncoder, completion_text

Embedder = Callable[[Sequence[str]], torch.Tensor]


class _GroupDiversity:
    """Shared part: local embeddings -> gathered ``[B, G, D]`` groups in TRL's layout."""

    def __init__(self, num_generations: int, embed: Embedder | None, backend: str) -> None:
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (the GRPOConfig value), got {num_generations}")
        self.num_generations = num_generations
        self.embed = embed if embed is not None else SentenceEncoder()
        self.backend = backend

    def groups(self, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[torch.Tensor, slice, list[int]]:
        """``(emb [B, G, D] of the global batch, slice of this process's rows in B * G, every
        process's row count)``."""
        local = self.embed([completion_text(completion) for completion in completions]).to(torch.float32)
        counts = row_counts(local.shape[0], local.device)
        emb, rows = gather_rows(local, counts)
        keys = gather_objects([repr(prompt) for prompt in prompts])
        size = self.num_generations
        if emb.shape[0] % size:
            raise ValueError(f"the batch holds {emb.shape[0]} completions, not a multiple of "
                             f"num_generations={size}: pass the num_generations of your GRPOConfig")
        for start in range(0, len(keys), size):
            if len(set(keys[start:start + size])) != 1:
                raise ValueError(f"completions {start}..{start + size - 1} do not share one prompt: TRL lays "
                                 f"out each prompt's num_generations={size} completions consecutively; check "
                                 "num_generations")
        return emb.view(-1, size, emb.shape[-1]), rows, counts


def _log(kwargs: dict[str, Any], name: str, value: torch.Tensor) -> None:
    log_metric = kwargs.get("log_metric")
    if log_metric is not None:
        log_metric(name, value.mean().item())


class DarlingReward(_GroupDiversity):
    """DARLING: the raw quality reward times partition diversity, as one reward function.

    The authors' code (facebookresearch/darling): ``partition_reward_vllm_serve.partition`` merges
    the completions an equivalence judge links (union-find) and scores each
    ``(n - |class|) / (n - 1)``, floored at 0.1; ``ray_trainer.py`` with ``multiplicative=True``
    multiplies the quality reward by it. Here two completions are linked when the cosine of their
    embeddings is ``>= tau`` (or pass ``partition_func`` for a learned judge's labels).

    Args:
        quality_func: a TRL reward function ``(prompts, completions, **kwargs) -> list[float]``.
        num_generations: the ``GRPOConfig.num_generations`` (completions per prompt).
        tau: cosine similarity at or above which two completions are linked.
        min_diversity: the floor (DARLING: 0.1).
        darling_reward: ``"raw"`` (DARLING) or ``"minmax"`` (ours: quality min-max scaled over the batch).
        embed: ``texts -> [N, D]`` embeddings; default the bundled all-MiniLM-L6-v2 encoder.
        backend: divkernels backend for the diversity op.
    """

    def __init__(self, quality_func: Callable[..., Sequence[float]], *, num_generations: int, tau: float = 0.9,
                 min_diversity: float = reference.DARLING_MIN_DIVERSITY, darling_reward: str = "raw",
                 embed: Embedder | None = None, backend: str = "auto") -> None:
        super().__init__(num_generations, embed, backend)
        self.quality_func = quality_func
        self.tau, self.min_diversity, self.darling_reward = tau, min_diversity, darling_reward
        self.__name__ = f"darling_{getattr(quality_func, '__name__', 'quality')}"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        quality = self.quality_func(prompts=prompts, completions=completions, **kwargs)
        emb, rows, counts = self.groups(prompts, completions)
        quality, _ = gather_rows(torch.as_tensor(quality, dtype=torch.float32, device=emb.device), counts)
        div = dk.partition_diversity(emb, tau=self.tau, min_diversity=self.min_diversity, backend=self.backend)
        valid = torch.ones_like(div, dtype=torch.bool)
        shaped = reference.darling_rewards(quality.view_as(div), valid, div, self.darling_reward)
        _log(kwargs, "diversity/partition", div)
        return shaped.flatten()[rows].tolist()


class DiversityBonusReward(_GroupDiversity):
    """Additive diversity bonus per completion: ``alpha * gain_i`` (dqo) or ``alpha * dev_i`` (deviation).

    Args:
        kind: ``"dqo"`` (leave-one-out gain of ``log det(S + eps I)``, DQO, arXiv 2509.04784) or
            ``"deviation"``.
        num_generations: the ``GRPOConfig.num_generations``.
        alpha: weight of the bonus (TRL's ``reward_weights`` multiply it once more).
        eps: ridge of the logdet kernel matrix (dqo; DQO's ``log det(L + I)``: 1).
        embed: ``texts -> [N, D]`` embeddings; default the bundled all-MiniLM-L6-v2 encoder.
        backend: divkernels backend for the diversity op.
    """

    def __init__(self, kind: str = "dqo", *, num_generations: int, alpha: float = 0.1,
                 eps: float = reference.DQO_EPS,
                 embed: Embedder | None = None, backend: str = "auto") -> None:
        if kind not in ("dqo", "deviation"):
            raise ValueError(f"kind={kind!r} is not valid; choose one of 'dqo', 'deviation'")
        super().__init__(num_generations, embed, backend)
        self.kind, self.alpha, self.eps = kind, alpha, eps
        self.__name__ = f"{kind}_bonus"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        emb, rows, _ = self.groups(prompts, completions)
        if self.kind == "dqo":
            logdet, measure = dk.logdet_diversity(emb, eps=self.eps, return_gains=True, backend=self.backend)
            _log(kwargs, "diversity/logdet", logdet)
        else:
            measure = dk.deviation(emb, backend=self.backend)
            _log(kwargs, "diversity/deviation", measure)
        return (self.alpha * measure).flatten()[rows].tolist()
