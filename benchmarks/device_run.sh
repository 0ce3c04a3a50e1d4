#!/usr/bin/env bash
# One command for a lent GPU machine (see the device tool's README): install, build, test, benchmark.
#   bash benchmarks/device_run.sh [suite] [budget_s] [steps]
#     suite     fused (default) or full
#     budget_s  start no new benchmark case after this many seconds (default 420, so that a
#               10-minute device call keeps time for the build and the tests); the result file says
#               "complete": false when cut short, and a second call continues it:
#               RESUME=path/to/that.json bash benchmarks/device_run.sh full 540 bench
#     steps     comma-separated subset of build,test,bench (default all three)
# Results and logs go to $OUT (or ./device_out when OUT is unset).
set -uo pipefail
suite="${1:-fused}"
budget="${2:-420}"
steps="${3:-build,test,bench}"
out="${OUT:-device_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 DIVKERNELS_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
has() { [[ ",$steps," == *",$1,"* ]]; }

if has build; then
    # Prebuild the CUDA extension for this GPU only (a fresh machine; the default list is 8.0;9.0).
    TORCH_CUDA_ARCH_LIST="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
    export TORCH_CUDA_ARCH_LIST
    time DIVKERNELS_BUILD_CUDA=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
    # liger-kernel is not in the device image: carry its wheel in wheels/ (pip download liger-kernel --no-deps -d wheels).
    ls wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps wheels/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -m divkernels info | tee "$out/info.txt"
if has test; then
    time python3 -m pytest -q -m "gpu or triton or cuda_ext" tests 2>&1 | tee "$out/tests.log" | tail -15
fi
if has bench; then
    resume=()
    if [[ -n "${RESUME:-}" ]]; then
        cp "$RESUME" "$out/" && resume=(--resume "$out/$(basename "$RESUME")")
    fi
    python3 -m divkernels.benchmarks --suite "$suite" --out "$out" --budget-s "$budget" "${resume[@]}" 2>&1 \
        | tee "$out/bench-$suite.log" | tail -60
    # Linear log-probs: fused vs unfused logits, peak memory and time (each case in a fresh process).
    python3 -m divkernels.benchmarks --suite linear --out "$out" 2>&1 | tee "$out/bench-linear.log" | tail -25
    # Per shape class, the faster of triton/cuda for backend="auto" (commit it as divkernels/dispatch_table.json).
    cp divkernels/dispatch_table.json "$out/dispatch_table.json"
    python3 -m divkernels.benchmarks.dispatch "$out"/*-"$suite"-*.json --table "$out/dispatch_table.json" \
        | tee "$out/dispatch.log"
fi
