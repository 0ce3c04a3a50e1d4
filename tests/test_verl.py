"""verl plugin (divkernels.integration.verl) against the reference, through verl's own code paths.

* ``score_groups`` (ragged groups in any order) against the reference op applied to each group
  alone;
* the ``GroupBoard`` protocol: out-of-order members, retries, overfill, timeouts;
* the example config composes with verl's own ``ppo_trainer`` config and resolves to our manager;
* end to end on a local Ray cluster: verl's ``RewardLoopManager`` with two reward workers (the batch
  path, each group split across both workers) and the agent loop's per-response calls to random
  workers (the streaming path). The shaped rewards equal the reference, and verl's own GRPO advantage
  code turns them into the reference's ``group_advantages``.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
ray = pytest.importorskip("ray")

import oracle  # noqa: E402

from divkernels import reference  # noqa: E402
from divkernels.integration import verl as dk_verl  # noqa: E402
from divkernels.integration.demo import build_tokenizer, is_correct, prompt_for  # noqa: E402
from divkernels.integration.embeddings import HashedNgramEncoder  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "integration" / "configs"
SCORES = Path(__file__).resolve().parent / "verl_scores.py"
VERL_GRPO_EPS = 1e-6  # verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage
ANSWERS = ["1 2 3", "3 2 1", "1 2 3", "9 9 9", "4 4 4", "2 5 5", "0 6 6", "6 6 0", "3 3 3", "1 1 4"]


def settings(**overrides) -> dk_verl.VerlDiversitySettings:
    values = {"encoder": "ngram", "group_size": 4, "poll_interval_s": 0.01, "group_timeout_s": 60.0, **overrides}
    return dk_verl.VerlDiversitySettings(**values)


def expected_group(quality: torch.Tensor, emb: torch.Tensor, setting: dk_verl.VerlDiversitySettings
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One group alone through the reference: (shaped reward [n], measure [n]), float64."""
    quality = quality.to(torch.float64)
    if quality.shape[0] == 1:
        neutral = 1.0 if setting.diversity == "darling" else 0.0
        return quality.clone(), torch.full_like(quality, neutral)
    if setting.diversity == "darling":
        measure = reference.partition_diversity(emb[None], tau=setting.tau, min_diversity=setting.min_diversity,
                                                transitive=setting.transitive)[0].to(torch.float64)
        return quality * measure, measure
    if setting.diversity == "dqo":
        measure = reference.logdet_diversity(emb[None], eps=setting.eps, return_gains=True)[1][0]
    else:
        measure = reference.deviation(emb[None])[0]
    measure = measure.to(torch.float64)
    return quality + setting.alpha * measure, measure


