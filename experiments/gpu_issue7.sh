#!/usr/bin/env bash
# Issue 7 on one H200, one device call (<= ~8.5 min wall): the packed ternary
# kernel tests compiled for the GPU (incl. the fused-epilogue and xla_int8 layout paths and the
# Mosaic GPU M = 1 kernel), the
# packed BitNet model tests (through the GPU kernels; the TF32 fix of the fake-quant reference),
# then experiments/bench_ternary.py with its config sweep (M = 1 and M = 4096 first). Everything lands under $OUT; a compact summary
# (test counts + the benchmark table) is printed last.
#
#   bash experiments/gpu_issue7.sh            # on the device (carry .whl for ml_collections)
#   TINY=1 bash experiments/gpu_issue7.sh     # CPU smoke test of this script (tiny bench, GPU
#                                             # tests selected but skipped)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_issue7_out}
mkdir -p "$OUT"
PY=${PY:-python3}
TINY=${TINY:-0}
export PYTHONUNBUFFERED=1
T_START=$(date +%s)

# ml_collections (imported by the config / model tests) from the carried wheels, if missing.
if ! "$PY" -c "import ml_collections" >/dev/null 2>&1; then
  LIB=/tmp/issue7_pylib
  if ls .whl/*.whl >/dev/null 2>&1 && \
     "$PY" -m pip install -q --no-deps --no-index --target "$LIB" .whl/*.whl >/dev/null 2>&1; then
    export PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}"
  else  # pure-python wheels import straight from the zip
    for w in .whl/*.whl; do [ -e "$w" ] && export PYTHONPATH="$PWD/$w${PYTHONPATH:+:$PYTHONPATH}"; done
  fi
fi
"$PY" -c "import ml_collections" >/dev/null 2>&1 || echo "WARNING: ml_collections not importable"

if [ "$TINY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SEL=(-k gpu)                      # only the GPU tests (skipped on CPU): exercises the plumbing
  BENCH_FLAGS=(--tiny)
  T_TEST=120; T_MODEL=120; T_BENCH=400
else
  SEL=()
  BENCH_FLAGS=(--budget_s=150)
  T_TEST=170; T_MODEL=90; T_BENCH=240
fi
MODEL_SEL=(-k packed)  # the packed-model tests (the 4 that failed on 2026-11-23 are among them)
[ "$TINY" = 1 ] && MODEL_SEL=(-k "packed and gpu")

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.txt"
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv; } >> "$OUT/env.txt" 2>&1 || true

section() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s) ==="
  timeout --signal=TERM --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
}
: > "$OUT/summary.txt"

# 1. kernel + packing tests, compiled for the GPU (interpret=False there)
# (the packing tests, tests/quant/test_ternary.py and tests/layers/test_packed_ternary_words.py, are
# backend-independent and run in CI on CPU)
section kernel_tests "$T_TEST" "$PY" -m pytest -p no:cacheprovider "${SEL[@]}" \
  tests/pallas_kernels/test_ternary_matmul.py tests/pallas_kernels/test_ternary_mgpu.py
# 2. BitNet model tests (test_packed_model_on_gpu_kernels: decode and prefill through the kernels)
section model_tests "$T_MODEL" "$PY" -m pytest -p no:cacheprovider "${MODEL_SEL[@]}" \
  tests/models/test_bitnet_model.py
# 3. benchmark with the sweep (writes the table after every row; a cut run keeps what is done)
section bench "$T_BENCH" "$PY" experiments/bench_ternary.py --out="$OUT/ternary.md" \
  "${BENCH_FLAGS[@]}"

echo
echo "================ summary ($(( $(date +%s) - T_START )) s) ================"
cat "$OUT/env.txt" | head -3
for f in kernel_tests model_tests; do
  echo "$f: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/$f.log" | tail -n 1)"
  grep -E '^(FAILED|ERROR)' "$OUT/$f.log" | head -n 8
done
cat "$OUT/summary.txt"
grep -E "copy bandwidth|FAIL" "$OUT/bench.log" | head -n 12
grep -E "^K=" "$OUT/bench.log" | head -n 12   # bf16 gross/net and the no-op chain per row
[ -f "$OUT/ternary.md" ] && tail -n +6 "$OUT/ternary.md" || echo "no benchmark table"
