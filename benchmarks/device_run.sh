#!/usr/bin/env bash
# The first check on a GPU machine, evidence first: builds, checks, measures in <= 8 minutes on one
# H100 from a bare machine (torch, Triton, nvcc and pytest-xdist installed; liger-kernel optional).
#   bash benchmarks/device_run.sh             results in $OUT (default ./device_out)
#   bash benchmarks/device_run.sh --dry-run   the same steps on CPU at tiny sizes (the Triton
#                                             interpreter, the host build of csrc/): CI runs it
# Each step has a time limit and the script goes on after a failed or cut step. At most 8 files, each
# useful alone if the call is cut, written in this order:
#   summary.txt    one line per finished step: name, exit status, seconds (the first file to read)
#   env.txt        GPU, torch / Triton / CUDA versions, backends (python -m divkernels info)
#   build.log      the CUDA extension, built for this GPU's arch only
#   tests.log      the GPU correctness tests, in parallel, the GPU-only ones first
#   headline.json  fused vs eager vs torch.compile (vs Liger where it computes the same), fused DDPO +
#   headline.csv   logdet, bf16, (8, 8, 384), (256, 16, 4096), (4096, 16, 2048), forward and fwd+bwd
#   bench.log      the headline table as printed, then the LM-head memory row (fused vs logits, one size)
#   sanitizer.log  compute-sanitizer memcheck of one fused forward + backward on the CUDA backend
set -uo pipefail
dry=0
case "${1:-}" in
    "") ;;
    --dry-run) dry=1 ;;
    -h|--help) echo "usage: bash benchmarks/device_run.sh [--dry-run]"; sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bash benchmarks/device_run.sh [--dry-run] (unknown argument: $1)" >&2; exit 2 ;;
esac
out="${OUT:-device_out}"
mkdir -p "$out"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export PYTHONUNBUFFERED=1 DIVKERNELS_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
started=$SECONDS

# step NAME LIMIT_S LOG COMMAND...: runs COMMAND with a time limit, its output to LOG (appended), and
# appends "NAME rc=N Ss" to summary.txt
step() {
    local name="$1" limit="$2" log="$3" begin=$SECONDS rc
    shift 3
    echo "== $name (limit ${limit}s)" >> "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - begin))s$([[ $rc == 124 ]] && echo ' (time limit)')" | tee -a "$out/summary.txt"
}

if (( dry )); then
    # CPU: Triton kernels under the interpreter, the CUDA kernels' math through its host build
    export TRITON_INTERPRET=1 DIVKERNELS_CUDA_HOST_EMULATION=1
    echo "dry run on CPU (interpreter, host build), tiny sizes" > "$out/summary.txt"
    suite=headline-tiny
    linear_case='tokens T=128 chunk=256'
    gpu_tests=(tests/test_triton.py::test_gpu_sweep tests/test_cuda.py::test_gpu_sweep
               tests/test_linear_logps.py::test_gpu_vocabulary_scale)
    rest=()
    workers=1
else
    : > "$out/summary.txt"
    suite=headline
    linear_case='tokens T=1024 chunk=256'
    # GPU-only tests first (the sweeps, the vocabulary scale, the sanitizer), then every kernel path
    gpu_tests=(-m "gpu or triton or cuda_ext" tests/test_triton.py tests/test_cuda.py tests/test_linear_logps.py)
    rest=(tests/test_kernel_paths.py tests/test_group_loss.py tests/test_advantages.py tests/test_diversity.py)
    workers=8
fi

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null \
    || echo "no GPU (nvidia-smi absent)"; } > "$out/env.txt"
step info 60 "$out/env.txt" python3 -m divkernels info

if (( dry )); then  # the host build compiles on first use; build it now so that its errors show here
    step build 300 "$out/build.log" python3 -c "import torch; from divkernels import _cuda; \
r = _cuda.unavailable_reason(torch.device('cpu')); print(r or 'host build ok'); raise SystemExit(1 if r else 0)"
else
    arch="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
    step build 240 "$out/build.log" env TORCH_CUDA_ARCH_LIST="$arch" DIVKERNELS_BUILD_CUDA=1 \
        python3 -m pip install -q --no-deps --no-build-isolation -e .
    ls wheels/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-deps wheels/*.whl >> "$out/build.log" 2>&1
fi

# correctness: the GPU-only tests first; xdist spreads whole files over the workers (loadfile)
xdist=()
(( workers > 1 )) && xdist=(-n "$workers" --dist loadfile)
step gpu-tests 150 "$out/tests.log" python3 -m pytest -q -x "${xdist[@]}" "${gpu_tests[@]}"
if (( ${#rest[@]} )); then
    step kernel-tests 120 "$out/tests.log" python3 -m pytest -q "${xdist[@]}" -m "triton or cuda_ext" "${rest[@]}"
fi

# headline numbers: the runner writes <device>-<suite>-<date>.json/.csv; they are copied as headline.*
step headline 150 "$out/bench.log" python3 -m divkernels.benchmarks --suite "$suite" --out "$scratch/bench" \
    --repeats 20 --warmup 3 --budget-s 120
for kind in json csv; do
    found=("$scratch"/bench/*-"$suite"-*."$kind")
    [[ -e "${found[0]}" ]] && cp "${found[0]}" "$out/headline.$kind"
done
step lm-head-memory 60 "$out/bench.log" python3 -m divkernels.benchmarks --suite linear --only "$linear_case" \
    --out "$scratch/linear"

script="$scratch/fused_call.py"
cat > "$script" <<'PY'
import torch
import divkernels as dk
device = "cuda" if torch.cuda.is_available() else "cpu"
e = torch.randn(3, 17, 40, device=device, requires_grad=True)
m = torch.ones(3, 17, dtype=torch.bool, device=device)
m[1, 9:] = False
p = (-torch.rand(3, 17, device=device)).requires_grad_()
r = torch.randn(3, 17, device=device)
o = dk.group_preference_loss(p, r, e, p.detach() * 0.9, m, diversity="logdet_gain", diversity_alpha=0.5,
                             backend="cuda")
o.loss.backward()
print("fused loss", float(o.loss), "finite grads", bool(torch.isfinite(e.grad).all() and torch.isfinite(p.grad).all()))
PY
if (( dry )); then  # no sanitizer on CPU: the same call through the host build
    step sanitizer 60 "$out/sanitizer.log" python3 "$script"
else
    step sanitizer 90 "$out/sanitizer.log" compute-sanitizer --tool=memcheck --error-exitcode=9 python3 "$script"
fi
echo "total $((SECONDS - started))s" | tee -a "$out/summary.txt"
# the exit status: every step passed
! grep -q "rc=[1-9]" "$out/summary.txt"
