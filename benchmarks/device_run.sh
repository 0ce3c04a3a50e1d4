#!/usr/bin/env bash
# One command for a lent GPU machine (see the device tool's README): install, build, test, benchmark.
#   bash benchmarks/device_run.sh [suite]      (suite: fused (default) or full)
# Results and logs go to $OUT (or ./device_out when OUT is unset).
set -uo pipefail
suite="${1:-fused}"
out="${OUT:-device_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 DIVKERNELS_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
# Prebuild the CUDA extension for this GPU only (a fresh machine; the default list is 8.0;9.0).
export TORCH_CUDA_ARCH_LIST="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
DIVKERNELS_BUILD_CUDA=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
# liger-kernel is not in the device image: carry its wheel in wheels/ (pip download liger-kernel --no-deps -d wheels).
ls wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -m divkernels info | tee "$out/info.txt"
python3 -m pytest -q -m "gpu or triton or cuda_ext" tests 2>&1 | tee "$out/tests.log" | tail -15
python3 -m divkernels.benchmarks --suite "$suite" --out "$out" 2>&1 | tee "$out/bench.log" | tail -40
