"""Hostile inputs, as a table: each case is one op call with one kind of bad or degenerate input, and the
outcome every backend must give: a right value (equal to the reference backend's on clean inputs, or
finite where the inputs are finite) or an error whose message names the argument. Never a silent NaN,
inf or wrong number. A new op or input class joins the table with one ``Case`` line.

Backends: the reference, Triton (under the interpreter on CPU) and the CUDA extension (its host build on
CPU); ``"any"`` cases do not depend on the backend (argument checks before dispatch, metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import use_backend

import divkernels as dk
from divkernels.backend import BackendUnavailableError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, G, D = 2, 4, 8


def groups(device: torch.device | str = DEVICE) -> dict[str, torch.Tensor]:
    """A small well-formed batch: emb, mask, policy / reference log-probs and rewards."""
    generator = torch.Generator().manual_seed(7)
    tensors = {"emb": torch.randn(B, G, D, generator=generator), "mask": torch.ones(B, G, dtype=torch.bool),
               "policy": -torch.rand(B, G, generator=generator), "rewards": torch.randn(B, G, generator=generator)}
    tensors["ref"] = tensors["policy"] - 0.1
    return {name: value.to(device) for name, value in tensors.items()}


def explicit_loss(pair_index: torch.Tensor, backend: str) -> torch.Tensor:
    x = groups()
    return dk.group_preference_loss(x["policy"], x["rewards"], x["emb"], x["ref"], x["mask"], pairs="explicit",
                                    pair_index=pair_index.to(DEVICE), diversity="deviation", diversity_alpha=0.5,
                                    backend=backend).loss


PAIRS = torch.tensor([[[0, 1], [2, 3]], [[1, 2], [3, 0]]])  # no (-1, -1) padding row: uint8 has no -1


def hidden_loss(backend: str, **change: object) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    arguments = {"hidden": torch.randn(1, 2, 3, 4, generator=generator),
                 "weight": torch.randn(5, 4, generator=generator),
                 "targets": torch.randint(0, 5, (1, 2, 3), generator=generator),
                 "mask": torch.ones(1, 2, 3, dtype=torch.bool), "rewards": torch.randn(1, 2, generator=generator)}
    arguments.update(change)
    return dk.group_preference_loss_from_hidden(loss="orpo", backend=backend, **arguments).loss


def meta_call(op: str, backend: str) -> torch.Tensor:
    """``op`` on meta tensors (deferred initialization, shape inference): there is no data to check."""
    x = groups("meta")
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "pairwise_similarity": lambda: dk.pairwise_similarity(x["emb"], x["mask"], backend=backend),
        "deviation": lambda: dk.deviation(x["emb"], x["mask"], backend=backend),
        "logdet_diversity": lambda: dk.logdet_diversity(x["emb"], x["mask"], backend=backend),
        "partition_diversity": lambda: dk.partition_diversity(x["emb"], x["mask"], backend=backend),
        "group_advantages": lambda: dk.group_advantages(x["rewards"], x["emb"], x["mask"], diversity="dqo",
                                                        backend=backend),
        "group_preference_loss": lambda: dk.group_preference_loss(x["policy"], x["rewards"], x["emb"], x["ref"],
                                                                  x["mask"], diversity="deviation",
                                                                  backend=backend).loss,
    }
    return calls[op]()


META_SHAPES = {"pairwise_similarity": (B, G, G), "deviation": (B, G), "logdet_diversity": (B,),
               "partition_diversity": (B, G), "group_advantages": (B, G), "group_preference_loss": ()}


@dataclass(frozen=True)
class Case:
    """``call(backend)`` must give ``expect``: ``("value", want)``, equal to ``want(backend)`` (the same
    backend on a clean input; ``want`` None: finite), ``("meta", shape)``, or ``("error", exception type,
    words that the message must contain)``."""

    name: str
    call: Callable[[str], object]
    expect: tuple
    backends: tuple[str, ...] = ("reference", "triton", "cuda")


CASES = [
    # explicit pair indices: every integer dtype is an index; out of range is named, on every backend
    *[Case(f"pair_index as {dtype}", lambda backend, d=dtype: explicit_loss(PAIRS.to(d), backend),
           ("value", lambda backend: explicit_loss(PAIRS, backend)))
      for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32)],
    *[Case(f"pair_index {label}", lambda backend, rows=rows: explicit_loss(torch.tensor(rows), backend),
           ("error", ValueError, ("pair_index", "[0, 4)")))
      for label, rows in (("past G", [[[0, 7]], [[1, 2]]]), ("negative", [[[0, -3]], [[1, 2]]]),
                          ("past int32", [[[0, 2**32 + 1]], [[1, 2]]]), ("int8 past G", [[[0, 100]], [[1, 2]]]))],
    Case("pair_index as uint8 with a -1 padding row (255)", lambda backend: explicit_loss(
        torch.tensor([[[0, 1]], [[-1, -1]]]).to(torch.uint8), backend),
         ("error", ValueError, ("pair_index", "[0, 4)"))),
    Case("pair_index as float", lambda backend: explicit_loss(PAIRS.float(), backend),
         ("error", TypeError, ("pair_index", "integer dtype")), ("any",)),
    # meta tensors: correctly shaped meta outputs where the backend runs without data, else a named refusal
    *[Case(f"{op} on meta", lambda backend, op=op: meta_call(op, backend), ("meta", META_SHAPES[op]),
           ("reference", "auto")) for op in META_SHAPES],
    *[Case(f"{op} on meta", lambda backend, op=op: meta_call(op, backend),
           ("error", BackendUnavailableError, (backend_name, "meta")), (backend_name,))
      for op in ("pairwise_similarity", "group_preference_loss") for backend_name in ("triton", "cuda")],
    # vendi_score: NaN / inf named before the eigensolver sees them
    *[Case(f"vendi_score with {value}", lambda backend, v=value: dk.vendi_score(
        groups()["emb"].index_put((torch.tensor([1]), torch.tensor([2]), torch.tensor([0])),
                                  torch.tensor(v, device=DEVICE))), ("error", ValueError, ("emb", "[1]")), ("any",))
      for value in (float("nan"), float("inf"))],
    # the importance ratio of a stale sample: a finite loss (the log-ratio is clamped, as in verl)
    Case("policy_gradient_loss with pi - pi_old = 100", lambda backend: dk.policy_gradient_loss(
        torch.tensor([[100.0, 0.0]]), torch.tensor([[-1.0, 1.0]]), torch.zeros(1, 2)), ("value", None), ("any",)),
    # the LM-head loss names its arguments
    Case("hidden loss, targets as a list", lambda backend: hidden_loss(backend, targets=[[[0, 1, 2]] * 2]),
         ("error", TypeError, ("targets", "list")), ("any",)),
    *[Case(f"hidden loss, nll_mask as {dtype}", lambda backend, d=dtype: hidden_loss(
        backend, nll_mask=torch.ones(1, 2, 3, dtype=d)), ("error", TypeError, ("nll_mask", "bool")), ("any",))
      for dtype in (torch.float32, torch.int64)],
]


def pairs_of_cases() -> list:
    return [pytest.param(case, backend, id=f"{case.name}-{backend}") for case in CASES for backend in case.backends]


@pytest.mark.parametrize(("case", "backend"), pairs_of_cases())
def test_hostile_input(case: Case, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend in ("triton", "cuda") and case.expect[:2] != ("error", BackendUnavailableError):
        use_backend(backend, DEVICE, monkeypatch)  # the interpreter / the host build on CPU
    run_as = "auto" if backend == "any" else backend
    kind = case.expect[0]
    if kind == "error":
        _, error, words = case.expect
        with pytest.raises(error) as raised:
            case.call(run_as)
        assert all(word in str(raised.value) for word in words), str(raised.value)
        return
    got = case.call(run_as)
    if kind == "meta":
        assert got.device.type == "meta" and tuple(got.shape) == case.expect[1]
        return
    want = case.expect[1]
    assert torch.isfinite(got).all(), got
    if want is not None:  # the same backend on the clean input: the same arithmetic, so the same bits
        assert torch.equal(got, want(run_as)), (got, want(run_as))
