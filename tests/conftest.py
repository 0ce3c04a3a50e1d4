"""Pytest configuration: GPU tests skip without CUDA; a fresh, printed seed per test."""

from __future__ import annotations

import os
import secrets

import pytest
import torch

# Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter. Triton
# reads this when a kernel is defined, so it is set before any test imports divkernels' kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, so an element a kernel fails to write fails the comparison.
os.environ.setdefault("DIVKERNELS_POISON_OUTPUTS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A fresh seed per test run (printed on failure), so inputs differ between runs."""
    seed = int(os.environ.get("DIVKERNELS_TEST_SEED", secrets.randbelow(2**31)))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed} (set DIVKERNELS_TEST_SEED to replay)")
    return torch.Generator().manual_seed(seed)
