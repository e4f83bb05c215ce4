"""Profile: where the device time of one batch-1 decode step goes (kernel by kernel).

Runs the decode loop of `experiments/bench_decode.py` (same model, same `decode_loop`) under
`jax.profiler.trace(..., create_perfetto_trace=True)` and reads the trace's device events: per
kernel name, the count and total device time per decode step; the sum of kernel time vs the span
of the loop (the difference is the time the GPU sat idle between kernels: launch gaps, host-side
loop control).

Usage: python -m experiments.profile_decode [--matvec=xla] [--attend=pallas] [--context=2048]
[--tiny]. Writes results/decode_profile.md (under $OUT when set).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import devtime  # noqa: E402
from experiments.bench_decode import decode_program, model_config, random_params  # noqa: E402
from effjax.models.transformer import Transformer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("matvec", "auto", "model.matvec_impl")
flags.DEFINE_string("attend", "auto", "DenseCache attend_impl")
flags.DEFINE_string("norm", "auto", "model.norm_impl")
flags.DEFINE_integer("batch", 1, "batch")
flags.DEFINE_integer("context", 2048, "positions already in the cache")
flags.DEFINE_integer("steps", 32, "decode steps in the traced run")
flags.DEFINE_integer("top", 40, "kernels listed")
flags.DEFINE_string("profile_out", "results/decode_profile.md", "markdown output")
flags.DEFINE_string("anchor", "decode_attention_append", "--sequence lists the kernels between two "
                    "consecutive launches of the first kernel whose name contains this (one layer)")
flags.DEFINE_bool("sequence", True, "also list one layer's kernels in launch order")
# --tiny comes from experiments.bench_decode (tiny model, CPU smoke run)


def device_events(trace):
  """Complete events ('X') on device/stream tracks of a perfetto/chrome trace dict."""
  pid_names = {}
  for e in trace.get("traceEvents", []):
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pid_names[e["pid"]] = e.get("args", {}).get("name", "")
  dev_pids = {p for p, n in pid_names.items() if "/device:" in n or "GPU" in n or "stream" in
              n.lower()}
  return [e for e in trace.get("traceEvents", [])
          if e.get("ph") == "X" and e.get("pid") in dev_pids and "dur" in e], pid_names


def layer_sequence(evs, anchor):
  """Markdown lines: the kernels from one launch of the anchor kernel to the next, in order
  (one layer of the middle decode step), with their durations and the gaps before them."""
  idx = [i for i, e in enumerate(evs) if anchor in e["name"]]
  if len(idx) < 3:
    return ["", f"(sequence: fewer than 3 kernels named like {anchor!r})"]
  a, b = idx[len(idx) // 2], idx[len(idx) // 2 + 1]
  out = ["", f"One layer in launch order (from one `{anchor}` launch to the next):", "",
         "| # | kernel | us | gap before (us) |", "|---:|---|---:|---:|"]
  for j in range(a, b):
    e, prev = evs[j], evs[j - 1]
    gap = e["ts"] - (prev["ts"] + prev["dur"])
    out.append(f"| {j - a} | `{e['name'][:80]}` | {e['dur']:.2f} | {gap:.2f} |")
  return out


def main(argv):
  del argv
  cfg = dataclasses.replace(model_config(FLAGS.tiny), matvec_impl=FLAGS.matvec,
                            norm_impl=FLAGS.norm)
  model = Transformer(cfg)
  params = random_params(model)
  B, C, n = FLAGS.batch, FLAGS.context, FLAGS.steps
  prog = decode_program(model, cfg, B, C, n + 2, 1, attend_impl=FLAGS.attend)
  jax.block_until_ready(prog(params, jnp.int32(n)))   # compile + warm up
  jax.block_until_ready(prog(params, jnp.int32(n)))
  logdir = tempfile.mkdtemp()
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    jax.block_until_ready(prog(params, jnp.int32(n)))
  files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"no perfetto trace written under {logdir}")
  with gzip.open(files[0], "rt") as f:
    trace = json.load(f)
  evs, pid_names = device_events(trace)
  if not evs:
    raise RuntimeError(f"no device events in the trace; processes: {sorted(pid_names.values())}")
  # the busiest device track is the compute stream
  by_track = collections.Counter((e["pid"], e.get("tid")) for e in evs)
  track = by_track.most_common(1)[0][0]
  evs = sorted((e for e in evs if (e["pid"], e.get("tid")) == track), key=lambda e: e["ts"])
  span_us = evs[-1]["ts"] + evs[-1]["dur"] - evs[0]["ts"]
  busy_us = sum(e["dur"] for e in evs)
  per = collections.defaultdict(lambda: [0, 0.0])
  for e in evs:
    per[e["name"]][0] += 1
    per[e["name"]][1] += e["dur"]
  rows = sorted(per.items(), key=lambda kv: -kv[1][1])
  lines = [f"# Decode step profile: matvec={FLAGS.matvec} attend={FLAGS.attend} norm={FLAGS.norm} batch={B} "
           f"context={C}", "",
           f"Device: {jax.devices()[0].device_kind}, jax {jax.__version__}. One program of {n} "
           f"decode steps (plus cache set-up) traced; track {pid_names.get(track[0], track)}.", "",
           f"Per step: {len(evs) / n:.1f} kernels, kernel time {busy_us / n:.1f} us, span "
           f"{span_us / n:.1f} us, idle between kernels {(span_us - busy_us) / n:.1f} us "
           f"({100 * (1 - busy_us / span_us):.1f}% of the span).", "",
           "| kernel | calls/step | us/step | % of kernel time |", "|---|---:|---:|---:|"]
  for name, (cnt, dur) in rows[:FLAGS.top]:
    lines.append(f"| `{name[:90]}` | {cnt / n:.1f} | {dur / n:.2f} | {100 * dur / busy_us:.1f} |")
  if FLAGS.sequence:
    lines += layer_sequence(evs, FLAGS.anchor)
  text = "\n".join(lines) + "\n"
  print(text, flush=True)
  out = devtime.output_path(FLAGS.profile_out)
  with open(out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  app.run(main)
