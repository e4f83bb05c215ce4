"""Benchmark: the split-K Pallas GEMV (pallas_kernels/gemv.py) vs XLA on decode-shaped products.

Shapes: the products of one batch-1 decode step of the Llama-3.2-1B-shaped model of
`experiments/bench_decode.py` (q/o 2048x2048, k/v 2048x512, gate/up 2048x8192, down 8192x2048,
the tied LM head 128256x2048 read as [N, K]), at M = 1 and 8 rows, bf16 weights.

Timing (`experiments/devtime.py`): one iteration chains the product through S distinct weight
sets (S * weight bytes >= 256 MB, so the 60 MB L2 cannot serve them), feeding a slice of each
output back into the next input; device time per product = slope between loop counts / S.
The XLA peer runs the same chain with `jnp.einsum` (XLA's own GEMV / Triton GEMM choice).
Every kernel configuration is checked against the float32 reference on fresh random data first.

Usage: python -m experiments.bench_gemv [--m=1,8] [--grid=quick|medium|full]
Writes results/gemv_bench.md and results/gemv_bench.json (under $OUT when set).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import devtime  # noqa: E402
from pallas_kernels import gemv as gemv_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("m", "1,8", "rows of x")
flags.DEFINE_enum("grid", "medium", ["quick", "medium", "full"], "kernel configurations swept")
flags.DEFINE_integer("trials", 3, "median over this many runs per loop count")
flags.DEFINE_string("out", "results/gemv_bench.md", "markdown output")
flags.DEFINE_bool("tiny", False, "tiny shapes (CPU smoke run in interpret mode)")

SHAPES = [("q/o", 2048, 2048, "kn"), ("k/v", 2048, 512, "kn"), ("gate/up", 2048, 8192, "kn"),
          ("down", 8192, 2048, "kn"), ("lm head", 2048, 128256, "nk")]
TINY_SHAPES = [("tiny", 256, 128, "kn"), ("tiny-nk", 128, 256, "nk")]


def configs(m: int, k: int, n: int, layout: str, grid: str):
  """Kernel configurations to sweep (dicts of gemv kwargs) that tile (m, k, n)."""
  del layout
  out = []
  modes = ["fma"] if m <= 2 else (["dot"] if grid != "full" else ["dot", "fma"])
  bns = {"quick": (64, 128), "medium": (64, 128, 256), "full": (32, 64, 128, 256)}[grid]
  bks = {"quick": (64, 128), "medium": (32, 64, 128), "full": (32, 64, 128, 256)}[grid]
  programs_ = (528, 1056) if grid == "full" else (528,)
  warps_ = (4,) if (grid == "quick" or m > 2) and grid != "full" else (4, 8)
  for mode, bn, bk, programs, warps in itertools.product(modes, bns, bks, programs_, warps_):
    if mode == "fma" and bn * bk * max(1, m) > 32768:   # accumulator registers
      continue
    if mode == "dot" and bk > 128:
      continue
    if n % bn:
      continue
    split = 1
    while (n // bn) * split < programs and k % (2 * split * bk) == 0:
      split *= 2
    if not gemv_lib.supported(m, k, n, block_n=bn, block_k=bk, split_k=split):
      continue
    out.append(dict(mode=mode, block_n=bn, block_k=bk, split_k=split, num_warps=warps))
  return out


def main(argv):
  del argv
  gpu = jax.default_backend() == "gpu"
  interpret = not gpu
  bw = devtime.copy_bandwidth()
  print(f"backend {jax.default_backend()} {jax.devices()[0].device_kind}  copy bandwidth "
        f"{bw / 1e12:.3f} TB/s", flush=True)
  rows = []
  shapes = TINY_SHAPES if FLAGS.tiny else SHAPES
  t_start = time.time()
  for m in [int(v) for v in FLAGS.m.split(",")]:
    for name, k, n, layout in shapes:
      wbytes = k * n * 2
      sets = max(2, min(128, math.ceil(256e6 / wbytes))) if gpu else 2
      key = jax.random.key(k * 7 + n + m)
      ws = [(jax.random.normal(kk, (k, n) if layout == "kn" else (n, k), jnp.float32)
             * 0.02).astype(jnp.bfloat16) for kk in jax.random.split(key, sets)]
      x0 = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
      est = sets * wbytes / (0.5 * bw)
      n_lo, n_hi = devtime.loop_counts(est, target_s=0.02 if gpu else 1e-3)
      if not gpu:
        n_lo, n_hi = 1, 2

      def chain(fn):
        def body(x, *w_list):
          for w in w_list:
            y = fn(x, w)
            x = x + 1e-6 * y[:, :1].astype(x.dtype)
          return x
        return body

      xla_fn = (lambda x, w: jnp.einsum("MK,KN->MN", x, w)) if layout == "kn" else \
          (lambda x, w: jnp.einsum("MK,NK->MN", x, w))
      t_xla = devtime.loop_seconds(chain(xla_fn), x0, n_lo=n_lo, n_hi=n_hi,
                                   trials=FLAGS.trials, consts=tuple(ws)) / sets
      print(f"M={m} {name:8s} K={k} N={n} ({layout}): XLA {t_xla * 1e6:8.2f} us = "
            f"{wbytes / t_xla / 1e12:.3f} TB/s", flush=True)
      best = None
      for cfg in configs(m, k, n, layout, FLAGS.grid if gpu else "quick"):
        fn = lambda x, w, cfg=cfg: gemv_lib.gemv(x, w, w_layout=layout, interpret=interpret,
                                                 **cfg)
        try:
          xt = jax.random.normal(jax.random.key(int(time.time() * 1e3) % 2**31), (m, k),
                                 jnp.float32).astype(jnp.bfloat16)
          y = fn(xt, ws[0]).astype(jnp.float32)
          ref = gemv_lib.gemv_reference(xt, ws[0], w_layout=layout)
          err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
          if not err < 1e-2:
            print(f"   {cfg}: WRONG rel err {err:.3e}", flush=True)
            continue
          t = devtime.loop_seconds(chain(fn), x0, n_lo=n_lo, n_hi=n_hi, trials=FLAGS.trials,
                                   consts=tuple(ws)) / sets
        except Exception as e:  # pylint: disable=broad-except
          print(f"   {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
          continue
        if best is None or t < best[1]:
          best = (cfg, t, err)
      if best is None:
        continue
      cfg, t, err = best
      row = dict(m=m, shape=name, k=k, n=n, layout=layout, xla_us=t_xla * 1e6,
                 gemv_us=t * 1e6, speedup=t_xla / t, xla_pct=100 * wbytes / t_xla / bw,
                 gemv_pct=100 * wbytes / t / bw, cfg=cfg, rel_err=err, sets=sets)
      rows.append(row)
      print(f"   best {cfg}: {t * 1e6:8.2f} us = {wbytes / t / 1e12:.3f} TB/s "
            f"({row['gemv_pct']:.1f}% of copy; XLA {row['xla_pct']:.1f}%)  x{t_xla / t:.2f}  "
            f"[{time.time() - t_start:.0f}s]", flush=True)
      _write(rows, bw)


def _write(rows, bw):
  out = devtime.output_path(FLAGS.out)
  lines = ["# Pallas split-K GEMV vs XLA (decode-shaped products, bf16 weights)", "",
           f"Device: {jax.devices()[0].device_kind}, jax {jax.__version__}; copy bandwidth "
           f"{bw / 1e12:.3f} TB/s (devtime.copy_bandwidth). Command: `python -m "
           f"experiments.bench_gemv --m={FLAGS.m}`. Times: devtime.loop_seconds, chained over "
           "distinct weight sets (>= 256 MB per iteration).", "",
           "| M | product | K | N | layout | XLA us | XLA % copy BW | gemv us | gemv % copy BW "
           "| speed-up | best config |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['m']} | {r['shape']} | {r['k']} | {r['n']} | {r['layout']} | "
                 f"{r['xla_us']:.2f} | {r['xla_pct']:.1f} | {r['gemv_us']:.2f} | "
                 f"{r['gemv_pct']:.1f} | {r['speedup']:.2f} | `{r['cfg']}` |")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(out.replace(".md", ".json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
