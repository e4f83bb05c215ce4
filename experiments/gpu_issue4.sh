#!/usr/bin/env bash
# Issue 4 on one H200, one device call (<= ~9 min wall): the Mosaic GPU flash-attention tests
# compiled for the GPU (tests/pallas_kernels/test_flash_attention_mosaic_gpu.py), a representative
# subset of the Triton-lowering tests and the `attend` dispatch tests, then
# experiments/bench_attention.py at D=128 and D=64, S in {1k, 4k, 16k, 32k}, causal and not, forward
# and forward+backward: ours (Mosaic GPU, and the Triton lowering at D=128) against cuDNN, jax's
# Pallas mha (Triton) and jax's Mosaic-GPU attention in the same run. Everything lands under $OUT;
# a compact summary (test counts + the benchmark tables) is printed last.
# (Earlier sessions' Triton variants: IMPLS_128=pallas,pallas_fma,atomic_w8,cudnn,jax_mha.)
#
#   bash experiments/gpu_issue4.sh            # on the device
#   TINY=1 bash experiments/gpu_issue4.sh     # CPU smoke test of this script (interpret mode,
#                                             # tiny shapes; GPU-only tests are skipped)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_issue4_out}
mkdir -p "$OUT"
PY=${PY:-python3}
TINY=${TINY:-0}
export PYTHONUNBUFFERED=1
T_START=$(date +%s)
TEST=tests/pallas_kernels/test_flash_attention.py
TEST_MGPU=tests/pallas_kernels/test_flash_attention_mosaic_gpu.py
IMPLS_128=${IMPLS_128:-mosaic_gpu,cudnn,jax_mha,jax_mgpu,pallas}
IMPLS_64=${IMPLS_64:-mosaic_gpu,cudnn,jax_mha}

if [ "$TINY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SEL_NEW=(-k "errors")
  SEL_CORE=(-k "len7 or dispatch")
  SEQS=64
  BENCH_FLAGS=(--tiny --batch=1 --heads=4 --kv_heads=2 --time_budget_s=60)
  IMPLS_128=pallas; IMPLS_64=pallas
  T_NEW=120; T_CORE=120; T_B128=240; T_B64=240
else
  SEL_NEW=(-k "not interpret")
  # A representative subset of the Triton-lowering cases plus the attend dispatch.
  SEL_CORE=(-k "len7 or bf16 or fully_masked or attend_impls or dispatch")
  SEQS=1024,4096,16384,32768
  BENCH_FLAGS=(--mha_modes=fwd)
  T_NEW=240; T_CORE=60; T_B128=250; T_B64=110
fi

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.txt"
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv; } >> "$OUT/env.txt" 2>&1 || true

section() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s) ==="
  timeout --signal=TERM --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
}
: > "$OUT/summary.txt"

# 1. Mosaic GPU kernels, compiled (GPU_CASES) + errors
section tests_mgpu "$T_NEW" "$PY" -m pytest -p no:cacheprovider --durations=5 "${SEL_NEW[@]}" "$TEST_MGPU"
# 2. representative subset of the Triton-lowering cases and the attend dispatch
section tests_core "$T_CORE" "$PY" -m pytest -p no:cacheprovider --durations=5 \
  "${SEL_CORE[@]}" "$TEST"
# 3. benchmarks (each writes its table after every shape; a cut run keeps what is done)
mkdir -p "$OUT/d128" "$OUT/d64"
section bench128 "$T_B128" "$PY" experiments/bench_attention.py --out_dir="$OUT/d128" --seqs=$SEQS \
  --head_dims=128 --impls=$IMPLS_128 --time_budget_s=$(( T_B128 - 35 )) "${BENCH_FLAGS[@]}"
section bench64 "$T_B64" "$PY" experiments/bench_attention.py --out_dir="$OUT/d64" --seqs=$SEQS \
  --head_dims=64 --impls=$IMPLS_64 --time_budget_s=$(( T_B64 - 30 )) "${BENCH_FLAGS[@]}"

echo
echo "================ summary ($(( $(date +%s) - T_START )) s) ================"
head -3 "$OUT/env.txt"
for f in tests_mgpu tests_core; do
  echo "$f: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/$f.log" | tail -n 1)"
  grep -E '^(FAILED|ERROR)' "$OUT/$f.log" | cut -c1-400 | head -n 8
done
cat "$OUT/summary.txt"
grep -h -E '"error": "' "$OUT"/bench*.log | cut -c1-300 | head -n 6
for d in d128 d64; do
  [ -f "$OUT/$d/attention_bench.md" ] && cat "$OUT/$d/attention_bench.md" || echo "no $d table"
done
