"""Small PTX helpers for Pallas kernels on the Triton lowering, each with a jnp path for interpret mode.

`prmt_emulated`: PTX `prmt.b32` (byte permute) in jnp, for the interpret-mode twins of the kernels
that use it through `elementwise_inline_asm` (ternary_matmul, quant_decode_attention).

`exp2_ftz`: 2^x through `ex2.approx.ftz.f32`, one MUFU.EX2 per value. `jnp.exp2` in a Triton kernel
lowers to `ex2.approx.f32` WITHOUT .ftz, which ptxas expands to a range test, two FMULs and the
MUFU.EX2 (to produce subnormal results): in the H200 profile of our flash-attention forward
(Nsight Compute, D=128, S=4k) that expansion is most of the kernel's 4 FMUL + 1 FSETP per score,
against 2 FMUL per score in cuDNN's kernel. Softmax probabilities below 2^-126 are zero in bf16
anyway, so flushing them costs nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

__all__ = ["exp2_ftz", "prmt_emulated"]

_TINY = 2.0 ** -126  # smallest normal float32


def exp2_ftz(x, *, interpret: bool):
  """2^x for a float32 tile, subnormal results flushed to +0 (PTX ex2.approx.ftz.f32).

  On the GPU: one MUFU.EX2 (max relative error ~2^-22, as the non-ftz form). interpret=True: jnp.exp2
  with the same flush, so CPU tests see the GPU's semantics.
  """
  if x.dtype != jnp.float32:
    raise TypeError(f"exp2_ftz takes float32, got {x.dtype}")
  if interpret:
    y = jnp.exp2(x)
    return jnp.where(y < _TINY, jnp.float32(0.0), y)
  [y] = plgpu.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return y


def prmt_emulated(a, b, sel):
  """jnp emulation of PTX `prmt.b32 d, a, b, sel` (default mode) on uint32 arrays.

  Byte k of d is byte (sel >> 4k) & 7 of the 8 bytes {b, a} (a = bytes 0-3); with bit 3 of that
  nibble set, the selected byte's sign bit replicated instead. `sel` may vary per element.
  """
  a, b, sel = jnp.broadcast_arrays(a, b, sel)
  src = jnp.stack([(x >> jnp.uint32(8 * i)) & 0xFF for x in (a, b) for i in range(4)], axis=-1)
  out = jnp.zeros_like(a)
  for k in range(4):
    nib = (sel >> jnp.uint32(4 * k)) & 0xF
    byte = jnp.take_along_axis(src, (nib & 7).astype(jnp.int32)[..., None], axis=-1)[..., 0]
    byte = jnp.where(nib >= 8, jnp.where(byte >= 0x80, jnp.uint32(0xFF), jnp.uint32(0)), byte)
    out = out | (byte << jnp.uint32(8 * k))
  return out
