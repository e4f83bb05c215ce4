"""Normalisation layers.

RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", arXiv 1910.07467):
`y = x / sqrt(mean(x²) + eps) * g`, with a learned per-channel gain `g` (initialised to 1),
computed in float32 and cast back to the compute dtype.

Single-Scale RMSNorm (SSNorm) from "Outlier-Safe Pre-Training for Robust 4-Bit Quantization of
Large Language Models" (Park et al., arXiv 2506.19697, Sec. on SSNorm): `y = x / rms(x) * g` with
ONE learnable scalar `g` per norm (initialised to 1) instead of a per-channel vector, so no single
channel can be amplified by the norm (a source of activation outliers). The OSP reference model
writes it as flax's RMSNorm with `feature_axes=()`, i.e. a scalar scale of shape `()`.

SubLN (BitNet b1.58 2B4T, arXiv 2504.12285) uses these same classes as extra norms inside the
attention and MLP blocks (see `effjax.layers.attention` / `effjax.layers.mlp`). `make_norm` picks
the class from `ModelConfig.norm_type`, which governs every norm of the model (block norms, the final
norm, q/k norms and the SubLN norms).

Both classes take an optional `residual`: `norm(x, residual=r)` returns `(x + r, norm(x + r))`,
the residual add of a pre-norm block and the next sub-layer's input. With `impl="pallas"`, or
"auto" on a GPU for at most `FUSED_MAX_ROWS` rows (decoding), that pair comes from one fused
Pallas kernel (`pallas_kernels.add_rmsnorm`; XLA runs it as three launch-bound kernels, twice per
layer and token); otherwise from jnp, whose result the kernel equals up to float32 summation order.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import NORM_IMPLS
from pallas_kernels import add_rmsnorm as add_rmsnorm_lib

# "auto" fuses on a GPU up to this many rows (batch x tokens): the decode shapes it was measured on
FUSED_MAX_ROWS = 64


def rms_normalize(x, eps: float):
  """`x / sqrt(mean(x², -1) + eps)` in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def _use_fused(impl: str, x) -> bool:
  if impl not in NORM_IMPLS:
    raise ValueError(f"norm impl: got {impl!r}, allowed: {list(NORM_IMPLS)}")
  rows = math.prod(x.shape[:-1])
  return impl == "pallas" or (impl == "auto" and rows <= FUSED_MAX_ROWS
                              and jax.default_backend() == "gpu")


def _norm(x, residual, scale, eps: float, dtype, impl: str):
  """RMS-normalise x (or x + residual, returning the sum too) and scale it by `scale`."""
  if residual is not None and _use_fused(impl, x):
    D = x.shape[-1]  # the gain goes in its stored dtype (an f32 copy would be one more kernel)
    s, y = add_rmsnorm_lib.add_rms_norm(x.reshape(-1, D), residual.reshape(-1, D), scale,
                                        eps=eps, out_dtype=dtype,
                                        interpret=jax.default_backend() != "gpu")
    return s.reshape(x.shape), y.reshape(x.shape)
  scale = scale.astype(jnp.float32)
  full_scale = scale.reshape((1,) * (x.ndim - 1) + (-1,)) if scale.ndim else scale
  if residual is None:
    return (rms_normalize(x, eps) * full_scale).astype(dtype)
  s = x + residual.astype(x.dtype)
  return s, (rms_normalize(s, eps) * full_scale).astype(dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a per-channel gain (logical axis `axis_name`).

  `__call__(x)` returns the normalised x; `__call__(x, residual=r)` returns `(x + r, norm(x + r))`
  (the sum in x's dtype; fused per `impl`, see the module docstring).
  """
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "embed"
  impl: str = "xla"

  @nn.compact
  def __call__(self, x, residual=None):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    return _norm(x, residual, scale, self.eps, self.dtype, self.impl)


class SSNorm(nn.Module):
  """Single-Scale RMSNorm: RMS normalisation over the last axis times ONE learned scalar.

  `residual` as in `RMSNorm`.
  """
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x, residual=None):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ()),
                       (), self.param_dtype)
    return _norm(x, residual, scale, self.eps, self.dtype, self.impl)


def make_norm(cfg, name: str | None = None, axis_name: str = "embed") -> nn.Module:
  """The norm named by `cfg.norm_type` ("rmsnorm" | "ssnorm") with the model's eps and dtypes.

  `impl` is `cfg.norm_impl` (how a residual add + norm runs). `axis_name` is the logical axis of
  RMSNorm's per-channel gain (SSNorm's scalar has none).
  `name=None` leaves the name to flax (e.g. the attribute name in `setup`).
  """
  kw = dict(eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
            impl=cfg.norm_impl)
  if name is not None:
    kw["name"] = name
  if cfg.norm_type == "rmsnorm":
    return RMSNorm(axis_name=axis_name, **kw)
  if cfg.norm_type == "ssnorm":
    return SSNorm(**kw)
  raise ValueError(f"model.norm_type: got {cfg.norm_type!r}, allowed: ['rmsnorm', 'ssnorm']")
