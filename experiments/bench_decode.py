"""Benchmark: decode tokens/s of `effjax.decode.generate`'s loop vs the memory-bandwidth floor.

Model: a Llama-3.2-1B-shaped `effjax.models.Transformer` (vocab 128256, d_model 2048, 16 layers,
32 query heads, 8 kv heads, head_dim 64, SwiGLU 8192, tied embeddings, 1.24 B parameters) with
random bf16 weights and a bf16 `effjax.kv.DenseCache`.

Measured: the decode loop exactly as `generate` runs it (`effjax.decode.generate.decode_loop`: one
`lax.while_loop`, one forward pass of one token per row per iteration, greedy sampling, per-row
stop bookkeeping) on a cache that already holds `context` positions per row (their contents do not
change the work: dense attention reads all slots). One jitted program builds the cache and runs
the loop for `limit` steps (`limit` is a traced argument, so one compile per (batch, context));
the time per step is the slope of the program's median wall time between n1 and n2 steps, which
cancels the cache set-up and the host dispatch.

Floor: a decode step must read every weight once (the tied embedding as LM head) and the K/V of
`context` positions per row: floor = (weight bytes + 2·L·B·context·K·H·2 bytes) / copy bandwidth,
with the copy bandwidth measured in the same run (y = x + 1 over a 1 GiB float32 array in a loop,
read + write bytes, slope between 2 and 12 repetitions). The peer is this floor (a bandwidth-bound step cannot beat it).

Usage: python -m experiments.bench_decode [--batches=1,8,64] [--contexts=2048,32768]
Writes results/decode_bench.md (and prints the table).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import devtime  # noqa: E402

from effjax.config import ModelConfig  # noqa: E402
from effjax.decode.generate import decode_loop  # noqa: E402
from effjax.decode.sampling import GREEDY  # noqa: E402
from effjax.kv import CacheConfig, DenseCache, init_layer_caches  # noqa: E402
from effjax.layers.linear import project  # noqa: E402
from effjax.models.transformer import Transformer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("batches", "1,8,64", "batch sizes")
flags.DEFINE_string("contexts", "2048,32768", "context lengths (positions already in the cache)")
flags.DEFINE_integer("trials", 5, "timed repetitions per point (median)")
flags.DEFINE_string("out", "results/decode_bench.md", "markdown output")
flags.DEFINE_bool("tiny", False, "tiny model (CPU smoke run of this script)")
flags.DEFINE_string("unrolls", "1", "decode steps per while iteration (first is the main "
                    "table; others are extra rows for batch 1, first context)")
flags.DEFINE_string("variants", "auto:auto", "comma-separated MATVEC:ATTEND[:NORM] kernel choices: "
                    "model.matvec_impl (xla|pallas|hybrid|auto) : DenseCache attend_impl "
                    "(xla|pallas|auto) [: model.norm_impl (xla|pallas|auto), default auto]; one "
                    "table row per (variant, batch, context)")
flags.DEFINE_bool("diagnose", True, "also time one decode step outside the loop (batch 1, "
                  "first context): separates loop overhead from the step itself")


def model_config(tiny: bool) -> ModelConfig:
  if tiny:
    return ModelConfig(vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       mlp_dim=128, max_seq_len=40000, dtype="bfloat16", param_dtype="bfloat16")
  return ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, mlp_dim=8192, max_seq_len=40000,
                     rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16",
                     param_dtype="bfloat16")


def random_params(model, seed=0):
  """Random bf16 params with the model's tree (N(0, 0.02); values do not affect speed). One small
  jitted generator per distinct leaf shape (compiles in seconds, unlike one program for all)."""
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                        jnp.zeros((1, 1), jnp.int32))))
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  make = jax.jit(lambda key, shape, dtype: (0.02 * jax.random.normal(key, shape, jnp.float32)
                                            ).astype(dtype), static_argnums=(1, 2))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [make(k, a.shape, a.dtype)
                                                for k, a in zip(keys, leaves)])


def weights_only_step(cfg, params, B, trials, matvec_impl="xla"):
  """Seconds for the decode step's matrix-vector products alone (all q/k/v/o, gate/up/down and
  the tied LM head on the real weights, chained, no attention/norm/RoPE/cache/sampling), through
  `effjax.layers.linear.project` with `matvec_impl`; slope between 2 and 10 in-program
  repetitions."""
  p = params["params"]

  def mm(eqn, x, w, out_dtype=None):
    return project(eqn, x, w, matvec_impl=matvec_impl, out_dtype=out_dtype)

  def once(x_BD):
    for i in range(cfg.num_layers):
      a, m = p[f"layers_{i}"]["attn"], p[f"layers_{i}"]["mlp"]
      q = mm("BD,DNH->BNH", x_BD, a["q_proj"]["kernel"])
      k = mm("BD,DKH->BKH", x_BD, a["k_proj"]["kernel"])
      v = mm("BD,DKH->BKH", x_BD, a["v_proj"]["kernel"])
      o = mm("BNH,NHD->BD", q, a["o_proj"]["kernel"])
      x_BD = x_BD + o + (jnp.mean(k) + jnp.mean(v)).astype(x_BD.dtype)
      h = jax.nn.silu(mm("BD,DF->BF", x_BD, m["gate"]["kernel"])) * mm(
          "BD,DF->BF", x_BD, m["up"]["kernel"])
      x_BD = x_BD + mm("BF,FD->BD", h, m["down"]["kernel"])
    logits = mm("BD,VD->BV", x_BD, p["embedding"], out_dtype=jnp.float32)
    return x_BD + jnp.max(logits).astype(x_BD.dtype)

  x = jnp.ones((B, cfg.d_model), cfg.compute_dtype)
  return devtime.loop_seconds(once, x, n_lo=2, n_hi=10, trials=trials)


def decode_program(model, cfg, B, C, nmax, unroll=1, attend_impl="xla"):
  """jit(params, limit) -> (tokens, steps): cache holding C positions, decode `limit` steps."""
  cache = CacheConfig(DenseCache, options=(("attend_impl", attend_impl),))

  def run(params, limit):
    caches = init_layer_caches(cache, cfg.num_layers, B, C + nmax, cfg.num_kv_heads,
                               cfg.head_dim, cfg.compute_dtype)
    caches = [c.rollback(jnp.full((B,), C, jnp.int32)) for c in caches]
    tok = jnp.zeros((B,), jnp.int32)
    s = decode_loop(model, params, caches, tok, jnp.full((B,), C, jnp.int32), jax.random.key(0),
                    max_new_tokens=nmax, sampler=GREEDY, limit=limit, unroll=unroll)
    return s.out_BN, s.step

  return jax.jit(run)


def step_outside_loop(model, cfg, params, B, C, reps=50):
  """Seconds per decode step when each step is its own jitted call (caches donated)."""
  caches = init_layer_caches(DenseCache, cfg.num_layers, B, C + reps + 8, cfg.num_kv_heads,
                             cfg.head_dim, cfg.compute_dtype)
  caches = [c.rollback(jnp.full((B,), C, jnp.int32)) for c in caches]

  def step_fn(params, caches, tok_B, pos_B):
    logits, caches = model.apply(params, tok_B[:, None], positions_BT=pos_B[:, None],
                                 caches=caches)
    return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), caches

  step = jax.jit(step_fn, donate_argnums=1)
  tok, pos = jnp.zeros((B,), jnp.int32), jnp.full((B,), C, jnp.int32)
  for _ in range(3):
    tok, caches = step(params, caches, tok, pos)
    pos = pos + 1
  jax.block_until_ready(tok)
  t = time.perf_counter()
  for _ in range(reps):
    tok, caches = step(params, caches, tok, pos)
    pos = pos + 1
  jax.block_until_ready(tok)
  return (time.perf_counter() - t) / reps


def main(argv):
  del argv
  base_cfg = model_config(FLAGS.tiny)
  print(f"backend {jax.default_backend()} devices {jax.devices()}", flush=True)
  t0 = time.time()
  params = random_params(Transformer(base_cfg))
  jax.block_until_ready(params)
  w_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"params {n_params / 1e9:.3f} B, {w_bytes / 1e9:.3f} GB, init {time.time() - t0:.1f}s",
        flush=True)
  bw = devtime.copy_bandwidth(max(FLAGS.trials, 7))
  print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
  rows = []
  contexts = [int(c) for c in FLAGS.contexts.split(",")]
  batches = [int(b) for b in FLAGS.batches.split(",")]
  variants = [tuple(v.split(":")) for v in FLAGS.variants.split(",")]
  for v in variants:
    if len(v) not in (2, 3):
      raise ValueError(f"--variants: each entry must be MATVEC:ATTEND[:NORM], got {':'.join(v)!r}")
  variants = [v if len(v) == 3 else (*v, "auto") for v in variants]
  diag = []
  if FLAGS.diagnose:
    B, C = batches[0], contexts[0]
    for mv in dict.fromkeys(v[0] for v in variants):
      cfg = dataclasses.replace(base_cfg, matvec_impl=mv)
      t_step = step_outside_loop(Transformer(cfg), cfg, params, B, C)
      t_w = weights_only_step(cfg, params, B, FLAGS.trials, matvec_impl=mv)
      diag.append(f"Diagnosis (batch {B}, context {C}, matvec_impl={mv}): one decode step as its "
                  f"own jitted call (caches donated, calls pipelined): {t_step * 1e3:.3f} ms. "
                  f"The step's matrix-vector products alone (same weights, chained, in a loop): "
                  f"{t_w * 1e3:.3f} ms = {w_bytes / t_w / 1e12:.3f} TB/s of weights "
                  f"({100 * w_bytes / bw / t_w:.1f}% of the copy bandwidth).")
      print(diag[-1], flush=True)
  unrolls = [int(u) for u in FLAGS.unrolls.split(",")]
  points = [(mv, at, nm, B, C, unrolls[0]) for (mv, at, nm) in variants for B in batches
            for C in contexts]
  points[1:1] = [(*variants[0], batches[0], contexts[0], u) for u in unrolls[1:]]
  for mv, at, nm, B, C, unroll in points:
    cfg = dataclasses.replace(base_cfg, matvec_impl=mv, norm_impl=nm)
    model = Transformer(cfg)
    kv_bytes = 2 * cfg.num_layers * B * C * cfg.num_kv_heads * cfg.head_dim * 2
    floor_s = (w_bytes + kv_bytes) / bw
    n1 = 4
    n2 = n1 + max(8, min(64, int(0.05 / floor_s)))
    t0 = time.time()
    try:
      prog = decode_program(model, cfg, B, C, n2 + unroll, unroll, attend_impl=at)
      t1 = devtime.median_wall(prog, params, jnp.int32(n1), trials=FLAGS.trials)
      t2 = devtime.median_wall(prog, params, jnp.int32(n2), trials=FLAGS.trials)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{mv}:{at}:{nm} B={B} C={C}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    step_s = (t2 - t1) / (n2 - n1)
    row = dict(variant=f"{mv}:{at}:{nm}", B=B, C=C, unroll=unroll, ms=step_s * 1e3, tok_s=B / step_s,
               floor_ms=floor_s * 1e3, pct=100 * floor_s / step_s, kv_gb=kv_bytes / 1e9,
               wall=time.time() - t0, n=(n1, n2))
    rows.append(row)
    print(f"{mv}:{at}:{nm} B={B:3d} C={C:6d} unroll={unroll}: {row['ms']:.3f} ms/step  "
          f"{row['tok_s']:9.1f} tok/s  floor {row['floor_ms']:.3f} ms  {row['pct']:5.1f}% of floor "
          f" (KV {row['kv_gb']:.2f} GB, steps {n1}->{n2}, {row['wall']:.0f}s incl. compile)",
          flush=True)
    _write(rows, cfg, n_params, w_bytes, bw, " ".join(diag))


def _write(rows, cfg, n_params, w_bytes, bw, diag):
  """Writes the markdown table (after every row, so a cut-off run keeps what it measured)."""
  del cfg
  dev = jax.devices()[0].device_kind
  lines = [
      "# Decode throughput vs the memory-bandwidth floor",
      "",
      f"Model: Llama-3.2-1B-shaped effjax Transformer, {n_params / 1e9:.3f} B params, random bf16 "
      f"weights ({w_bytes / 1e9:.3f} GB), bf16 DenseCache, greedy. Device: {dev}, jax "
      f"{jax.__version__}. Measured copy bandwidth (y = x + 1 on 1 GiB float32, read + write, "
      "devtime.copy_bandwidth): "
      f"{bw / 1e12:.3f} TB/s.",
      "",
      "Floor = (weight bytes + KV bytes of `context` positions) / copy bandwidth. Time per step = "
      "slope of the median wall time of one jitted program (cache set-up + decode loop) between "
      "n1 and n2 steps.",
      "",
      "| matvec:attend:norm | batch | context | steps/while-iter | ms/step | tokens/s | floor ms/step "
      "| % of floor | KV read GB/step |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['B']} | {r['C']} | {r['unroll']} | {r['ms']:.3f} | {r['tok_s']:.1f} | "
                 f"{r['floor_ms']:.3f} | {r['pct']:.1f} | {r['kv_gb']:.3f} |")
  lines += ["", diag, "", "Command: `python -m experiments.bench_decode` "
            f"(batches {FLAGS.batches}, contexts {FLAGS.contexts}, trials {FLAGS.trials})."]
  text = "\n".join(lines) + "\n"
  out = devtime.output_path(FLAGS.out)
  with open(out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  app.run(main)
