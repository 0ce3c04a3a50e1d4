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
from divkernels.integration.distributed import gather_objects, gather_rows, process_count, process_rank, row_counts
from divkernels.integration.embeddings import SentenceEncoder, completion_text
from divkernels.integration.judge import PairJudge, judge_groups
from divkernels.integration.judge import preset as judge_preset

Embedder = Callable[[Sequence[str]], torch.Tensor]


class _GroupDiversity:
    """Shared part: local embeddings -> gathered ``[B, G, D]`` groups in TRL's layout."""

    def __init__(self, num_generations: int, embed: Embedder | None, backend: str, needs_embed: bool = True) -> None:
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (the GRPOConfig value), got {num_generations}")
        self.num_generations = num_generations
        self.embed = embed if embed is not None or not needs_embed else SentenceEncoder()
        self.backend = backend

    def check_layout(self, prompts: Sequence[Any], rows: int) -> None:
        """The global batch's ``rows`` completions come in groups of ``num_generations`` consecutive rows
        with one prompt each (``prompts``: this process's)."""
        keys = gather_objects([repr(prompt) for prompt in prompts])
        size = self.num_generations
        if rows % size:
            raise ValueError(f"the batch holds {rows} completions, not a multiple of "
                             f"num_generations={size}: pass the num_generations of your GRPOConfig")
        for start in range(0, len(keys), size):
            if len(set(keys[start:start + size])) != 1:
                raise ValueError(f"completions {start}..{start + size - 1} do not share one prompt: TRL lays "
                                 f"out each prompt's num_generations={size} completions consecutively; check "
                                 "num_generations")

    @staticmethod
    def local_rows(count: int) -> slice:
        """This process's ``count`` rows in the global batch (the processes' rows come in rank order)."""
        start = sum(gather_objects([count])[:process_rank()])
        return slice(start, start + count)

    def groups(self, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[torch.Tensor, slice, list[int]]:
        """``(emb [B, G, D] of the global batch, slice of this process's rows in B * G, every
        process's row count)``."""
        local = self.embed([completion_text(completion) for completion in completions]).to(torch.float32)
        counts = row_counts(local.shape[0], local.device)
        emb, rows = gather_rows(local, counts)
        self.check_layout(prompts, emb.shape[0])
        return emb.view(-1, self.num_generations, emb.shape[-1]), rows, counts


def _log(kwargs: dict[str, Any], name: str, value: torch.Tensor) -> None:
    log_metric = kwargs.get("log_metric")
    if log_metric is not None:
        log_metric(name, value.mean().item())


class DarlingReward(_GroupDiversity):
    """DARLING: the raw quality reward times partition diversity, as one reward function.

    The authors' code (facebookresearch/darling): ``partition_reward_vllm_serve.partition`` merges
    the completions an equivalence judge links (union-find) and scores each
    ``(n - |class|) / (n - 1)``, floored at 0.1; ``ray_trainer.py`` with ``multiplicative=True``
    multiplies the quality reward by it. With ``judge`` (DARLING's learned pair classifier,
    :mod:`divkernels.integration.judge`) two completions are linked as the authors link them: the
    short-answer shortcut, else ``P(similar) > threshold``. Without one, when the cosine of their
    embeddings is ``>= tau`` (ours: an embedding stand-in for the judge).

    Args:
        quality_func: a TRL reward function ``(prompts, completions, **kwargs) -> list[float]``.
        num_generations: the ``GRPOConfig.num_generations`` (completions per prompt).
        judge: ``pairs -> P(similar)`` (an :class:`~divkernels.integration.judge.HFPairJudge`, a
            :class:`~divkernels.integration.judge.ServedPairJudge` or any callable); None: embeddings.
        preset: the judge's threshold by the authors' setting: ``"darling-math"`` (0.5) or
            ``"darling-wildchat"`` (0.32); ``threshold`` overrides it.
        shortcut: the authors' short-answer shortcut (responses of at most 5 words skip the judge).
        tau: cosine similarity at or above which two completions are linked (without a judge).
        min_diversity: the floor (DARLING: 0.1).
        darling_reward: ``"raw"`` (DARLING) or ``"minmax"`` (ours: quality min-max scaled over the batch).
        embed: ``texts -> [N, D]`` embeddings (without a judge); default the bundled all-MiniLM-L6-v2 encoder.
        backend: divkernels backend for the diversity op.

    With several processes each judges a share of the groups and the links are exchanged, so the
    judge sees every pair of the global batch once.
    """

    def __init__(self, quality_func: Callable[..., Sequence[float]], *, num_generations: int,
                 judge: PairJudge | None = None, preset: str = "darling-math", threshold: float | None = None,
                 shortcut: bool = True, tau: float = 0.9, min_diversity: float = reference.DARLING_MIN_DIVERSITY,
                 darling_reward: str = "raw", embed: Embedder | None = None, backend: str = "auto") -> None:
        super().__init__(num_generations, embed, backend, needs_embed=judge is None)
        self.quality_func, self.judge, self.shortcut = quality_func, judge, shortcut
        self.threshold = judge_preset(preset).threshold if threshold is None else threshold
        self.tau, self.min_diversity, self.darling_reward = tau, min_diversity, darling_reward
        self.__name__ = f"darling_{getattr(quality_func, '__name__', 'quality')}"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        quality = self.quality_func(prompts=prompts, completions=completions, **kwargs)
        if self.judge is None:
            emb, rows, counts = self.groups(prompts, completions)
            quality, _ = gather_rows(torch.as_tensor(quality, dtype=torch.float32, device=emb.device), counts)
            div = dk.partition_diversity(emb, tau=self.tau, min_diversity=self.min_diversity, backend=self.backend)
        else:
            texts = gather_objects([completion_text(completion) for completion in completions])
            rows = self.local_rows(len(completions))
            self.check_layout(prompts, len(texts))
            quality = torch.tensor(gather_objects([float(value) for value in quality]), dtype=torch.float32)
            links = self.judged_links(texts, kwargs)
            div = dk.partition_diversity(equivalence=links, min_diversity=self.min_diversity, backend=self.backend)
        valid = torch.ones_like(div, dtype=torch.bool)
        shaped = reference.darling_rewards(quality.view_as(div), valid, div, self.darling_reward)
        _log(kwargs, "diversity/partition", div)
        return shaped.flatten()[rows].tolist()

    def judged_links(self, texts: list[str], kwargs: dict[str, Any]) -> torch.Tensor:
        """``[B, G, G]`` links of the global batch's groups: this process judges groups
        ``rank, rank + world, ...``, and the processes exchange their links."""
        size, world, rank = self.num_generations, process_count(), process_rank()
        groups = [texts[start:start + size] for start in range(0, len(texts), size)]
        mine = list(range(rank, len(groups), world))
        links, _, calls = judge_groups(self.judge, [groups[k] for k in mine], threshold=self.threshold,
                                       shortcut=self.shortcut)
        shared = gather_objects([(k, links[n].tolist()) for n, k in enumerate(mine)])
        every = torch.zeros(len(groups), size, size, dtype=torch.bool)
        for k, rows in shared:
            every[k] = torch.tensor(rows, dtype=torch.bool)
        judged = sum(gather_objects([calls.judged]))
        _log(kwargs, "judge/calls_per_group", torch.tensor(float(judged) / max(len(groups), 1)))
        return every


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


class PasskReward(_GroupDiversity):
    """A quality reward turned into each completion's pass@k advantage (:func:`divkernels.group_advantages`
    with ``estimator``), as one reward function: use it instead of the quality reward.

    ``estimator``: ``"passk_analytic"`` (Pass@k Training, arXiv 2508.10751), ``"pkpo"`` (PKPO,
    arXiv 2505.15201, ``s^(loo-1)``) or ``"best_minus_second"`` (verl's ``grpo_passk``). TRL then forms
    ``A = r - mean_group(r)``, divided by the group's std unless ``GRPOConfig(scale_rewards="none")``.
    passk_analytic's values sum to 0 over a group, so with ``scale_rewards="none"`` TRL's advantage is the
    paper's exactly (``scale="std"`` here: over the subsets' std). pkpo and best_minus_second do not sum
    to 0: TRL's centering subtracts their group mean, a baseline on top of theirs.

    Args:
        quality_func: a TRL reward function ``(prompts, completions, **kwargs) -> list[float]`` (0/1 for
            pass@k, any value for max@k).
        num_generations: the ``GRPOConfig.num_generations``.
        estimator, k, scale: as in :func:`divkernels.group_advantages`.
        backend: divkernels backend for the op.
    """

    def __init__(self, quality_func: Callable[..., Sequence[float]], *, num_generations: int,
                 estimator: str = "passk_analytic", k: int | None = None, scale: str | None = None,
                 backend: str = "auto") -> None:
        super().__init__(num_generations, None, backend, needs_embed=False)
        if estimator == "grpo":
            raise ValueError("estimator='grpo' is TRL's own advantage: pass the quality reward itself")
        # the op checks estimator, k and scale on a group of num_generations now, not at the first step
        dk.group_advantages(torch.zeros(1, num_generations), estimator=estimator, k=k, scale=scale,
                            backend="reference")
        self.quality_func, self.estimator, self.k, self.scale = quality_func, estimator, k, scale
        self.__name__ = f"{estimator}_{getattr(quality_func, '__name__', 'quality')}"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        quality = self.quality_func(prompts=prompts, completions=completions, **kwargs)
        values = gather_objects([float(value) for value in quality])
        rows = self.local_rows(len(completions))
        self.check_layout(prompts, len(values))
        rewards = torch.tensor(values, dtype=torch.float64).view(-1, self.num_generations)
        advantages = dk.group_advantages(rewards, estimator=self.estimator, k=self.k, scale=self.scale,
                                         backend=self.backend)
        return advantages.flatten()[rows].tolist()
