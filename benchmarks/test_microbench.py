"""pytest-benchmark entries at small sizes: ``pytest benchmarks/ --benchmark-only``.

The reference (eager PyTorch) of each op family on CPU, so regressions of the reference and the
dispatch overhead are tracked with the standard tool; the kernels' speed is measured on a GPU by
``python -m divkernels.benchmarks``. Nothing here asserts a time.
"""

from __future__ import annotations

import pytest
import torch

from divkernels.benchmarks import advantages, diversity, group_loss

pytest.importorskip("pytest_benchmark")
SHAPE = [(8, 8, 384)]
CASES = (group_loss.cases(SHAPE, [torch.float32], [False, True], list(group_loss.VARIANTS))
         + diversity.cases(SHAPE, [torch.float32], [False, True], list(diversity.OPS))
         + advantages.cases(SHAPE, [torch.float32], ["darling", "dqo", "deviation"]))


def case_id(case: object) -> str:
    return f"{case.family}-{case.name}-{'fwdbwd' if case.backward else 'fwd'}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_on_cpu(benchmark, case) -> None:
    inputs = case.make_inputs(torch.device("cpu"))
    benchmark(case.run, case.reference_op, inputs)
