"""Configuration: the frozen model config and the one place where experiment configs are checked.

Experiment configs are `ml_collections.ConfigDict`s returned by `configs/<name>.py:get_config()`
with four sections: `model`, `data`, `train`, `mesh`. `validate(config)` checks all of them before
anything is compiled and raises `ConfigError` naming the field and the allowed values.
`ModelConfig` is the frozen, keyword-only view of `config.model` that modules receive.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
MATVEC_IMPLS = ("xla", "pallas", "hybrid", "auto")
NORM_IMPLS = ("xla", "pallas", "auto")
DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
MLP_TYPES = ("swiglu", "relu2")
NORM_TYPES = ("rmsnorm", "ssnorm")
LINEAR_TYPES = ("dense", "bitlinear", "ternary_packed")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ROPE_SCALINGS = ("none", "llama3")


class ConfigError(ValueError):
  """A config field has a value that is not allowed; the message names the field."""


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Decoder-only LM hyper-parameters (validated at construction).

  `head_dim = 0` means `d_model // num_heads`. `dtype` is the compute dtype, `param_dtype` the
  storage dtype of parameters.

  Low-bit / OSP switches (all off by default; the default path is the plain Llama block):
  `linear` "dense" (Einsum), "bitlinear" (BitNet b1.58 BitEinsum, trained with STE) or
  "ternary_packed" (inference only: the packed export of a bitlinear model,
  `effjax.layers.packed_ternary.export_packed_ternary`); `mlp_type` "swiglu" or "relu2" (2B4T gated
  squared ReLU); `norm_type` "rmsnorm" or "ssnorm" (OSP single-scale RMSNorm, every norm of the
  model); `sub_ln` adds the 2B4T sub-norms before the attention output and the MLP down
  projections; `emb_proj` adds OSP's two d×d embedding projections (`effjax.layers.embed`).

  `matvec_impl` picks the kernel of the dense projections and the LM head when they multiply at
  most `pallas_kernels.gemv.MAX_M` rows (decoding): "xla" (jnp.einsum) or "pallas" (the split-K
  Pallas GEMV of `pallas_kernels.gemv` where its blocks tile the shapes; interpret mode off-GPU;
  opt-in: slower than XLA inside an H200 decode step) or "hybrid" (Pallas for weights up to
  16 MiB, XLA for larger ones) or "auto" (on a GPU, Pallas only for the products XLA handles
  badly at one row: weights up to 16 MiB contracted over more than one axis, i.e. the attention
  output projection; XLA elsewhere and off-GPU; the default: a batch-1 decode step of a 1.24B
  model 14% faster on an H200, results/decode_bench.md); see `effjax.layers.linear.project`.
  Training and prefill (more rows) always use jnp.einsum.

  `norm_impl` picks how a block's residual add and the following RMSNorm run: "xla" (jnp; three
  kernels on a GPU), "pallas" (`pallas_kernels.add_rmsnorm`, one kernel; interpret mode off-GPU)
  or "auto" (the default: "pallas" on a GPU for at most `effjax.layers.norms.FUSED_MAX_ROWS` rows,
  i.e. decoding, "xla" otherwise); see `effjax.layers.norms`.
  """
  vocab_size: int = 260
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  mlp_dim: int = 512
  max_seq_len: int = 256
  rope_theta: float = 10_000.0
  rope_scaling: str = "none"
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  tie_embeddings: bool = True
  attention_impl: str = "xla"
  matvec_impl: str = "auto"
  norm_impl: str = "auto"
  attention_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  mlp_type: str = "swiglu"
  norm_type: str = "rmsnorm"
  linear: str = "dense"
  remat: str = "none"
  sub_ln: bool = False
  emb_proj: bool = False

  def __post_init__(self):
    _check_model(self, prefix="model")
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)

  @property
  def compute_dtype(self):
    return _dtype(self.dtype)

  @property
  def weight_dtype(self):
    return _dtype(self.param_dtype)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds a ModelConfig from a mapping (e.g. `config.model`); unknown keys are an error."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"model: unknown field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**d)


def _require(cond: bool, field: str, msg: str):
  if not cond:
    raise ConfigError(f"{field}: {msg}")


def _check_choice(value, field: str, allowed):
  _require(value in allowed, field, f"got {value!r}, allowed: {list(allowed)}")


