#!/usr/bin/env bash
# Issue 5 on one H200, in ONE run of <= ~5 minutes wall time (every section has its own timeout):
#   1. GPU tests of the quantized decode kernels (real Triton kernels, both dot orientations) and of
#      the TurboQuant / KIVI caches' kernel path;
#   2. experiments/bench_kv_decode.py: correctness on real codes, launch-config sweep of the
#      quantized kernels at 64k, then XLA / cuDNN / our bf16 / TurboQuant 4, 2.5, 3, 2 / KIVI 2, 4
#      at 64k, 128k, 32k (B=8, 32/8 heads, D=128; device time via experiments/devtime.py, inputs
#      rotated past the 60 MB L2), and the encode cost (TurboQuantCache.update, T=1) vs the step;
#   3. experiments/turboquant_distortion.py for the d=1536 row at 1e5 vectors (data drawn on the GPU).
# Everything lands in $OUT (markdown + json + logs); a compact summary is printed at the end.
#
#   bash experiments/gpu_issue5.sh              # on the GPU machine (OUT defaults to ./out_issue5)
#   TINY=1 PY=.venv/bin/python bash experiments/gpu_issue5.sh   # CPU smoke run (interpreter, tiny)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out_issue5}
mkdir -p "$OUT"
PY=${PY:-python3}
command -v "$PY" > /dev/null 2>&1 || PY=python
TINY=${TINY:-0}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
status() { echo "$1: rc=$2" >> "$OUT/status.txt"; }
: > "$OUT/status.txt"

if [ "$TINY" = "1" ]; then
  export JAX_PLATFORMS=cpu
  T_TEST1=400; T_TEST2=400; T_BENCH=900; T_DIST=300
  BENCH_ARGS=(--tiny)
  DIST_ARGS=(--dims=64 --num_vectors=2000 --num_quantizers=2 --chunk=1000 --bits=1,2 --device_data)
else
  # budget: ~15 s start-up + 45 + 35 + 145 + 50 = ~290 s (worst case; typically less)
  T_TEST1=45; T_TEST2=35; T_BENCH=145; T_DIST=50
  BENCH_ARGS=(--contexts=32768,65536,131072 --sweep_context=65536 --check_context=8192
              --budget_s=120 --trials=3)
  DIST_ARGS=(--dims=1536 --num_vectors=100000 --num_quantizers=4 --chunk=25000 --device_data)
fi

stamp "environment"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>/dev/null || true
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -2; } | tee "$OUT/env.txt"

stamp "1a. kernel tests (tests/pallas_kernels/test_quant_decode_attention.py)"
timeout -k 5 "$T_TEST1" $PY -m pytest -p no:cacheprovider \
  tests/pallas_kernels/test_quant_decode_attention.py > "$OUT/pytest_kernels.log" 2>&1
rc=$?; status pytest_kernels $rc; tail -4 "$OUT/pytest_kernels.log"

stamp "1b. cache kernel-path tests (real kernel on GPU)"
timeout -k 5 "$T_TEST2" $PY -m pytest -p no:cacheprovider -k "kernel_path or stores" \
  tests/kv/test_turboquant_cache.py tests/kv/test_kivi_cache.py > "$OUT/pytest_caches.log" 2>&1
rc=$?; status pytest_caches $rc; tail -4 "$OUT/pytest_caches.log"

stamp "2. bench_kv_decode"
timeout -k 5 "$T_BENCH" $PY experiments/bench_kv_decode.py "${BENCH_ARGS[@]}" \
  --out="$OUT/kv_decode.md" --json="$OUT/kv_decode.json" > "$OUT/bench.log" 2>&1
rc=$?; status bench $rc; tail -3 "$OUT/bench.log"

stamp "3. turboquant_distortion (d=1536 row)"
timeout -k 5 "$T_DIST" $PY experiments/turboquant_distortion.py "${DIST_ARGS[@]}" \
  --out_dir="$OUT/distortion" > "$OUT/distortion.log" 2>&1
rc=$?; status distortion $rc; tail -2 "$OUT/distortion.log"

stamp "summary"
{
  echo "## status (rc 124 = section hit its time limit; partial results are still in \$OUT)"
  cat "$OUT/status.txt"
  echo "## tests"
  grep -E "passed|failed|error" "$OUT/pytest_kernels.log" | tail -1
  grep -E "passed|failed|error" "$OUT/pytest_caches.log" | tail -1
  echo "## correctness (rel err vs dequantized reference)"
  grep -E "^\| (TurboQuant|KIVI|ours bf16)" "$OUT/kv_decode.md" 2>/dev/null
  echo "## sweep @ 64k (us, TB/s)"
  grep -E "^\| (tq4|tq2.5|kivi2) " "$OUT/kv_decode.md" 2>/dev/null
  sed -n '/==== summary/,$p' "$OUT/bench.log"
  echo "## distortion d=1536"
  grep -E "^d= *[0-9]+ " "$OUT/distortion.log"
  echo "total wall: $(( $(date +%s) - T0 )) s"
} | tee "$OUT/summary.txt"