def expected_rows(quality: torch.Tensor, emb: torch.Tensor, uids: list[str], setting: dk_verl.VerlDiversitySettings
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    rewards, measure = torch.empty(len(uids), dtype=torch.float64), torch.empty(len(uids), dtype=torch.float64)
    for uid in dict.fromkeys(uids):
        rows = torch.tensor([index for index, key in enumerate(uids) if key == uid])
        rewards[rows], measure[rows] = expected_group(quality[rows], emb[rows], setting)
    return rewards, measure


# ------------------------------------------------------------------ the group scoring


@pytest.mark.parametrize("diversity", ["darling", "dqo", "deviation"])
def test_score_groups_equals_the_reference_per_group(diversity: str, generator: torch.Generator) -> None:
    """Ragged groups (1 to 7 members, one singleton) interleaved in random order; duplicated responses
    give singular kernel matrices and shared partition classes, and one group is all duplicates."""
    sizes = [3, 7, 1, 2, 5]
    uids = [f"u{group}" for group, size in enumerate(sizes) for _ in range(size)]
    order = torch.randperm(len(uids), generator=generator).tolist()
    uids = [uids[index] for index in order]
    emb = torch.randn(len(uids), 16, generator=generator)
    emb[1] = emb[0]  # an exact duplicate (same group or not, depending on the shuffle)
    group_one = [index for index, uid in enumerate(uids) if uid == "u1"]
    emb[group_one[:3]] = emb[group_one[0]].clone()  # a class of three in the 7-member group
    collapsed = [index for index, uid in enumerate(uids) if uid == "u4"]
    emb[collapsed] = emb[collapsed[0]].clone()  # one class: DARLING's floor
    quality = torch.rand(len(uids), generator=generator, dtype=torch.float64)
    setting = settings(diversity=diversity, tau=0.8)
    rewards, measure = dk_verl.score_groups(quality, emb, uids, setting)
    want_rewards, want_measure = expected_rows(quality, emb, uids, setting)
    torch.testing.assert_close(measure, want_measure, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rewards, want_rewards, rtol=1e-5, atol=1e-6)
    singleton = uids.index("u2")
    assert rewards[singleton] == quality[singleton]


@pytest.mark.parametrize(("estimator", "k"), [("pkpo", 2), ("passk_analytic", 3), ("best_minus_second", None)])
def test_score_groups_turns_shaped_rewards_into_passk_advantages(estimator: str, k: int | None,
                                                                 generator: torch.Generator) -> None:
    """``estimator``: each ragged group's shaped rewards become their pass@k advantage (the subset
    enumeration of tests/oracle.py; a group smaller than k uses k = n); a singleton keeps its reward."""
    sizes = [3, 5, 1, 2]
    uids = [f"u{group}" for group, size in enumerate(sizes) for _ in range(size)]
    order = torch.randperm(len(uids), generator=generator).tolist()
    uids = [uids[index] for index in order]
    emb = torch.randn(len(uids), 16, generator=generator)
    quality = (torch.rand(len(uids), generator=generator) < 0.5).double()
    plain, _ = dk_verl.score_groups(quality, emb, uids, settings(diversity="deviation"))
    rewards, _ = dk_verl.score_groups(quality, emb, uids, settings(diversity="deviation", estimator=estimator, k=k))
    for uid, size in zip(dict.fromkeys(f"u{group}" for group in range(len(sizes))), sizes, strict=True):
        rows = [index for index, key in enumerate(uids) if key == uid]
        if size == 1:
            assert rewards[rows[0]] == plain[rows[0]]
            continue
        want = oracle.passk_group(plain[rows].tolist(), estimator, k or size)
        torch.testing.assert_close(rewards[rows], torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="needs k"):
        settings(estimator="pkpo")


def test_score_groups_rejects_bad_input() -> None:
    setting = settings()
    with pytest.raises(ValueError, match="one row per response"):
        dk_verl.score_groups(torch.ones(3), torch.ones(2, 4), ["a", "a", "a"], setting)
    emb = torch.ones(2, 4)
    emb[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        dk_verl.score_groups(torch.ones(2), emb, ["a", "a"], setting)


def test_settings_from_verl_config() -> None:
    from omegaconf import OmegaConf

    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"n": 6}},
                               "reward": {"reward_kwargs": {"divkernels": {"diversity": "dqo", "alpha": 0.5}}}})
    setting = dk_verl.VerlDiversitySettings.from_verl_config(config)
    assert (setting.diversity, setting.alpha, setting.group_size) == ("dqo", 0.5, 6)
    config.reward.reward_kwargs.divkernels.tua = 0.8
    with pytest.raises(ValueError, match=r"unknown reward.reward_kwargs.divkernels keys \['tua'\]"):
        dk_verl.VerlDiversitySettings.from_verl_config(config)
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"n": 1}}, "reward": {}})
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        dk_verl.VerlDiversitySettings.from_verl_config(config)
    with pytest.raises(ValueError, match="diversity='vendi' is not valid"):
        settings(diversity="vendi")
    with pytest.raises(ValueError, match="encoder='minilm2' is not valid"):
        dk_verl.build_encoder("minilm2")
    assert isinstance(dk_verl.build_encoder("divkernels.integration.embeddings:HashedNgramEncoder"), HashedNgramEncoder)


