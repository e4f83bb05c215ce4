"""Shared helpers of the speculative-decoding experiments (train_dflash, bench_speculative,
gpu_issue6.sh).

No paper. A trained LM is kept as `<run_dir>/params.msgpack` (flax serialisation of the raw params
tree) next to the run's `config.json`; `train_or_load_lm` trains it once and reloads it afterwards,
so the drafter training and the benchmark share one frozen target. Two ways to train:

  * by steps (`max_seconds=0`): `effjax.train.loop.train` (checkpoints, resume, schedule over
    `train.steps`);
  * by wall-clock budget (`max_seconds > 0`, `train_lm_timed`): the same model, data, optimizer
    and jitted train step (`effjax.train.step.make_train_step`), stopped once `max_seconds` have
    passed since the first step was dispatched (compile included) or after `train.steps` steps,
    then params.msgpack is written ("stop and checkpoint by time"). The learning rate follows the
    usual warmup (by steps) and then a cosine decay to `min_lr_ratio` over the FRACTION OF THE
    WALL-CLOCK BUDGET used (`wall_clock_optimizer`): a step count is unknown in advance on a
    new device, and a decay that ends when the budget ends is what a fixed-time run wants. The
    decay factor is an `optax.inject_hyperparams` value set from the host, so no recompilation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from effjax.config import ModelConfig, validate
from effjax.models.transformer import Transformer
from effjax.optim import make_optimizer

PARAMS_FILE = "params.msgpack"
TIMED_JSON = "timed_train.json"


def lm_config(base: ml_collections.ConfigDict, *, run_dir: str, steps: int | None = None,
              **model_overrides) -> ml_collections.ConfigDict:
  """A copy of `base` with `train.run_dir`, optionally `train.steps` and model fields replaced."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.train.run_dir = run_dir
  if steps is not None:
    cfg.train.steps = int(steps)
  for k, v in model_overrides.items():
    if k not in cfg.model:
      raise ValueError(f"lm_config: unknown model field {k!r}")
    cfg.model[k] = v
  return cfg


def params_path(run_dir: str) -> str:
  """Where `train_or_load_lm` keeps the raw params of the run in `run_dir`."""
  return os.path.join(os.path.abspath(run_dir), PARAMS_FILE)


