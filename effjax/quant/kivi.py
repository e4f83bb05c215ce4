"""KIVI: asymmetric 2/4-bit KV-cache quantization with per-channel keys and per-token values.

Paper: "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (Liu, Yuan, Jin, Zhong, Xu,
Braverman, Chen, Hu; arXiv 2402.02750). Implements the quantizer of its Section 3 / Eq. (1):

    Q(X) = round((X - z_X) / s_X),  z_X = min X,  s_X = (max X - min X) / (2^B - 1),
    X_hat = Q(X) * s_X + z_X,

with the grouping of its Section 3.2 (Algorithm 1): KEYS are quantized PER-CHANNEL -- for every channel,
one (scale, zero) per group of `group` = 32 consecutive tokens -- and VALUES PER-TOKEN -- for every
token, one (scale, zero) per group of 32 consecutive channels. The full-precision window of recent
tokens (the paper's residual length R) is the cache's job, not this file's.

Choices the paper leaves open, written down here:
* scale and zero are stored in float16 (as in the paper's CUDA code); they are rounded so that the
  stored pair still covers the group's range: zero is rounded DOWN and scale UP to the next float16,
  so every element satisfies |x - x_hat| <= scale/2 (up to float32 rounding of the dequantization).
  Inputs must be finite and within float16 range (|x| < 65504); a constant group gets scale 1.
* Codes are packed along the token axis, four per word (uint8 words for 2 bits, uint16 for 4 bits;
  `effjax.quant.token_packing`): that is the layout `pallas_kernels/quant_decode_attention.py` reads.
* Shapes follow the dense cache: x [..., S, K, D] (tokens, kv heads, head dim). The token axis is
  padded (edge-replicated, so group ranges are unchanged) to a multiple of 64; `decode` returns the
  original S. D must be a multiple of 32 for values.

Storage layout per quantized tensor (`KIVITensor`):
  keys:   codes [..., S64/4, K, D] (words), scale/zero float16 [..., S64/32, K, D]
  values: codes [..., S64/4, K, D] (words), scale/zero float16 [..., S64/4, K, D/32, 4] in the
          token-packing slot order (`token_packing.to_slot_order`: [.., r, k, c, j] belongs to the
          token in field j of packed row r), so the kernel reads a field's per-token scales as one
          strided vector.
where S64 = S rounded up to a multiple of 64.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
from flax import struct

from effjax.quant import token_packing

__all__ = ["KIVITensor", "quantize_keys", "quantize_values", "dequantize", "value_scales", "GROUP"]

GROUP = 32


@struct.dataclass
class KIVITensor:
  """KIVI-quantized keys or values (see the module docstring for the layout)."""
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  length: int = struct.field(pytree_node=False)  # S (unpadded)
  bits: int = struct.field(pytree_node=False)
  per_channel: bool = struct.field(pytree_node=False)  # True for keys, False for values

  def nbytes(self) -> int:
    """Bytes of the packed codes plus the float16 scales and zero-points."""
    return int(self.codes.nbytes + self.scale.nbytes + self.zero.nbytes)


def _check(x, bits):
  if bits not in (2, 4):
    raise ValueError(f"KIVI bits must be 2 or 4, got {bits!r}")
  if x.ndim < 3:
    raise ValueError(f"x must be [..., S, K, D], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float array, got {x.dtype}")


def _pad_tokens(x):
  S = x.shape[-3]
  pad = (-S) % token_packing.GROUP_TOKENS
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[-3] = (0, pad)
    x = jnp.pad(x, widths, mode="edge")
  return x


def _f16_step(x16, up: bool):
  """The next float16 above (up) or below x16 (finite), by integer arithmetic on the bit pattern.

  Not `jnp.nextafter`: XLA may evaluate a float16 nextafter in float32 and round back (a no-op).
  """
  u = lax.bitcast_convert_type(x16, jnp.uint16).astype(jnp.int32)
  neg, mag = (u >> 15) == 1, u & 0x7FFF
  away = neg != up  # moving away from zero: magnitude + 1
  stepped = jnp.where(away, u + 1, u - 1)
  from_zero = jnp.int32(0x0001 if up else 0x8001)  # +-smallest subnormal
  return lax.bitcast_convert_type(jnp.where(mag == 0, from_zero, stepped).astype(jnp.uint16),
                                  jnp.float16)


def _as_f16(x32):
  """(float16 value, its exact float32 value) of round-to-nearest(x32).

  The optimization barrier keeps XLA from folding convert(convert(x, f16), f32) back to x (the GPU
  compiler's default "excess precision" rewrite does so inside some fusions and not others, which made
  the cache's and the offline quantizer's scales differ by one float16 ulp on the H200).
  """
  x16 = lax.optimization_barrier(x32.astype(jnp.float16))
  return x16, x16.astype(jnp.float32)


def _scale_zero(lo, hi, bits):
  """float16 (scale, zero) with zero <= lo and zero + (2^b - 1) * scale >= hi."""
  levels = (1 << bits) - 1
  z16, zf = _as_f16(lo)
  z16 = jnp.where(zf > lo, _f16_step(z16, up=False), z16)
  s32 = (hi - z16.astype(jnp.float32)) / levels
  s16, sf = _as_f16(s32)
  s16 = jnp.where(sf < s32, _f16_step(s16, up=True), s16)
  s16 = jnp.where(s16 > 0, s16, jnp.float16(1.0))
  return lax.optimization_barrier((s16, z16))


def _codes(x, s16, z16, bits):
  q = jnp.round((x - z16.astype(jnp.float32)) / s16.astype(jnp.float32))
  return jnp.clip(q, 0, (1 << bits) - 1).astype(jnp.uint8)


def quantize_keys(k, bits: int) -> KIVITensor:
  """Per-channel KIVI quantization of keys k [..., S, K, D]: one (scale, zero) per 32 tokens x channel."""
  _check(k, bits)
  S = k.shape[-3]
  x = _pad_tokens(k.astype(jnp.float32))
  S64 = x.shape[-3]
  lead = x.shape[:-3]
  K, D = x.shape[-2:]
  g = x.reshape(lead + (S64 // GROUP, GROUP, K, D))
  s16, z16 = _scale_zero(jnp.min(g, axis=-3), jnp.max(g, axis=-3), bits)  # [..., S64/32, K, D]
  codes = _codes(g, s16[..., None, :, :], z16[..., None, :, :], bits).reshape(x.shape)
  words = token_packing.pack_tokens(codes, bits, axis=-3)
  return KIVITensor(codes=words, scale=s16, zero=z16, length=S, bits=bits, per_channel=True)


def quantize_values(v, bits: int) -> KIVITensor:
  """Per-token KIVI quantization of values v [..., S, K, D]: one (scale, zero) per token x 32 channels."""
  _check(v, bits)
  D = v.shape[-1]
  if D % GROUP:
    raise ValueError(f"head_dim must be a multiple of {GROUP} for per-token value groups, got {D}")
  S = v.shape[-3]
  x = _pad_tokens(v.astype(jnp.float32))
  g = x.reshape(x.shape[:-1] + (D // GROUP, GROUP))
  s16, z16 = _scale_zero(jnp.min(g, axis=-1), jnp.max(g, axis=-1), bits)  # [..., S64, K, D/32]
  codes = _codes(g, s16[..., None], z16[..., None], bits).reshape(x.shape)
  words = token_packing.pack_tokens(codes, bits, axis=-3)
  ax = x.ndim - 3
  return KIVITensor(codes=words, scale=token_packing.to_slot_order(s16, axis=ax),
                    zero=token_packing.to_slot_order(z16, axis=ax), length=S, bits=bits,
                    per_channel=False)


def value_scales(t: KIVITensor):
  """Per-token value (scale, zero) float16 [..., S64, K, D/32] (undoing the slot order)."""
  if t.per_channel:
    raise ValueError("value_scales() is for per-token (value) tensors")
  ax = t.scale.ndim - 4
  return (token_packing.from_slot_order(t.scale, axis=ax),
          token_packing.from_slot_order(t.zero, axis=ax))


def dequantize(t: KIVITensor, dtype=jnp.float32):
  """X_hat = code * scale + zero (Eq. 1 of the paper), shape [..., S, K, D] with the original S."""
  codes = token_packing.unpack_tokens(t.codes, t.bits, axis=-3).astype(jnp.float32)
  S64, K, D = codes.shape[-3:]
  if t.per_channel:
    g = codes.reshape(codes.shape[:-3] + (S64 // GROUP, GROUP, K, D))
    x = g * t.scale.astype(jnp.float32)[..., None, :, :] + t.zero.astype(jnp.float32)[..., None, :, :]
  else:
    sc, ze = value_scales(t)
    g = codes.reshape(codes.shape[:-1] + (D // GROUP, GROUP))
    x = g * sc.astype(jnp.float32)[..., None] + ze.astype(jnp.float32)[..., None]
  x = x.reshape(codes.shape)
  return jax.lax.slice_in_dim(x, 0, t.length, axis=x.ndim - 3).astype(dtype)
