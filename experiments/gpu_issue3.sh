#!/usr/bin/env bash
# Issue 3 on one H200, one device call (~6 min): the decode-path tests compiled for the GPU (fused
# add + RMSNorm, decode attention + its split-combine kernel, GEMV, dense cache, generate, model, HF
# parity), then experiments/bench_decode.py at batch 1 (2k / 32k, fused norms on and off in the same
# run) and experiments/profile_decode.py (one 2k layer in launch order). Results land under $OUT.
#
#   bash experiments/gpu_issue3.sh                  # on the device (carry .whl for ml_collections)
#   BATCHES=8,64 VARIANTS=auto:auto bash experiments/gpu_issue3.sh   # the larger batches
#   SKIP_TESTS=1 / SKIP_PROFILE=1 skip those parts.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_issue3_out}
mkdir -p "$OUT"
export OUT
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
BATCHES=${BATCHES:-1}
CONTEXTS=${CONTEXTS:-2048,32768}
VARIANTS=${VARIANTS:-auto:auto:auto,auto:auto:xla}
TRIALS=${TRIALS:-5}
T_START=$(date +%s)

if ! "$PY" -c "import ml_collections" >/dev/null 2>&1; then
  LIB=/tmp/issue3_pylib
  "$PY" -m pip install -q --no-deps --no-index --target "$LIB" .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH="$LIB:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.txt"

section() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s) ==="
  timeout --signal=TERM --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
}
: > "$OUT/summary.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  section tests ${T_TESTS:-420} "$PY" -m pytest -q -p no:cacheprovider -p no:warnings \
    tests/pallas_kernels/test_add_rmsnorm.py tests/pallas_kernels/test_decode_attention.py \
    tests/pallas_kernels/test_gemv.py tests/kv/test_dense.py tests/decode/test_generate.py \
    tests/models/test_transformer.py tests/interop
fi
section bench 330 "$PY" -m experiments.bench_decode --batches="$BATCHES" --contexts="$CONTEXTS" \
  --trials="$TRIALS" --variants="$VARIANTS" --diagnose=false --out="$OUT/decode_bench.md"
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  for nm in ${PROFILE_NORMS:-auto xla}; do
    section "profile_$nm" 90 "$PY" -m experiments.profile_decode --context=2048 --sequence \
      --norm="$nm" --profile_out="$OUT/decode_profile_norm_$nm.md"
  done
fi

echo "================ summary ($(( $(date +%s) - T_START )) s) ================"
grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" 2>/dev/null | tail -n 1
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" 2>/dev/null | head -n 10
cat "$OUT/summary.txt"
grep -E "copy bandwidth|ms/step|FAILED" "$OUT/bench.log"
for f in "$OUT"/decode_profile_norm_*.md; do
  [ -f "$f" ] && { echo "$f"; grep -E "^Per step|^\| [0-9]+ \|" "$f" | head -n 30; }
done