# ------------------------------------------------------------------ the board


def test_board_scores_a_group_once_complete_in_any_order(generator: torch.Generator) -> None:
    setting = settings(diversity="deviation")
    board = dk_verl.GroupBoard(setting)
    emb = torch.randn(8, 6, generator=generator)
    quality = torch.rand(8, generator=generator, dtype=torch.float64)
    uids = ["a", "b"] * 4
    indices = []
    for row in [0, 1, 3, 2, 5, 4, 7]:
        indices.append(board.post(uids[row], None, float(quality[row]), emb[row].tolist()))
        assert board.result("a", 0) is None  # group a is still waiting for row 6
    assert board.result("b", 0) is not None  # b is complete
    indices.append(board.post("a", None, float(quality[6]), emb[6].tolist()))
    got = {}
    for row, index in zip([0, 1, 3, 2, 5, 4, 7, 6], indices, strict=True):
        got[row] = board.result(uids[row], index)
    for rows in ([0, 2, 4, 6], [1, 3, 5, 7]):  # the rows of a, of b
        want_rewards, want_measure = expected_group(quality[rows], emb[rows], setting)
        torch.testing.assert_close(torch.tensor([got[row][0] for row in rows], dtype=torch.float64), want_rewards)
        torch.testing.assert_close(torch.tensor([got[row][1] for row in rows], dtype=torch.float64), want_measure)
    assert board.result("a", 0) == got[0]  # read again (a retried call): the same answer
    with pytest.raises(ValueError, match="is not on the board"):
        board.result("c", 0)
    with pytest.raises(ValueError, match="got a response after it was scored"):
        board.post("a", None, 1.0, emb[0].tolist())


def test_board_with_a_judge_scores_as_the_authors(generator: torch.Generator) -> None:
    """With a judge the workers post texts and the board links each complete group as DARLING's reward
    does (shortcut, P(similar) > threshold, union-find, 0.1 floor), times the quality."""
    from test_judge import oracle_judge, oracle_rewards
    from verl_scores import word_overlap_judge

    texts = ["we add the two numbers and get five as the answer", "adding the two numbers we get five as answer",
             "the product of the numbers is six which is the answer here", "5", "five",
             "an unrelated long text about something else entirely here"]
    judge = {"kind": "callable", "target": "verl_scores:word_overlap_judge"}
    for threshold in (0.3, 0.6):
        board = dk_verl.GroupBoard(settings(group_size=len(texts), judge=judge, judge_threshold=threshold))
        quality = torch.rand(len(texts), generator=generator, dtype=torch.float64)
        indices = [board.post("g", None, float(q), text) for q, text in zip(quality, texts, strict=True)]
        got = [board.result("g", index) for index in indices]

        def probability(text: str) -> float:
            first, _, second = text.partition(" [SEP] ")
            return word_overlap_judge([(first.split(" ", 1)[1], second.removesuffix(" [SEP]"))])[0]

        same = oracle_judge(texts, probability, threshold, "[CLS]", "[SEP]", 4096)
        want = oracle_rewards(texts, same)
        assert [measure for _, measure in got] == pytest.approx(want, abs=1e-6)
        assert [reward for reward, _ in got] == pytest.approx((quality * torch.tensor(want)).tolist(), abs=1e-6)
    same = dk_verl.GroupBoard(settings(group_size=3, judge=judge))  # one class: every member at the floor
    indices = [same.post("s", None, 1.0, texts[0]) for _ in range(3)]
    assert [same.result("s", index) for index in indices] == [(pytest.approx(0.1), pytest.approx(0.1))] * 3
    with pytest.raises(ValueError, match="a judge links responses for diversity='darling'"):
        settings(diversity="dqo", judge=judge)
    with pytest.raises(ValueError, match="preset must be one of"):
        settings(judge=judge, judge_preset="math")


