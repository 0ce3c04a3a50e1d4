"""DARLING's learned partition: a judge's links -> partition diversity on every backend, the judge
interface (in-process classifier, served classifier, any callable) and the authors' algorithm.

The oracle below is written from the authors' code (facebookresearch/darling
``verl/verl/utils/reward_score/partition_reward_vllm_serve.py``: ``maybe_test_equality``,
``build_input_ids(..., tokenize=False)``, ``equivalence_check``, ``process_uid_partition``'s
union-find and ``partition``'s rewards), not from divkernels."""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import divkernels as dk
from divkernels.integration import judge as judging
from divkernels.integration import judge_training

# ------------------------------------------------------------------ the authors' algorithm, transcribed


def oracle_shortcut(r0: str, r1: str) -> bool | None:
    u0, u1 = r0.strip().lower().split(), r1.strip().lower().split()
    max_len = max(len(u0), len(u1))
    if max_len <= 5:
        return len(set(u0) & set(u1)) * 2 >= max_len
    return None


def oracle_input(s1: str, s2: str, cls: str, sep: str, max_len: int) -> str:
    half = (max_len - 3) // 2
    ids1 = s1.split()[:half]
    ids2 = s2.split()[:half]
    return cls + " " + " ".join(ids1) + " " + sep + " " + " ".join(ids2) + " " + sep


def oracle_rewards(responses: list[str], same: dict[tuple[int, int], bool], floor: float = 0.1) -> list[float]:
    """Union-find over the pairs judged the same, then ``max(distinct / (n - 1), floor)``."""
    n = len(responses)
    parent = list(range(n))

    def find(x: int) -> int:
        if parent[x] != x:
            parent[x] = find(parent[x])
        return parent[x]

    for (i, j), linked in same.items():
        if linked:
            pa, pb = find(i), find(j)
            if pa != pb:
                parent[pa] = pb
    groups: dict[int, list[int]] = {}
    for k in range(n):
        groups.setdefault(find(k), []).append(k)
    rewards = [0.0] * n
    for members in groups.values():
        for k in members:
            rewards[k] = (n - len(members)) / (n - 1)
    return [max(r, floor) for r in rewards]


def oracle_judge(responses: list[str], probability, threshold: float, cls: str, sep: str,
                 max_len: int) -> dict[tuple[int, int], bool]:
    """``equivalence_check`` for every pair i < j: the shortcut, else P(similar) > threshold."""
    same = {}
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            eq = oracle_shortcut(responses[i], responses[j])
            if eq is None:
                eq = probability(oracle_input(responses[i], responses[j], cls, sep, max_len)) > threshold
            same[i, j] = eq
    return same


