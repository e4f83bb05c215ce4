"""Fused residual add + RMSNorm for few-row (decode-shaped) inputs, one Pallas kernel.

Technique: RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", arXiv 1910.07467,
Eq. 4: y = x / RMS(x) * g, RMS(x) = sqrt(mean(x^2) + eps)) applied to the residual stream right
after a residual add, the "fused add + RMSNorm" that inference engines use between a pre-norm
transformer's sub-layers:

    s = x + r                    (in x's dtype: the residual stream as the unfused model has it)
    y = (s / sqrt(mean(s^2) + eps) * g).astype(out_dtype)       (float32 arithmetic)

returning both s (the stream, for the next residual) and y (the sub-layer input). g is a
per-channel gain [D] (RMSNorm) or one scalar (OSP's single-scale RMSNorm, `effjax.layers.norms`).

Why a kernel: at one token per row XLA runs this as three kernels (the add; the sum of squares;
the scale + cast), each ~1.3 us of launch-bound work on an H200, twice per layer
(results/decode_profile_auto.md). Here one program per row reads x and r once and writes s and y.
Choices: the row is one block of D rounded up to a power of two (masked), so any D works; the
gradient (`custom_vjp`) is the plain-jnp reference's, so the fused forward can sit in a
differentiated model (it is meant for decoding; training shapes use the XLA path, see
`effjax.layers.norms`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["add_rms_norm", "add_rms_norm_reference"]


def add_rms_norm_reference(x_RD, r_RD, scale, *, eps: float, out_dtype):
  """Plain-jnp fused add + RMSNorm: (s = x + r in x's dtype, y = rmsnorm(s) * scale in out_dtype).

  scale: [D] per-channel gain or a scalar (shape () or (1,)).
  """
  s_RD = (x_RD + r_RD.astype(x_RD.dtype)).astype(x_RD.dtype)
  s32 = s_RD.astype(jnp.float32)
  y32 = s32 * jax.lax.rsqrt(jnp.mean(jnp.square(s32), axis=-1, keepdims=True) + eps)
  y_RD = (y32 * jnp.asarray(scale, jnp.float32).reshape(1, -1)).astype(out_dtype)
  return s_RD, y_RD


def _kernel(x_ref, r_ref, g_ref, s_ref, y_ref, *, eps, D, Dp, per_channel):
  cols = jnp.arange(Dp)
  valid = cols < D
  x = plgpu.load(x_ref.at[pl.ds(0, Dp)], mask=valid, other=0.0)
  r = plgpu.load(r_ref.at[pl.ds(0, Dp)], mask=valid, other=0.0)
  s = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(s_ref.dtype)
  plgpu.store(s_ref.at[pl.ds(0, Dp)], s, mask=valid)
  s32 = s.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.sum(s32 * s32) / D + eps)
  if per_channel:
    g = plgpu.load(g_ref.at[pl.ds(0, Dp)], mask=valid, other=0.0).astype(jnp.float32)
  else:
    g = g_ref[0].astype(jnp.float32)
  plgpu.store(y_ref.at[pl.ds(0, Dp)], (s32 * inv * g).astype(y_ref.dtype), mask=valid)


def _num_warps(Dp: int) -> int:
  return 4 if Dp >= 2048 else 2


def _forward(x_RD, r_RD, scale, eps, out_dtype, interpret):
  R, D = x_RD.shape
  Dp = 1 << max(0, (D - 1).bit_length())
  g = jnp.asarray(scale).reshape(-1)
  per_channel = g.shape[0] == D
  row = pl.BlockSpec((None, D), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(_kernel, eps=eps, D=D, Dp=Dp, per_channel=per_channel),
      grid=(R,),
      in_specs=[row, row, pl.BlockSpec(g.shape, lambda i: (0,))],
      out_specs=[row, row],
      out_shape=[jax.ShapeDtypeStruct((R, D), x_RD.dtype), jax.ShapeDtypeStruct((R, D), out_dtype)],
      compiler_params=plgpu.CompilerParams(num_warps=_num_warps(Dp), num_stages=1),
      interpret=interpret,
      name="add_rms_norm",
  )(x_RD, r_RD.astype(x_RD.dtype), g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _add_rms_norm(x_RD, r_RD, scale, eps, out_dtype, interpret):
  return _forward(x_RD, r_RD, scale, eps, out_dtype, interpret)


def _fwd(x_RD, r_RD, scale, eps, out_dtype, interpret):
  return _forward(x_RD, r_RD, scale, eps, out_dtype, interpret), (x_RD, r_RD, scale)


def _bwd(eps, out_dtype, interpret, res, cot):
  _, vjp = jax.vjp(functools.partial(add_rms_norm_reference, eps=eps, out_dtype=out_dtype), *res)
  return vjp(cot)


_add_rms_norm.defvjp(_fwd, _bwd)


def add_rms_norm(x_RD, r_RD, scale, *, eps: float, out_dtype=None, interpret: bool = False):
  """Fused `s = x + r; y = RMSNorm(s) * scale` (see the module docstring); returns (s, y).

  Args:
    x_RD: [R, D] residual stream (its dtype is the stream's: s is rounded to it, as the unfused
      `x + r` would be).
    r_RD: [R, D] the sub-layer output to add (cast to x's dtype first).
    scale: [D] per-channel gain, or a scalar gain (shape () or (1,)) for single-scale RMSNorm.
    eps: added to mean(s^2) before the square root.
    out_dtype: dtype of y (default x's).
    interpret: run in the Pallas interpreter (CPU tests).
  Returns:
    (s_RD in x's dtype, y_RD in out_dtype). Differentiable (the gradient is the reference's).
  """
  if x_RD.ndim != 2 or r_RD.shape != x_RD.shape:
    raise ValueError(f"x_RD and r_RD must both be [rows, features] of one shape, got {x_RD.shape} "
                     f"and {r_RD.shape}")
  D = x_RD.shape[1]
  if jnp.size(scale) not in (1, D) or jnp.ndim(scale) > 1:
    raise ValueError(f"scale must be [{D}] (per channel) or a scalar, got shape {jnp.shape(scale)}")
  out_dtype = jnp.dtype(out_dtype or x_RD.dtype)
  return _add_rms_norm(x_RD, r_RD, scale, float(eps), out_dtype, bool(interpret))
