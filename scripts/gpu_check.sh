#!/usr/bin/env bash
# One prepared check for a lent GPU machine: build the CUDA extension against that machine's torch, run every
# backend's first-use self-check (fails loudly on any fallback), the CUDA and Triton tests against the float64
# oracle, the benchmarks, write everything under $OUT (measured_cost.json: commit it as
# mixlora_kernels/measured_cost.json, the evidence `auto` orders the GPU backends by) and print the measured table
# beside the predicted one last. Needs no network. Fits in ~8 minutes: every stage runs under `timeout`, cut to what is left of
# GPU_CHECK_BUDGET_S (default 480 s) so a slow stage cannot starve the ones after it of their reserve.
#
#   OUT=/path/to/results bash scripts/gpu_check.sh        # on the device: OUT is set by the device tool
#
# Environment: OUT (default /tmp/gpu_check_out), GPU_CHECK_BUDGET_S, PYTHON (default python3),
# MIXLORA_CUDA_ARCHS (default 90: the H200), MAX_JOBS (default 16), GPU_CHECK_BENCH_K (pytest -k expression for
# the FFN benchmark, default T4096: the T16384 shape and the whole-model benchmark do not fit the budget).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
BENCH_K="${GPU_CHECK_BENCH_K:-T4096}"
export MIXLORA_CUDA_ARCHS="${MIXLORA_CUDA_ARCHS:-90}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
LOGS="$OUT/logs"
mkdir -p "$LOGS"
SUMMARY="$OUT/summary.tsv"
printf 'stage\tstatus\tseconds\tlast line\n' > "$SUMMARY"

# run_stage NAME MAX_SECONDS RESERVE_SECONDS CMD...: runs CMD under timeout min(MAX, left - RESERVE), logs to
# $LOGS/NAME.log, records status (ok / failed rc=N / timeout / skipped) and never aborts the script.
run_stage() {
  local name="$1" max_s="$2" reserve_s="$3"
  shift 3
  local left=$((BUDGET - SECONDS - reserve_s))
  local limit=$((max_s < left ? max_s : left))
  local log="$LOGS/$name.log"
  if ((limit < 10)); then
    printf '%s\tskipped (no time left)\t0\t-\n' "$name" >> "$SUMMARY"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee "$log"
  local start=$SECONDS rc=0
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$log" 2>&1 || rc=$?
  local status="ok"
  if ((rc == 124 || rc == 137)); then
    status="timeout after ${limit}s"
  elif ((rc != 0)); then
    status="failed rc=$rc"
  fi
  local last
  last="$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-100 | tr '\t' ' ' || true)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$last" >> "$SUMMARY"
  echo "--- $name: $status ($((SECONDS - start))s)"
}

run_stage env 20 440 "$PYTHON" -c "
import torch, subprocess
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))
try:
    import triton; print('triton', triton.__version__)
except ImportError as e:
    print('triton missing:', e)
print(subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip(), '(+ working tree)')
"

# Build in place against this machine's torch (pip -e needs network on the lent machine; build_ext does not).
run_stage build 200 250 "$PYTHON" setup.py build_ext --inplace

# Every op on every dtype through its first-use self-check: any fallback (a kernel that errs or is off the
# reference beyond the tolerance rule) fails this stage and is listed.
run_stage selfcheck 60 240 env MIXLORA_BACKEND=auto MIXLORA_SELFTEST=1 "$PYTHON" -c "
import json, sys, torch, mixlora_kernels._C
from mixlora_kernels import backend
print('loaded:', backend.loaded(), 'load errors:', backend.load_errors())
print(json.dumps(backend.check_all('cuda'), indent=1))
missing = [b for b in ('cuda', 'triton') if b not in backend.loaded()]
if backend.fallbacks() or missing:
    print('SELF-CHECK FAILED: fallbacks', json.dumps(backend.fallbacks(), indent=1), 'not loaded', missing)
    sys.exit(1)
print('self-check: every kernel passed')
"

# The extension against the float64 references (tests marked cuda: tests/test_cuda_ops.py and any other).
run_stage cuda-tests 150 190 "$PYTHON" -m pytest -q -rf -m cuda tests/ -p no:cacheprovider \
  --junitxml="$OUT/cuda-tests.xml"

# The Triton kernels' tests (on the GPU when they support it) and the extension's CPU-side tests.
run_stage triton-tests 90 130 "$PYTHON" -m pytest -q tests/test_cuda_ops.py tests/test_triton_*.py \
  -p no:cacheprovider --junitxml="$OUT/triton-tests.xml"

# FFN benchmark (LLaMA-2-7B FFN shapes on CUDA; all providers incl. cuda and triton).
run_stage bench 200 10 "$PYTHON" -m pytest -q --benchmark-only benchmarks/bench_ffn.py -k "$BENCH_K" \
  -p no:cacheprovider --benchmark-json "$OUT/bench.json"

if [[ -s "$OUT/bench.json" ]]; then
  run_stage report 15 0 "$PYTHON" -m benchmarks.report "$OUT/bench.json" -o "$OUT/bench.md" \
    --measured-cost "$OUT/measured_cost.json"
else
  printf 'report\tskipped (no bench.json)\t0\t-\n' >> "$SUMMARY"
fi

echo
echo "=== results in $OUT (logs/, *.xml, bench.json, bench.md); total ${SECONDS}s of ${BUDGET}s"
if [[ -s "$OUT/bench.md" ]]; then
  echo "--- measured on this GPU"
  cat "$OUT/bench.md"
  echo
fi
predicted="$(ls benchmarks/results/sm90-cost-*.md 2> /dev/null | tail -n 1 || true)"
if [[ -n "$predicted" ]]; then
  echo "--- predicted without a GPU ($predicted)"
  cat "$predicted"
  echo
fi
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
