"""DARLING's learned equivalence judge: a pair classifier that says whether two responses are the same
answer, and the ``[B, G, G]`` links it gives :func:`divkernels.partition_diversity`.

As the authors compute it (Li et al. 2025, arXiv 2509.02534; facebookresearch/darling
``verl/verl/utils/reward_score/partition_reward_vllm_serve.py`` for math and
``partition_reward_vllm_serve_modernbert.py`` for open-ended writing):

* each pair ``i < j`` of a group is judged once, in that order;
* two responses of at most 5 whitespace words each skip the classifier: they are equivalent when
  ``2 |set(words_i) & set(words_j)| >= max(len)`` (lower-cased; two empty responses are);
* otherwise the classifier reads ``cls + " " + words_i + " " + sep + " " + words_j + " " + sep``, each
  response cut to its first ``(max_len - 3) // 2`` whitespace words, and returns the softmax
  probability of its last label ("similar"); the pair is equivalent when that is **strictly**
  greater than the threshold: 0.5 for the math judge (fine-tuned from ``Qwen/Qwen3-Embedding-4B``,
  ``max_len`` 4096), 0.32 for the writing judge (``answerdotai/ModernBERT-base``, 2048).

Judges (anything with ``judge(pairs) -> P(similar) per pair``):

* :class:`HFPairJudge`: an ``AutoModelForSequenceClassification`` and its tokenizer in this process,
  every pair of a step in a few padded forward passes;
* :class:`ServedPairJudge`: a client of classifiers served by vLLM (``vllm serve PATH --task
  classify``, ``POST /classify``), several servers round-robin, concurrent requests, a timeout and
  retries with backoff;
* any callable ``pairs -> probabilities``.

The trained judges' weights are not published; :mod:`divkernels.integration.judge_training` trains one
from labelled pairs with the authors' recipe.
"""

from __future__ import annotations

import importlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

Pair = tuple[str, str]
PairJudge = Callable[[Sequence[Pair]], Sequence[float]]
SHORT_ANSWER_WORDS = 5  # the authors' maybe_test_equality: both responses at most this many words


@dataclass(frozen=True)
class JudgePreset:
    """The authors' settings of one judge: equivalent when ``P(similar) > threshold``; each response
    keeps its first ``(max_len - 3) // 2`` words; ``base_model``: what they fine-tuned (for the
    training recipe; nothing is downloaded unless you ask for it)."""

    threshold: float
    max_len: int
    base_model: str


PRESETS = {
    "darling-math": JudgePreset(0.5, 4096, "Qwen/Qwen3-Embedding-4B"),
    "darling-wildchat": JudgePreset(0.32, 2048, "answerdotai/ModernBERT-base"),
}


def preset(name: str | JudgePreset) -> JudgePreset:
    """A preset by name (``"darling-math"``, ``"darling-wildchat"``), or the settings given."""
    if isinstance(name, JudgePreset):
        return name
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a JudgePreset, got {name!r}")
    return PRESETS[name]


def short_answer_equivalence(first: str, second: str) -> bool | None:
    """The authors' shortcut: None when either response has more than 5 whitespace words (the
    classifier decides), else whether ``2 |shared lower-cased words| >= max(word counts)``."""
    words_first, words_second = first.strip().lower().split(), second.strip().lower().split()
    longest = max(len(words_first), len(words_second))
    if longest > SHORT_ANSWER_WORDS:
        return None
    return 2 * len(set(words_first) & set(words_second)) >= longest


def pair_input(first: str, second: str, cls_token: str, sep_token: str, max_len: int) -> str:
    """The classifier's input string: ``cls w1 sep w2 sep``, each response cut to its first
    ``(max_len - 3) // 2`` whitespace words (the words keep their case)."""
    half = (max_len - 3) // 2
    words_first, words_second = first.split()[:half], second.split()[:half]
    return f"{cls_token} {' '.join(words_first)} {sep_token} {' '.join(words_second)} {sep_token}"


def group_pairs(size: int) -> list[tuple[int, int]]:
    """The pairs ``i < j`` of a group of ``size``, in the authors' order."""
    return [(i, j) for i in range(size) for j in range(i + 1, size)]


@dataclass
class JudgeCalls:
    """What one :func:`judge_groups` call cost: pairs in the groups, those the shortcut decided, and
    those sent to the judge."""

    pairs: int = 0
    shortcut: int = 0
    judged: int = 0


