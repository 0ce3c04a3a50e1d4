"""Parity of the mode numbers and stat columns between Python (``loss_config``), the Triton kernels'
constants and the C++ header ``csrc/group_math.h``: the header is parsed, nothing is kept in step by
a comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from divkernels import reference
from divkernels.loss_config import CHECK_STATS, STAT, STATS, WEIGHT_MODES, LossConfig
from divkernels.ops import group_loss
from divkernels.types import DEVIATION_NORMS, LOSSES, PAIR_MODES

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "group_math.h"


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


@pytest.mark.parametrize(("enum", "python", "aliases"), [
    ("Loss", LOSSES, {}),
    ("Pairs", PAIR_MODES, {}),
    ("Weights", WEIGHT_MODES, {}),
    ("DeviationNorm", DEVIATION_NORMS, {"mean": "kMeanOne", "none": "kRaw"}),
])
def test_mode_enums_match_python(enum: str, python: tuple[str, ...], aliases: dict[str, str]) -> None:
    assert header_enum(enum) == [aliases.get(name, camel(name)) for name in python]


def test_stat_columns_match_python() -> None:
    aliases = {"deviation": "kDeviationSum"}
    assert header_enum("Stat") == [aliases.get(name, camel(name)) for name in STATS] + ["kNumStats"]


def test_triton_column_constants_match_python() -> None:
    for name in STATS + CHECK_STATS:
        assert int(getattr(group_loss, f"COL_{name.upper()}")) == STAT[name]


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
