"""Benchmarks of diversity-aware GRPO advantages (reference/advantages.py); forward only (no gradient)."""

from __future__ import annotations

import torch

import divkernels as dk
from divkernels import reference
from divkernels.benchmarks.harness import Case, element_bytes, embeddings


def _advantages(rewards, emb, *, diversity, backend=None):
    if backend is None:
        return reference.group_advantages(rewards, emb, diversity=diversity)
    return dk.group_advantages(rewards, emb, diversity=diversity, backend=backend, check_inputs=False)


def cases(shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype], diversities: list[str]) -> list[Case]:
    result = []
    for diversity in diversities:
        for batch, group, dim in shapes:
            for dtype in dtypes:
                floor = batch * group * dim * element_bytes(dtype) + 2 * batch * group * 4

                def make_inputs(device: torch.device, batch=batch, group=group, dim=dim, dtype=dtype) -> dict:
                    return {"rewards": torch.randn(batch, group, device=device),
                            "emb": embeddings(batch, group, dim, dtype, device, False)}

                def run(fn, inputs: dict, diversity=diversity) -> None:
                    fn(inputs["rewards"], inputs["emb"], diversity=diversity)

                result.append(Case("advantages", diversity, batch, group, dim, dtype, False, floor, make_inputs, run,
                                   _advantages, _advantages))
    return result