def test_board_retries_overfill_and_timeouts(generator: torch.Generator) -> None:
    board = dk_verl.GroupBoard(settings(group_size=3))
    emb = torch.randn(4, 6, generator=generator).tolist()
    assert board.post("g", 0, 1.0, emb[0]) == 0
    assert board.post("g", 0, 1.0, emb[0]) == 0  # a retried call of session 0 is the same member
    assert board.post("g", 1, 0.5, emb[1]) == 1
    assert board.post("g", 2, 0.0, emb[2]) == 2  # complete: scored
    assert board.post("g", 1, 0.5, emb[1]) == 1  # a retry after scoring still finds its member
    with pytest.raises(ValueError, match="more than group_size=3 responses share this uid"):
        board.post("g", 3, 1.0, emb[3])
    board.post("h", None, 1.0, emb[0])
    board.post("h", None, 1.0, emb[3])
    board.close("h")  # timed out with 2 of 3: scored on those
    partial = [board.result("h", index) for index in range(2)]
    want, _ = expected_group(torch.tensor([1.0, 1.0]), torch.tensor([emb[0], emb[3]]), board.settings)
    assert [reward for reward, _ in partial] == pytest.approx(want.tolist())


def test_board_client_waits_for_the_group_and_times_out(monkeypatch: pytest.MonkeyPatch,
                                                        generator: torch.Generator) -> None:
    """Without Ray the board lives in the process; concurrent members of one group wait for each other,
    and a lone member gets its quality back after the timeout (a group of one has no diversity)."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    setting = settings(group_timeout_s=0.2, tau=0.95)
    client = dk_verl.BoardClient(setting)
    emb = torch.randn(4, 6, generator=generator)
    emb[1] = emb[0]

    async def main():
        group = asyncio.gather(*[client.score("w", None, 1.0, emb[row].tolist()) for row in range(4)])
        alone = client.score("lonely", None, 0.7, emb[0].tolist())
        return await group, await alone

    group, alone = asyncio.run(main())
    want, _ = expected_group(torch.ones(4), emb, setting)
    assert [reward for reward, _ in group] == pytest.approx(want.tolist())
    assert alone == (pytest.approx(0.7), 1.0)


# ------------------------------------------------------------------ verl end to end


def test_example_config_composes_with_verl() -> None:
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        config = compose(config_name="verl_grpo_darling")
    assert resolve_reward_manager_cls(config) is dk_verl.DiversityRewardManager
    setting = dk_verl.VerlDiversitySettings.from_verl_config(config)
    assert (setting.diversity, setting.group_size, setting.min_diversity, setting.tau) == ("darling", 8, 0.1, 0.9)
    assert config.algorithm.adv_estimator == "grpo" and config.algorithm.norm_adv_by_std_in_grpo is False


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def verl_config(tmp_path: Path, diversity: str, group_size: int):
    from hydra import compose, initialize_config_dir

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    ours = "reward.reward_kwargs.divkernels"
    overrides = [f"{ours}.diversity={diversity}", f"{ours}.encoder=ngram", f"{ours}.tau=0.8",
                 f"+{ours}.poll_interval_s=0.01", f"{ours}.group_timeout_s=60", "reward.num_workers=2",
                 f"actor_rollout_ref.rollout.n={group_size}", f"actor_rollout_ref.model.path={tmp_path / 'tokenizer'}",
                 f"reward.custom_reward_function.path={SCORES}",
                 f"algorithm.norm_adv_by_std_in_grpo={diversity != 'darling'}"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="verl_grpo_darling", overrides=overrides), tokenizer


def verl_batch(tokenizer, generator: torch.Generator, groups: int, group_size: int, sessions: bool):
    """A verl reward batch: ``groups`` prompts x ``group_size`` answers (duplicates likely), rows
    shuffled so that every group is split across the reward workers' chunks."""
    from tensordict import TensorDict
    from verl import DataProto

    rows = []
    for group in range(groups):
        target = 6 + group
        for session in range(group_size):
            answer = ANSWERS[int(torch.randint(len(ANSWERS), (1,), generator=generator))]
            rows.append((f"uid{group}", session, prompt_for(target), answer))
    rows = [rows[index] for index in torch.randperm(len(rows), generator=generator).tolist()]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_width, response_width = 4, 5  # padded: the response mask has trailing zeros
    prompts = torch.tensor([[0] * (prompt_width - len(encode(row[2]))) + encode(row[2]) for row in rows])
    responses = torch.tensor([encode(row[3]) + [0] * (response_width - len(encode(row[3]))) for row in rows])
    response_mask = (torch.arange(response_width)[None] < torch.tensor([len(encode(row[3])) for row in rows])[:, None])
    attention_mask = torch.cat([torch.ones_like(prompts), response_mask.long()], dim=1)
    non_tensor = {"uid": np.array([row[0] for row in rows], dtype=object),
                  "data_source": np.array(["divkernels_demo"] * len(rows), dtype=object),
                  "reward_model": np.array([{"ground_truth": row[2]} for row in rows], dtype=object)}
    if sessions:
        non_tensor["session_id"] = np.array([row[1] for row in rows], dtype=object)
    batch = TensorDict({"prompts": prompts, "responses": responses, "attention_mask": attention_mask,
                        "response_mask": response_mask.long()}, batch_size=len(rows))
    quality = torch.tensor([float(is_correct(row[2], row[3])) for row in rows], dtype=torch.float64)
    emb = HashedNgramEncoder()([row[3] for row in rows])
    return DataProto(batch=batch, non_tensor_batch=non_tensor), quality, emb, [row[0] for row in rows], rows