def judge_groups(judge: PairJudge, groups: Sequence[Sequence[str]], *, threshold: float = 0.5,
                 shortcut: bool = True) -> tuple[torch.Tensor, torch.Tensor, JudgeCalls]:
    """Judge every pair of every group: ``(equivalence [B, G, G] bool, mask [B, G] bool, calls)``.

    ``equivalence[b, i, j]`` (``i < j``; the rest False) says the judge links responses ``i`` and
    ``j`` of group ``b``; groups shorter than the longest are padded (``mask`` False). All pairs of
    all groups go to ``judge`` in one call, which batches them as it likes. ``shortcut=False``
    sends short responses to the judge too (ours)."""
    size = max((len(group) for group in groups), default=0)
    equivalence = torch.zeros(len(groups), size, size, dtype=torch.bool)
    mask = torch.zeros(len(groups), size, dtype=torch.bool)
    calls = JudgeCalls()
    asked: list[tuple[int, int, int]] = []
    texts: list[Pair] = []
    for b, group in enumerate(groups):
        mask[b, :len(group)] = True
        for i, j in group_pairs(len(group)):
            calls.pairs += 1
            decided = short_answer_equivalence(group[i], group[j]) if shortcut else None
            if decided is None:
                asked.append((b, i, j))
                texts.append((group[i], group[j]))
            else:
                calls.shortcut += 1
                equivalence[b, i, j] = decided
    if texts:
        probabilities = list(judge(texts))
        if len(probabilities) != len(texts):
            raise ValueError(f"the judge returned {len(probabilities)} probabilities for {len(texts)} pairs")
        for (b, i, j), probability in zip(asked, probabilities, strict=True):
            equivalence[b, i, j] = float(probability) > threshold
    calls.judged = len(texts)
    return equivalence, mask, calls


class HFPairJudge:
    """A Hugging Face sequence classifier (2 labels, the last "similar") run in this process.

    Every pair of a call goes through the model in batches of ``batch_size`` padded inputs, in
    ``pair_input``'s format tokenized without added special tokens (the string holds them), with
    ``token_type_ids`` 0 up to the first separator and 1 after when the tokenizer uses them, as the
    training recipe builds its inputs.

    Args:
        model: an ``AutoModelForSequenceClassification`` (or a path to load one from).
        tokenizer: its tokenizer (or a path); ``cls_token`` / ``sep_token`` default to the
            tokenizer's, else its BOS / EOS (the authors' Qwen judge used ``<|im_start|>`` /
            ``<|im_end|>``).
        max_len: the authors' MAX_LEN (each response keeps ``(max_len - 3) // 2`` words); inputs are
            cut to the model's own limit too.
        batch_size: pairs per forward pass.
        device: where the model runs (default: where it is).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_len: int = 4096, batch_size: int = 32,
                 device: torch.device | str | None = None, cls_token: str | None = None,
                 sep_token: str | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if isinstance(model, str):
            model = AutoModelForSequenceClassification.from_pretrained(model)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        if device is not None:
            self.model.to(device)
        self.cls_token = cls_token or tokenizer.cls_token or tokenizer.bos_token
        self.sep_token = sep_token or tokenizer.sep_token or tokenizer.eos_token
        if self.cls_token is None or self.sep_token is None:
            raise ValueError("the tokenizer has no cls/sep (or bos/eos) token: pass cls_token and sep_token")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.max_len, self.batch_size = max_len, batch_size

    def encode(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        """The model inputs of ``pairs`` (padded, on the model's device)."""
        texts = [pair_input(first, second, self.cls_token, self.sep_token, self.max_len) for first, second in pairs]
        limit = min(self.max_len, getattr(self.tokenizer, "model_max_length", self.max_len))
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, add_special_tokens=False,
                               return_tensors="pt")
        if "token_type_ids" in batch:
            sep_id = self.tokenizer.convert_tokens_to_ids(self.sep_token)
            after_first_sep = ((batch["input_ids"] == sep_id).long().cumsum(-1) - (batch["input_ids"] == sep_id).long())
            batch["token_type_ids"] = (after_first_sep > 0).long() * batch["attention_mask"]
        device = next(self.model.parameters()).device
        return {name: value.to(device) for name, value in batch.items()}

    @torch.no_grad()
    def __call__(self, pairs: Sequence[Pair]) -> list[float]:
        probabilities: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            logits = self.model(**self.encode(pairs[start:start + self.batch_size])).logits
            probabilities += torch.softmax(logits.float(), dim=-1)[:, -1].tolist()
        return probabilities


class JudgeServerError(RuntimeError):
    """A served classifier did not answer after every retry."""


