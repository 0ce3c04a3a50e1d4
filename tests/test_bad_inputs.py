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


def emb_call(op: str, backend: str, emb: torch.Tensor, mask: torch.Tensor | None = None,
             **change: torch.Tensor) -> torch.Tensor:
    """``op`` on the small batch with ``emb`` (and ``mask``, other tensors) replaced."""
    def moved(value: torch.Tensor) -> torch.Tensor:
        return value if value.is_meta else value.to(DEVICE)

    x = groups()
    x.update(emb=moved(emb), mask=x["mask"] if mask is None else moved(mask),
             **{name: moved(value) for name, value in change.items()})
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "pairwise_similarity": lambda: dk.pairwise_similarity(x["emb"], x["mask"], backend=backend),
        "pairwise_similarity (dot)": lambda: dk.pairwise_similarity(x["emb"], x["mask"], kernel="dot",
                                                                    backend=backend),
        "pairwise_similarity (rbf)": lambda: dk.pairwise_similarity(x["emb"], x["mask"], kernel="rbf",
                                                                    backend=backend),
        "deviation": lambda: dk.deviation(x["emb"], x["mask"], backend=backend),
        "logdet_diversity": lambda: dk.logdet_diversity(x["emb"], x["mask"], backend=backend),
        "partition_diversity": lambda: dk.partition_diversity(x["emb"], x["mask"], backend=backend),
        "group_advantages (deviation)": lambda: dk.group_advantages(x["rewards"], x["emb"], x["mask"],
                                                                    diversity="deviation", backend=backend),
        "group_advantages (dqo)": lambda: dk.group_advantages(x["rewards"], x["emb"], x["mask"], diversity="dqo",
                                                              backend=backend),
        "group_advantages (darling)": lambda: dk.group_advantages(x["rewards"], x["emb"], x["mask"],
                                                                  diversity="darling", backend=backend),
        "group_preference_loss": lambda: dk.group_preference_loss(x["policy"], x["rewards"], x["emb"], x["ref"],
                                                                  x["mask"], diversity="deviation",
                                                                  diversity_alpha=0.5, backend=backend).loss,
        "group_preference_loss (logdet)": lambda: dk.group_preference_loss(
            x["policy"], x["rewards"], x["emb"], x["ref"], x["mask"], diversity="logdet_gain", backend=backend).loss,
        "vendi_score": lambda: dk.vendi_score(x["emb"], x["mask"]),
    }
    return calls[op]()


def backends_of(op: str) -> tuple[str, ...]:
    """The backends an op runs on: the fused loss has a CUDA kernel, the metrics none."""
    if op == "vendi_score":
        return ("any",)
    return ("reference", "triton", "cuda") if op.startswith("group_preference_loss") else ("reference", "triton")


EMB_OPS = ("pairwise_similarity", "pairwise_similarity (dot)", "pairwise_similarity (rbf)", "deviation",
           "logdet_diversity", "partition_diversity", "group_advantages (deviation)", "group_advantages (dqo)",
           "group_advantages (darling)", "group_preference_loss", "group_preference_loss (logdet)", "vendi_score")
SCALE_FREE = tuple(op for op in EMB_OPS if "(dot)" not in op and "(rbf)" not in op)