def verl_advantages(data, rm_scores: torch.Tensor, config, rows) -> torch.Tensor:
    """verl 0.9's trainer path: rm_scores -> token_level_rewards -> the v1 GRPO advantage code."""
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    data.batch["token_level_scores"] = rm_scores
    data.batch["token_level_rewards"] = rm_scores
    keys = [f"{uid}_{session}_0" for uid, session, _, _ in rows]
    out = compute_advantage_for_multi_trajectories(
        data, batch_keys=keys, adv_estimator=config.algorithm.adv_estimator, gamma=1.0, lam=1.0,
        num_repeat=config.actor_rollout_ref.rollout.n, norm_adv_by_std_in_grpo=config.algorithm.norm_adv_by_std_in_grpo,
        config=config.algorithm)
    return out.batch["advantages"][:, 0]


def reference_advantages(quality, emb, uids, setting, scale: str) -> torch.Tensor:
    groups = list(dict.fromkeys(uids))
    rows = torch.tensor([[index for index, uid in enumerate(uids) if uid == group] for group in groups])
    packed = reference.group_advantages(quality[rows].to(torch.float32), emb[rows], diversity=setting.diversity,
                                        alpha=setting.alpha, tau=setting.tau, eps=setting.eps, scale=scale)
    flat = torch.empty(len(uids), dtype=packed.dtype)
    for group, members in enumerate(rows.tolist()):
        flat[members] = packed[group]
    return flat


