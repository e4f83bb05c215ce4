"""Benchmark: plain decoding vs draft-model speculative decoding vs DFlash.

Papers: Leviathan et al., arXiv 2211.17192 and Chen et al., arXiv 2302.01318 (speculative
sampling); "DFlash: Block Diffusion for Flash Speculative Decoding", arXiv 2602.06036.

For every batch size (default 1 and 8) and sampler (greedy, temperature 1) the three decoders run
the same prompts (windows of the validation split) with a fixed number of new tokens and no EOS,
each as the same jitted program: `effjax.decode.generate.generate` with `drafter=None`,
`DraftModel(draft_lm, γ)` or `DFlash(drafter, dcfg)`. Reported: tokens/s (generated tokens of all rows / median wall time of
`--reps` runs after one compile-and-warm-up run, a fresh prompt set and key per run, timed around
`block_until_ready`; the compile is excluded), τ (mean accepted + 1 per target call, the decoders' own statistic), the
speed-up over plain decoding in the same run, and for greedy runs whether the speculative outputs
equal the plain greedy output token for token; where a row differs, the first differing token and
the target's top-1 - top-2 logit gap there (`divergence`): in bf16 the verification pass (γ+1
positions, matrix-matrix kernels) and the one-token decode step (matrix-vector kernels, the
split-K decode-attention kernel) round differently, so a near-tie can flip; the CPU float32
tests check exact equality.

The models come from configs/dflash.py (`target`, `draft_lm`, and the drafter trained by
experiments/train_dflash.py). Missing target / draft LM params are trained first
(`effjax.train.loop.train`); a missing drafter is an error.

Run (CPU, tiny): python -m experiments.bench_speculative --config=configs/dflash.py
GPU (issue scale): python -m experiments.bench_speculative --config=configs/dflash.py:small \
    --max_new_tokens=256 --prompt_len=128
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from effjax.data import BOS_ID, LMBatcher, load_corpus
from effjax.decode.dflash import DFlash
from effjax.decode.generate import generate
from effjax.decode.sampling import Sampler
from effjax.decode.speculative_generate import DraftModel
from experiments.speculative_common import train_or_load_lm
from experiments.train_dflash import load_drafter

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dflash.py", "configs/dflash.py")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
_TEMPS = flags.DEFINE_list("temperatures", ["0", "1"], "Sampler temperatures (0 = greedy).")
_NEW = flags.DEFINE_integer("max_new_tokens", 96, "Tokens generated per row.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt length (tokens, BOS included).")
_GAMMA = flags.DEFINE_integer("draft_gamma", 4, "γ of draft-model speculation.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed runs per cell (median reported).")
_OUT = flags.DEFINE_string("out", "results/speculative", "Output prefix (.md and .json).")
_F32 = flags.DEFINE_bool("f32_check", True, "Also decode greedily with the target computing in "
                         "float32 (full-precision matmuls) and check speculative == plain there.")


def make_prompts(batcher: LMBatcher, batch: int, length: int, rep: int) -> np.ndarray:
  """`[batch, length]` prompts: BOS + windows of the validation stream (fresh per `rep`)."""
  rng = np.random.default_rng([7, batch, rep])
  starts = rng.integers(0, batcher.stream.size - length, size=batch)
  rows = [np.concatenate([[BOS_ID], batcher.stream[s:s + length - 1]]) for s in starts]
  return np.stack(rows).astype(np.int32)


def time_decoder(run, batcher, batch, length, reps):
  """Runs `run(prompts, key)` once to compile/warm up, then `reps` timed runs.

  Returns:
    (median seconds, the first timed output, mean τ over the timed runs or None).
  """
  out = run(make_prompts(batcher, batch, length, 0), jax.random.key(0))
  jax.block_until_ready(out.tokens)
  times, outs = [], []
  for r in range(1, reps + 1):
    prompts = make_prompts(batcher, batch, length, r)
    t0 = time.perf_counter()
    out = run(prompts, jax.random.key(r))
    jax.block_until_ready(out.tokens)
    times.append(time.perf_counter() - t0)
    outs.append(out)
  taus = [float(o.mean_accept_length) for o in outs if hasattr(o, "mean_accept_length")]
  return statistics.median(times), outs, (float(np.mean(taus)) if taus else None)


def divergence(target, t_vars, prompts, plain_tokens, spec_tokens):
  """Where a greedy speculative output first differs from plain greedy decoding, and how close
  the target's top-2 logits are there (one teacher-forced forward pass over the common prefix).

  Returns a dict: rows, identical rows, median first-divergence index over differing rows, and
  the largest top-1 - top-2 logit gap at those positions (a near-tie flips under a different
  reduction order: bf16 verification of γ+1 positions vs one-token decode steps).
  """
  plain, spec = np.asarray(plain_tokens), np.asarray(spec_tokens)
  diff = plain != spec
  rows = [b for b in range(plain.shape[0]) if diff[b].any()]
  rep = dict(rows=plain.shape[0], identical=plain.shape[0] - len(rows), first=None, max_gap=None)
  if not rows:
    return rep
  firsts, gaps = [], []
  for b in rows:
    d = int(np.argmax(diff[b]))
    firsts.append(d)
    seq = np.concatenate([np.asarray(prompts[b]), plain[b, :d]])[None].astype(np.int32)
    logits = np.asarray(target.apply(t_vars, seq)[0, -1], np.float32)
    top2 = np.sort(logits)[-2:]
    gaps.append(float(top2[1] - top2[0]))
  rep.update(first=float(np.median(firsts)), max_gap=max(gaps))
  return rep


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  target, t_vars, _ = train_or_load_lm(config.target)
  draft, d_vars, _ = train_or_load_lm(config.draft_lm)
  drafter, f_vars, dcfg = load_drafter(config, target)
  dc = config.target.data
  corpus = load_corpus(dc.corpus, val_fraction=float(dc.val_fraction),
                       max_bytes=int(dc.max_bytes) or None)
  val = LMBatcher.from_corpus(corpus, "val", seq_len=8, batch_size=1, seed=0)
  N, P, G = _NEW.value, _PROMPT.value, _GAMMA.value
  n_t = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t_vars))
  n_d = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(d_vars))
  n_f = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(f_vars))
  dev = jax.devices()[0]
  hw = f"{dev.platform}:{dev.device_kind} ({os.cpu_count()} host cores, {platform.machine()})"
  if dev.platform == "cpu":
    hw += f", load avg {os.getloadavg()[0]:.1f}"
  header = (f"target {n_t:,} params ({target.cfg.num_layers} layers, d {target.cfg.d_model}); "
            f"draft LM {n_d:,} params (γ={G}); DFlash drafter {n_f:,} params "
            f"(block {dcfg.block_size}, γ={dcfg.gamma}, layers {dcfg.num_layers}, target layers "
            f"{list(dcfg.target_layers)}); prompt {P}, new tokens {N}; {hw}")
  print(header, flush=True)
  rows = []
  for b in [int(x) for x in _BATCHES.value]:
    for temp in [float(x) for x in _TEMPS.value]:
      sampler = Sampler(temperature=temp)
      drafters = {"plain": (None, None), "draft-model": (DraftModel(draft, G), d_vars),
                  "dflash": (DFlash(drafter, dcfg), f_vars)}
      res = {}
      for name, (dr, dr_vars) in drafters.items():
        def run(p, k, dr=dr, dr_vars=dr_vars):
          return generate(target, t_vars, p, max_new_tokens=N, sampler=sampler, key=k,
                          drafter=dr, drafter_params=dr_vars)
        sec, outs, tau = time_decoder(run, val, b, P, _REPS.value)
        toks = int(np.sum(np.asarray(outs[0].lengths)))
        res[name] = dict(sec=sec, tok_s=toks / sec, tau=tau, outs=outs)
      for name in ("plain", "draft-model", "dflash"):
        r = res[name]
        match = ""
        if temp == 0 and name != "plain":
          reps = [divergence(target, t_vars, make_prompts(val, b, P, i + 1), p.tokens, o.tokens)
                  for i, (o, p) in enumerate(zip(r["outs"], res["plain"]["outs"]))]
          n_rows = sum(d["rows"] for d in reps)
          n_same = sum(d["identical"] for d in reps)
          match = "yes" if n_same == n_rows else f"{n_same}/{n_rows} rows"
          gaps = [d["max_gap"] for d in reps if d["max_gap"] is not None]
          if gaps:
            firsts = [d["first"] for d in reps if d["first"] is not None]
            match += (f"; differing rows split at token ~{np.median(firsts):.0f} where the "
                      f"target's top-2 logits differ by <= {max(gaps):.3f}")
        row = dict(batch=b, temperature=temp, decoder=name, tok_s=round(r["tok_s"], 1),
                   tau=None if r["tau"] is None else round(r["tau"], 3),
                   speedup=round(r["tok_s"] / res["plain"]["tok_s"], 3),
                   median_s=round(r["sec"], 4), greedy_match=match)
        rows.append(row)
        print(row, flush=True)
      text = _write(header, rows)
  if _F32.value:
    # the same comparison with the target in float32: equality must hold up to float32 rounding
    t32 = type(target)(dataclasses.replace(target.cfg, dtype="float32"))
    b = max(int(x) for x in _BATCHES.value)
    prompts = make_prompts(val, b, P, 1)
    with jax.default_matmul_precision("float32"):
      outs = {name: generate(t32, t_vars, prompts, max_new_tokens=N, sampler=Sampler(),
                             key=jax.random.key(1), drafter=dr, drafter_params=dv)
              for name, (dr, dv) in (("plain", (None, None)),
                                     ("draft-model", (DraftModel(draft, G), d_vars)),
                                     ("dflash", (DFlash(drafter, dcfg), f_vars)))}
      checks = {n: divergence(t32, t_vars, prompts, outs["plain"].tokens, outs[n].tokens)
                for n in ("draft-model", "dflash")}
    header += ("\n\nFloat32 target (dtype float32, float32 matmuls), greedy, batch "
               f"{b}: " + "; ".join(f"{n}: {c['identical']}/{c['rows']} rows identical to plain"
                                    + (f" (max top-2 gap at a split {c['max_gap']:.2e})"
                                       if c["max_gap"] is not None else "")
                                    for n, c in checks.items()))
    text = _write(header, rows)
  print(text, flush=True)


def _write(header, rows):
  """Writes the markdown table and json (after every cell, so a cut-off run keeps its rows)."""
  lines = ["# Speculative decoding benchmark\n", f"{header}\n",
           f"Command: `python -m experiments.bench_speculative {' '.join(sys.argv[1:])}`\n",
           "| batch | temp | decoder | tokens/s | τ | speed-up | median s | greedy == plain |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    tau = "" if r["tau"] is None else f"{r['tau']:.2f}"
    lines.append(f"| {r['batch']} | {r['temperature']:g} | {r['decoder']} | {r['tok_s']:.1f} | "
                 f"{tau} | {r['speedup']:.2f}× | {r['median_s']:.4f} | {r['greedy_match']} |")
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + "_bench.md", "w") as f:
    f.write(text)
  with open(_OUT.value + "_bench.json", "w") as f:
    json.dump({"header": header, "rows": rows}, f, indent=1)
  return text


if __name__ == "__main__":
  app.run(main)