# ------------------------------------------------------------------ partition diversity from links


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("group", [2, 5, 12])
def test_partition_from_links_equals_union_find(backend: str, group: int, generator: torch.Generator,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Random links (the lower triangle random too: it must not be read) on every backend equal the
    authors' union-find rewards with the 0.1 floor; also the floor 0 and direct links only (ours)."""
    from helpers import use_backend

    use_backend(backend, torch.device("cpu"), monkeypatch)
    for density in (0.1, 0.3, 0.7):
        links = torch.rand(6, group, group, generator=generator) < density
        got = dk.partition_diversity(equivalence=links, backend=backend)
        for b in range(6):
            same = {(i, j): bool(links[b, i, j]) for i, j in itertools.combinations(range(group), 2)}
            want = oracle_rewards([""] * group, same)
            assert got[b].tolist() == pytest.approx(want, abs=1e-6), (b, links[b])
        unfloored = dk.partition_diversity(equivalence=links, min_diversity=0.0, backend=backend)
        assert (unfloored >= 0).all() and (unfloored <= got).all()
        direct = dk.partition_diversity(equivalence=links, transitive=False, min_diversity=0.0, backend=backend)
        upper = torch.ones(group, group, dtype=torch.bool).triu(1)
        symmetric = (links & upper) | (links & upper).mT
        want_direct = (~symmetric & ~torch.eye(group, dtype=torch.bool)).sum(-1) / (group - 1)
        torch.testing.assert_close(direct, want_direct.float())


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_partition_from_links_with_padding(backend: str, generator: torch.Generator,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded responses are in no class and count in no n; their rows and columns are not read."""
    from helpers import use_backend

    use_backend(backend, torch.device("cpu"), monkeypatch)
    links = torch.rand(4, 7, 7, generator=generator) < 0.4
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 0] = False
    got = dk.partition_diversity(equivalence=links, mask=mask, backend=backend)
    for b in range(4):
        rows = mask[b].nonzero().flatten().tolist()
        same = {(p, q): bool(links[b, rows[p], rows[q]]) for p, q in itertools.combinations(range(len(rows)), 2)}
        assert got[b, rows].tolist() == pytest.approx(oracle_rewards([""] * len(rows), same), abs=1e-6)
        assert (got[b, ~mask[b]] == 0).all()


def test_advantages_take_a_judges_links(generator: torch.Generator) -> None:
    """DARLING's advantage from a judge: ``r * div - mean`` (no std), every backend alike."""
    links = torch.rand(3, 6, 6, generator=generator) < 0.4
    rewards = torch.rand(3, 6, generator=generator)
    div = dk.partition_diversity(equivalence=links, backend="reference")
    shaped = rewards * div
    want = shaped - shaped.mean(-1, keepdim=True)
    for backend in ("reference", "triton"):
        got = dk.group_advantages(rewards, diversity="darling", equivalence=links, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_group_loss_weighs_pairs_by_a_judges_partition(backend: str, generator: torch.Generator,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``diversity="partition"``: the chosen weight is the partition diversity of the links normalized to
    mean 1 (ours), the same loss and gradient as those weights given, on every backend."""
    from helpers import use_backend

    use_backend(backend, torch.device("cpu"), monkeypatch)
    policy = -torch.rand(3, 6, generator=generator, dtype=torch.float64) * 3
    rewards = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    links = torch.rand(3, 6, 6, generator=generator) < 0.3
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    div = dk.partition_diversity(equivalence=links, mask=mask, backend="reference").double()
    mean = div.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    weights = torch.where(mask, div / mean, 0.0)
    for loss in ("dpo", "orpo"):
        got_policy = policy.clone().requires_grad_(True)
        got = dk.group_preference_loss(got_policy, rewards, mask=mask, loss=loss, diversity="partition",
                                       equivalence=links, backend=backend)
        got.loss.backward()
        want_policy = policy.clone().requires_grad_(True)
        want = dk.group_preference_loss(want_policy, rewards, mask=mask, loss=loss, weights=weights,
                                        backend="reference")
        want.loss.backward()
        # the kernels' weights are float32: div (a ratio of counts) and its mean over <= G values each
        # round, so a weight is within (G + 2) ulps of float32; the loss and gradient are linear in them
        rtol = (6 + 2) * 2.0**-24
        torch.testing.assert_close(got.loss, want.loss, rtol=rtol, atol=rtol * want.loss.abs().item())
        torch.testing.assert_close(got_policy.grad, want_policy.grad, rtol=rtol,
                                   atol=rtol * want_policy.grad.abs().max().item())


def test_links_are_checked() -> None:
    links = torch.zeros(2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly one of emb"):
        dk.partition_diversity(torch.randn(2, 3, 4), equivalence=links)
    with pytest.raises(TypeError, match="equivalence must have dtype torch.bool"):
        dk.partition_diversity(equivalence=links.float())
    with pytest.raises(ValueError, match=r"equivalence must have shape \[B, G, G\]"):
        dk.partition_diversity(equivalence=torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="only used with diversity='darling'"):
        dk.group_advantages(torch.rand(2, 3), diversity="dqo", equivalence=links)
    with pytest.raises(ValueError, match=r"equivalence has \[B, G\]"):
        dk.group_advantages(torch.rand(2, 4), diversity="darling", equivalence=links)
    with pytest.raises(ValueError, match="it needs equivalence"):
        dk.group_preference_loss(torch.rand(2, 3), torch.rand(2, 3), diversity="partition")
    with pytest.raises(ValueError, match="it needs equivalence"):
        dk.group_preference_loss(torch.rand(2, 3), torch.rand(2, 3), equivalence=links)


# ------------------------------------------------------------------ the judge


def test_shortcut_and_input_string_match_the_authors() -> None:
    texts = ["", "  ", "42", "The answer is 42", "the ANSWER is 42.", "x = 3 so 2x = 6", "a b c d e",
             "a b c d e f", "A a a", "one two three four five six seven eight"]
    for first, second in itertools.product(texts, repeat=2):
        assert judging.short_answer_equivalence(first, second) == oracle_shortcut(first, second), (first, second)
        for max_len in (7, 11, 4096):
            assert judging.pair_input(first, second, "[CLS]", "[SEP]", max_len) == oracle_input(
                first, second, "[CLS]", "[SEP]", max_len)
    assert judging.short_answer_equivalence("", "") is True
    assert judging.group_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert judging.PRESETS["darling-math"] == judging.JudgePreset(0.5, 4096, "Qwen/Qwen3-Embedding-4B")
    assert judging.PRESETS["darling-wildchat"] == judging.JudgePreset(0.32, 2048, "answerdotai/ModernBERT-base")


LONG = ["the first step adds two and two to get four then doubles it",
        "we add two and two which gives four and doubling that gives eight",
        "a completely different route through modular arithmetic reaches eight",
        "eight", "Eight", "the answer is nine because of a mistake in step two of the proof"]


def fixed_probability(text: str) -> float:
    """A deterministic stand-in classifier: the share of words the two halves share."""
    first, _, second = text.partition("[SEP]")
    a, b = set(first.split()[1:]), set(second.split()[:-1])
    return len(a & b) / max(len(a | b), 1)


def test_judge_groups_follow_the_authors(generator: torch.Generator) -> None:
    """``judge_groups`` + partition diversity equal the oracle: shortcut, strict threshold, union-find."""
    def judge(pairs):
        return [fixed_probability(judging.pair_input(a, b, "[CLS]", "[SEP]", 4096)) for a, b in pairs]

    groups = [LONG, LONG[::-1], [LONG[0], LONG[0], LONG[3], LONG[4], LONG[5], LONG[2]]]
    probabilities = sorted({fixed_probability(oracle_input(a, b, "[CLS]", "[SEP]", 4096))
                            for a, b in itertools.combinations(LONG, 2)})
    for threshold in [probabilities[len(probabilities) // 2], probabilities[0], 0.0]:  # strict: equal is not linked
        links, mask, calls = judging.judge_groups(judge, groups, threshold=threshold)
        got = dk.partition_diversity(equivalence=links, mask=mask, backend="reference")
        for b, group in enumerate(groups):
            same = oracle_judge(group, fixed_probability, threshold, "[CLS]", "[SEP]", 4096)
            assert got[b].tolist() == pytest.approx(oracle_rewards(group, same), abs=1e-6)
        assert calls.pairs == 3 * 15 and calls.shortcut == 1 + 1 + 1 and calls.judged == calls.pairs - 3
    links, _, calls = judging.judge_groups(judge, groups, shortcut=False)
    assert calls.shortcut == 0 and calls.judged == 45
    with pytest.raises(ValueError, match="returned 1 probabilities for 12 pairs"):
        judging.judge_groups(lambda pairs: [0.5], [[*LONG[:5], "x"]])


@pytest.fixture(scope="module")
def tiny_classifier():
    """A 2-label BERT classifier built from a config (seeded, untrained) with the bundled MiniLM
    tokenizer: no download."""
    pytest.importorskip("transformers")
    from divkernels.integration.judge_training import tiny_classifier

    model, tokenizer = tiny_classifier(0)
    return model.eval(), tokenizer


def oracle_model_probability(model, tokenizer, max_len: int):
    """P(similar) of one input string, one forward each: the string's tokens (no added special tokens;
    it holds them), token types 0 through the first [SEP] and 1 after, softmax's last label."""
    def probability(text: str) -> float:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
        first_sep = ids.index(tokenizer.sep_token_id)
        types = [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
        return torch.softmax(logits, -1)[0, -1].item()
    return probability


def test_in_process_judge_equals_the_oracle(tiny_classifier) -> None:
    model, tokenizer = tiny_classifier
    judge = judging.HFPairJudge(model, tokenizer, max_len=41, batch_size=4)  # 19 words per response
    groups = [LONG, LONG[1:] + LONG[:1]]
    probability = oracle_model_probability(model, tokenizer, 41)
    pairs = [(a, b) for a, b in itertools.combinations(LONG, 2)]
    want = [probability(oracle_input(a, b, "[CLS]", "[SEP]", 41)) for a, b in pairs]
    assert judge(pairs) == pytest.approx(want, abs=1e-5)  # batched and padded vs one at a time
    ordered = sorted(want)
    gaps = [(high - low, (high + low) / 2) for low, high in itertools.pairwise(ordered)]
    threshold = max(gaps)[1]  # midway in the widest gap: no probability near it
    links, mask, _ = judging.judge_groups(judge, groups, threshold=threshold)
    for backend in ("reference", "triton"):
        got = dk.partition_diversity(equivalence=links, mask=mask, backend=backend)
        for b, group in enumerate(groups):
            same = oracle_judge(group, probability, threshold, "[CLS]", "[SEP]", 41)
            assert got[b].tolist() == pytest.approx(oracle_rewards(group, same), abs=1e-6)


# ------------------------------------------------------------------ the served judge


class ClassifyServer:
    """A loopback HTTP server that answers vLLM's ``POST /classify`` with ``probability(text)``;
    ``fail`` requests answer 500 first, ``delay`` seconds pass before each answer."""

    def __init__(self, probability, fail: int = 0, delay: float = 0.0) -> None:
        self.probability, self.fail, self.delay = probability, fail, delay
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                time.sleep(server.delay)
                if server.fail > 0 or self.path != "/classify":
                    server.fail -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                probs = [[1.0 - server.probability(text), server.probability(text)] for text in body["input"]]
                payload = json.dumps({"data": [{"index": k, "probs": p} for k, p in enumerate(probs)]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ClassifyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_served_judge_round_robin_equals_in_process() -> None:
    pairs = [(a, b) for a, b in itertools.combinations(LONG, 2)]
    local = [fixed_probability(judging.pair_input(a, b, "[CLS]", "[SEP]", 4096)) for a, b in pairs]
    with ClassifyServer(fixed_probability) as first, ClassifyServer(fixed_probability) as second:
        for per_request in (1, 4):
            first.requests = second.requests = 0
            judge = judging.ServedPairJudge([first.url, second.url], "judge", cls_token="[CLS]", sep_token="[SEP]",
                                            pairs_per_request=per_request, concurrency=4)
            assert judge(pairs) == pytest.approx(local, abs=1e-12)
            requests = -(-len(pairs) // per_request)
            assert first.requests + second.requests == requests
            assert abs(first.requests - second.requests) <= 1


def test_served_judge_retries_then_names_the_server() -> None:
    pairs = [(LONG[0], LONG[1])] * 3
    with ClassifyServer(fixed_probability, fail=2) as flaky:
        judge = judging.ServedPairJudge([flaky.url], "judge", cls_token="[CLS]", sep_token="[SEP]", retries=2,
                                        backoff=0.01, concurrency=1)
        assert len(judge(pairs)) == 3 and flaky.requests == 5  # two 500s, retried, then every pair answered
    with ClassifyServer(fixed_probability, fail=100) as broken:
        judge = judging.ServedPairJudge([broken.url], "judge", cls_token="[CLS]", sep_token="[SEP]", retries=1,
                                        backoff=0.01)
        with pytest.raises(judging.JudgeServerError, match=f"{broken.url}/classify failed 2 times"):
            judge(pairs[:1])
    with ClassifyServer(fixed_probability, delay=0.5) as slow:
        judge = judging.ServedPairJudge([slow.url], "judge", cls_token="[CLS]", sep_token="[SEP]", timeout=0.1,
                                        retries=1, backoff=0.01)
        with pytest.raises(judging.JudgeServerError, match="timed out"):
            judge(pairs[:1])
    with ClassifyServer(fixed_probability) as closed:
        url = closed.url
    judge = judging.ServedPairJudge([url], "judge", cls_token="[CLS]", sep_token="[SEP]", retries=0)
    with pytest.raises(judging.JudgeServerError, match=f"{url}/classify failed 1 times"):
        judge(pairs[:1])


# ------------------------------------------------------------------ training and the TRL reward


def test_learning_rate_is_the_authors() -> None:
    """``get_lr`` of the authors' finetune_classifier.py, transcribed: warm-up, cosine, floor."""
    config = judge_training.JudgeTrainingConfig()

    def get_lr(t: int) -> float:
        if t <= 10:
            return (t / 10) * 2e-5
        elif t >= 80:
            return 2e-6
        return (2e-5 - 2e-6) / 2 * math.cos((t - 10) * math.pi / (80 - 10)) + (2e-6 + 2e-5) / 2

    for step in range(0, 100):
        assert config.learning_rate(step) == pytest.approx(get_lr(step), rel=1e-12, abs=1e-20)
    assert (config.steps, config.grad_accumulation, config.batch_size) == (80, 64, 1)


def digit_pairs(count: int, seed: int) -> list[dict[str, object]]:
    """Labelled pairs: the same digits reordered (similar) or other digits."""
    rng = random.Random(seed)
    rows = []
    for k in range(count):
        digits = [rng.choice("0123456789") for _ in range(3)]
        other = rng.sample(digits, 3) if k % 2 == 0 else [rng.choice("0123456789") for _ in range(3)]
        rows.append({"generation_0": " ".join(digits), "generation_1": " ".join(other),
                     "similar": int(sorted(digits) == sorted(other))})
    return rows


def family_pairs(count: int, seed: int) -> list[dict[str, object]]:
    """Labelled pairs: two lists of colours, or of number words, are similar; a colour list and a number
    list are not."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink"]
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rows = []
    for k in range(count):
        family, other = (colours, numbers) if k % 4 < 2 else (numbers, colours)
        second = family if k % 2 == 0 else other
        rows.append({"generation_0": " ".join(rng.choice(family) for _ in range(4)),
                     "generation_1": " ".join(rng.choice(second) for _ in range(4)), "similar": int(k % 2 == 0)})
    return rows


def test_training_recipe_learns_labelled_pairs() -> None:
    """The authors' recipe (both orders, class weights, warm-up + cosine) on the bundled MiniLM encoder:
    20 steps of 16 pairs separate the two families on new pairs."""
    pytest.importorskip("transformers")
    model, tokenizer = judge_training.bundled_classifier(0)
    rows = digit_pairs(64, 0)
    similar = sum(row["similar"] for row in rows)
    assert judge_training.class_weights(rows).tolist() == pytest.approx(
        [len(rows) / (len(rows) - similar), len(rows) / similar])
    assert len(judge_training.training_examples(rows)) == 2 * len(rows)
    config = judge_training.JudgeTrainingConfig(steps=20, warmup_steps=5, max_lr=1e-4, min_lr=1e-5, batch_size=16,
                                                grad_accumulation=1, max_len=64)
    losses = judge_training.train_judge(model, tokenizer, family_pairs(512, 0), config, log=None)
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.5, losses
    judge = judging.HFPairJudge(model, tokenizer, max_len=64)
    scores = judge_training.evaluate_judge(judge, family_pairs(128, 1))
    assert scores["accuracy"] > 0.9, scores


def test_train_command_saves_a_judge(tmp_path) -> None:
    pytest.importorskip("transformers")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(row) for row in digit_pairs(16, 2)))
    out = tmp_path / "judge"
    judging.main(["train", "--pairs", str(pairs), "--tiny", "--output", str(out), "--steps", "2",
                  "--grad-accumulation", "2", "--val", str(pairs)])
    judge = judging.build_judge({"kind": "hf", "path": str(out), "max_len": 64})
    probabilities = judge([("1 2 3", "3 2 1"), ("1 2 3", "4 5 6")])
    assert len(probabilities) == 2 and all(0.0 < p < 1.0 for p in probabilities)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"generation_0": "a", "similar": 1}))
    with pytest.raises(ValueError, match="bad.jsonl:1 lacks \\['generation_1'\\]"):
        judge_training.read_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit, match="usage"):
        judging.main(["fit"])


def test_darling_reward_with_a_judge() -> None:
    """TRL's reward-function call: the quality times the judged groups' partition diversity."""
    from divkernels.integration import DarlingReward

    def judge(pairs):
        return [fixed_probability(judging.pair_input(a, b, "[CLS]", "[SEP]", 4096)) for a, b in pairs]

    prompts = ["p1"] * 3 + ["p2"] * 3
    completions = [LONG[0], LONG[1], LONG[5], LONG[2], LONG[3], LONG[4]]
    quality = [1.0, 0.5, 0.25, 1.0, 1.0, 0.0]
    logged = {}
    reward = DarlingReward(lambda prompts, completions, **_: quality, num_generations=3, judge=judge, threshold=0.2,
                           backend="reference")
    got = reward(prompts, completions, log_metric=logged.__setitem__)
    want = []
    for start in (0, 3):
        group = completions[start:start + 3]
        want += oracle_rewards(group, oracle_judge(group, fixed_probability, 0.2, "[CLS]", "[SEP]", 4096))
    assert got == pytest.approx([q * w for q, w in zip(quality, want, strict=True)], abs=1e-6)
    assert logged["judge/calls_per_group"] == pytest.approx((3 + 2) / 2)  # "eight" / "Eight": the shortcut
    assert reward.threshold == 0.2 and DarlingReward(judge, num_generations=3, judge=judge).threshold == 0.5
    assert DarlingReward(judge, num_generations=3, judge=judge, preset="darling-wildchat").threshold == 0.32
