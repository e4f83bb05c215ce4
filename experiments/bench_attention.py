"""Benchmark: effjax's Pallas flash attention vs cuDNN, jax's Pallas `mha` and XLA (H200).

"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (Dao,
arXiv 2307.08691) FLOP convention: forward 4·B·H·S²·D (halved when
causal), forward+backward 3.5x the forward. GQA 4:1 (16 query heads, 4 KV heads); jax's `mha`
has no GQA, so it gets K/V repeated to 16 heads (the repeat is done once, outside the timing).
XLA (`jax.nn.dot_product_attention(implementation="xla")`) materialises the S x S logits and is
run only up to S = 4096.

Timing: each function is jitted, compiled and warmed up; then several batches of back-to-back
calls (alternating between two input sets) are timed with `block_until_ready` at the end of the
batch, and the median per-call time is reported (device throughput; dispatch overlaps with
execution).

  python3 experiments/bench_attention.py --out_dir=results
  # backward / forward variants of our kernel (names in VARIANTS), cuDNN and jax's mha:
  python3 experiments/bench_attention.py --seqs=4096,16384 --head_dims=128 \
      --impls=pallas,pallas_fma,atomic_w8,atomic_64x128,atomic_fma,cudnn,jax_mha

Variants of our kernel (`VARIANTS`): the tuned tiles of the shape (tuned_blocks.json) with some
fields overridden, e.g. `dq_atomic=True` (FA2's atomic dQ: the dK/dV kernel also accumulates dQ,
5 instead of 7 backward matmuls) or `fma_softmax=True` (exponent as one FMA in unmasked tiles).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.flash_attention import BlockSizes, flash_attention, lookup_block_sizes  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> (BlockSizes overrides on top of the tuned entry, modes timed). The forward of the
# backward-only variants is the tuned one, so only fwd+bwd is timed for them.
VARIANTS = {
    "pallas": ({}, ("fwd", "fwd+bwd")),
    "pallas_fma": ({"fma_softmax": True}, ("fwd", "fwd+bwd")),
    "pallas_ftz": ({"ftz_exp2": True}, ("fwd", "fwd+bwd")),
    "pallas_ftz_fma": ({"ftz_exp2": True, "fma_softmax": True}, ("fwd", "fwd+bwd")),
    "atomic": ({"dq_atomic": True}, ("fwd+bwd",)),
    "atomic_w8": ({"dq_atomic": True, "dkv_num_warps": 8}, ("fwd+bwd",)),
    "atomic_64x128": ({"dq_atomic": True, "dkv_block_q": 64, "dkv_block_k": 128,
                       "dkv_num_warps": 8, "dkv_num_stages": 2}, ("fwd+bwd",)),
    "atomic_128x64": ({"dq_atomic": True, "dkv_block_q": 128, "dkv_block_k": 64,
                       "dkv_num_warps": 8, "dkv_num_stages": 2}, ("fwd+bwd",)),
    "atomic_fma": ({"dq_atomic": True, "dkv_num_warps": 8, "fma_softmax": True}, ("fwd+bwd",)),
}
PEERS = ("cudnn", "jax_mha", "jax_mgpu", "xla")

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "results", "where to write attention_bench.{md,json}")
flags.DEFINE_string("seqs", "1024,4096,16384,32768", "sequence lengths")
flags.DEFINE_string("head_dims", "128,64", "head dims")
flags.DEFINE_string("impls", "pallas,cudnn,jax_mha,xla", "implementations to time")
flags.DEFINE_integer("batch", 4, "batch size")
flags.DEFINE_integer("heads", 16, "query heads")
flags.DEFINE_integer("kv_heads", 4, "kv heads (GQA)")
flags.DEFINE_integer("xla_max_seq", 4096, "largest S for the XLA reference")
flags.DEFINE_float("time_budget_s", 540.0, "stop starting new shapes after this many seconds")
flags.DEFINE_bool("breakdown", False, "also time our backward's two kernels separately (D=128)")
flags.DEFINE_string("mha_modes", "fwd,fwd+bwd", "modes timed for jax's mha")
flags.DEFINE_string("causal", "true,false", "causal settings to run")
flags.DEFINE_bool("tiny", False, "CPU smoke test: interpret mode, tiny shapes (not a benchmark)")


def time_fn(fn, arg_sets, *, target_s: float = 0.05, trials: int = 5) -> float:
  """Median seconds per call of jitted `fn` (after compile + warm-up)."""
  jax.block_until_ready(fn(*arg_sets[0]))
  t = time.perf_counter()
  jax.block_until_ready(fn(*arg_sets[-1]))
  est = time.perf_counter() - t
  n = int(max(1, min(100, target_s / max(est, 1e-6))))
  if est > 0.2:
    trials = 3
  samples = []
  for _ in range(trials):
    t = time.perf_counter()
    out = None
    for r in range(n):
      out = fn(*arg_sets[r % len(arg_sets)])
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t) / n)
  return statistics.median(samples)


def attention_fns(impl: str, causal: bool, scale: float, blocks=None, interpret=False):
  """(forward, forward+backward) callables for one implementation."""
  if impl == "pallas":
    f = lambda q, k, v: flash_attention(q, k, v, causal=causal, sm_scale=scale,
                                        block_sizes=blocks, interpret=interpret)
  elif impl == "mosaic_gpu":  # our Mosaic GPU (warp-specialised, Hopper) kernels
    f = lambda q, k, v: flash_attention(q, k, v, causal=causal, sm_scale=scale,
                                        backend="mosaic_gpu", interpret=interpret)
  elif impl == "cudnn":
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                                     implementation="cudnn")
  elif impl == "xla":
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                                     implementation="xla")
  elif impl == "jax_mha":
    from jax.experimental.pallas.ops.gpu import attention as jax_attention  # pylint: disable=g-import-not-at-top
    f = lambda q, k, v: jax_attention.mha(q, k, v, None, sm_scale=scale, causal=causal)
  elif impl == "jax_mgpu":
    # jax's Mosaic-GPU (Hopper, warp-specialised) attention; its shared-memory buffers are
    # float16, so it is given float16 inputs (same tensor-core rate as bf16); causal has no
    # backward there. It applies no softmax scale: the benchmark's q is pre-scaled (run_shape).
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=g-import-not-at-top
    cfg = attention_mgpu.TuningConfig(
        block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal, compute_wgs_bwd=1,
        block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    f = lambda q, k, v: attention_mgpu.attention(q, k, v, cfg)
  else:
    raise ValueError(f"unknown impl {impl!r}")

  def fwd_bwd(q, k, v, do):
    _, vjp = jax.vjp(f, q, k, v)
    return vjp(do)

  return jax.jit(f), jax.jit(fwd_bwd)


def flops(B, H, S, D, causal, mode):
  f = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
  return f * (3.5 if mode == "fwd+bwd" else 1.0)


def make_inputs(B, S, H, K, D, n_sets=2, repeat_kv=False):
  sets = []
  for i in range(n_sets):
    key = jax.random.PRNGKey(1000 + i)
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, S, H, D), jnp.bfloat16)
    k = jax.random.normal(kk, (B, S, K, D), jnp.bfloat16)
    v = jax.random.normal(kv, (B, S, K, D), jnp.bfloat16)
    do = jax.random.normal(kd, (B, S, H, D), jnp.bfloat16)
    if repeat_kv:
      k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    sets.append((q, k, v, do))
  return sets


def run_shape(B, H, K, S, D, causal, impls, rows, blocks=None, label=None, interpret=False):
  scale = D ** -0.5
  base = make_inputs(B, S, H, K, D)
  rep = None
  for impl in impls:
    if impl == "xla" and S > FLAGS.xla_max_seq:
      continue
    if impl == "jax_mha" and rep is None:
      rep = [(q, jnp.repeat(k, H // K, 2), jnp.repeat(v, H // K, 2), do) for q, k, v, do in base]
    sets = rep if impl == "jax_mha" else base
    modes = ("fwd", "fwd+bwd")
    name, blk = impl, blocks
    if impl in VARIANTS:
      overrides, modes = VARIANTS[impl]
      blk = (blocks or lookup_block_sizes("triton", D, jnp.bfloat16, S, causal)).replace(
          **overrides)
      impl = "pallas"
    elif impl == "jax_mha":
      modes = tuple(FLAGS.mha_modes.split(","))
    elif impl == "jax_mgpu":
      sets = [((q * scale).astype(jnp.float16),) + tuple(a.astype(jnp.float16) for a in rest)
              for q, *rest in base]
      modes = ("fwd",) if causal else ("fwd", "fwd+bwd")
    elif impl not in PEERS + ("mosaic_gpu",):
      known = sorted(VARIANTS) + list(PEERS) + ["mosaic_gpu"]
      raise ValueError(f"--impls: unknown {impl!r}; known: {known}")
    fwd, fb = attention_fns(impl, causal, scale, blk, interpret=interpret)
    for mode, fn, args in (("fwd", fwd, [s[:3] for s in sets]), ("fwd+bwd", fb, sets)):
      if mode not in modes:
        continue
      try:
        sec = time_fn(fn, args)
        err = None
      except Exception as e:  # pylint: disable=broad-except
        sec, err = float("nan"), f"{type(e).__name__}: {str(e)[:200]}"
      row = dict(impl=label or name, D=D, S=S, causal=causal, mode=mode, ms=sec * 1e3,
                 tflops=flops(B, H, S, D, causal, mode) / sec / 1e12 if sec == sec else None,
                 error=err)
      rows.append(row)
      print(json.dumps(row), flush=True)
    del fwd, fb


def table(rows, B, H, K):
  out = [f"B={B}, H={H}, KV heads={K} (GQA {H // K}:1), bf16, {jax.devices()[0].device_kind}, "
         f"jax {jax.__version__}", "",
         "| D | S | causal | mode | pallas (ours) TF/s | cuDNN TF/s | jax mha TF/s | XLA TF/s "
         "| ours/cuDNN | ours/jax mha |", "|---|---|---|---|---|---|---|---|---|---|"]
  keyed = {}
  rows = [r for r in rows if r["mode"] in ("fwd", "fwd+bwd")]
  for r in rows:
    keyed[(r["D"], r["S"], r["causal"], r["mode"], r["impl"])] = r["tflops"]
  shapes = sorted({(r["D"], r["S"], r["causal"], r["mode"]) for r in rows},
                  key=lambda x: (-x[0], x[3], x[1], not x[2]))
  fmt = lambda x: "-" if x is None else f"{x:.0f}"
  for D, S, c, m in shapes:
    g = lambda i: keyed.get((D, S, c, m, i))
    ours, cud, mha, xla = g("pallas"), g("cudnn"), g("jax_mha"), g("xla")
    ratio = lambda a, b: "-" if not a or not b else f"{a / b:.2f}"
    out.append(f"| {D} | {S} | {'yes' if c else 'no'} | {m} | {fmt(ours)} | {fmt(cud)} | "
               f"{fmt(mha)} | {fmt(xla)} | {ratio(ours, cud)} | {ratio(ours, mha)} |")
  return "\n".join(out)


def variant_table(rows, B, H, K):
  """Compact table over every timed impl: TF/s, and for our variants the ratio to cuDNN (and,
  forward only, to jax's mha)."""
  rows = [r for r in rows if r["mode"] in ("fwd", "fwd+bwd")]
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  keyed = {(r["D"], r["S"], r["causal"], r["mode"], r["impl"]): r for r in rows}
  out = [f"B={B}, H={H}, KV heads={K} (GQA {H // K}:1), bf16, {jax.devices()[0].device_kind}, "
         f"jax {jax.__version__}; TF/s [x cuDNN, x jax mha (fwd)]", "",
         "| D | S | causal | mode | " + " | ".join(impls) + " |",
         "|---|---|---|---|" + "---|" * len(impls)]
  shapes = sorted({(r["D"], r["S"], r["causal"], r["mode"]) for r in rows},
                  key=lambda x: (-x[0], x[3], x[1], not x[2]))
  for D, S, c, m in shapes:
    tf = lambda i: (keyed.get((D, S, c, m, i)) or {}).get("tflops")
    cells = []
    for i in impls:
      r = keyed.get((D, S, c, m, i))
      if r is None:
        cells.append("")
        continue
      if r["tflops"] is None:
        cells.append("err" if r.get("error") else "-")
        continue
      cell = f"{r['tflops']:.0f}"
      if i not in PEERS:
        extra = [f"{r['tflops'] / tf(p):.2f}" for p in ("cudnn", "jax_mha")
                 if tf(p) and (p == "cudnn" or m == "fwd")]
        if extra:
          cell += " [" + ", ".join(extra) + "]"
      cells.append(cell)
    out.append(f"| {D} | {S} | {'yes' if c else 'no'} | {m} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def backward_breakdown(B, H, K, S, D, causal, rows):
  """fwd + dQ kernel only (grad wrt q) and fwd + dK/dV kernel only (grad wrt k, v): XLA drops
  the unused pallas_call, so these split the backward time between our two kernels."""
  scale = D ** -0.5
  sets = make_inputs(B, S, H, K, D)
  f = lambda q, k, v: flash_attention(q, k, v, causal=causal, sm_scale=scale)
  dq_only = jax.jit(lambda q, k, v, do: jax.vjp(lambda q: f(q, k, v), q)[1](do))
  dkv_only = jax.jit(lambda q, k, v, do: jax.vjp(lambda k, v: f(q, k, v), k, v)[1](do))
  for name, fn in (("fwd+dq_kernel", dq_only), ("fwd+dkdv_kernel", dkv_only)):
    sec = time_fn(fn, sets)
    row = dict(impl="pallas", D=D, S=S, causal=causal, mode=name, ms=sec * 1e3, tflops=None,
               error=None)
    rows.append(row)
    print(json.dumps(row), flush=True)


def main(argv):
  del argv
  B, H, K = FLAGS.batch, FLAGS.heads, FLAGS.kv_heads
  impls = FLAGS.impls.split(",")
  rows = []
  t0 = time.time()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  blocks = None
  if FLAGS.tiny:  # CPU smoke test of the plumbing: interpret mode, tiny tiles
    blocks = BlockSizes(block_q=16, block_k=16, dq_block_q=16, dq_block_k=16, dkv_block_q=16,
                        dkv_block_k=16)
  generic = any(i not in ("pallas", "cudnn", "jax_mha", "xla") for i in impls)
  render = variant_table if generic else table
  causals = [{"true": True, "false": False}[c] for c in FLAGS.causal.split(",")]
  for D in [int(x) for x in FLAGS.head_dims.split(",")]:
    for S in [int(x) for x in FLAGS.seqs.split(",")]:
      for causal in causals:
        if time.time() - t0 > FLAGS.time_budget_s:
          print(f"time budget reached; skipping D={D} S={S} causal={causal}", flush=True)
          continue
        run_shape(B, H, K, S, D, causal, impls, rows, blocks=blocks, interpret=FLAGS.tiny)
        with open(os.path.join(FLAGS.out_dir, "attention_bench.json"), "w") as f:
          json.dump(rows, f, indent=1)
        md = render(rows, B, H, K)
        with open(os.path.join(FLAGS.out_dir, "attention_bench.md"), "w") as f:
          f.write(md + "\n")
  if FLAGS.breakdown:
    extra = []
    for S, causal in ((16384, True), (4096, False)):
      backward_breakdown(B, H, K, S, 128, causal, extra)
    with open(os.path.join(FLAGS.out_dir, "attention_breakdown.json"), "w") as f:
      json.dump(extra, f, indent=1)
  print(render(rows, B, H, K))


if __name__ == "__main__":
  app.run(main)
