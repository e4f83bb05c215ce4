"""Decode-attention benchmark over bf16, TurboQuant-packed and KIVI-packed KV caches (H200).

Issue 5, item 4: B=8, 32 query heads / 8 KV heads, head_dim 128, bf16 queries; contexts 8k..128k,
every row at full length. Compared in the same run:
  * XLA decode attention (jnp einsums, bf16 operands, f32 softmax) -- the speed-up baseline;
  * cuDNN through jax.nn.dot_product_attention(implementation="cudnn") (the strongest peer);
  * optionally jax's own Pallas GPU kernels ops.gpu.decode_attention.gqa / paged_attention (bf16);
  * ours: pallas_kernels.decode_attention (bf16 split-K), quant_decode_attention for TurboQuant_mse
    at 4 / 3 / 2.5 / 2 bits (K and V at the same rate) and KIVI-2 / KIVI-4.

Timing (device side, `experiments/devtime.loop_seconds`): one jitted `fori_loop` whose body runs
the decode step once on EACH of n input sets, the query of the next call being the output of the
previous one and every cache array getting a one-element write per step (so nothing is hoisted:
see `step_seconds`); the time per step is the slope between
two loop counts divided by n, median of --trials. n is chosen so that the sets together exceed
240 MB (> 4x the 60 MB L2), so every step reads its KV from HBM. The time includes the kernel's
jnp wrapper (query rotation, split combine, output rotation): the decode step as a model sees it.

Reported: time per step, effective bandwidth = bytes of KV the kernel reads (codes + norms /
scales; bf16 K+V for the others) / time, speed-up over XLA bf16 at the same context, a launch
config sweep of our quantized kernels (tokens per tile = 64 * groups_per_iter, num_warps,
num_stages, num_splits, dot orientation), and the cost of quantizing ONE new token's K and V
(`TurboQuantCache.update` with T = 1, all rows and KV heads, fused and per-part encode) as a share of
the decode step. Quantized caches are filled with random codes / norms for timing (the kernels'
time does not depend on the values); correctness of the kernels is checked first on real encoded
data with ragged lengths against the dequantize-then-attend float32 references.

Writes markdown (--out) and JSON (--json), flushed after every row, and stops starting new
measurements after --budget_s seconds (a partial table is still written).

  python experiments/bench_kv_decode.py --contexts=32768,65536,131072 --out=$OUT/kv_decode.md
  python experiments/bench_kv_decode.py --tiny    # CPU smoke run (Pallas interpreter, tiny sizes)
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from effjax.kv.turboquant import TurboQuantCache
from effjax.quant import kivi, token_packing
from effjax.quant.turboquant import TurboQuant
from experiments import devtime
from pallas_kernels import quant_decode_attention as qda
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference

FLAGS = flags.FLAGS
INTERPRET = jax.default_backend() != "gpu"  # CPU smoke runs only
flags.DEFINE_list("contexts", ["32768", "65536", "131072"], "context lengths of the main table")
flags.DEFINE_integer("batch", 8, "batch")
flags.DEFINE_integer("heads", 32, "query heads")
flags.DEFINE_integer("kv_heads", 8, "kv heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_string("out", "results/kv_decode.md", "markdown output")
flags.DEFINE_string("json", "", "JSON output (default: --out with .json)")
flags.DEFINE_bool("sweep", True, "sweep our quantized kernels' launch configs at --sweep_context")
flags.DEFINE_integer("sweep_context", 65536, "context of the config sweep")
flags.DEFINE_list("sweep_kernels", [], "subset of tq4,tq2.5,kivi2 to sweep (default: all wanted)")
flags.DEFINE_integer("check_context", 8192, "context of the correctness checks (0 = no checks)")
flags.DEFINE_integer("trials", 3, "trials per loop count (median)")
flags.DEFINE_float("target_ms", 15.0, "device work between the two loop counts, ms")
flags.DEFINE_list("methods", [], "subset of: xla,cudnn,gqa,paged,bf16,tq4,tq3,tq2.5,tq2,kivi4,"
                  "kivi2,encode (default: all but gqa,paged)")
flags.DEFINE_float("budget_s", 1e9, "start no new measurement after this many seconds")
flags.DEFINE_bool("tiny", False, "CPU smoke mode: tiny shapes, 2 configs per sweep, 1 trial")

DEFAULT_METHODS = ("xla", "cudnn", "bf16", "tq4", "tq3", "tq2.5", "tq2", "kivi4", "kivi2", "encode")
_T0 = time.time()


def rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def n_sets(nbytes):
  """Input sets so that one loop iteration touches > 240 MB (4x the H200's L2)."""
  return 1 if FLAGS.tiny else int(min(4, max(1, math.ceil(240e6 / nbytes))))


def out_of_time():
  return time.time() - _T0 > FLAGS.budget_s


def _touch(x, flag):
  """x with its first element rewritten under a data-dependent predicate (never true in
  practice): the array becomes loop-variant, like a cache that is written every decode step."""
  idx = (0,) * x.ndim
  return x.at[idx].set(jnp.where(flag, x[idx] + jnp.ones((), x.dtype), x[idx]))


def step_seconds(fn, q, sets, nbytes):
  """Device seconds of one fn(q, *set) call (loop_seconds over all sets, q fed forward).

  The sets are part of the loop carry and every array of a set gets a one-element write that
  depends on the previous output each iteration (as a decode step writes its cache): with
  loop-invariant K/V, XLA hoists its layout copy of K out of the loop and its attention looks
  ~3x faster than it is in a real decode step. The loop counts assume ~2 TB/s for `nbytes` per
  call (no separate compile for an estimate); a slower kernel just makes the timed loops longer."""
  def body(carry):
    q, sets = carry
    new_sets = []
    for s in sets:
      flag = jnp.isnan(jnp.sum(q.astype(jnp.float32)))
      s = jax.tree_util.tree_map(lambda x: _touch(x, flag), s)
      q = fn(q, *s).astype(q.dtype)
      new_sets.append(s)
    return q, type(sets)(new_sets)
  carry = (q, sets)
  if FLAGS.tiny:
    return devtime.loop_seconds(body, carry, n_lo=1, n_hi=2, trials=1) / len(sets)
  est = max(nbytes * len(sets) / 2e12, 20e-6)
  n_lo, n_hi = devtime.loop_counts(est, target_s=FLAGS.target_ms * 1e-3, n_lo=2, most=400)
  return devtime.loop_seconds(body, carry, n_lo=n_lo, n_hi=n_hi, trials=FLAGS.trials) / len(sets)


# ---- random packed caches of a given layout (timing only) ------------------------------------------


def random_tq_parts(key, B, S, K, H, bits, norm_dtype=jnp.float16):
  """Random TQParts for bits in {4, 3, 2, 2.5} (2.5 = H/4 channels at 3 bits + 3H/4 at 2)."""
  specs = [(tuple(range(H)), int(bits))] if bits == int(bits) else [
      (tuple(range(H // 4)), int(bits) + 1), (tuple(range(H // 4, H)), int(bits))]
  parts = []
  for chans, b in specs:
    key, k1, k2 = jax.random.split(key, 3)
    d = len(chans)
    wdt = token_packing.word_dtype(b)
    words = jax.random.bits(k1, (B, S // 4, K, d), jnp.uint32).astype(wdt)
    if b == 3:  # 3-bit codes in 4-bit fields: keep the top bit of each field zero
      words = words & jnp.asarray(0x7777, wdt)
    norms = (jax.random.uniform(k2, (B, S // 4, K, 4), jnp.float32, 0.5, 2.0)).astype(norm_dtype)
    tq = TurboQuant(d, b, seed=len(parts))
    coeffs, n_coeffs = qda.kernel_codebook(np.asarray(tq.centroids), b)
    parts.append(qda.TQPart(words=words, norms=norms, rotation=tq.rotation.matrix(),
                            centroids=tq.centroids, coeffs=jnp.asarray(coeffs), bits=b,
                            channels=chans, n_coeffs=n_coeffs))
  return parts


def random_kivi(key, B, S, K, H, bits, per_channel):
  k1, k2, k3 = jax.random.split(key, 3)
  wdt = token_packing.word_dtype(bits)
  words = jax.random.bits(k1, (B, S // 4, K, H), jnp.uint32).astype(wdt)
  sshape = (B, S // kivi.GROUP, K, H) if per_channel else (B, S // 4, K, H // kivi.GROUP, 4)
  scale = jax.random.uniform(k2, sshape, jnp.float32, 0.01, 0.1).astype(jnp.float16)
  zero = jax.random.uniform(k3, sshape, jnp.float32, -1, 0).astype(jnp.float16)
  return kivi.KIVITensor(codes=words, scale=scale, zero=zero, length=S, bits=bits,
                         per_channel=per_channel)


# ---- peers ------------------------------------------------------------------------------------------


def xla_decode(q_BNH, k_BSKH, v_BSKH, lengths_B):
  B, N, H = q_BNH.shape
  _, S, K, _ = k_BSKH.shape
  q = q_BNH.reshape(B, K, N // K, H)
  s = jnp.einsum("BKGH,BSKH->BKGS", q, k_BSKH, preferred_element_type=jnp.float32) / math.sqrt(H)
  s = jnp.where(jnp.arange(S)[None, None, None, :] < lengths_B[:, None, None, None], s, -1e30)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("BKGS,BSKH->BKGH", p.astype(v_BSKH.dtype), v_BSKH,
                 preferred_element_type=jnp.float32)
  return o.reshape(B, N, H).astype(q_BNH.dtype)


def cudnn_decode(q_BNH, k_BSKH, v_BSKH, lengths_B):
  o = jax.nn.dot_product_attention(q_BNH[:, None], k_BSKH, v_BSKH,
                                   key_value_seq_lengths=lengths_B, implementation="cudnn")
  return o[:, 0]


def jax_gqa(q, k, v, lengths):
  from jax.experimental.pallas.ops.gpu import decode_attention as jda
  return jda.gqa(q, k, v, kv_seq_len=lengths)


def paged_inputs(k_BSKH, v_BSKH, page=16):
  B, S, K, H = k_BSKH.shape
  kp = jnp.transpose(k_BSKH.reshape(B, S // page, page, K, H), (3, 0, 1, 2, 4)).reshape(
      K, B * S // page, page, H)
  vp = jnp.transpose(v_BSKH.reshape(B, S // page, page, K, H), (3, 0, 1, 2, 4)).reshape(
      K, B * S // page, page, H)
  tables = jnp.arange(B * S // page, dtype=jnp.int32).reshape(B, S // page)
  return kp, vp, tables


def jax_paged(q, kp, vp, tables, lengths):
  from jax.experimental.pallas.ops.gpu import paged_attention as jpa
  return jpa.paged_attention(q, kp, vp, tables, lengths)


# ---- configs ---------------------------------------------------------------------------------------


def tq_cfg(gpi=2, warps=4, stages=3, splits=None, tr=False, dq="lut"):
  return dict(groups_per_iter=gpi, num_warps=warps, num_stages=stages, num_splits=splits,
              transposed=tr, dequant=dq, interpret=INTERPRET)


def kivi_cfg(gpi=4, warps=4, stages=3, splits=None):
  return dict(groups_per_iter=gpi, num_warps=warps, num_stages=stages, num_splits=splits,
              interpret=INTERPRET)


def sweep_configs(B, K, S):
  """Launch configs to try at the sweep context (the default programs ~ 1024; 2x more splits)."""
  from pallas_kernels.decode_attention import default_num_splits
  more = 2 * default_num_splits(B, K, S, 256)
  if FLAGS.tiny:
    return {"tq4": [tq_cfg(1), tq_cfg(1, tr=True, dq="poly")], "tq2.5": [tq_cfg(1, tr=True)],
            "kivi2": [kivi_cfg(1)]}
  tq4 = [tq_cfg(2, dq="poly"), tq_cfg(2), tq_cfg(4), tq_cfg(4, tr=True), tq_cfg(4, stages=2),
         tq_cfg(1), tq_cfg(4, splits=more)]
  tq25 = [tq_cfg(2, dq="poly"), tq_cfg(2), tq_cfg(4), tq_cfg(4, tr=True), tq_cfg(4, stages=2),
          tq_cfg(8, stages=2), tq_cfg(4, splits=more)]
  kv2 = [kivi_cfg(1), kivi_cfg(2), kivi_cfg(4)]
  return {"tq4": tq4, "tq2.5": tq25, "kivi2": kv2}


def cfg_str(cfg):
  return ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "interpret")


# ---- main ------------------------------------------------------------------------------------------


def main(argv):
  del argv
  if FLAGS.tiny:
    B, N, K, H = 2, 8, 2, 128
    contexts, sweep_S, check_S = [256], 256, 128
  else:
    B, N, K, H = FLAGS.batch, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
    contexts, sweep_S, check_S = ([int(c) for c in FLAGS.contexts], FLAGS.sweep_context,
                                  FLAGS.check_context)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}  jax {jax.__version__}", flush=True)
  methods = set(FLAGS.methods) or set(DEFAULT_METHODS)
  want = lambda m: m in methods
  out_path = FLAGS.out
  json_path = FLAGS.json or os.path.splitext(out_path)[0] + ".json"
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  key = jax.random.PRNGKey(int.from_bytes(os.urandom(4), "little"))
  sections = {"check": [], "sweep": [], "main": [], "encode": []}
  records = []
  info = {}

  def flush():
    md = [f"# KV decode attention on {dev.device_kind} (jax {jax.__version__})", "",
          f"B={B}, {N} query heads / {K} KV heads, head_dim {H}, bf16 queries; device time by "
          "`experiments/devtime.loop_seconds` (slope between loop counts, inputs rotated past L2); "
          f"command: `python experiments/bench_kv_decode.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
          ""]
    if info:
      md += [f"{k}: {v}  " for k, v in info.items()] + [""]
    titles = {"check": "## Correctness (ragged lengths, rel. error vs float32 references)\n\n"
                       "| kernel | rel err |\n|---|---|",
              "sweep": f"## Launch-config sweep at context {sweep_S} (us per decode step)\n\n"
                       "| kernel | config | us | TB/s |\n|---|---|---|---|",
              "main": "## Decode step time, effective KV bandwidth, speed-up over XLA bf16\n\n"
                      "| context | method | bits/value read | us/step | TB/s (KV read) | "
                      "vs XLA | config |\n|---|---|---|---|---|---|---|",
              "encode": "## Encode of ONE new token (K and V, all rows and KV heads: "
                        "`TurboQuantCache.update`, T=1) vs the decode step\n\n"
                        "| context | cache | encode path | encode us | decode step us | share |\n"
                        "|---|---|---|---|---|---|"}
    for name in ("check", "sweep", "main", "encode"):
      if sections[name]:
        md += [titles[name]] + sections[name] + [""]
    with open(out_path, "w") as f:
      f.write("\n".join(md) + "\n")
    with open(json_path, "w") as f:
      json.dump({"device": dev.device_kind, "jax": jax.__version__, "B": B, "N": N, "K": K,
                 "H": H, "info": info, "rows": records}, f, indent=1)

  def note(section, line, **rec):
    sections[section].append(line)
    if rec:
      records.append(dict(section=section, **rec))
    print(line, flush=True)
    flush()

  # ---- copy bandwidth (roofline reference) ----
  if not FLAGS.tiny:
    try:
      info["copy bandwidth (y = x + 1, 1 GiB f32)"] = f"{devtime.copy_bandwidth(trials=3) / 1e12:.2f} TB/s"
    except Exception as e:  # noqa: BLE001
      info["copy bandwidth"] = f"failed: {type(e).__name__}"

  # ---- correctness at a small context on real encoded data ----
  if check_S:
    S = check_S
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (B, N, H), jnp.float32).astype(jnp.bfloat16)
    k = (jax.random.normal(ks[1], (B, S, K, H), jnp.float32) * 2).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(jnp.bfloat16)
    lengths = jax.random.randint(ks[3], (B,), 1, S + 1).at[0].set(1).at[1].set(S - 37)
    ref = decode_attention_reference(q, k, v, lengths)
    try:
      note("check", f"| ours bf16 | {rel(decode_attention(q, k, v, lengths, interpret=INTERPRET), ref):.2e} |")
    except Exception as e:  # noqa: BLE001
      note("check", f"| ours bf16 | failed {type(e).__name__}: {str(e)[:120]} |")
    note("check", f"| XLA bf16 | {rel(jax.jit(xla_decode)(q, k, v, lengths), ref):.2e} |")
    for bits in (4, 2.5):
      kp = qda.turboquant_parts(TurboQuant(H, bits, seed=1), k.astype(jnp.float32))
      vp = qda.turboquant_parts(TurboQuant(H, bits, seed=2), v.astype(jnp.float32))
      r = qda.turboquant_decode_reference(q, kp, vp, lengths)
      for tr, dq in ((False, "poly"), (True, "poly"), (False, "lut"), (True, "lut")):
        try:
          o = qda.turboquant_decode_attention(q, kp, vp, lengths, transposed=tr, dequant=dq,
                                              interpret=INTERPRET)
          note("check", f"| TurboQuant {bits}b ({'kq' if tr else 'qk'}, {dq}) vs its dequantized "
                        f"ref | {rel(o, r):.2e} (quantized vs exact: {rel(r, ref):.3f}) |",
               kernel=f"tq{bits}", transposed=tr, dequant=dq, rel_err=rel(o, r),
               quant_err=rel(r, ref))
        except Exception as e:  # noqa: BLE001
          note("check", f"| TurboQuant {bits}b tr={tr} {dq} | failed {type(e).__name__}: {str(e)[:200]} |")
    for bits in (2, 4):
      kq = kivi.quantize_keys(k.astype(jnp.float32), bits)
      vq = kivi.quantize_values(v.astype(jnp.float32), bits)
      r = qda.kivi_decode_reference(q, kq, vq, lengths)
      try:
        o = qda.kivi_decode_attention(q, kq, vq, lengths, interpret=INTERPRET)
        note("check", f"| KIVI-{bits} vs its dequantized ref | {rel(o, r):.2e} "
                      f"(quantized vs exact: {rel(r, ref):.3f}) |",
             kernel=f"kivi{bits}", rel_err=rel(o, r), quant_err=rel(r, ref))
      except Exception as e:  # noqa: BLE001
        note("check", f"| KIVI-{bits} | failed {type(e).__name__}: {str(e)[:200]} |")
    del k, v

  L_of = lambda S: jnp.full((B,), S, jnp.int32)

  def tq_sets(kk, S, bits, q):
    first = (random_tq_parts(kk[0], B, S, K, H, bits), random_tq_parts(kk[1], B, S, K, H, bits))
    nb = sum(p.nbytes() for p in first[0] + first[1])
    sets = [first + (L_of(S),)]
    for i in range(1, n_sets(nb)):
      sets.append((random_tq_parts(jax.random.fold_in(kk[0], i), B, S, K, H, bits),
                   random_tq_parts(jax.random.fold_in(kk[1], i), B, S, K, H, bits), L_of(S)))
    return sets, nb

  def kivi_sets(kk, S, bits):
    mk = lambda i: (random_kivi(jax.random.fold_in(kk[0], i), B, S, K, H, bits, True),
                    random_kivi(jax.random.fold_in(kk[1], i), B, S, K, H, bits, False))
    a, b_ = mk(0)
    nb = a.nbytes() + b_.nbytes()
    return [(a, b_, L_of(S))] + [mk(i) + (L_of(S),) for i in range(1, n_sets(nb))], nb

  def timed(section, label, fn, q, sets, nbytes, S, extra_line, **rec):
    """Measures; returns seconds or None (failure / out of budget), logging a row either way."""
    if out_of_time():
      note(section, extra_line(None, "skipped (time budget)"))
      return None
    try:
      t = step_seconds(fn, q, sets, nbytes)
    except Exception as e:  # noqa: BLE001
      note(section, extra_line(None, f"failed {type(e).__name__}: {str(e)[:160]}"))
      return None
    note(section, extra_line(t, None), label=label, context=S, us=t * 1e6, nbytes=nbytes,
         tbps=nbytes / t / 1e12, **rec)
    return t

  # ---- config sweep for our quantized kernels ----
  best = {"tq4": tq_cfg(), "tq2.5": tq_cfg(), "kivi2": kivi_cfg()}
  if FLAGS.sweep:
    S = sweep_S
    kk = jax.random.split(jax.random.fold_in(key, 7), 4)
    q = jax.random.normal(kk[3], (B, N, H), jnp.float32).astype(jnp.bfloat16)
    for name, cfgs in sweep_configs(B, K, S).items():
      if not want(name) or (FLAGS.sweep_kernels and name not in FLAGS.sweep_kernels):
        continue
      if name.startswith("tq"):
        sets, nb = tq_sets(kk, S, 4 if name == "tq4" else 2.5, q)
        fn0 = qda.turboquant_decode_attention
      else:
        sets, nb = kivi_sets(kk, S, 2)
        fn0 = qda.kivi_decode_attention
      res = []
      for cfg in cfgs:
        line = lambda t, err, cfg=cfg: (f"| {name} | {cfg_str(cfg)} | "
                                        + (err if err else f"{t * 1e6:.1f} | {nb / t / 1e12:.2f}")
                                        + (" |" if not err else " | |"))
        t = timed("sweep", name, functools.partial(fn0, **cfg), q, sets, nb, S, line,
                  config=cfg_str(cfg))
        if t is not None:
          res.append((t, cfg))
      if res:
        best[name] = min(res, key=lambda r: r[0])[1]
      del sets
    info["chosen configs"] = {k: cfg_str(v) for k, v in best.items()}
    flush()

  # ---- main table ----
  step_us = {}

  def main_context(S):
    kk = jax.random.split(jax.random.fold_in(key, S), 8)
    q = jax.random.normal(kk[0], (B, N, H), jnp.float32).astype(jnp.bfloat16)
    kv_bytes = 2 * B * S * K * H * 2
    t_xla = [None]

    def row(name, nbytes, cfg=""):
      def line(t, err):
        if err:
          return f"| {S} | {name} | - | {err} | | | |"
        sp = 1.0 if name == "XLA bf16" else (t_xla[0] / t if t_xla[0] else float("nan"))
        bits = 8 * nbytes / (2 * B * S * K * H)
        return (f"| {S} | {name} | {bits:.2f} | {t * 1e6:.1f} | {nbytes / t / 1e12:.2f} | "
                f"{sp:.2f}x | {cfg} |")
      return line

    def run(name, fn, sets, nbytes, cfg=""):
      t = timed("main", name, fn, q, sets, nbytes, S, row(name, nbytes, cfg), config=cfg,
                speedup_vs_xla=None)
      if t is not None:
        records[-1]["speedup_vs_xla"] = (t_xla[0] / t) if t_xla[0] else None
        step_us[(S, name)] = t * 1e6
      return t

    if {"xla", "cudnn", "bf16", "gqa", "paged"} & methods:
      ns = n_sets(kv_bytes)
      dense = [(jax.random.normal(kk[1 + i], (B, S, K, H), jnp.bfloat16),
                jax.random.normal(kk[5 - i], (B, S, K, H), jnp.bfloat16), L_of(S)) for i in range(ns)]
      if want("xla"):
        t_xla[0] = run("XLA bf16", xla_decode, dense, kv_bytes)
      if want("cudnn") and not FLAGS.tiny:
        run("cuDNN (jax.nn.dot_product_attention)", cudnn_decode, dense, kv_bytes)
      if want("gqa") and not FLAGS.tiny:
        run("jax Pallas gqa", jax_gqa, dense, kv_bytes)
      if want("paged") and not FLAGS.tiny:
        run("jax Pallas paged_attention", jax_paged, [paged_inputs(d[0], d[1]) + (d[2],)
                                                      for d in dense[:1]], kv_bytes)
      if want("bf16"):
        run("ours bf16", functools.partial(decode_attention, interpret=INTERPRET), dense, kv_bytes,
            "decode_attention defaults")
      del dense
    for bits in (4, 2.5, 3, 2):
      if not want(f"tq{bits}") or (FLAGS.tiny and bits in (3, 2)):
        continue
      cfg = best["tq4"] if bits == 4 else best["tq2.5"]  # 3-bit: LUT-able like 2.5
      sets, nb = tq_sets(kk[6:8], S, bits, q)
      run(f"ours TurboQuant {bits}-bit", functools.partial(qda.turboquant_decode_attention, **cfg),
          sets, nb, cfg_str(cfg))
      del sets
    for bits in (2, 4):
      if not want(f"kivi{bits}") or (FLAGS.tiny and bits == 4):
        continue
      sets, nb = kivi_sets(kk[6:8], S, bits)
      run(f"ours KIVI-{bits}", functools.partial(qda.kivi_decode_attention, **best["kivi2"]), sets,
          nb, cfg_str(best["kivi2"]))
      del sets

  # ---- encode cost: TurboQuantCache.update of one token, vs the decode step ----
  def encode_context(S):
    kk = jax.random.split(jax.random.fold_in(key, S + 1), 2)
    k_new = jax.random.normal(kk[0], (B, 1, K, H), jnp.float32).astype(jnp.bfloat16)
    v_new = jax.random.normal(kk[1], (B, 1, K, H), jnp.float32).astype(jnp.bfloat16)
    pos = jnp.full((B, 1), S - 1, jnp.int32)
    for bits in (4, 2.5):
      cache = TurboQuantCache.init(B, S, K, H, jnp.bfloat16, bits=bits, impl="jnp")
      t_step = step_us.get((S, f"ours TurboQuant {bits}-bit"), float("nan"))
      for path, c0 in (("fused (K+V: one batched matmul)", cache),
                       ("per-part encode", cache.replace(k_enc=(), v_enc=(), kv_enc=()))):
        def line(t, err, path=path):
          if err:
            return f"| {S} | TurboQuant {bits}-bit | {path} | {err} | | |"
          return (f"| {S} | TurboQuant {bits}-bit | {path} | {t * 1e6:.1f} | {t_step:.1f} | "
                  f"{100 * t * 1e6 / t_step:.1f}% |")
        if out_of_time():
          note("encode", line(None, "skipped (time budget)"))
          continue
        try:
          body = lambda c, kn, vn, p: c.update(kn, vn, p)
          if FLAGS.tiny:
            t = devtime.loop_seconds(body, c0, n_lo=1, n_hi=2, trials=1, consts=(k_new, v_new, pos))
          else:
            t = devtime.loop_seconds(body, c0, n_lo=2, n_hi=202, trials=FLAGS.trials,
                                     consts=(k_new, v_new, pos))
        except Exception as e:  # noqa: BLE001
          note("encode", line(None, f"failed {type(e).__name__}: {str(e)[:160]}"))
          continue
        note("encode", line(t, None), label=f"encode tq{bits} {path}", context=S,
             us=t * 1e6, step_us=t_step, share=t * 1e6 / t_step)
      del cache

  # Priority order (the budget may cut the tail): the sweep context first, then its encode cost,
  # then the other contexts (longest first), then the encode cost at the longest one.
  ordered = sorted(contexts, key=lambda c: (c != sweep_S, -c))
  enc_at = [c for c in ordered if c >= sweep_S][:2] if not FLAGS.tiny else ordered[:1]
  for S in ordered:
    main_context(S)
    if want("encode") and S in enc_at[:1]:
      encode_context(S)
  for S in enc_at[1:]:
    if want("encode"):
      encode_context(S)

  # ---- compact summary ----
  print("\n==== summary (us per decode step; x = speed-up over XLA bf16) ====")
  names = ["XLA bf16", "cuDNN (jax.nn.dot_product_attention)", "ours bf16", "ours TurboQuant 4-bit",
           "ours TurboQuant 3-bit", "ours TurboQuant 2.5-bit", "ours TurboQuant 2-bit",
           "ours KIVI-4", "ours KIVI-2"]
  short = ["XLA", "cuDNN", "bf16", "TQ4", "TQ3", "TQ2.5", "TQ2", "KIVI4", "KIVI2"]
  print("context | " + " | ".join(short))
  for S in contexts:
    x = step_us.get((S, "XLA bf16"))
    cells = []
    for n in names:
      t = step_us.get((S, n))
      cells.append("-" if t is None else (f"{t:.0f}" + (f" ({x / t:.2f}x)" if x else "")))
    print(f"{S} | " + " | ".join(cells))
  for S in contexts:
    x = step_us.get((S, "XLA bf16"))
    for bits, target in ((4, 3.0), (2.5, 4.0)):
      t = step_us.get((S, f"ours TurboQuant {bits}-bit"))
      if x and t and S == sweep_S:
        print(f"target @ {S}: TQ-{bits} {x / t:.2f}x vs XLA (target >= {target}x): "
              f"{'PASS' if x / t >= target else 'FAIL'}")
  for r in records:
    if r["section"] == "encode":
      print(f"encode {r['label']} @ {r['context']}: {r['us']:.1f} us = {100 * r['share']:.1f}% of "
            "the decode step (target < 10%)")
  print(f"wrote {out_path} and {json_path} ({time.time() - _T0:.0f} s)")


if __name__ == "__main__":
  app.run(main)
