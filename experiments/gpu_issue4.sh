#!/usr/bin/env bash
# Issue 4 follow-up on one H200, one device call (<= ~5 min wall): flash-attention tests compiled
# for the GPU (new atomic-dQ / FMA-softmax paths first, then a representative subset of the rest),
# then experiments/bench_attention.py at D=128 (D=64 if the time budget allows), S in {4096, 16384},
# causal and not, forward and forward+backward, for our kernel's variants (two-kernel vs atomic-dQ
# backward, FMA softmax) against cuDNN and jax's Pallas mha in the same run. Everything lands under
# $OUT; a compact summary (test counts + the benchmark table) is printed last.
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
VARIANTS=pallas,pallas_fma,atomic_w8,atomic_64x128,atomic_fma

if [ "$TINY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SEL_NEW=(-k "atomic-dq-gqa4 or fma-unmasked or gpu_atomic")
  SEL_CORE=(-k "not atomic and not fma and (len7 or dispatch or gpu_sweep)")
  BENCH_FLAGS=(--tiny --seqs=64 --head_dims=64 --batch=1 --heads=4 --kv_heads=2
               --impls=$VARIANTS,cudnn,jax_mha --time_budget_s=60)
  T_NEW=120; T_CORE=120; T_BENCH=240
else
  # New paths: every atomic / FMA case (CPU-interpret cases run compiled here + GPU_ATOMIC).
  SEL_NEW=(-k "atomic or fma")
  # A representative subset of the rest (the whole file took > 200 s compiled on the H200).
  CORE="len7 or len129 or transposed-dkv-causal or bf16 or fully_masked or gpu-1000-causal"
  CORE="$CORE or attend_impls or dispatch"
  SEL_CORE=(-k "not atomic and not fma and ($CORE)")
  BENCH_FLAGS=(--seqs=4096,16384 --head_dims=128,64 --impls=$VARIANTS,cudnn,jax_mha
               --mha_modes=fwd --time_budget_s=95)
  T_NEW=75; T_CORE=55; T_BENCH=150
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

# 1. new paths (atomic-dQ backward, FMA softmax), compiled for the GPU (interpret=False there)
section tests_new "$T_NEW" "$PY" -m pytest -p no:cacheprovider --durations=5 \
  "${SEL_NEW[@]}" "$TEST"
# 2. representative subset of the existing cases
section tests_core "$T_CORE" "$PY" -m pytest -p no:cacheprovider --durations=5 \
  "${SEL_CORE[@]}" "$TEST"
# 3. benchmark (writes the table after every shape; a cut run keeps what is done)
section bench "$T_BENCH" "$PY" experiments/bench_attention.py --out_dir="$OUT" "${BENCH_FLAGS[@]}"

echo
echo "================ summary ($(( $(date +%s) - T_START )) s) ================"
head -3 "$OUT/env.txt"
for f in tests_new tests_core; do
  echo "$f: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/$f.log" | tail -n 1)"
  grep -E '^(FAILED|ERROR)' "$OUT/$f.log" | cut -c1-400 | head -n 8
done
cat "$OUT/summary.txt"
grep -E '"error": "' "$OUT/bench.log" | cut -c1-300 | head -n 6
[ -f "$OUT/attention_bench.md" ] && cat "$OUT/attention_bench.md" || echo "no benchmark table"
