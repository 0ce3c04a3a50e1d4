"""verl plugin: DARLING, DQO and deviation diversity for verl's PPO/GRPO trainer.

verl (>= 0.8, tested with 0.9.1) computes rewards in its *reward loop*. Each response is scored
alone (``RewardManagerBase.run_single``) on one of ``reward.num_workers`` Ray workers, picked at
random as its rollout finishes. The advantage estimators (``register_adv_est``) see token-level
rewards and ``uid``s, but no responses. No verl extension point sees a whole group, which a
group-wise diversity term needs. This module adds one, through verl's own reward-manager extension
point (``reward.reward_manager.source=importlib``):

1. Each response's quality comes from an inner verl reward manager: ``naive`` by default, so the
   data source's ``compute_score`` or your custom reward function scores it exactly as verl would.
2. The worker embeds the response (MiniLM, hashed character n-grams, or your encoder).
3. ``(quality, embedding)`` goes to a :class:`GroupBoard`, one Ray actor per job and setting,
   keyed by verl's ``uid``. Once the group's ``n`` responses have arrived, from any worker, the
   board scores the group once with divkernels' ops. Every member then reads its shaped reward.

verl's own GRPO estimator turns the shaped rewards into advantages:

* ``darling`` (Li et al. 2025, arXiv 2509.02534; facebookresearch/darling
  ``verl/verl/trainer/ppo/ray_trainer.py`` with ``multiplicative``): ``quality * div_i``. Here
  ``div_i`` is the partition diversity ``(n - |C_i|) / (n - 1)``, floored at 0.1, where ``C_i`` is
  the union-find class of the pairs a learned ``judge`` links, as the authors' reward does
  (:mod:`divkernels.integration.judge`; the workers post the response texts and the board judges
  each complete group), or, without a judge, of ``cos >= tau``. Pair it with
  ``algorithm.norm_adv_by_std_in_grpo=False`` (``verl/math_scripts/darling.batch``).
* ``dqo`` (arXiv 2509.04784): ``quality + alpha * gain_i``, where ``gain_i`` is the leave-one-out
  gain of ``log det(S + I)``. GRPO runs with its std normalization.
* ``deviation``: ``quality + alpha * dev_i``, with ``dev_i`` the mean cosine distance to the rest
  of the group.

Settings live under ``reward.reward_kwargs.divkernels`` (see :class:`VerlDiversitySettings`);
``integration/configs/verl_grpo_darling.yaml`` is a complete example.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

import divkernels as dk
from divkernels import reference
from divkernels.integration.embeddings import HashedNgramEncoder, SentenceEncoder
from divkernels.integration.judge import PairJudge, build_judge, judge_groups
from divkernels.integration.judge import preset as judge_preset

try:
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("divkernels.integration.verl needs verl >= 0.8 with its reward loop "
                      "(pip install 'divkernels[verl]')") from error

logger = logging.getLogger(__name__)

DIVERSITY_KINDS = ("darling", "dqo", "deviation")
Embedder = Callable[[Sequence[str]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class VerlDiversitySettings:
    """The plugin's settings, read from ``reward.reward_kwargs.divkernels`` of verl's config.

    Args:
        diversity: ``"darling"``, ``"dqo"`` or ``"deviation"``.
        alpha: weight of the additive bonus (dqo, deviation).
        tau: cosine at or above which two responses are linked (darling).
        eps: ridge of the logdet kernel matrix (dqo; DQO's ``log det(L + I)``: 1).
        min_diversity: DARLING's floor of the partition diversity (0.1).
        transitive: darling classes are connected components (the authors' union-find); False
            counts only direct links.
        encoder: ``"minilm"`` (the bundled all-MiniLM-L6-v2), ``"ngram"`` (hashed character
            3-grams, no model) or ``"module:attr"``, a callable ``texts -> [N, D]`` or a class
            built with no arguments.
        group_size: responses per ``uid``; None takes ``actor_rollout_ref.rollout.n``.
        group_timeout_s: how long a member waits for the rest of its group. A group still
            incomplete after that is scored on the members that arrived, with a warning; a
            response arriving after its group was scored raises.
        quality_manager: the registered verl reward manager that scores quality (``naive``,
            ``dapo``, ...).
        poll_interval_s: how often a waiting member asks the board for its group's result.
        backend: divkernels backend of the diversity ops (the board runs on CPU: ``reference``).
        judge: DARLING's pair classifier (darling only), built in the board by
            :func:`divkernels.integration.judge.build_judge`: ``{kind: served, urls: [...], model: NAME,
            cls_token: "[CLS]", sep_token: "[SEP]", max_len: 2048}`` (vLLM ``/classify`` servers),
            ``{kind: hf, path: DIR, max_len: ...}`` (in the board's process) or ``{kind: callable,
            target: "module:attr"}``; None links by embeddings (``encoder``, ``tau``).
        judge_preset: the threshold by the authors' setting, ``"darling-math"`` (0.5) or
            ``"darling-wildchat"`` (0.32); ``judge_threshold`` overrides it.
        judge_shortcut: the authors' short-answer shortcut (responses of at most 5 words skip the judge).
        estimator: ``"grpo"`` (the shaped reward as it is) or a pass@k estimator of
            :func:`divkernels.group_advantages` (``"passk_analytic"``, ``"pkpo"``, ``"best_minus_second"``):
            each response's reward becomes its pass@k advantage within its uid's group (subsets of
            ``k``). verl's GRPO then centers it; ``passk_analytic``'s sum to 0 per group, so with
            ``algorithm.norm_adv_by_std_in_grpo=False`` verl's advantage is the paper's exactly.
        k: the pass@k subset size (``passk_analytic``, ``pkpo``; at most ``group_size``).
    """

    diversity: str = "darling"
    alpha: float = 0.1
    tau: float = 0.9
    eps: float = reference.DQO_EPS
    min_diversity: float = reference.DARLING_MIN_DIVERSITY
    transitive: bool = True
    encoder: str = "minilm"
    group_size: int | None = None
    group_timeout_s: float = 600.0
    quality_manager: str = "naive"
    poll_interval_s: float = 0.05
    backend: str = "auto"
    judge: dict[str, Any] | None = None
    judge_preset: str = "darling-math"
    judge_threshold: float | None = None
    judge_shortcut: bool = True
    estimator: str = "grpo"
    k: int | None = None

    def __post_init__(self) -> None:
        if self.diversity not in DIVERSITY_KINDS:
            raise ValueError(f"diversity={self.diversity!r} is not valid; choose one of {', '.join(DIVERSITY_KINDS)}")
        if self.group_size is not None and self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a diversity term needs several responses per uid: "
                             f"set actor_rollout_ref.rollout.n >= 2), got {self.group_size}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.group_timeout_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("group_timeout_s and poll_interval_s must be > 0")
        if self.judge is not None and self.diversity != "darling":
            raise ValueError(f"a judge links responses for diversity='darling', not {self.diversity!r}")
        judge_preset(self.judge_preset)  # a known name
        # the op checks estimator and k on one group of the configured size now, not at the first step
        dk.group_advantages(torch.zeros(1, self.group_size or max(self.k or 2, 2)), estimator=self.estimator,
                            k=self.k, backend="reference")

    @property
    def threshold(self) -> float:
        """The judge's threshold: ``judge_threshold``, else the preset's."""
        return judge_preset(self.judge_preset).threshold if self.judge_threshold is None else self.judge_threshold

    @classmethod
    def from_verl_config(cls, config: Any) -> VerlDiversitySettings:
        """Settings from ``config.reward.reward_kwargs.divkernels``; unknown keys raise."""
        from omegaconf import OmegaConf

        reward_kwargs = config.reward.get("reward_kwargs") or {}
        node = reward_kwargs.get("divkernels") or {}
        values = dict(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown reward.reward_kwargs.divkernels keys {unknown}; known: {sorted(known)}")
        if values.get("group_size") is None:
            values["group_size"] = int(config.actor_rollout_ref.rollout.n)
        return cls(**values)

    def board_name(self) -> str:
        """One board per job and setting: two trainers with different settings never share one."""
        return f"divkernels_group_board_{zlib.crc32(repr(self).encode()):08x}"


def build_encoder(spec: str) -> Embedder:
    """The encoder named by :attr:`VerlDiversitySettings.encoder`."""
    if spec == "minilm":
        return SentenceEncoder()
    if spec == "ngram":
        return HashedNgramEncoder()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"encoder={spec!r} is not valid; use 'minilm', 'ngram' or 'module:attr'")
    encoder = getattr(importlib.import_module(module_name), attribute)
    return encoder() if isinstance(encoder, type) else encoder


def score_groups(quality: torch.Tensor, emb: torch.Tensor, group_ids: Sequence[Hashable],
                 settings: VerlDiversitySettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaped rewards and the diversity measure of responses grouped by ``group_ids``.

    Groups may be ragged and their members in any order. The rows are packed into ``[B, G_max, D]``
    with a mask, and one op call scores every group. A group of one response has no diversity:
    it keeps its quality, and its measure is the neutral value (1 for darling, 0 otherwise).

    Args:
        quality: ``[N]`` quality rewards. emb: ``[N, D]`` embeddings. group_ids: ``N`` hashables
            (verl's ``uid``s).

    Returns:
        ``(rewards [N], measure [N])`` in float64.
    """
    count = quality.shape[0]
    if emb.shape[0] != count or len(group_ids) != count:
        raise ValueError(f"quality ({count}), emb ({emb.shape[0]}) and group_ids ({len(group_ids)}) "
                         "must have one row per response")
    if not torch.isfinite(emb).all():
        raise ValueError("emb holds NaN or inf: the encoder returned a non-finite embedding")
    quality = quality.to(torch.float64)
    neutral = 1.0 if settings.diversity == "darling" else 0.0
    measure = torch.full((count,), neutral, dtype=torch.float64)
    members: dict[Hashable, list[int]] = {}
    for position, key in enumerate(group_ids):
        members.setdefault(key, []).append(position)
    groups = [positions for positions in members.values() if len(positions) >= 2]  # singletons: no diversity
    if groups:
        rows = torch.tensor([row for row, positions in enumerate(groups) for _ in positions])
        slots = torch.tensor([slot for positions in groups for slot in range(len(positions))])
        positions = torch.tensor([position for positions in groups for position in positions])
        packed = emb.new_zeros(len(groups), max(map(len, groups)), emb.shape[1])
        mask = torch.zeros(packed.shape[:2], dtype=torch.bool)
        packed[rows, slots] = emb[positions]
        mask[rows, slots] = True
        if settings.diversity == "darling":
            packed_measure = dk.partition_diversity(packed, mask, tau=settings.tau,
                                                    min_diversity=settings.min_diversity,
                                                    transitive=settings.transitive, backend=settings.backend)
        elif settings.diversity == "dqo":
            packed_measure = dk.logdet_diversity(packed, mask, eps=settings.eps, return_gains=True,
                                                 backend=settings.backend)[1]
        else:
            packed_measure = dk.deviation(packed, mask, backend=settings.backend)
        measure[positions] = packed_measure[rows, slots].to(torch.float64)
    if settings.diversity == "darling":
        shaped = reference.darling_rewards(quality, torch.ones_like(quality, dtype=torch.bool), measure)
    else:
        shaped = quality + settings.alpha * measure
    return passk_rewards(shaped, groups, settings), measure


def passk_rewards(shaped: torch.Tensor, groups: Sequence[Sequence[int]],
                  settings: VerlDiversitySettings) -> torch.Tensor:
    """``shaped [N]`` with each group's (positions ``groups``, 2 or more) rewards replaced by their pass@k
    advantage (``settings.estimator``; ``"grpo"``: unchanged)."""
    if settings.estimator == "grpo" or not groups:
        return shaped
    width = max(map(len, groups))
    packed = shaped.new_zeros(len(groups), width)
    mask = torch.zeros(len(groups), width, dtype=torch.bool)
    for row, positions in enumerate(groups):
        packed[row, :len(positions)] = shaped[list(positions)]
        mask[row, :len(positions)] = True
    k = None if settings.estimator == "best_minus_second" else min(settings.k, width)
    advantages = dk.group_advantages(packed, mask=mask, estimator=settings.estimator, k=k, backend=settings.backend)
    out = shaped.clone()
    for row, positions in enumerate(groups):
        out[list(positions)] = advantages[row, :len(positions)].to(out.dtype)
    return out


def score_judged_group(quality: torch.Tensor, texts: Sequence[str], judge: PairJudge,
                       settings: VerlDiversitySettings) -> tuple[torch.Tensor, torch.Tensor]:
    """DARLING's shaped rewards of one group as the authors compute them: the judge's links
    (:func:`divkernels.integration.judge.judge_groups`), their union-find classes' diversity, times
    the quality. ``(rewards [n], measure [n])`` in float64; one response keeps its quality (measure 1)."""
    quality = quality.to(torch.float64)
    if len(texts) < 2:
        return quality.clone(), torch.ones_like(quality)
    links, mask, _ = judge_groups(judge, [list(texts)], threshold=settings.threshold, shortcut=settings.judge_shortcut)
    measure = dk.partition_diversity(equivalence=links, mask=mask, min_diversity=settings.min_diversity,
                                     transitive=settings.transitive, backend=settings.backend)[0].to(torch.float64)
    shaped = reference.darling_rewards(quality, torch.ones_like(quality, dtype=torch.bool), measure)
    return passk_rewards(shaped, [range(len(texts))], settings), measure


@dataclasses.dataclass
class _Group:
    quality: list[float] = dataclasses.field(default_factory=list)
    payloads: list[Any] = dataclasses.field(default_factory=list)  # embeddings, or texts for a judge
    members: dict[Hashable, int] = dataclasses.field(default_factory=dict)
    rewards: list[float] = dataclasses.field(default_factory=list)
    measure: list[float] = dataclasses.field(default_factory=list)


class GroupBoard:
    """Collects the responses of each verl group (by ``uid``) and scores a group once it is complete.

    One instance per job and setting runs as a named Ray actor, so all reward workers post to the
    same board. Its methods never block: members poll :meth:`result`. A Ray actor runs one
    method call at a time, so no locking is needed. Without Ray, one instance lives in the
    process. Scored groups keep their results (not their embeddings) for the last
    ``finished_memory`` groups, so a retried reward call gets the same answer.
    """

    def __init__(self, settings: VerlDiversitySettings, finished_memory: int = 1 << 16) -> None:
        self.settings = settings
        self.finished_memory = finished_memory
        self.judge = None if settings.judge is None else build_judge(settings.judge)
        self._open: dict[str, _Group] = {}
        self._scored: OrderedDict[str, _Group] = OrderedDict()

    def post(self, uid: str, member: Hashable | None, quality: float, payload: list[float] | str) -> int:
        """Add one response to group ``uid`` and return its index in the group; ``payload``: its
        embedding, or its text when the settings have a judge.

        ``member`` identifies a response within its group (verl's ``session_id`` when the agent
        loop passes one). Posting the same member again returns its first index, so a retried
        reward call is not counted twice. With no ``member``, every post is a new response.
        """
        scored = self._scored.get(uid)
        if scored is not None:
            if member is not None and member in scored.members:
                return scored.members[member]
            raise ValueError(f"verl group uid={uid!r} got a response after it was scored: more than "
                             f"group_size={self.settings.group_size} responses share this uid, or one arrived after "
                             f"group_timeout_s={self.settings.group_timeout_s}. Set "
                             "reward.reward_kwargs.divkernels.group_size to the responses per prompt (and, for the "
                             "batch reward path, make reward.num_workers divide the batch: verl pads it with copies)")
        group = self._open.setdefault(uid, _Group())
        if member is not None and member in group.members:
            return group.members[member]
        index = len(group.quality)
        group.quality.append(float(quality))
        group.payloads.append(payload if isinstance(payload, str) else list(payload))
        group.members[member if member is not None else ("arrival", index)] = index
        if len(group.quality) == self.settings.group_size:
            self._score(uid)
        return index

    def result(self, uid: str, index: int) -> tuple[float, float] | None:
        """``(shaped reward, diversity measure)`` of member ``index`` of group ``uid``, or None
        while the group is incomplete."""
        if uid in self._open:
            return None
        group = self._scored.get(uid)
        if group is None:
            raise ValueError(f"verl group uid={uid!r} is not on the board: it was never posted, or was scored more "
                             f"than {self.finished_memory} groups ago")
        return group.rewards[index], group.measure[index]

    def close(self, uid: str) -> None:
        """Score group ``uid`` with the members that arrived (a member's wait timed out)."""
        group = self._open.get(uid)
        if group is None:
            return
        logger.warning("verl group uid=%r: %d of %d responses arrived within group_timeout_s=%s; scoring those",
                       uid, len(group.quality), self.settings.group_size, self.settings.group_timeout_s)
        self._score(uid)

    def _score(self, uid: str) -> None:
        group = self._open.pop(uid)
        size = len(group.quality)
        quality = torch.tensor(group.quality, dtype=torch.float64)
        if self.judge is not None:
            rewards, measure = score_judged_group(quality, group.payloads, self.judge, self.settings)
        else:
            rewards, measure = score_groups(quality, torch.tensor(group.payloads, dtype=torch.float32), [uid] * size,
                                            self.settings)
        group.rewards, group.measure, group.payloads = rewards.tolist(), measure.tolist(), []
        self._scored[uid] = group
        while len(self._scored) > self.finished_memory:
            self._scored.popitem(last=False)


_LOCAL_BOARDS: dict[str, GroupBoard] = {}


class BoardClient:
    """A reward worker's handle on the job's :class:`GroupBoard`: the named Ray actor when Ray is
    running (created by the first worker that asks), else a board in this process."""

    def __init__(self, settings: VerlDiversitySettings) -> None:
        import ray

        self.settings = settings
        self.remote = ray.is_initialized()
        name = settings.board_name()
        if self.remote:
            self.board = ray.remote(GroupBoard).options(name=name, get_if_exists=True, num_cpus=0).remote(settings)
        else:
            self.board = _LOCAL_BOARDS.setdefault(name, GroupBoard(settings))

    async def _call(self, method: str, *args: Any) -> Any:
        if self.remote:
            return await getattr(self.board, method).remote(*args)
        return getattr(self.board, method)(*args)

    async def score(self, uid: str, member: Hashable | None, quality: float,
                    payload: list[float] | str) -> tuple[float, float]:
        """Post one response (its embedding, or its text for a judge) and wait for its group's result:
        ``(shaped reward, measure)``."""
        index = await self._call("post", uid, member, quality, payload)
        deadline = time.monotonic() + self.settings.group_timeout_s
        while True:
            outcome = await self._call("result", uid, index)
            if outcome is not None:
                return outcome
            if time.monotonic() >= deadline:
                await self._call("close", uid)
                continue
            await asyncio.sleep(self.settings.poll_interval_s)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class DiversityRewardManager(RewardManagerBase):
    """verl reward manager: the inner manager's quality, shaped by the diversity of the response's group.

    Select it with ``reward.reward_manager.source=importlib``,
    ``reward.reward_manager.module.path=pkg://divkernels.integration.verl`` and
    ``reward.reward_manager.name=DiversityRewardManager``; the settings are
    ``reward.reward_kwargs.divkernels`` (:class:`VerlDiversitySettings`). ``reward_extra_info``
    keeps the inner manager's entries and adds ``quality`` and ``diversity`` (the measure).
    """

    def __init__(self, config: Any, tokenizer: Any, compute_score: Callable[..., Any] | None,
                 reward_router_address: str | None = None, reward_model_tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer, compute_score)
        self.settings = VerlDiversitySettings.from_verl_config(config)
        quality_cls = get_reward_manager_cls(self.settings.quality_manager)
        self.quality_manager = quality_cls(config, tokenizer, compute_score,
                                           reward_router_address=reward_router_address,
                                           reward_model_tokenizer=reward_model_tokenizer)
        self.encoder = build_encoder(self.settings.encoder) if self.settings.judge is None else None
        self.board = BoardClient(self.settings)

    async def run_single(self, data: DataProto) -> dict:
        item = data[-1]  # multi-turn outputs: verl scores the last sequence
        if "uid" not in item.non_tensor_batch:
            raise ValueError("the reward input has no 'uid': verl groups a prompt's responses by it, and the "
                             "diversity term needs those groups")
        scored = await self.quality_manager.run_single(data)
        uid = str(_scalar(item.non_tensor_batch["uid"]))
        member = item.non_tensor_batch.get("session_id")
        member = None if member is None else _scalar(member)
        response_ids = item.batch["responses"]
        length = int(item.batch["attention_mask"][-response_ids.shape[-1]:].sum())
        text = self.tokenizer.decode(response_ids[:length], skip_special_tokens=True)
        if self.encoder is None:  # the board's judge reads the text
            payload: list[float] | str = text
        else:
            payload = await self.loop.run_in_executor(None, lambda: self.encoder([text])[0].float().tolist())
        quality = float(scored["reward_score"])
        reward, measure = await self.board.score(uid, member, quality, payload)
        extra = dict(scored.get("reward_extra_info", {}))
        extra["quality"], extra["diversity"] = quality, measure
        return {"reward_score": reward, "reward_extra_info": extra}
