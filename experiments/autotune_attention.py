"""Autotune the Triton flash-attention tiles on this GPU; writes tuned_blocks.json.

For each (head_dim, sequence bucket, causal) it times the forward over a few (block_q rows,
block_k, num_warps, num_stages) candidates, then the dQ and dK/dV kernels (through the
forward+backward time, forward fixed at its best), and keeps the fastest. It also measures the
FlashAttention-4 variants on the tuned forward (exp instead of exp2; conditional rescaling with
threshold 8.0 in log2 units) so the choice between them is a measurement, not a guess.
`fma_softmax` (exponent as one FMA in unmasked tiles) is kept if it makes the forward faster, and
the backward is tuned over both options: two kernels (dQ kernel tiles, then dK/dV tiles) and the
atomic-dQ kernel (`dq_atomic`, dK/dV tiles in ATOMIC_DKV); the faster one goes into the table.
Shapes as in the benchmark: B=4, 16 query heads, 4 KV heads, bf16.

  python3 experiments/autotune_attention.py --out=pallas_kernels/flash_attention/tuned_blocks.json
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.bench_attention import attention_fns, flops, make_inputs, time_fn  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels.flash_attention import BlockSizes  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels.flash_attention.api import DEFAULT_BLOCKS, table_key  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "pallas_kernels/flash_attention/tuned_blocks.json", "table to write")
flags.DEFINE_string("tune_seqs", "4096,16384", "sequence buckets to tune")
flags.DEFINE_string("tune_head_dims", "128,64", "head dims to tune")
flags.DEFINE_float("tune_time_budget_s", 420.0, "stop tuning new shapes after this many seconds")

FWD = {128: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
             (128, 64, 4, 2)],
       64: [(128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4),
            (256, 64, 8, 3)]}
DQ = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 3)]
DKV = [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 128, 4, 2)]
# dK/dV tiles for the atomic-dQ backward: it also holds a [block_q, H] fp32 dQ tile, so 8 warps.
ATOMIC_DKV = [(64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 128, 4, 2)]


def _time(blocks, S, D, causal, mode, inputs):
  fwd, fb = attention_fns("pallas", causal, D ** -0.5, blocks)
  fn, args = (fwd, [s[:3] for s in inputs]) if mode == "fwd" else (fb, inputs)
  try:
    sec = time_fn(fn, args, target_s=0.03, trials=3)
  except Exception as e:  # pylint: disable=broad-except
    print(f"  failed {blocks}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return float("inf")
  print(f"  {mode} {sec * 1e3:8.3f} ms {flops(4, 16, S, D, causal, mode) / sec / 1e12:6.0f} TF/s "
        f"{blocks}", flush=True)
  return sec


def main(argv):
  del argv
  t0 = time.time()
  entries, log = {}, []
  base = DEFAULT_BLOCKS["triton"]
  for D in [int(x) for x in FLAGS.tune_head_dims.split(",")]:
    for S in [int(x) for x in FLAGS.tune_seqs.split(",")]:
      for causal in (True, False):
        if time.time() - t0 > FLAGS.tune_time_budget_s:
          print(f"budget reached, skipping D={D} S={S} causal={causal}", flush=True)
          continue
        print(f"== D={D} S={S} causal={causal}", flush=True)
        inputs = make_inputs(4, S, 16, 4, D)
        best, best_t = None, float("inf")
        for bq, bk, w, st in FWD[D]:
          blk = base.replace(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
          t = _time(blk, S, D, causal, "fwd", inputs)
          if t < best_t:
            best, best_t = blk, t
        t = _time(best.replace(heads_per_tile=1), S, D, causal, "fwd", inputs)
        if t < best_t:
          best, best_t = best.replace(heads_per_tile=1), t
        rec = {"D": D, "S": S, "causal": causal, "fwd_ms": best_t * 1e3}
        if D == 128:  # FA4 variants on the tuned forward.
          rec["fwd_ms_exp_not_exp2"] = _time(best.replace(use_exp2=False), S, D, causal, "fwd",
                                             inputs) * 1e3
          rec["fwd_ms_cond_rescale_8"] = _time(best.replace(rescale_threshold=8.0), S, D, causal,
                                               "fwd", inputs) * 1e3
        t = _time(best.replace(fma_softmax=True), S, D, causal, "fwd", inputs)
        rec["fwd_ms_fma_softmax"] = t * 1e3
        if t < best_t:
          best, best_t = best.replace(fma_softmax=True), t
        fb_t = float("inf")
        for bq, bk, w, st in DQ:
          blk = best.replace(dq_block_q=bq, dq_block_k=bk, dq_num_warps=w, dq_num_stages=st)
          t = _time(blk, S, D, causal, "fwd+bwd", inputs)
          if t < fb_t:
            best, fb_t = blk, t
        for bq, bk, w, st in DKV[1:]:
          blk = best.replace(dkv_block_q=bq, dkv_block_k=bk, dkv_num_warps=w, dkv_num_stages=st)
          t = _time(blk, S, D, causal, "fwd+bwd", inputs)
          if t < fb_t:
            best, fb_t = blk, t
        two_kernel_t = fb_t
        for bq, bk, w, st in ATOMIC_DKV:
          blk = best.replace(dq_atomic=True, dkv_block_q=bq, dkv_block_k=bk, dkv_num_warps=w,
                             dkv_num_stages=st)
          t = _time(blk, S, D, causal, "fwd+bwd", inputs)
          if t < fb_t:
            best, fb_t = blk, t
        rec["fwd_bwd_ms_two_kernel"] = two_kernel_t * 1e3
        rec["fwd_bwd_ms"] = fb_t * 1e3
        rec["blocks"] = {f: getattr(best, f) for f in best.__dataclass_fields__}
        log.append(rec)
        entries[table_key("triton", D, "bfloat16", S, causal)] = rec["blocks"]
        print(json.dumps(rec), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
          json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                     "shapes": "B=4, H=16, KV heads=4, bf16", "entries": entries,
                     "measurements": log}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