def _check_model(m: ModelConfig, prefix: str):
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
               "max_seq_len"):
    v = getattr(m, name)
    _require(isinstance(v, int) and v > 0, f"{prefix}.{name}", f"must be a positive int, got {v!r}")
  _require(isinstance(m.head_dim, int) and m.head_dim >= 0, f"{prefix}.head_dim",
           f"must be an int >= 0 (0 = d_model // num_heads), got {m.head_dim!r}")
  if m.head_dim == 0:
    _require(m.d_model % m.num_heads == 0, f"{prefix}.num_heads",
             f"must divide d_model={m.d_model} when head_dim=0, got {m.num_heads}")
  _require(m.num_heads % m.num_kv_heads == 0, f"{prefix}.num_kv_heads",
           f"must divide num_heads={m.num_heads}, got {m.num_kv_heads}")
  hd = m.head_dim or m.d_model // m.num_heads
  _require(hd % 2 == 0, f"{prefix}.head_dim", f"must be even for RoPE, got {hd}")
  _require(m.rope_theta > 0, f"{prefix}.rope_theta", f"must be > 0, got {m.rope_theta}")
  _require(m.norm_eps > 0, f"{prefix}.norm_eps", f"must be > 0, got {m.norm_eps}")
  _check_choice(m.rope_scaling, f"{prefix}.rope_scaling", ROPE_SCALINGS)
  _check_choice(m.attention_impl, f"{prefix}.attention_impl", ATTENTION_IMPLS)
  _check_choice(m.matvec_impl, f"{prefix}.matvec_impl", MATVEC_IMPLS)
  _check_choice(m.norm_impl, f"{prefix}.norm_impl", NORM_IMPLS)
  _check_choice(m.dtype, f"{prefix}.dtype", DTYPES)
  _check_choice(m.param_dtype, f"{prefix}.param_dtype", PARAM_DTYPES)
  _check_choice(m.mlp_type, f"{prefix}.mlp_type", MLP_TYPES)
  _check_choice(m.norm_type, f"{prefix}.norm_type", NORM_TYPES)
  _check_choice(m.linear, f"{prefix}.linear", LINEAR_TYPES)
  _check_choice(m.remat, f"{prefix}.remat", REMAT_POLICIES)
  for name in ("sub_ln", "emb_proj"):
    _require(isinstance(getattr(m, name), bool), f"{prefix}.{name}",
             f"must be a bool, got {getattr(m, name)!r}")
  if m.linear != "dense":
    _require(not m.attention_bias, f"{prefix}.attention_bias",
             f"must be False with linear={m.linear!r} (BitLinear layers have no biases)")


OPTIMIZERS = ("adamw", "muon")
TASKS = ("lm", "mdlm", "bd3lm")  # "mdlm"/"bd3lm": effjax.train.diffusion


def _check_diffusion(config, model: ModelConfig):
  """The `diffusion` section of a masked/block-diffusion experiment (`data.task` mdlm/bd3lm)."""
  _require("diffusion" in config, "diffusion",
           f"missing section (needed by data.task={config.data.task!r}; fields block_size, "
           "t_min, t_max, eval_samples; see configs/bd3lm.py)")
  x, d = config.diffusion, config.data
  for name in ("block_size", "t_min", "t_max", "eval_samples"):
    _require(name in x, f"diffusion.{name}", "missing field")
  _require(0.0 <= x.t_min < x.t_max <= 1.0, "diffusion.t_min",
           f"need 0 <= t_min < t_max <= 1, got t_min={x.t_min}, t_max={x.t_max}")
  _require(isinstance(x.eval_samples, int) and x.eval_samples >= 1, "diffusion.eval_samples",
           f"must be an int >= 1, got {x.eval_samples!r}")
  _require(model.attention_impl in ("xla", "auto"), "model.attention_impl",
           f"diffusion masks need 'xla' or 'auto', got {model.attention_impl!r}")
  if d.task == "bd3lm":
    _require(isinstance(x.block_size, int) and x.block_size >= 1 and d.seq_len % x.block_size == 0,
             "diffusion.block_size", f"must be a positive int dividing data.seq_len={d.seq_len}, "
             f"got {x.block_size!r}")
    _require(2 * d.seq_len <= model.max_seq_len, "model.max_seq_len",
             f"must be >= 2 * data.seq_len = {2 * d.seq_len} for bd3lm (the [x_t ; x_0] training "
             f"input has 2T tokens), got {model.max_seq_len}")


