"""Small PTX helpers for Pallas kernels on the Triton lowering, each with a jnp path for interpret mode.

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

__all__ = ["exp2_ftz"]

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