@pytest.mark.slow
def test_reward_loop_manager_batch_path_darling(ray_cluster, tmp_path: Path, generator: torch.Generator) -> None:
    """verl's ``RewardLoopManager.compute_rm_score`` chunks the batch over 2 reward workers, so every
    shuffled group is scored on both; the board joins them. The rm_scores and verl's GRPO
    advantages (no std scaling, DARLING's setting) equal the reference."""
    from verl.experimental.reward_loop import RewardLoopManager

    config, tokenizer = verl_config(tmp_path, "darling", group_size=4)
    data, quality, emb, uids, rows = verl_batch(tokenizer, generator, groups=3, group_size=4, sessions=False)
    output = RewardLoopManager(config).compute_rm_score(data)
    setting = dk_verl.VerlDiversitySettings.from_verl_config(config)
    want_rewards, want_measure = expected_rows(quality, emb, uids, setting)
    rm_scores = output.batch["rm_scores"]
    lengths = data.batch["response_mask"].sum(-1)
    assert torch.equal(rm_scores.ne(0).sum(-1) <= 1, torch.ones(len(rows), dtype=torch.bool))
    torch.testing.assert_close(rm_scores[torch.arange(len(rows)), lengths - 1].double(), want_rewards,
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(output.non_tensor_batch["diversity"], dtype=torch.float64), want_measure,
                               rtol=1e-6, atol=1e-7)
    assert output.non_tensor_batch["quality"].tolist() == quality.tolist()
    advantages = verl_advantages(data, rm_scores, config, rows)
    torch.testing.assert_close(advantages, reference_advantages(quality, emb, uids, setting, "none"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("diversity", ["dqo", "deviation"])
def test_reward_workers_streaming_path(diversity: str, ray_cluster, tmp_path: Path, generator: torch.Generator
                                       ) -> None:
    """The agent loop's path: each response alone to a random reward worker (``compute_score.remote``),
    with its ``session_id``; one response is sent twice (a retried call). Rewards equal the reference,
    and verl's std-normalized GRPO divides the reference's centered rewards by the group std + 1e-6
    (verl's epsilon; divkernels and TRL add 1e-4)."""
    from verl.experimental.reward_loop import RewardLoopManager

    config, tokenizer = verl_config(tmp_path, diversity, group_size=5)
    data, quality, emb, uids, rows = verl_batch(tokenizer, generator, groups=2, group_size=5, sessions=True)
    workers = RewardLoopManager(config).reward_loop_workers
    picker = random.Random(int(torch.randint(2**31, (1,), generator=generator)))
    picks = picker.choices(range(len(workers)), k=len(rows))
    calls = [workers[pick].compute_score.remote(data[index:index + 1]) for index, pick in enumerate(picks)]
    calls.append(workers[0].compute_score.remote(data[0:1]))  # a retry of row 0: the same member
    outputs = ray.get(calls)
    setting = dk_verl.VerlDiversitySettings.from_verl_config(config)
    want_rewards, _ = expected_rows(quality, emb, uids, setting)
    got = torch.tensor([output["reward_score"] for output in outputs[:-1]], dtype=torch.float64)
    torch.testing.assert_close(got, want_rewards, rtol=1e-6, atol=1e-7)
    assert outputs[-1]["reward_score"] == outputs[0]["reward_score"]
    lengths = data.batch["response_mask"].sum(-1)
    rm_scores = torch.zeros(data.batch["responses"].shape)
    rm_scores[torch.arange(len(rows)), lengths - 1] = got.float()
    advantages = verl_advantages(data, rm_scores, config, rows)
    centered = reference_advantages(quality, emb, uids, setting, "none")
    std = torch.tensor([centered[[key == uid for key in uids]].std().item() for uid in uids])
    torch.testing.assert_close(advantages, centered / (std + VERL_GRPO_EPS), rtol=1e-5, atol=1e-5)


def test_missing_uid_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      generator: torch.Generator) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    from verl.trainer.ppo.reward import load_reward_manager

    config, tokenizer = verl_config(tmp_path, "darling", group_size=4)
    manager = load_reward_manager(config, tokenizer)
    data, *_ = verl_batch(tokenizer, generator, groups=1, group_size=4, sessions=False)
    data.non_tensor_batch.pop("uid")
    with pytest.raises(ValueError, match="has no 'uid'"):
        manager.loop.run_until_complete(manager.run_single(data[0:1]))



def test_hashed_ngram_encoder() -> None:
    emb = HashedNgramEncoder(n=3, dim=4096)(["1 2 3", "1 2 3", "abcdef", "", "ab"])
    assert emb.shape == (5, 4096) and emb.dtype == torch.float32
    assert torch.dot(emb[0], emb[1]).item() == pytest.approx(1.0)
    assert torch.dot(emb[0], emb[2]).item() == pytest.approx(0.0)  # no shared 3-gram (4096 buckets: no collision)
    assert emb[3].abs().sum() == 0 and emb[4].norm().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n and dim must be >= 1"):
        HashedNgramEncoder(n=0)