def validate(config) -> ModelConfig:
  """Checks a whole experiment config; returns its `ModelConfig`.

  Raises:
    ConfigError: naming the first offending field and the allowed values.
  """
  for section in ("model", "data", "train", "mesh"):
    _require(section in config, section, "missing section")
  model = ModelConfig.from_dict(config.model)
  d, t, mesh = config.data, config.train, config.mesh
  _require(isinstance(d.seq_len, int) and d.seq_len > 0, "data.seq_len",
           f"must be a positive int, got {d.seq_len!r}")
  _require(d.seq_len <= model.max_seq_len, "data.seq_len",
           f"must be <= model.max_seq_len={model.max_seq_len}, got {d.seq_len}")
  _require(isinstance(d.batch_size, int) and d.batch_size > 0, "data.batch_size",
           f"must be a positive int, got {d.batch_size!r}")
  _require(0.0 < d.val_fraction < 1.0, "data.val_fraction",
           f"must be in (0, 1), got {d.val_fraction}")
  _check_choice(d.task, "data.task", TASKS)
  if d.task != "lm":
    _check_diffusion(config, model)
  _require(isinstance(d.max_bytes, int) and d.max_bytes >= 0, "data.max_bytes",
           f"must be an int >= 0 (0 = the whole corpus), got {d.max_bytes!r}")
  _require(isinstance(d.seed, int) and d.seed >= 0, "data.seed",
           f"must be an int >= 0, got {d.seed!r}")
  _require(isinstance(d.corpus, str) and d.corpus != "", "data.corpus",
           f"must be 'stdlib', 'stdlib+tests' or a path, got {d.corpus!r}")
  _require(model.vocab_size >= 260, "model.vocab_size",
           f"the byte tokenizer needs >= 260 ids, got {model.vocab_size}")
  _require(isinstance(t.steps, int) and t.steps > 0, "train.steps",
           f"must be a positive int, got {t.steps!r}")
  _require(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
  _require(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
           f"must be in [0, train.steps={t.steps}], got {t.warmup_steps}")
  _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio",
           f"must be in [0, 1], got {t.min_lr_ratio}")
  _require(isinstance(t.grad_accum, int) and t.grad_accum >= 1, "train.grad_accum",
           f"must be an int >= 1, got {t.grad_accum!r}")
  _require(d.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"must divide data.batch_size={d.batch_size}, got {t.grad_accum}")
  _check_choice(t.optimizer, "train.optimizer", OPTIMIZERS)
  for name in ("eval_every", "checkpoint_every", "log_every"):
    v = t[name]
    _require(isinstance(v, int) and v >= 0, f"train.{name}", f"must be an int >= 0, got {v!r}")
  _require(isinstance(t.keep_checkpoints, int) and t.keep_checkpoints >= 1,
           "train.keep_checkpoints", f"must be an int >= 1, got {t.keep_checkpoints!r}")
  for name in ("weight_decay", "grad_clip", "sample_temperature"):
    v = t[name]
    _require(isinstance(v, (int, float)) and v >= 0, f"train.{name}",
             f"must be a number >= 0, got {v!r}")
  for name in ("b1", "b2"):
    _require(0.0 <= t[name] < 1.0, f"train.{name}", f"must be in [0, 1), got {t[name]!r}")
  _require(t.eps > 0, "train.eps", f"must be > 0, got {t.eps!r}")
  for name in ("eval_batches", "sample_tokens", "seed"):
    v = t[name]
    _require(isinstance(v, int) and v >= 0, f"train.{name}", f"must be an int >= 0, got {v!r}")
  _require(isinstance(t.run_dir, str) and t.run_dir != "", "train.run_dir",
           f"must be a non-empty path, got {t.run_dir!r}")
  _require(isinstance(t.sample_prompt, str), "train.sample_prompt",
           f"must be a str, got {t.sample_prompt!r}")
  for axis in ("data", "fsdp", "tensor"):
    v = mesh[axis]
    _require(isinstance(v, int) and (v == -1 or v >= 1), f"mesh.{axis}",
             f"must be -1 (all remaining devices) or a positive int, got {v!r}")
  _require([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1, "mesh",
           "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  return model
