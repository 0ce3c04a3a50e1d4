"""Backend choice, its error messages, and ``python -m divkernels info``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import divkernels as dk
from divkernels.backend import MAX_KERNEL_GROUP, BackendUnavailableError, resolve_backend

CPU = torch.device("cpu")


def test_auto_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIVKERNELS_BACKEND", raising=False)
    assert resolve_backend("auto", op="deviation", device=CPU, group_size=8, kernels=("triton",)) == "reference"
    assert resolve_backend("reference", op="deviation", device=CPU, group_size=500) == "reference"


def test_unavailable_backends_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="on CPU they run only under TRITON_INTERPRET=1"):
        resolve_backend("triton", op="deviation", device=CPU, group_size=8, kernels=("triton",))
    with pytest.raises(BackendUnavailableError, match="the CUDA extension needs a CUDA device"):
        dk.deviation(torch.randn(2, 3, 4), backend="cuda")


def test_op_without_kernel_and_oversized_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="vendi has no triton kernel"):
        resolve_backend("triton", op="vendi", device=CPU, group_size=8, kernels=())
    with pytest.raises(BackendUnavailableError, match=f"exceeds the in-kernel limit of {MAX_KERNEL_GROUP}"):
        resolve_backend("triton", op="deviation", device=CPU, group_size=MAX_KERNEL_GROUP + 1, kernels=("triton",))


def test_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIVKERNELS_BACKEND", "reference")
    assert resolve_backend("auto", op="deviation", device=CPU, group_size=8, kernels=("triton",)) == "reference"
    monkeypatch.setenv("DIVKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DIVKERNELS_BACKEND='fastest' is not valid"):
        resolve_backend("auto", op="deviation", device=CPU, group_size=8)


def test_info_command_lists_every_backend() -> None:
    result = subprocess.run([sys.executable, "-m", "divkernels", "info"], capture_output=True, text=True, check=True)
    for line in ("divkernels", "torch", "triton", "reference  available", "triton", "cuda"):
        assert line in result.stdout
    assert "unavailable: " in result.stdout