def scaled(power: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The batch's emb times 2^power: exact in every float dtype while it stays in range."""
    return (groups("cpu")["emb"].double() * 2.0**power).to(dtype)


def strided(kind: str) -> torch.Tensor:
    """The batch's emb, equal values, in a layout other than contiguous."""
    emb = groups("cpu")["emb"]
    if kind == "transposed":  # D not innermost
        return emb.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "every other column":
        return torch.stack([emb, torch.zeros_like(emb)], dim=-1).flatten(-2)[..., ::2]
    return emb[:, :1].expand(B, G, D)  # "overlapping": every response the same storage row


def one_valid_mask() -> torch.Tensor:
    mask = torch.zeros(B, G, dtype=torch.bool)
    mask[:, 0] = True
    return mask


def none_valid_in_second_group() -> torch.Tensor:
    mask = torch.ones(B, G, dtype=torch.bool)
    mask[1] = False
    return mask


HUGE = "emb has NaN or inf, or a row norm above"
FEW_VALID = {"one valid response": one_valid_mask, "an all-masked group": none_valid_in_second_group}
NEEDS_PAIR = ("deviation", "logdet_diversity", "partition_diversity", "group_advantages", "group_preference_loss")
EMPTY_SHAPES = {"pairwise_similarity": (0, G, G), "deviation": (0, G), "logdet_diversity": (0,),
                "partition_diversity": (0, G), "group_advantages": (0, G), "group_preference_loss": (),
                "vendi_score": (0,)}


def empty_call(op: str, backend: str) -> torch.Tensor:
    """``op`` on an empty batch (B = 0)."""
    x = {name: value[:0] for name, value in groups().items()}
    return emb_call(op, backend, x["emb"], x["mask"], policy=x["policy"], rewards=x["rewards"], ref=x["ref"])


def duplicates(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The batch's emb with exact duplicates: responses 0 and 1 of every group, and 2 and 3 of the second."""
    emb = groups("cpu")["emb"] * 2.0
    emb[:, 1] = emb[:, 0]
    emb[1, 3] = emb[1, 2]
    return emb.to(dtype)


def logdet_tiny_eps(backend: str, kernel: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dk.logdet_diversity(duplicates(dtype).to(DEVICE), kernel=kernel, eps=1e-6, backend=backend)


def logdet_of_own_similarity(backend: str, kernel: str) -> torch.Tensor:
    """The float64 factorization of the S that ``backend`` computes: what its logdet must be, whatever the
    rounding of S on this device (a pivot of 1e-6 amplifies S's rounding; a float32 sweep adds its own)."""
    from divkernels import reference

    sim = dk.pairwise_similarity(duplicates().to(DEVICE), kernel=kernel, backend=backend)
    return reference.logdet_and_inverse(sim.double(), torch.ones(B, G, dtype=torch.bool, device=DEVICE),
                                        1e-6)[0].float()


def loss_tiny_eps(backend: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = groups()
    return dk.group_preference_loss(x["policy"], x["rewards"], duplicates(dtype).to(DEVICE), x["ref"],
                                    diversity="logdet_gain", eps=1e-6, backend=backend).loss


META_SHAPES = {"pairwise_similarity": (B, G, G), "deviation": (B, G), "logdet_diversity": (B,),
               "partition_diversity": (B, G), "group_advantages": (B, G), "group_preference_loss": ()}


@dataclass(frozen=True)
class Case:
    """``call(backend)`` must give ``expect``: ``("value", want)``, equal to ``want(backend)`` (the same
    backend on a clean input; ``want`` None: finite), ``("close", want, atol)``: within ``atol`` of
    ``want(backend)``, ``("meta", shape)``, ``("shape", shape)``: zeros of that shape, or ``("error", exception type,
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
    # huge embeddings: rows whose Gram entries would overflow are named; below the limit cosine is exact
    # (scaling by 2^k is exact, so the value has the clean input's bits)
    *[Case(f"{op}, emb x 2^{power} ({str(dtype)[6:]})", lambda backend, op=op, p=power, d=dtype: emb_call(
        op, backend, scaled(p, d)), ("error", ValueError, (HUGE,)), backends_of(op))
      for op in EMB_OPS for power, dtype in ((61, torch.float32), (67, torch.float32), (100, torch.float32),
                                             (100, torch.bfloat16))],
    *[Case(f"{op}, emb x 2^56", lambda backend, op=op: emb_call(op, backend, scaled(56)),
           ("value", lambda backend, op=op: emb_call(op, backend, scaled(0))), backends_of(op)) for op in SCALE_FREE],
    *[Case(f"{op}, emb x 2^28", lambda backend, op=op: emb_call(op, backend, scaled(28)), ("value", None),
           backends_of(op)) for op in EMB_OPS if op not in SCALE_FREE],
    Case("several encoders, the second huge", lambda backend: dk.group_preference_loss(
        groups()["policy"], groups()["rewards"], [groups()["emb"], scaled(100).to(DEVICE)], groups()["ref"],
        diversity="deviation", backend=backend).loss, ("error", ValueError, ("emb[1]", "row norm above"))),
    # tiny embeddings: norms under the floor (1e-12) give similarities ~0, finite, as the reference's
    *[Case(f"{op}, emb x 2^-100", lambda backend, op=op: emb_call(op, backend, scaled(-100)),
           ("close", lambda backend, op=op: emb_call(op, "reference" if backend != "any" else backend,
                                                     scaled(-100)), 1e-5), backends_of(op)) for op in EMB_OPS],
    # layouts: transposed, strided and overlapping (expanded) emb give the contiguous copy's value
    *[Case(f"{op}, {kind} emb", lambda backend, op=op, k=kind: emb_call(op, backend, strided(k)),
           ("close", lambda backend, op=op, k=kind: emb_call(op, backend, strided(k).contiguous()), 0.0),
           backends_of(op)) for op in EMB_OPS for kind in ("transposed", "every other column", "overlapping")],
    # groups with fewer than two valid responses: the ops that need a pair name the mask and the groups;
    # the others give a value (the identity, a score of 1, a group without pairs)
    *[Case(f"{op}, {few}", lambda backend, op=op, m=mask: emb_call(op, backend, scaled(0), m()),
           ("error", ValueError, ("at least 2 valid responses", "mask", "[1]" if "masked" in few else "[0, 1]")),
           backends_of(op)) for op in EMB_OPS if op.split(" ")[0] in NEEDS_PAIR for few, mask in FEW_VALID.items()],
    *[Case(f"{op}, {few}", lambda backend, op=op, m=mask: emb_call(op, backend, scaled(0), m()), ("value", None),
           backends_of(op)) for op in EMB_OPS if op.startswith(("pairwise", "vendi"))
      for few, mask in FEW_VALID.items()],
    *[Case(f"group_preference_loss without diversity, {few}", lambda backend, m=mask: dk.group_preference_loss(
        groups()["policy"], groups()["rewards"], ref_logps=groups()["ref"], mask=m().to(DEVICE),
        backend=backend).loss, ("value", None)) for few, mask in FEW_VALID.items()],
    # an empty batch: empty outputs (a zero loss)
    *[Case(f"{op}, B = 0", lambda backend, op=op: empty_call(op, backend),
           ("shape", EMPTY_SHAPES[op.split(" ")[0]]), backends_of(op)) for op in EMB_OPS],
    # exact duplicates with eps = 1e-6: a float32 sweep has no correct bit left in the duplicate's pivot;
    # Triton sweeps again in float64 (the value of its own S), the CUDA kernel names eps, float64 passes
    *[Case(f"logdet_diversity ({kernel}), exact duplicates, eps=1e-6", lambda backend, k=kernel: logdet_tiny_eps(
        backend, k), ("close", lambda backend, k=kernel: logdet_of_own_similarity(backend, k), 1e-4),
           ("reference", "triton")) for kernel in ("cosine", "dot")],
    *[Case(f"group_preference_loss (logdet), exact duplicates, eps=1e-6, {str(dtype)[6:]}",
           lambda backend, d=dtype: loss_tiny_eps(backend, d), ("value", None), backends)
      for dtype, backends in ((torch.float32, ("reference", "triton")),
                              (torch.float64, ("reference", "triton", "cuda")))],
    *[Case(f"logdet_diversity ({kernel}, float64), exact duplicates, eps=1e-15", lambda backend, k=kernel: (
        dk.logdet_diversity(duplicates(torch.float64).to(DEVICE), kernel=k, eps=1e-15, backend=backend)),
           ("error", ValueError, ("factorization", "raise eps")), ("reference", "triton"))
      for kernel in ("cosine", "dot")],
    Case("group_preference_loss (logdet), exact duplicates, eps=1e-6, cuda float32", loss_tiny_eps,
         ("error", ValueError, ("factorization", "raise eps or pass float64 emb")), ("cuda",)),
    # wrong types, shapes and devices: refused before any kernel, naming the argument
    *[Case(f"{op}, emb {label}", lambda backend, op=op, e=value: emb_call(op, backend, e()),
           ("error", error, words), ("any",)) for op in EMB_OPS for label, value, error, words in (
        ("2-D", lambda: scaled(0)[0], ValueError, ("emb", "3-D")),
        ("of integers", lambda: scaled(0).long(), TypeError, ("emb", "floating dtype")),
        ("with G = 1", lambda: scaled(0)[:, :1], ValueError, ("emb", "G >= 2")))],
    *[Case(f"{op}, mask as float", lambda backend, op=op: emb_call(op, backend, scaled(0), torch.ones(B, G)),
           ("error", TypeError, ("mask", "bool")), ("any",)) for op in EMB_OPS],
    *[Case(f"{op}, mask on another device", lambda backend, op=op: emb_call(
        op, backend, torch.empty(B, G, D, device="meta"), torch.ones(B, G, dtype=torch.bool)),
           ("error", ValueError, ("one device", "mask")), ("any",)) for op in EMB_OPS if op != "vendi_score"],
    # NaN / inf in a valid response of each tensor: named with its group, on every backend
    *[Case(f"{op}, {value} in emb", lambda backend, op=op, v=value: emb_call(op, backend, scaled(0).index_put(
        (torch.tensor([1]), torch.tensor([2]), torch.tensor([0])), torch.tensor(v))),
           ("error", ValueError, ("emb has NaN or inf", "groups [1]")), backends_of(op))
      for op in EMB_OPS for value in (float("nan"), float("-inf"))],
    *[Case(f"{op}, NaN in rewards", lambda backend, op=op: emb_call(op, backend, scaled(0), rewards=groups(
        "cpu")["rewards"].index_put((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("nan")))),
           ("error", ValueError, ("rewards has NaN or inf", "groups [0]")), backends_of(op))
      for op in EMB_OPS if op.startswith(("group_advantages", "group_preference_loss"))],
    # 32-bit offsets within a group: a stride that spreads one group past 2^31 elements is refused on every
    # backend (a meta tensor carries such strides without memory)
    *[Case(f"{op}, emb with a group spanning 2^31 elements", lambda backend, op=op: emb_call(
        op, backend, torch.empty_strided((B, G, D), (G * 2**30, 2**30, 1), device="meta"), mask=torch.ones(
            B, G, dtype=torch.bool, device="meta")), ("error", ValueError, ("emb's strides", "contiguous")), ("any",))
      for op in ("pairwise_similarity", "deviation", "group_preference_loss")],
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
    if kind == "shape":
        assert tuple(got.shape) == case.expect[1] and torch.isfinite(got).all() and not got.any(), got
        return
    want = case.expect[1]
    assert torch.isfinite(got).all(), got
    if kind == "close":
        torch.testing.assert_close(got, want(run_as), atol=case.expect[2], rtol=0.0)
    elif want is not None:  # the same backend on the clean input: the same arithmetic, so the same bits
        assert torch.equal(got, want(run_as)), (got, want(run_as))
