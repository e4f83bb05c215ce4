"""Benchmark: packed ternary x int8 matmul (pallas_kernels/ternary_matmul.py) vs XLA bf16 matmul.

BitNet b1.58 (arXiv 2402.17764) inference from 2-bit packed weights. For K x N in
{8192x8192, 4096x14336, 4096x4096} and M in {1, 8, 64, 4096}, timed in the same run:
  * XLA bf16: x_bf16[M, K] @ w_bf16[K, N] -> bf16 (XLA's / cuBLAS's choice of kernel).
  * ternary: `ternary_matmul` from int32 words (`as_words`), int8 x + per-token scale given, bf16
    output, for the automatic config and a small sweep of configs (at M = 1 on Hopper: the Mosaic
    GPU kernel `impl="mgpu"` (auto there) and its tilings, then the Triton dp4a kernel; on the
    --sweep_shapes: split-K with the XLA reduction vs the fused epilogue (in-kernel scale +
    float32 atomics, or plain stores at split_k = 1), tile shapes, num_warps / num_stages; at
    M = 4096 the unpack layouts of the xla_int8 path); every config is first checked against the
    unpacked reference (relative error < 1e-2).

Timing (experiments/devtime.py): device seconds of one loop iteration = slope of host wall time
between jitted `fori_loop`s of n_lo and n_hi iterations (n_hi - n_lo chosen for >= --target_ms of
device work; median of --trials runs each). One iteration chains S calls through S distinct
weight sets whose total size (>= --set_mib, capped at --max_sets sets) exceeds the H200's 60 MB L2,
each call's input depending on the previous call's output (x[0, 0] is bumped iff y[0, 0] is NaN),
so weights stream from HBM and XLA can neither hoist nor merge calls. bf16 and ternary use the
same S (the larger of the two needs), so both carry the same share of the loop's own cost.
Time per call = iteration time / S ("gross": it includes kernel launch gaps, the split-K
epilogue, the dependency kernel `_bump` (one tiny fusion per call) and 1/S of the loop's
per-iteration cost). The same chain with a no-op in place of the matmul (only `_bump`, same x, same
S) is timed for every row; "net" = gross - that chain cost, for bf16 and ternary alike (an
estimate of the matmul's own device time; XLA may fuse the no-op chain's bumps more tightly than
the real ones, which makes net an upper bound). Bandwidth = packed weight bytes / time, compared
with `devtime.copy_bandwidth` (y = x + 1 over 1 GiB float32, read + write bytes) of the same run.

Usage: python experiments/bench_ternary.py [--nosweep] [--out=results/ternary.md] [--tiny]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from effjax.quant import ternary  # noqa: E402
from experiments import devtime  # noqa: E402
from pallas_kernels import ternary_matmul as tm  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/ternary.md", "markdown table output (a _log.json next to it)")
flags.DEFINE_bool("sweep", True, "sweep kernel configs for --sweep_shapes (auto config elsewhere)")
flags.DEFINE_list("sweep_shapes", ["8192x8192", "4096x14336"], "KxN shapes that get the sweep")
flags.DEFINE_list("shapes", ["8192x8192", "4096x14336", "4096x4096"], "KxN list")
flags.DEFINE_list("ms", ["1", "4096", "8", "64"], "M list (in this order: targets first)")
flags.DEFINE_integer("trials", 5, "median over this many runs per loop count")
flags.DEFINE_integer("chain_trials", 3, "median runs for the no-op chain (net column)")
flags.DEFINE_float("target_ms", 12.0, "device work between the two loop counts")
flags.DEFINE_integer("set_mib", 256, "weight bytes per loop iteration (small M), >> 60 MB L2")
flags.DEFINE_integer("max_sets", 16, "most distinct weight sets per iteration")
flags.DEFINE_float("budget_s", 170.0, "after this many seconds only automatic configs are timed")
flags.DEFINE_bool("tiny", False, "CPU smoke test: tiny shapes, interpret mode, few iterations")

T0 = time.time()


def rand_words(key, k4: int, n4: int) -> jax.Array:
  """Random valid packed words [k4, n4] (every 2-bit field in {0, 1, 2}, i.e. codes -1, 0, 1)."""
  b = jax.random.bits(key, (k4, n4), jnp.uint32)
  both = b & (b >> 1) & jnp.uint32(0x55555555)   # fields equal to 3
  return lax.bitcast_convert_type(b & ~(both << 1), jnp.int32)


def _bump(x, y):
  """x with x[0, 0] changed iff y[0, 0] is NaN (never): a cheap data dependency y -> next x."""
  v = x[0, 0]
  return x.at[0, 0].set(jnp.where(jnp.isnan(y[0, 0].astype(jnp.float32)), v + 1, v))


def chain_seconds(op, carry0: tuple, ws, est_call_s: float, trials: int | None = None):
  """Device seconds per call of `y = op(carry, w)` chained through the sets `ws` (gross).

  The carry is a tuple whose first entry (the activations) gets the `_bump` from each output.
  """
  op_j = jax.jit(op)  # lowered once, however many calls the chain has

  def body(carry, *ws_):
    for w in ws_:
      carry = (_bump(carry[0], op_j(carry, w)), *carry[1:])
    return carry

  s = len(ws)
  if FLAGS.tiny:
    n_lo, n_hi = 1, 3
  else:
    n_lo, n_hi = devtime.loop_counts(s * est_call_s, target_s=FLAGS.target_ms / 1e3, most=2000)
  t_iter = devtime.loop_seconds(body, carry0, n_lo=n_lo, n_hi=n_hi,
                                trials=trials or FLAGS.trials, consts=tuple(ws))
  return t_iter / s


def noop_chain_seconds(carry0: tuple, ws) -> float:
  """Per-call seconds of the chain with the matmul replaced by the activations themselves."""
  return chain_seconds(lambda c, w: c[0], carry0, ws, 3e-6, trials=FLAGS.chain_trials)


def _tbs(nbytes, t):
  return f"{nbytes / t / 1e12:.2f}" if t > 0 else "n/a"


def n_sets(nbytes: int, m: int) -> int:
  """Weight sets per iteration: >= --set_mib of weights at small M, >= 4 x L2-size at large M."""
  want = (FLAGS.set_mib << 20) if m <= 256 else (64 << 20)
  return int(min(FLAGS.max_sets, max(2, math.ceil(want / nbytes))))


def configs(m: int, k4: int, n4: int, sweep: bool):
  """[(impl, kwargs)]: the automatic path first, then the fused-epilogue variant of it, then (if
  sweep) the rest of <= 10 (M = 1) / 4 (M > DOT_MAX_M) variants; M = 8, 64 get only the two."""
  auto = tm.auto_impl(m, k4, mgpu=tm.ternary_mgpu.usable(m, k4, n4, interpret=FLAGS.tiny))
  out = [(auto, {})]
  if auto == "mgpu":  # its tilings, then the Triton dp4a kernel (auto's choice without Mosaic)
    out += [("mgpu", dict(block_w=32, block_k=32)), ("mgpu", dict(num_stages=3))]
    if sweep:
      out += [("mgpu", dict(block_w=32)), ("mgpu", dict(num_stages=6)),
              ("mgpu", dict(block_k=32, num_stages=8)), ("mgpu", dict(block_w=8))]
    auto = "dp4a"
    out.append((auto, {}))
  if auto in ("gemv", "dot", "dp4a"):
    out.append((auto, dict(reduce="fused")))
  if auto == "dp4a":  # the SWAR gemv it replaced, for the comparison at the same M
    out.append(("gemv", {}))
    if sweep and m == 1:
      d0 = tm.dp4a_config(m, k4, n4)["split_k"]
      w8 = dict(num_warps=8)
      out += [("dp4a", dict(prefetch=False)), ("dp4a", dict(w8, prefetch=False)),
              ("dp4a", dict(w8, block_w=32, block_k=8, split_k=d0 // 2))]
      out += [("dp4a", w8), ("dp4a", dict(w8, block_k=16)), ("dp4a", dict(w8, block_w=32)),
              ("dp4a", dict(w8, block_w=128, block_k=4)), ("dp4a", dict(w8, split_k=d0 // 2)),
              ("dp4a", dict(w8, split_k=d0 // 2, num_stages=2)),
              ("dp4a", dict(w8, block_k=4, num_stages=2)), ("dp4a", dict(block_w=32)),
              ("dp4a", dict(block_k=4)), ("dp4a", dict(split_k=d0 * 2)),
              ("dp4a", dict(w8, block_w=32, block_k=16, split_k=d0 // 2)),
              ("dp4a", dict(num_warps=16, block_w=128, block_k=8))]
    return [c for i, c in enumerate(out) if c not in out[:i]]
  if m > tm.DOT_MAX_M:  # the unpack layouts of the int8 path (every shape: the M = 4096 target)
    out += [("xla_int8", dict(xla_layout="nk_direct")), ("xla_int8", dict(xla_layout="kn")),
            ("xla_int8", dict(xla_barrier=False))]
  if not sweep or m > tm.GEMV_MAX_M:
    return out
  s0 = tm.gemv_config(m, k4, n4)["split_k"]
  f = dict(reduce="fused")
  out += [("gemv", dict(split_k=max(1, s0 // 2))),
          ("gemv", dict(f, split_k=max(1, s0 // 2))), ("gemv", dict(f, split_k=s0 * 2)),
          ("gemv", dict(f, block_w=32, block_k=128)), ("gemv", dict(f, num_warps=2)),
          # no split-K: every program streams all of K for a narrow column tile (pipelined)
          ("gemv", dict(f, split_k=1, block_w=16, block_k=128, num_stages=3)),
          ("gemv", dict(f, split_k=1, block_w=8, block_k=256, num_stages=3)),
          ("gemv", dict(f, split_k=4, block_w=32, block_k=64, num_stages=2))]
  return [c for i, c in enumerate(out) if c not in out[:i]]


def resolved(impl, kw, m, k4, n4):
  """The tiling a config resolves to (for the table)."""
  extra = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages", "reduce", "prefetch")}
  if impl == "gemv":
    return {**tm.gemv_config(m, k4, n4, kw.get("block_t"), kw.get("block_w"), kw.get("block_k"),
                             kw.get("split_k")), **extra}
  if impl == "dp4a":
    return {**tm.dp4a_config(m, k4, n4, kw.get("block_t"), kw.get("block_w"), kw.get("block_k"),
                             kw.get("split_k")), **extra}
  if impl == "mgpu":
    return {**tm.ternary_mgpu.mgpu_config(k4, n4, kw.get("block_w"), kw.get("block_k"),
                                          kw.get("num_stages"))}
  if impl == "dot":
    return {**tm.dot_config(m, k4, n4, kw.get("block_m"), kw.get("block_w"), kw.get("block_k"),
                            kw.get("split_k")), **extra}
  return dict(kw)


def fmt_cfg(impl, cfg):
  short = dict(block_t="t", block_m="m", block_w="w", block_k="k", split_k="s", num_warps="nw",
               num_stages="ns", block_g="g", stages="st", xla_layout="", xla_barrier="barrier=", prefetch="prefetch=")
  parts = []
  for k, v in cfg.items():
    if k == "reduce":
      parts.append(str(v))
    else:
      parts.append(f"{short.get(k, k)}{v}")
  return impl + (" " + ",".join(parts) if parts else "")


def main(argv):
  del argv
  if FLAGS.tiny:
    FLAGS.shapes, FLAGS.sweep_shapes, FLAGS.ms = ["256x384"], ["256x384"], ["1", "300", "8"]
    FLAGS.trials, FLAGS.set_mib, FLAGS.max_sets = 1, 1, 2
  print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
  bw_copy = devtime.copy_bandwidth()
  loop_oh = devtime.loop_seconds(lambda c: c + 1, jnp.zeros((8,), jnp.float32), n_lo=2,
                                 n_hi=202 if FLAGS.tiny else 2002, trials=FLAGS.trials)
  print(f"copy bandwidth: {bw_copy / 1e12:.3f} TB/s; empty loop iteration {loop_oh * 1e6:.1f} us",
        flush=True)
  shapes = [tuple(int(v) for v in s.split("x")) for s in FLAGS.shapes]
  ms = [int(v) for v in FLAGS.ms]
  rows, log = [], []
  key = jax.random.PRNGKey(int.from_bytes(os.urandom(4), "little"))
  for m in ms:
    for (k, n) in shapes:
      kp, np_ = ternary.padded_dims(k, n)
      k4, n4 = kp // 4, np_ // 4
      pbytes, bbytes = k4 * n4 * 4, 2 * k * n
      flops = 2 * m * k * n
      key, kx, kw = jax.random.split(key, 3)
      # the same number of sets (calls per loop iteration) for bf16 and ternary
      sets = max(n_sets(bbytes, m), n_sets(pbytes, m))
      # --- XLA bf16 peer
      x_bf = jax.random.normal(kx, (m, k), jnp.bfloat16)
      ws_bf = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in jax.random.split(kw, sets)]
      est_bf = max(bbytes / 2.5e12, flops / 6e14) + 3e-6
      t_bf = chain_seconds(lambda c, w: jnp.dot(c[0], w), (x_bf,), ws_bf, est_bf)
      del ws_bf
      # --- ternary
      ps = [ternary.PackedTernary(packed=rand_words(kk, k4, n4), scale=jnp.float32(0.02),
                                  shape=(k, n)) for kk in jax.random.split(kw, sets)]
      xq, sx = tm.int8_act_codes(x_bf)
      x0 = (xq, sx[:, 0])
      t_chain = noop_chain_seconds(x0, ps)  # the bump kernel + 1/S of the loop, per call
      t_bf_net = t_bf - t_chain
      print(f"K={k} N={n} M={m}: bf16 {t_bf * 1e6:.1f} us, net {t_bf_net * 1e6:.1f} us ({sets} "
            f"sets; {bbytes / t_bf / 1e12:.2f} TB/s of weights gross); no-op chain "
            f"{t_chain * 1e6:.1f} us per call", flush=True)
      mc = min(m, 8)  # rows checked against the reference
      ref = np.asarray(tm.ternary_matmul_reference(xq[:mc], sx[:mc, 0], ps[0]), np.float64)
      est_t = max(pbytes / 2.0e12, flops / 6e14) + 5e-6
      sweep = FLAGS.sweep and f"{k}x{n}" in FLAGS.sweep_shapes
      results, seen = [], set()
      for ci, (impl, kwc) in enumerate(configs(m, k4, n4, sweep)):
        if ci > 1 and time.time() - T0 > FLAGS.budget_s:
          print("  (budget spent: sweep cut short)", flush=True)
          break
        try:
          cfg = resolved(impl, kwc, m, k4, n4)
          if (impl, str(cfg)) in seen:
            continue
          seen.add((impl, str(cfg)))
          op = lambda xs, p, impl=impl, kwc=kwc: tm.ternary_matmul(  # noqa: E731
              xs[0], xs[1], p, impl=impl, out_dtype=jnp.bfloat16, **kwc)
          y = np.asarray(jax.jit(op)(x0, ps[0])[:mc], np.float64)
          err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
          if not err < 1e-2:
            raise AssertionError(f"wrong result: relative error {err:.3g}")
          t = chain_seconds(op, x0, ps, est_t)
        except Exception as e:  # noqa: BLE001 -- a failing config is logged; the sweep goes on
          msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
          log.append(dict(k=k, n=n, m=m, impl=impl, cfg=str(kwc), error=msg))
          print(f"  FAIL {impl} {kwc}: {msg}", flush=True)
          continue
        t_net = t - t_chain
        results.append((t, t_net, impl, cfg, ci == 0))
        log.append(dict(k=k, n=n, m=m, impl=impl, cfg=cfg, us=t * 1e6, us_net=t_net * 1e6,
                        err=err))
        print(f"  {fmt_cfg(impl, cfg):44s} {t * 1e6:8.1f} us (net {t_net * 1e6:6.1f})  "
              f"x{t_bf / t:5.2f} vs bf16 (net x{_ratio(t_bf_net, t_net)})  "
              f"{pbytes / t / 1e12:5.2f} TB/s ({100 * pbytes / t / bw_copy:5.1f}% copy; net "
              f"{_tbs(pbytes, t_net)} TB/s)", flush=True)
      del ps
      if not results:
        rows.append(dict(k=k, n=n, m=m, t_bf_us=t_bf * 1e6, failed=True))
        write(rows, log, bw_copy, loop_oh, final=False)
        continue
      best = min(results, key=lambda r: r[0])
      auto = [r for r in results if r[4]]
      rows.append(dict(k=k, n=n, m=m, t_bf_us=t_bf * 1e6, t_bf_net_us=t_bf_net * 1e6,
                       t_chain_us=t_chain * 1e6, impl=best[2], cfg=fmt_cfg(best[2], best[3]),
                       t_us=best[0] * 1e6, t_net_us=best[1] * 1e6, speedup=t_bf / best[0],
                       speedup_net=_ratio(t_bf_net, best[1]),
                       tbs=pbytes / best[0] / 1e12, frac=pbytes / best[0] / bw_copy,
                       tbs_net=_tbs(pbytes, best[1]),
                       frac_net=(f"{100 * pbytes / best[1] / bw_copy:.1f}" if best[1] > 0
                                 else "n/a"),
                       t_auto_us=auto[0][0] * 1e6 if auto else float("nan"),
                       n_cfgs=len(results), sets=sets))
      write(rows, log, bw_copy, loop_oh, final=False)  # keep what is done if the run is cut
  write(rows, log, bw_copy, loop_oh)


def _ratio(a, b):
  return f"{a / b:.2f}" if a > 0 and b > 0 else "n/a"


def write(rows, log, bw_copy, loop_oh, final=True):
  """Writes the markdown table and the JSON log; prints the table when `final`."""
  dev = jax.devices()[0].device_kind
  lines = [
      "# Packed ternary matmul vs XLA bf16",
      "",
      f"Device: {dev}; jax {jax.__version__}; copy bandwidth {bw_copy / 1e12:.3f} TB/s "
      f"(devtime.copy_bandwidth); empty fori_loop iteration {loop_oh * 1e6:.1f} us. Command: "
      f"`python experiments/bench_ternary.py{'' if FLAGS.sweep else ' --nosweep'}`.",
      "Device time per call (devtime.loop_seconds slope over a chain of S distinct weight sets per "
      "iteration, the same S for bf16 and ternary; see the script docstring). `us` is gross (it "
      "includes the chain's dependency kernel and 1/S of the loop's cost); `chain` is that cost "
      "per call, timed with a no-op in place of the matmul; `net` = gross - chain, for both "
      "columns. `TB/s` and `% copy`: packed weight bytes / gross (net) time. `best` is the "
      "fastest config timed; `auto us` is impl='auto' with default settings (gross).",
      "",
      "| K | N | M | S | chain us | bf16 us | bf16 net | best ternary | us | net | x bf16 | "
      "x bf16 net | TB/s | % copy | net % copy | auto us |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(rows, key=lambda r: (-r["k"] * r["n"], r["k"], r["m"])):
    if r.get("failed"):
      lines.append(f"| {r['k']} | {r['n']} | {r['m']} | | | {r['t_bf_us']:.1f} | | all configs "
                   "failed | | | | | | | | |")
      continue
    lines.append(f"| {r['k']} | {r['n']} | {r['m']} | {r['sets']} | {r['t_chain_us']:.1f} | "
                 f"{r['t_bf_us']:.1f} | {r['t_bf_net_us']:.1f} | `{r['cfg']}` | {r['t_us']:.1f} | "
                 f"{r['t_net_us']:.1f} | {r['speedup']:.2f} | {r['speedup_net']} | "
                 f"{r['tbs']:.2f} | {100 * r['frac']:.1f} | {r['frac_net']} | "
                 f"{r['t_auto_us']:.1f} |")
  out = FLAGS.out
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  with open(os.path.splitext(out)[0] + "_log.json", "w") as fh:
    json.dump(dict(copy_bw=bw_copy, loop_overhead_s=loop_oh, rows=rows, log=log), fh, indent=1,
              default=str)
  if final:
    print("\n".join(lines))
    print(f"wrote {out}  ({time.time() - T0:.0f} s)")


if __name__ == "__main__":
  app.run(main)
