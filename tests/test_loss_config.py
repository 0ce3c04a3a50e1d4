"""One declaration of the loss options, modes and stat columns: ``csrc/loss_params.h`` is what
``loss_config`` generates (regenerated here and compared), the C++ math declares none of it by hand,
the Triton kernels' column constants come from the same table, and validation follows each field's
declared range."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from divkernels import reference
from divkernels.loss_config import CHECK_STATS, PUBLIC_OPTIONS, STAT, STATS, WEIGHT_MODES, LossConfig, cpp_header
from divkernels.ops.group_loss import pair_math
from divkernels.types import DEVIATION_NORMS, LOSSES, PAIR_MODES

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HEADER = CSRC / "loss_params.h"


def header_enum(name: str) -> list[str]:
    """The enumerators of ``enum name : int { ... }`` in order (explicit values must count up from 0)."""
    match = re.search(rf"enum {name} : int \{{(.*?)\}};", HEADER.read_text(), re.S)
    assert match, f"enum {name} not found in {HEADER}"
    names = []
    for index, item in enumerate(part.strip() for part in match.group(1).split(",") if part.strip()):
        enumerator, _, value = (piece.strip() for piece in item.partition("="))
        assert not value or int(value) == index, f"{name}::{enumerator} = {value}, expected {index}"
        names.append(enumerator)
    return names


def header_constant(name: str) -> float:
    match = re.search(rf"constexpr double {name} = ([0-9a-fA-FxpP.+-]+);", HEADER.read_text())
    assert match, f"{name} not found in {HEADER}"
    text = match.group(1)
    return float.fromhex(text) if text.lower().startswith("0x") else float(text)


def camel(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def test_generated_header_is_current() -> None:
    """``python -m divkernels.loss_config`` regenerates csrc/loss_params.h; the committed one is its output."""
    assert HEADER.read_text() == cpp_header()


def test_no_hand_written_declarations_in_the_cuda_sources() -> None:
    """The enums, LossParams and the reference's constants live in the generated header only."""
    for path in (*CSRC.glob("*.h"), *CSRC.glob("*.cu"), *CSRC.glob("cpu/*.cpp")):
        if path.name == HEADER.name:
            continue
        text = path.read_text()
        assert not re.search(r"enum (Loss|Pairs|Weights|DeviationNorm|Stat|Input) : int", text), path
        assert "struct LossParams" not in text and "constexpr double" not in text, path


@pytest.mark.parametrize(("enum", "prefix", "python"), [
    ("Loss", "kLoss", LOSSES),
    ("Pairs", "kPairs", PAIR_MODES),
    ("Weights", "kWeights", WEIGHT_MODES),
    ("DeviationNorm", "kNorm", DEVIATION_NORMS),
])
def test_mode_enums_match_python(enum: str, prefix: str, python: tuple[str, ...]) -> None:
    assert header_enum(enum) == [prefix + camel(name)[1:] for name in python]


def test_stat_columns_match_python() -> None:
    assert header_enum("Stat") == [camel(name) for name in STATS] + ["kNumStats"]


def test_triton_column_constants_match_python() -> None:
    for name in STATS + CHECK_STATS:
        assert int(getattr(pair_math, f"COL_{name.upper()}")) == STAT[name]


def test_option_checks_follow_the_declaration() -> None:
    """Every public field is checked as declared: a name outside its choices, or a number outside its
    range, raises naming the field."""
    import divkernels as dk

    policy, rewards = -torch.rand(1, 3), torch.randn(1, 3)
    for name, meta in PUBLIC_OPTIONS:
        bad = "nope" if meta["choices"] is not None else (meta["low"] - 1.0 if meta["low"] is not None
                                                          else float("nan"))
        with pytest.raises(ValueError, match=name):
            dk.group_preference_loss(policy, rewards, **{name: bad}, backend="reference")


def test_header_constants_match_reference() -> None:
    assert header_constant("kDivpoCountSlack") == reference.DIVPO_COUNT_SLACK
    assert header_constant("kDeviationTie") == reference.DEVIATION_TIE
    assert header_constant("kDivpoTieRtol") == reference.DIVPO_TIE_RTOL
    assert header_constant("kNormFloor") == reference.NORM_FLOOR
    assert header_constant("kPivotMargin") == reference.PIVOT_MARGIN
    assert header_constant("kEmbNormLimit32") == reference.EMB_NORM_LIMIT[torch.float32]
    assert header_constant("kEmbNormLimit64") == reference.EMB_NORM_LIMIT[torch.float64]


def test_config_modes_index_the_python_names() -> None:
    config = LossConfig("simpo", "logdet_gain", "divpo", 0.1, 0.1, 0.5, "none", 0.0, 0.1, 1.0, 0.25)
    assert (config.loss_mode, config.pair_mode, config.weight_mode, config.norm_mode) == (3, 2, 2, 2)
    assert LossConfig.from_key(config.key) == config and hash(LossConfig.from_key(config.key)) == hash(config)


def test_public_options_come_from_the_declaration() -> None:
    """``group_preference_loss`` names no option: its signature lists each declared option with the
    declared default, which is the reference's (the spec) default too; an unknown one is a TypeError."""
    import inspect

    import divkernels

    public = inspect.signature(divkernels.group_preference_loss).parameters
    spec = inspect.signature(reference.group_preference_loss).parameters
    for name, _ in PUBLIC_OPTIONS:
        assert public[name].kind == inspect.Parameter.KEYWORD_ONLY, name
        assert public[name].default == spec[name].default, name
        assert f"{name}: " in divkernels.group_preference_loss.__doc__, name
    assert "{options}" not in divkernels.group_preference_loss.__doc__
    policy, rewards = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    with pytest.raises(TypeError, match="'qualty_quantile'"):
        divkernels.group_preference_loss(policy, rewards, pairs="divpo", qualty_quantile=0.5)
    got = divkernels.group_preference_loss(policy - 1.0, rewards, backend="reference", beta=2.0).loss
    assert got.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item())


def test_kernel_mode_and_scalar_table_follow_the_parameters() -> None:
    """The Triton kernels' constexpr ``MODE`` holds the ints and flags and the scalar table the reals,
    each in KERNEL_PARAMS' order (what the CUDA extension receives packed)."""
    from divkernels.loss_config import KERNEL_PARAMS, SCALARS, scalar_slot

    config = LossConfig(loss="orpo", diversity="deviation", pairs="divpo", beta=0.3, orpo_lambda=0.2,
                        simpo_gamma=0.7, deviation_norm="mean", min_deviation=0.05, diversity_alpha=0.0, eps=0.5,
                        quality_quantile=0.4, divpo_pools="threshold")
    packed = config.kernel_values(True, False)
    mode = config.kernel_mode(True, False)
    for index, param in enumerate(KERNEL_PARAMS):
        if param.ctype == "double":
            assert config.triton_scalars[scalar_slot(param.name)] == packed[index], param.name
        else:
            assert float(getattr(mode, param.name)) == packed[index], param.name
    assert len(mode) + len(SCALARS) == len(KERNEL_PARAMS)
    assert (mode.loss, mode.pairs, mode.divpo_ranked, mode.need_logdet) == (2, 2, False, True)
