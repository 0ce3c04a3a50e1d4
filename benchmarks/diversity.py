"""Benchmarks of the standalone diversity ops: similarity, deviation, logdet + gains (divkernels.reference)."""

from __future__ import annotations

import torch

import divkernels as dk
from divkernels import reference
from divkernels.benchmarks.harness import Case, clear_grads, element_bytes, embeddings


def _similarity(emb, *, backend=None):
    if backend is None:
        return reference.pairwise_similarity(emb)
    return dk.pairwise_similarity(emb, backend=backend, check_inputs=False)


def _deviation(emb, *, backend=None):
    return reference.deviation(emb) if backend is None else dk.deviation(emb, backend=backend, check_inputs=False)


def _logdet_gains(emb, *, backend=None):
    if backend is None:
        logdet, gains = reference.logdet_diversity(emb, return_gains=True)
    else:
        logdet, gains = dk.logdet_diversity(emb, return_gains=True, backend=backend, check_inputs=False)
    return logdet.sum() + gains.sum()


OPS = {"similarity": _similarity, "deviation": _deviation, "logdet+gains": _logdet_gains}


def cases(shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype], backward_passes: list[bool],
          ops: list[str]) -> list[Case]:
    result = []
    for name in ops:
        op = OPS[name]
        for batch, group, dim in shapes:
            for dtype in dtypes:
                for backward in backward_passes:
                    emb_bytes = batch * group * dim * element_bytes(dtype)
                    out_bytes = batch * group * group * 4 if name == "similarity" else batch * group * 4
                    floor = emb_bytes * (3 if backward else 1) + out_bytes * (2 if backward else 1)

                    def make_inputs(device: torch.device, batch=batch, group=group, dim=dim, dtype=dtype,
                                    backward=backward) -> dict:
                        return {"emb": embeddings(batch, group, dim, dtype, device, backward)}

                    def run(fn, inputs: dict, backward=backward) -> None:
                        clear_grads(inputs)
                        out = fn(inputs["emb"])
                        if backward:
                            out.sum().backward()

                    result.append(Case("diversity", name, batch, group, dim, dtype, backward, floor, make_inputs,
                                       run, op, op))
    return result
