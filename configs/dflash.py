"""DFlash drafter training + speculative benchmark at tiny (CPU) scale.

Sections:
  target    a full LM experiment config (model/data/train/mesh) for the frozen target; trained by
            `effjax.train.loop.train` into `target.train.run_dir` if its params are not there yet.
  draft_lm  the same for the small autoregressive draft model of draft-model speculation (bench).
  dflash    the drafter (`effjax.models.dflash.DFlashConfig` fields + init choice + labels).
  train     the drafter's training run.

Run:
  python -m experiments.train_dflash --config=configs/dflash.py
  python -m experiments.bench_speculative --config=configs/dflash.py
GPU scale: `--config=configs/dflash.py:small` (a configs/small.py-like target, see get_config).
Every choice is explained in experiments/train_dflash.py; the GPU run of issue 6
(experiments/gpu_issue6.sh) trains all three models by wall-clock budget.
"""

import ml_collections

from configs import small as small_cfg
from configs import tiny


def get_config(scale: str = "tiny") -> ml_collections.ConfigDict:
  """`scale` "tiny" (CPU, minutes) or "small" (one GPU, the issue's ~100M target)."""
  if scale not in ("tiny", "small"):
    raise ValueError(f"configs/dflash.py: scale must be 'tiny' or 'small', got {scale!r}")
  c = ml_collections.ConfigDict()
  if scale == "tiny":
    c.target = tiny.get_config()
    c.target.model.num_layers = 4
    c.target.train.update(dict(steps=300, run_dir="runs/spec_target"))
    c.draft_lm = tiny.get_config()
    c.draft_lm.model.update(dict(num_layers=1, d_model=64, num_heads=2, num_kv_heads=1,
                                 mlp_dim=192))
    c.draft_lm.train.update(dict(steps=250, run_dir="runs/spec_draft"))
  else:
    c.target = small_cfg.get_config()
    c.target.train.update(dict(steps=3000, warmup_steps=200, eval_batches=8, sample_tokens=0,
                               run_dir="runs/spec_small_target"))
    c.draft_lm = small_cfg.get_config()
    c.draft_lm.model.update(dict(num_layers=2, d_model=256, num_heads=4, num_kv_heads=2,
                                 mlp_dim=1024))
    c.draft_lm.train.update(dict(steps=3000, learning_rate=1e-3, warmup_steps=100, eval_batches=8,
                                 sample_tokens=0, run_dir="runs/spec_small_draft"))
  L = c.target.model.num_layers
  c.dflash = ml_collections.ConfigDict(dict(
      block_size=8 if scale == "tiny" else 16,  # γ + 1
      num_layers=1 if scale == "tiny" else 2,
      target_layers=(),          # () = effjax.models.dflash.default_target_layers(L)
      mask_id=259,               # effjax.data.tokenizer.MASK_ID
      init_from_target=True,     # drafter layer i starts as target layer L - num_layers + i
      labels="target",           # "target": the target's argmax; "data": the corpus tokens
  ))
  del L
  c.train = ml_collections.ConfigDict(dict(
      steps=800 if scale == "tiny" else 4000,
      max_seconds=0.0,           # > 0: stop (and save) after this much wall time
      batch_size=16 if scale == "tiny" else 16,
      seq_len=128 if scale == "tiny" else 1024,
      num_anchors=8 if scale == "tiny" else 64,
      optimizer="adamw", learning_rate=7e-4 if scale == "tiny" else 6e-4,
      warmup_steps=30 if scale == "tiny" else 50, min_lr_ratio=0.1, weight_decay=0.01,
      b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
      seed=1, log_every=50, eval_every=200 if scale == "tiny" else 100_000, eval_batches=4,
      run_dir="runs/spec_dflash" if scale == "tiny" else "runs/spec_small_dflash",
  ))
  return c