class ServedPairJudge:
    """A client of pair classifiers served by vLLM's ``/classify`` (``vllm serve PATH --task classify``).

    Each request posts ``{"model": model, "input": [text, ...]}`` to ``URL/classify`` and reads
    ``data[k]["probs"][-1]``; pairs go round-robin over the servers, ``concurrency`` requests at a
    time. A failed request (connection refused, HTTP error, timeout, malformed answer) is retried
    ``retries`` times after ``backoff * 2^attempt`` seconds; then :class:`JudgeServerError` names
    the server and the last error.

    Args:
        urls: the servers' base URLs (``http://host:8000``).
        model: the served model name, one for all servers or one per server.
        cls_token, sep_token: the classifier's special tokens as text (e.g. ``"[CLS]"``, ``"[SEP]"``).
        max_len: the authors' MAX_LEN.
        pairs_per_request: pairs in one request's ``input`` list (1: the authors' one pair per request).
        concurrency: requests in flight.
        timeout: seconds per request.
        retries: tries after the first.
        backoff: seconds before the first retry (doubling).
    """

    def __init__(self, urls: Sequence[str], model: str | Sequence[str], *, cls_token: str, sep_token: str,
                 max_len: int = 4096, pairs_per_request: int = 1, concurrency: int = 16, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0) -> None:
        if not urls:
            raise ValueError("urls must name at least one server")
        models = [model] * len(urls) if isinstance(model, str) else list(model)
        if len(models) != len(urls):
            raise ValueError(f"model names {len(models)} models for {len(urls)} servers")
        if pairs_per_request < 1 or concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("pairs_per_request and concurrency must be >= 1, retries >= 0, timeout > 0, backoff >= 0")
        self.servers = [(url.rstrip("/"), name) for url, name in zip(urls, models, strict=True)]
        self.cls_token, self.sep_token, self.max_len = cls_token, sep_token, max_len
        self.pairs_per_request, self.concurrency = pairs_per_request, concurrency
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def _post(self, server: tuple[str, str], texts: list[str]) -> list[float]:
        url, name = server
        body = json.dumps({"model": name, "input": texts}).encode("utf-8")
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{url}/classify", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = json.loads(response.read())["data"]
                if len(data) != len(texts):
                    raise ValueError(f"{len(data)} results for {len(texts)} inputs")
                return [float(item["probs"][-1]) for item in data]
            except (OSError, ValueError, KeyError, TypeError, IndexError) as caught:  # URLError, timeouts: OSError
                error = caught
        raise JudgeServerError(f"the classifier at {url}/classify failed {self.retries + 1} times: {error!r}")

    def __call__(self, pairs: Sequence[Pair]) -> list[float]:
        texts = [pair_input(first, second, self.cls_token, self.sep_token, self.max_len) for first, second in pairs]
        chunks = [texts[start:start + self.pairs_per_request] for start in range(0, len(texts), self.pairs_per_request)]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._post, self.servers[k % len(self.servers)], chunk)
                       for k, chunk in enumerate(chunks)]
            return [probability for future in futures for probability in future.result()]


def build_judge(spec: Mapping[str, Any]) -> PairJudge:
    """A judge from a plain mapping (a config file's): ``{"kind": "served", "urls": [...], "model": NAME,
    "cls_token": ..., "sep_token": ..., ...}`` (:class:`ServedPairJudge`'s arguments), ``{"kind": "hf",
    "path": DIR, ...}`` (:class:`HFPairJudge`: model and tokenizer from ``path``) or ``{"kind":
    "callable", "target": "module:attr"}`` (a judge, or a class built with no arguments)."""
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind == "served":
        return ServedPairJudge(**options)
    if kind == "hf":
        path = options.pop("path")
        return HFPairJudge(path, options.pop("tokenizer", path), **options)
    if kind == "callable":
        module_name, _, attribute = str(options.pop("target", "")).partition(":")
        if not module_name or not attribute or options:
            raise ValueError(f"a callable judge is {{kind: callable, target: 'module:attr'}}, got {dict(spec)}")
        target = getattr(importlib.import_module(module_name), attribute)
        return target() if isinstance(target, type) else target
    raise ValueError(f"judge kind must be 'served', 'hf' or 'callable', got {kind!r}")


def main(argv: list[str] | None = None) -> None:
    """``python -m divkernels.integration.judge train ...``: :mod:`divkernels.integration.judge_training`."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        raise SystemExit("usage: python -m divkernels.integration.judge train --pairs FILE (--model M | --tiny) "
                         "--output DIR [...]  (train --help for every option)")
    from divkernels.integration.judge_training import main as train

    train(argv[1:])


if __name__ == "__main__":
    main()
