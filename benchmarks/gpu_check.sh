#!/usr/bin/env bash
# One prepared run on a GPU machine (sized for an H200, under 8 minutes):
#   1. the `gpu` tests of tests/test_triton.py (and test_triton_quant/stats/sinks.py): every
#      interpreter case natively on the GPU plus the GPU-only tests (large shapes, fp32
#      exactness, long-cache decode, quantized long-cache decode, weights), with one
#      heuristic tile per kernel (compile time is what costs here, not speed);
#   2. benchmarks/gpu.py: triton vs SDPA (flash, efficient, cuDNN) and compiled FlexAttention,
#      autotuned, under a time budget; JSON + markdown table.
# Everything lands in $OUT (default benchmarks/results/gpu_run): env.txt, pytest.txt,
# bench.log, gpu_h200.json, gpu_h200.md. The table is printed last.
#
# Usage: OUT=/some/dir benchmarks/gpu_check.sh        (TEST_S / BENCH_S override the budgets)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_run}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TEST_S="${TEST_S:-210}"
BENCH_S="${BENCH_S:-260}"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET
t0=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. tests (xdist spreads the compiles over the CPU cores when it is installed)
par=()
if "$PY" -c "import xdist" 2>/dev/null; then par=(-n 8); fi
echo "== tests (limit ${TEST_S}s)"
SELFATTN_TRITON_AUTOTUNE=0 timeout "$TEST_S" "$PY" -m pytest -q -m gpu tests/test_triton.py \
  tests/test_triton_quant.py tests/test_triton_stats.py tests/test_triton_sinks.py \
  "${par[@]}" -p no:cacheprovider --durations=15 -rfE > "$OUT/pytest.txt" 2>&1
test_rc=$?
tail -n 40 "$OUT/pytest.txt"
echo "pytest exit code: $test_rc ($(( $(date +%s) - t0 )) s so far)"

# 2. benchmark (autotuning on, at most 3 candidate tiles per kernel to bound compile time)
echo "== benchmark (budget ${BENCH_S}s)"
SELFATTN_TRITON_MAX_CONFIGS="${SELFATTN_TRITON_MAX_CONFIGS:-3}" \
  timeout $(( BENCH_S + 40 )) "$PY" benchmarks/gpu.py --out "$OUT" --budget "$BENCH_S" \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
grep -v '^|' "$OUT/bench.log" | tail -n 30
echo "benchmark exit code: $bench_rc; total $(( $(date +%s) - t0 )) s"
if [ -f "$OUT/gpu_h200.md" ]; then cat "$OUT/gpu_h200.md"; fi
exit $(( test_rc != 0 || bench_rc != 0 ))