def save_params(params, path: str) -> None:
  """Writes a raw params tree with flax msgpack serialisation."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))


def load_params(path: str):
  """Reads a params tree written by `save_params` (as jax arrays)."""
  with open(path, "rb") as f:
    tree = flax.serialization.msgpack_restore(f.read())
  return jax.tree_util.tree_map(jnp.asarray, tree)


# ----------------------------------------------------------------------------------------------
# Training by wall-clock budget
# ----------------------------------------------------------------------------------------------


def wall_clock_optimizer(train_cfg, params) -> optax.GradientTransformation:
  """`make_optimizer(train_cfg)` with its cosine decay taken out (warmup, then the peak LR) and an
  injected multiplier `lr_scale` that `set_lr_scale` drives from the wall clock."""
  flat = ml_collections.ConfigDict(train_cfg.to_dict())
  flat.min_lr_ratio = 1.0
  flat.steps = max(int(flat.warmup_steps), 1)
  base = make_optimizer(flat, params)
  return optax.inject_hyperparams(
      lambda lr_scale: optax.chain(base, optax.scale(lr_scale)))(
          lr_scale=jnp.asarray(1.0, jnp.float32))


def wall_clock_scale(frac: float, min_lr_ratio: float) -> float:
  """Cosine from 1 at `frac` = 0 to `min_lr_ratio` at `frac` >= 1 (fraction of the budget)."""
  f = min(max(frac, 0.0), 1.0)
  return min_lr_ratio + 0.5 * (1.0 - min_lr_ratio) * (1.0 + math.cos(math.pi * f))


def set_lr_scale(opt_state, scale: float):
  """Sets the injected `lr_scale` of a `wall_clock_optimizer` state (same dtype: no retrace)."""
  opt_state.hyperparams["lr_scale"] = jnp.asarray(scale, jnp.float32)
  return opt_state


class WallClock:
  """Budget bookkeeping: `frac()` of `seconds` used since `start()`; `over()` when spent.

  Checked every `sync_every` steps after blocking on the step's output, so that asynchronous
  dispatch cannot run far past the budget.
  """

  def __init__(self, seconds: float, sync_every: int = 10):
    if seconds <= 0:
      raise ValueError(f"WallClock: seconds must be > 0, got {seconds}")
    self.seconds, self.sync_every, self.t0 = float(seconds), int(sync_every), None

  def start(self):
    self.t0 = time.time()

  def elapsed(self) -> float:
    return time.time() - self.t0

  def frac(self) -> float:
    return self.elapsed() / self.seconds

  def check(self, step: int, out) -> bool:
    """True when the budget is spent (blocks on `out` every `sync_every` steps)."""
    if step % self.sync_every:
      return False
    jax.block_until_ready(out)
    return self.frac() >= 1.0


def train_lm_timed(config: ml_collections.ConfigDict, max_seconds: float, *, stream=None):
  """Trains the LM of `config` for at most `max_seconds` of wall time (or `train.steps` steps).

  Returns:
    dict with `params` (host tree), `steps`, `seconds`, `val_bpb`, `tokens_per_s`.
  """
  from effjax.data import LMBatcher, load_corpus  # pylint: disable=g-import-not-at-top
  from effjax.eval.bpb import evaluate_bpb  # pylint: disable=g-import-not-at-top
  from effjax.train.state import init_train_state  # pylint: disable=g-import-not-at-top
  from effjax.train.step import make_eval_step, make_train_step  # pylint: disable=g-import-not-at-top
  stream = stream or sys.stdout
  model = Transformer(validate(config))
  d, t = config.data, config.train
  corpus = load_corpus(d.corpus, val_fraction=float(d.val_fraction),
                       max_bytes=int(d.max_bytes) or None)
  train_data = LMBatcher.from_corpus(corpus, "train", seq_len=d.seq_len, batch_size=d.batch_size,
                                     seed=d.seed)
  val_data = LMBatcher.from_corpus(corpus, "val", seq_len=d.seq_len, batch_size=d.batch_size,
                                   seed=d.seed)
  key = jax.random.PRNGKey(t.seed)
  params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, d.seq_len), jnp.int32)))[
      "params"])(key)
  optimizer = wall_clock_optimizer(t, params)
  state = init_train_state(params, optimizer, jax.random.fold_in(key, 1))
  train_step = make_train_step(model, optimizer, config)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  print(f"timed LM training: {n_params:,} params, budget {max_seconds:.0f} s, "
        f"<= {t.steps} steps, run dir {t.run_dir}", file=stream, flush=True)
  clock = WallClock(max_seconds)
  clock.start()
  step, metrics, t_first = 0, None, None
  while step < int(t.steps):
    state, metrics = train_step(state, train_data.batch(step))
    step += 1
    if step == 1:
      jax.block_until_ready(metrics)
      t_first = clock.elapsed()
      print(f"step 1 (compile + first step) {t_first:.1f} s", file=stream, flush=True)
    if clock.check(step, metrics["loss"]):
      break
    set_lr_scale(state.opt_state, wall_clock_scale(clock.frac(), float(t.min_lr_ratio)))
    if t.log_every and step % t.log_every == 0:
      print(f"step {step} | loss {float(metrics['loss']):.4f} | {clock.elapsed():.0f} s | "
            f"lr scale {wall_clock_scale(clock.frac(), float(t.min_lr_ratio)):.3f}",
            file=stream, flush=True)
  jax.block_until_ready(state.params)
  seconds = clock.elapsed()
  eval_step = make_eval_step(model, config=config)
  n_eval = min(int(t.eval_batches) or 8, val_data.num_eval_batches())
  val_bpb, _ = evaluate_bpb(eval_step, state.params, val_data.eval_batches(n_eval))
  tok_s = (step - 1) * d.batch_size * d.seq_len / max(seconds - (t_first or 0.0), 1e-9)
  print(f"stopped after {step} steps, {seconds:.1f} s (budget {max_seconds:.0f} s); final loss "
        f"{float(metrics['loss']):.4f}; val bpb {val_bpb:.4f}; {tok_s:,.0f} tokens/s",
        file=stream, flush=True)
  return {"params": jax.device_get(state.params), "steps": step, "seconds": seconds,
          "val_bpb": val_bpb, "tokens_per_s": tok_s}


def train_or_load_lm(config: ml_collections.ConfigDict, *, retrain: bool = False,
                     max_seconds: float = 0.0):
  """Trains the LM of `config` unless its params are saved (see the module docstring).

  Args:
    config: an LM experiment config (model/data/train/mesh).
    retrain: train even if params.msgpack exists.
    max_seconds: > 0: train by wall-clock budget (`train_lm_timed`); 0: by steps.

  Returns:
    `(model, variables, info)`: the `Transformer`, `{"params": raw params}`, and a dict with
    `val_bpb` (None when loaded) and `params_path`.
  """
  model_cfg: ModelConfig = validate(config)
  path = params_path(config.train.run_dir)
  info = {"params_path": path, "val_bpb": None}
  if retrain or not os.path.exists(path):
    if max_seconds > 0:
      result = train_lm_timed(config, max_seconds)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(os.path.join(os.path.dirname(path), TIMED_JSON), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "params"}, f, indent=1)
    else:
      from effjax.train.loop import train  # pylint: disable=g-import-not-at-top
      result = train(config, tensorboard=False)
    save_params(result["params"], path)
    info["val_bpb"] = float(result["val_bpb"])
  params = load_params(path)
  return Transformer(model_cfg), {"params": params}, info


def main(argv):
  """Trains one LM section (`--section=target|draft_lm`) of a speculative config by time."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  section = flags.FLAGS.section
  if section not in ("target", "draft_lm"):
    raise app.UsageError(f"--section must be 'target' or 'draft_lm', got {section!r}")
  _, _, info = train_or_load_lm(config[section], retrain=flags.FLAGS.retrain,
                                max_seconds=flags.FLAGS.max_seconds)
  print(f"{section}: params at {info['params_path']} (val bpb {info['val_bpb']})", flush=True)


if __name__ == "__main__":
  # Defined here so that importing this module defines no flags.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/dflash.py", "configs/dflash.py")
  flags.DEFINE_string("section", "target", "Which LM of the config: target or draft_lm.")
  flags.DEFINE_float("max_seconds", 0.0, "Wall-clock budget (0: train.steps via the train loop).")
  flags.DEFINE_bool("retrain", False, "Train even if params.msgpack exists.")
  app.run(main)
