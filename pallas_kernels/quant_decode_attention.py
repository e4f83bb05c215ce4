"""Decode attention that reads TurboQuant- or KIVI-packed keys and values directly (no bf16 K/V).

Papers:
* TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online Vector Quantization with
  Near-optimal Distortion Rate", arXiv 2504.19874), Algorithm 1 (TurboQuant_mse): a vector x is stored
  as ||x|| and the indices idx_j = argmin_k |y_j - c_k| of y = Pi x / ||x||; its reconstruction is
  x_hat = ||x|| Pi^T c[idx]. Fractional rates (2.5 bits) split the channels into sets, each with its own
  quantizer (own rotation, codebook, norm); here each set is one `TQPart`.
* KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750),
  Eq. (1) with per-channel key groups and per-token value groups (see `effjax.quant.kivi`).

Attention over a quantized cache without materialising K/V (one query token per row, GQA):

  TurboQuant keys:   <q, k_hat_s> = sum_parts ||k_s,part|| * <Pi_part q_part, c[idx_s,part]>
                     -> the query is rotated ONCE per head (outside the loop), scores are dots against
                        codebook values decoded in registers, scaled by the per-token norm.
  TurboQuant values: sum_s p_s v_hat_s = Pi^T ( sum_s (p_s ||v_s||) c[idx_s] )
                     -> values are accumulated in the rotated space and Pi^T is applied ONCE to the
                        output (per part) after the split combine.
  KIVI keys:         codes are dequantized in registers, code * scale + zero, with the (scale, zero)
                     of each key's 32-token group (one broadcast [1, D] row per field tile when
                     groups_per_iter = 1, gathered [R, D] rows otherwise), then dotted with q.
  KIVI values:       sum_t p_t (code_t s_t + z_t) = dot(p * s, code) + sum_t p_t z_t per token and
                     32-channel group: the per-token scale folds into the probabilities, so the
                     codes enter the tensor-core dot as exact small integers (int -> float by the
                     2^23 magic number, no per-element FMA).

Kernel-side choices (ours, not the papers'):
* Packed layout: `effjax.quant.token_packing` -- four codes per word along the token axis (uint8 words
  for 2-bit codes, uint16 for 3/4-bit), in groups of 64 tokens; fields are extracted with shift+mask.
  Arrays: words [B, S/4, K, d] (S a multiple of 64), TurboQuant norms [B, S/4, K, 4] in slot order
  (any float dtype; float16 in the benchmark), KIVI scales/zeros as in `effjax.quant.kivi`.
  Bits read per value: TurboQuant b-bit at d=128 with float16 norms = b + 0.125 (3-bit: 4.125);
  2.5-bit (32 ch at 3 bits in 4-bit fields + 96 at 2) = 2.75; KIVI-b = b + 1 (float16 scale+zero
  per 32 elements).
* Codebook lookup (default `dequant="lut"`): the bf16 codebook's low and high bytes are held in
  registers and the packed codes become PTX `prmt` byte-permute selectors, so a lookup is a few
  integer instructions per 2-4 values and yields the bf16-rounded centroid exactly (section "byte-
  permute table" below; H200, 64k: 1.5x faster than the polynomial at 2.5 bits, 1.4x at 4 bits).
* Codebook lookup without gathers, `dequant="poly"`: a symmetric Lloyd-Max codebook c[0..n-1] (n = 2^b) is the odd
  polynomial c(x) = x * sum_k a_k x^(2k), x = 2 idx - (n-1), through its n points (a_k solved once in
  float64 on the host, `codebook_poly_coeffs`; evaluation error ~1e-7 relative in float32). At 4 bits
  the kernels use a 5-term fit instead of the 8-term interpolant (`FAST_CODEBOOK_TERMS`: max error
  ~2.6e-4 relative, 8x below the bf16 rounding of the dot operand; 6 instead of 9 flops). The index
  is converted to float with the 2^23 "magic number" bit trick (the field is extracted already
  doubled, then one OR + one subtract). 3-bit codes are stored in 4-bit fields (so 3-bit costs the
  bytes of 4-bit; documented, not hidden).
* One inner-loop block = `groups_per_iter` packing groups = R = 16*groups_per_iter packed rows; field j
  of the block is ONE [R, d] tile of R tokens (16-token runs of each group), so each part needs one
  dot per field and block; per-token norms are stored in the same slot order ([S/4, 4] per row/head)
  so the norms of a field are one strided [R] load.
* Parts whose dimension is not a power of two (96 = 64 + 32) are read as several power-of-two column
  pieces sharing the part's norm; every piece must be >= 16 wide (the Triton dot's minimum).
* Split-K over the sequence, online softmax in base 2, LSE combine: shared with
  `pallas_kernels/decode_attention.py`. Grid (row, kv head, split); each program reads its
  packed rows exactly once (d contiguous words per packed row: 64-256 B), and its G query heads
  share every decoded tile.
* Dot orientation (`transposed`, measured, not assumed): "qk" computes s[Gp, R] = q' y^T and
  acc[Gp, d] += p y (the decoded codes y are the right operand: Triton converts them to the dot
  layout through shared memory as bf16); "kq" computes s^T[R, Gp] = y q'^T and
  acc^T[d, Gp] += y^T p^T, so the decoded codes are always the LEFT operand -- the operand Triton
  can keep in registers (mma.sync A, or wgmma's register-A form once M = R or d >= 64), and the
  value tile is transposed while still packed (4x fewer bytes than decoded bf16).
* Launch tunables exposed for sweeps: `groups_per_iter` (tokens per inner-loop tile = 64 x it),
  `num_warps`, `num_stages`, `num_splits`, `transposed`.
* Roofline (H200, B=8, 32/8 heads, D=128, 64k): packed bytes per step are 4.125/16 (TQ-4) and
  2.75/16 (TQ-2.5) of bf16 K+V = 553 MB / 369 MB -> ~135 us / ~90 us at ~4.1 TB/s. The decoding
  arithmetic is the real bound: per element (K and V: 1.07e9 per step) ~2 integer ops (shift, mask
  / LOP3), 1 FADD (magic-number int->float), 2^(b-1)+1 FMA/FMUL (odd codebook polynomial: 9 at 4
  bits, 3 at 2 bits) and half a bf16 pack, i.e. ~13.5 (4-bit) / ~7.5 (2-bit) ops per element on
  the "poly" path; the "lut" path needs ~1.5 (2-bit), 2.5 (3-bit) and 6 (4-bit). Measured
  (RESULTS.md, loop-timed): 2.5-bit 609 us and 4-bit 717 us per 64k step, 5.4x / 4.6x XLA.
* References (`turboquant_decode_reference`, `kivi_decode_reference`) dequantize to float32 with plain
  jnp (centroid gathers, explicit Pi^T) and call the dense float32 reference.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np
from flax import struct

from effjax.quant import kivi as kivi_lib
from effjax.quant import token_packing
from pallas_kernels import ptx
from pallas_kernels.decode_attention import (LOG2E, _NEG_BIG, _next_pow2, combine_splits,
                                             decode_attention_reference, default_num_splits,
                                             split_range)

__all__ = ["TQPart", "codebook_poly_coeffs", "kernel_codebook", "FAST_CODEBOOK_TERMS", "DEQUANTS",
           "codebook_lut_words", "turboquant_encode_part", "turboquant_dequantize",
           "turboquant_parts",
           "turboquant_decode_attention", "turboquant_decode_reference", "kivi_decode_attention",
           "kivi_decode_reference"]

GT = token_packing.GROUP_TOKENS  # 64 tokens per packing group
ROWS = GT // token_packing.FIELDS  # 16 packed rows = 16 tokens per field
_MAGIC = 0x4B000000  # bits of 2^23 in float32
_MAX_COEFFS = 8


# ---------------------------------------------------------------------------------------------------
# Codebook as an odd polynomial
# ---------------------------------------------------------------------------------------------------


def codebook_poly_coeffs(centroids, num_coeffs: Optional[int] = None) -> np.ndarray:
  """Coefficients a_k (float32 [8], zero-padded) with c[i] ~= x * sum_k a_k x^(2k), x = 2i - (n-1).

  `centroids` must be concrete, sorted and symmetric about 0 (Lloyd-Max codebooks for the symmetric
  coordinate density are), with n = 2, 4, 8 or 16 entries. num_coeffs=None (or >= n/2): the
  interpolating polynomial through all n points (exact up to float32 evaluation). A smaller
  num_coeffs: the odd polynomial with that many terms minimising the max RELATIVE error over the
  n points (iteratively reweighted least squares); see `kernel_codebook` for where that is used.
  """
  c = np.asarray(centroids, np.float64)
  n = c.shape[0]
  if c.ndim != 1 or n not in (2, 4, 8, 16):
    raise ValueError(f"centroids must be 1-D with 2, 4, 8 or 16 entries, got shape {c.shape}")
  if np.any(np.diff(c) <= 0):
    raise ValueError("centroids must be strictly increasing")
  if np.max(np.abs(c + c[::-1])) > 1e-6 * np.max(np.abs(c)):
    raise ValueError("centroids must be symmetric about 0 (c[i] == -c[n-1-i])")
  h = n // 2
  m = h if num_coeffs is None else int(num_coeffs)
  if not 1 <= m <= _MAX_COEFFS:
    raise ValueError(f"num_coeffs must be in [1, {_MAX_COEFFS}], got {num_coeffs!r}")
  m = min(m, h)
  xs = 2.0 * np.arange(h, n) - (n - 1)
  ys = c[h:]
  V = np.stack([xs ** (2 * k + 1) for k in range(m)], axis=1)
  if m == h:
    a = np.linalg.solve(V, ys)
  else:
    w = np.ones_like(ys)
    for _ in range(60):  # Lawson-style IRLS towards the minimax relative error
      a = np.linalg.lstsq(V * (w / ys)[:, None], w, rcond=None)[0]
      r = np.abs(V @ a - ys) / ys
      w = w * np.sqrt(r / r.max() + 1e-6)
      w = w / w.max()
  out = np.zeros(_MAX_COEFFS, np.float32)
  out[:m] = a
  return out


# Codebooks evaluated with FEWER polynomial terms than interpolation needs (bits -> terms). At 4 bits
# the 8-term interpolant costs 9 flops per element; 5 odd terms reproduce the Lloyd-Max centroids
# of any d within ~2.6e-4 relative (d = 64 .. 1536, measured by `codebook_poly_coeffs`), 8x below
# the bf16 rounding (2^-9) the value then gets for the tensor-core dot, for 6 flops.
FAST_CODEBOOK_TERMS = {4: 5}


def kernel_codebook(centroids, bits: int):
  """(coeffs float32 [8], n_coeffs) the kernels use for a `bits`-bit codebook (`TQPart` fields)."""
  m = FAST_CODEBOOK_TERMS.get(int(bits))
  return codebook_poly_coeffs(centroids, m), (m or 0)


def _codebook_eval(code2_u32, coeffs, n: int):
  """c[code] for codes in [0, n) given as code2 = 2*code (uint32), from the odd-polynomial coefficients
  (Horner in x^2 over len(coeffs) terms).

  (2^23 + 2 code) is built by OR-ing into the mantissa of 2^23; ONE subtraction of the exactly
  representable 2^23 + n - 1 then gives x2 = 2 code - (n - 1) exactly (a single constant, so no
  compiler reassociation of two float constants can round it).
  """
  f = lax.bitcast_convert_type(code2_u32 | jnp.uint32(_MAGIC), jnp.float32)
  x = f - jnp.float32(8388608.0 + (n - 1))
  h = len(coeffs)
  if h == 1:
    return x * coeffs[0]
  u = x * x
  acc = u * coeffs[h - 1] + coeffs[h - 2]
  for k in range(h - 3, -1, -1):
    acc = acc * u + coeffs[k]
  return acc * x


# ---------------------------------------------------------------------------------------------------
# Codebook as a byte-permute table (PTX prmt): 2- and 3-bit codes straight to bf16
# ---------------------------------------------------------------------------------------------------
#
# `prmt.b32 d, a, b, sel` builds each byte k of d from byte (sel >> 4k) & 7 of the 8 bytes {b, a}
# (bit 3 of a selector nibble replicates that byte's sign bit instead). Holding the low bytes of the
# bf16 codebook entries in one pair of registers and their high bytes in another turns the packed
# codes into the selector, so a table lookup is a handful of integer instructions per 2-4 values and
# the result is the bf16 centroid itself (rounded once, from the float32 centroid):
#
#   2-bit (uint8 words, 4 per 32-bit register): t = (w >> 2j) & 0x03030303; s = 17 t + 0x40404040 puts
#     (c, c + 4) into the two nibbles of every byte; prmt(LO, HI, s) = bf16x2 of the codes of bytes 0
#     and 1, prmt(LO, HI, s >> 16) those of bytes 2 and 3 (LO / HI: low / high bytes of c[0..3]).
#     6 instructions per 4 values (vs ~7.5 per value for the polynomial path).
#   3-bit (4-bit fields of uint16 words, 2 per register): u = w >> 4j; t = prmt(u, 0, 0x0020) brings the
#     code of the second word to nibble 2; a = prmt(L0, L1, t), b = prmt(H0, H1, t) look up the low and
#     high bytes of c[0..7], prmt(a, b, 0x6240) interleaves them. 5 instructions per 2 values.
#   4-bit (same words): the 3-bit lookup of the low 3 code bits in entries 0-7 and again in entries
#     8-15 (L2, L3, H2, H3), then a per-value select on the top bit: prmt(u << 4, 0, 0xAA88) replicates
#     the top bit of each code (now a byte's sign bit) over its 16-bit lane, one LOP3 selects.
#     12 instructions per 2 values (vs ~10 per value for the 5-term polynomial).
# Interpret mode looks the same table words up value by value; `_lut_decode_emulated` runs the exact
# instruction sequences on a jnp emulation of prmt (`ptx.prmt_emulated`), and a test checks it against the
# codebook for every code.

DEQUANTS = ("lut", "poly")
LUT_BITS = (2, 3, 4)


def codebook_lut_words(centroids, bits: int):
  """int32 [8]: the bf16 codebook as prmt tables (traceable; see the section comment).

  2-bit: [LO, HI, 0 ...] (byte i = low / high byte of bf16(c[i])); 3-bit: [L0, L1, H0, H1, 0 ...]
  (Lk / Hk: entries 4k .. 4k+3); 4-bit: [L0, L1, H0, H1, L2, L3, H2, H3]. Other widths: zeros.
  """
  c = jnp.asarray(centroids, jnp.float32)
  if bits not in LUT_BITS:
    return jnp.zeros((8,), jnp.int32)
  h = lax.bitcast_convert_type(c.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
  lo, hi = h & 0xFF, h >> 8

  def word(v):  # 4 bytes -> one little-endian word
    return sum(v[i] << (8 * i) for i in range(4))
  z = jnp.uint32(0)
  if bits == 2:
    words = [word(lo), word(hi)] + [z] * 6
  else:
    words = [word(lo[:4]), word(lo[4:8]), word(hi[:4]), word(hi[4:8])]
    words += [word(lo[8:12]), word(lo[12:]), word(hi[8:12]), word(hi[12:])] if bits == 4 else [z] * 4
  return lax.bitcast_convert_type(jnp.stack(words).astype(jnp.uint32), jnp.int32)


def _asm_lut2(j: int) -> str:
  shift = f"shr.b32 t, $2, {2 * j};\n and.b32 t, t, 0x03030303;" if j else \
      "and.b32 t, $2, 0x03030303;"
  return ("{\n .reg .b32 t;\n " + shift + "\n mad.lo.u32 t, t, 17, 0x40404040;\n"
          " prmt.b32 $0, $3, $7, t;\n shr.b32 t, t, 16;\n prmt.b32 $1, $3, $7, t;\n}")


def _asm_lut3(j: int) -> str:
  shift = f"shr.b32 u, $1, {4 * j};\n prmt.b32 u, u, 0, 0x0020;" if j else \
      "prmt.b32 u, $1, 0, 0x0020;"
  return ("{\n .reg .b32 u, a, b;\n " + shift + "\n prmt.b32 a, $2, $4, u;\n"
          " prmt.b32 b, $6, $8, u;\n prmt.b32 $0, a, b, 0x6240;\n}")


def _asm_lut4(j: int) -> str:
  # operands: $0 out, $1 the 2 words, then 8 table words x 2 copies: L0 $2, L1 $4, H0 $6, H1 $8,
  # L2 $10, L3 $12, H2 $14, H3 $16
  shift = f"shr.b32 u, $1, {4 * j};" if j else "mov.b32 u, $1;"
  return ("{\n .reg .b32 u, t, a, b, n, p, m;\n " + shift + "\n and.b32 t, u, 0x00070007;\n"
          " prmt.b32 t, t, 0, 0x0020;\n"
          " prmt.b32 a, $2, $4, t;\n prmt.b32 b, $6, $8, t;\n prmt.b32 n, a, b, 0x6240;\n"
          " prmt.b32 a, $10, $12, t;\n prmt.b32 b, $14, $16, t;\n prmt.b32 p, a, b, 0x6240;\n"
          " shl.b32 m, u, 4;\n prmt.b32 m, m, 0, 0xAA88;\n lop3.b32 $0, p, n, m, 0xE4;\n}")


def _lut_decode(w_RC, bits: int, j: int, lut, emulate: bool):
  """bf16 [R, C] codebook values of field j of a tile of packed words (2-bit uint8 / 3-bit uint16).

  `lut`: the part's 8 prmt table words (int32 scalars, `codebook_lut_words`).
  """
  R, C = w_RC.shape
  if bits not in LUT_BITS:
    raise ValueError(f"LUT dequantization covers {LUT_BITS}-bit codes, got {bits}")
  per = 4 if bits == 2 else 2
  if not emulate:
    tabs = [jnp.broadcast_to(x, (R, C)) for x in lut]
    if bits == 2:  # operands: $0 $1 out (bf16x2 each), $2 the 4 words, $3.. LO x4, $7.. HI x4
      args, asm, cons = [w_RC, tabs[0], tabs[1]], _asm_lut2(j), "=r,=r," + ",".join(["r"] * 9)
    elif bits == 3:  # $0 out, $1 the 2 words, $2 L0 x2, $4 L1 x2, $6 H0 x2, $8 H1 x2
      args, asm, cons = [w_RC] + tabs[:4], _asm_lut3(j), "=r," + ",".join(["r"] * 9)
    else:
      args, asm, cons = [w_RC] + tabs, _asm_lut4(j), "=r," + ",".join(["r"] * 17)
    [y] = plgpu.elementwise_inline_asm(
        asm, args=args, constraints=cons, pack=per,
        result_shape_dtypes=[jax.ShapeDtypeStruct((R, C), jnp.bfloat16)])
    return y
  # Interpret mode: the table lookup the instructions implement, one value at a time (cheap to
  # trace); `_lut_decode_emulated` runs the exact instruction sequence (tested for every code).
  u = [lax.bitcast_convert_type(x, jnp.uint32) for x in lut]
  sb = token_packing.storage_bits(bits)
  code = (w_RC.astype(jnp.uint32) >> jnp.uint32(sb * j)) & jnp.uint32((1 << sb) - 1)
  sh = (code & 3) * 8
  if bits == 2:
    lo, hi = u[0] >> sh, u[1] >> sh
  else:  # entries 4k .. 4k+3: low bytes in word (0, 1, 4, 5)[k], high bytes in (2, 3, 6, 7)[k]
    blk = code >> 2

    def pick(idx):
      out = u[idx[0]]
      for k in range(1, 4):
        out = jnp.where(blk == k, u[idx[k]], out)
      return out
    lo, hi = pick((0, 1, 4, 5)) >> sh, pick((2, 3, 6, 7)) >> sh
  y16 = ((lo & 0xFF) | ((hi & 0xFF) << 8)).astype(jnp.uint16)
  return lax.bitcast_convert_type(y16, jnp.bfloat16)


def _lut_decode_emulated(w_RC, bits: int, j: int, lut):
  """`_lut_decode`'s PTX instruction sequence, emulated on packed uint32 registers (for tests)."""
  R, C = w_RC.shape
  per = 4 if bits == 2 else 2
  u = [lax.bitcast_convert_type(jnp.asarray(x), jnp.uint32) for x in lut]
  g = w_RC.astype(jnp.uint32).reshape(R, C // per, per)
  reg = sum(g[..., i] << jnp.uint32(32 // per * i) for i in range(per))
  if bits == 2:
    t = ((reg >> jnp.uint32(2 * j)) & 0x03030303) * 17 + 0x40404040
    outs = [ptx.prmt_emulated(u[0], u[1], t), ptx.prmt_emulated(u[0], u[1], t >> jnp.uint32(16))]
  elif bits == 3:
    t = ptx.prmt_emulated(reg >> jnp.uint32(4 * j), jnp.zeros_like(reg), jnp.full_like(reg, 0x0020))
    a, b = ptx.prmt_emulated(u[0], u[1], t), ptx.prmt_emulated(u[2], u[3], t)
    outs = [ptx.prmt_emulated(a, b, jnp.full_like(reg, 0x6240))]
  else:
    uu = reg >> jnp.uint32(4 * j)
    t = ptx.prmt_emulated(uu & 0x00070007, jnp.zeros_like(reg), jnp.full_like(reg, 0x0020))
    il = jnp.full_like(reg, 0x6240)
    n = ptx.prmt_emulated(ptx.prmt_emulated(u[0], u[1], t), ptx.prmt_emulated(u[2], u[3], t), il)
    p = ptx.prmt_emulated(ptx.prmt_emulated(u[4], u[5], t), ptx.prmt_emulated(u[6], u[7], t), il)
    m = ptx.prmt_emulated(uu << jnp.uint32(4), jnp.zeros_like(reg), jnp.full_like(reg, 0xAA88))
    outs = [(p & m) | (n & ~m)]  # lop3 0xE4
  halves = [h for o in outs for h in (o & 0xFFFF, o >> jnp.uint32(16))]
  y16 = jnp.stack(halves, axis=-1).astype(jnp.uint16).reshape(R, C)
  return lax.bitcast_convert_type(y16, jnp.bfloat16)


# ---------------------------------------------------------------------------------------------------
# TurboQuant parts: data, encoder (for the cache / tests), dequantizer, reference
# ---------------------------------------------------------------------------------------------------


@struct.dataclass
class TQPart:
  """One TurboQuant_mse quantizer's share of a K or V cache, in the kernel's packed layout.

  words:     [B, S/4, K, d] token-packed codes (`effjax.quant.token_packing`), S % 64 == 0.
  norms:     [B, S/4, K, 4] ||x|| of each token's channels in this part (any float dtype), in the
             token-packing "slot order" (`token_packing.to_slot_order`: [.., r, k, j] is the token
             in field j of packed row r).
  rotation:  [d, d] float32 Pi (y = Pi x, the `effjax.quant.rotation` convention).
  centroids: [2^bits] float32 codebook (sorted, symmetric).
  coeffs:    [8] float32 `codebook_poly_coeffs(centroids, n_coeffs or None)`.
  bits:      code width (2, 3 or 4).
  channels:  the head-dim channels this part covers (static tuple; all parts of a K or V cache
             partition range(head_dim)).
  """
  words: jax.Array
  norms: jax.Array
  rotation: jax.Array
  centroids: jax.Array
  coeffs: jax.Array
  bits: int = struct.field(pytree_node=False)
  channels: tuple = struct.field(pytree_node=False)
  n_coeffs: int = struct.field(pytree_node=False, default=0)  # Horner terms; 0 = all 2^(bits-1)

  @property
  def dim(self) -> int:
    return len(self.channels)

  @property
  def terms(self) -> int:
    """Number of odd-polynomial terms the kernel evaluates for this part's codebook."""
    return self.n_coeffs or (1 << (self.bits - 1))

  def nbytes(self) -> int:
    """Bytes the decode kernel reads for this part (codes + norms)."""
    return int(self.words.nbytes + self.norms.nbytes)


def turboquant_encode_part(x_BSKH, rotation_DD, centroids, bits: int, channels=None,
                           norm_dtype=jnp.float16) -> TQPart:
  """TurboQuant_mse-encodes channels `channels` of x [B, S, K, H] into a `TQPart` (S % 64 == 0).

  idx_j = #{boundaries < y_j} for y = Pi x/||x|| (nearest centroid; boundaries = midpoints).
  """
  B, S, K, H = x_BSKH.shape
  channels = tuple(range(H)) if channels is None else tuple(int(c) for c in channels)
  d = len(channels)
  c = np.asarray(centroids, np.float64)
  if c.shape != (1 << bits,):
    raise ValueError(f"centroids must have 2^bits = {1 << bits} entries, got {c.shape}")
  if jnp.shape(rotation_DD) != (d, d):
    raise ValueError(f"rotation must be [{d}, {d}] for {d} channels, got {jnp.shape(rotation_DD)}")
  xs = x_BSKH.astype(jnp.float32)[..., np.asarray(channels)]
  nrm = jnp.sqrt(jnp.sum(xs * xs, axis=-1))
  y = jnp.einsum("BSKd,ed->BSKe", xs / jnp.where(nrm > 0, nrm, 1.0)[..., None],
                 jnp.asarray(rotation_DD, jnp.float32))
  bnd = jnp.asarray((c[1:] + c[:-1]) / 2, jnp.float32)
  codes = jnp.sum(y[..., None] > bnd, axis=-1).astype(jnp.uint8)
  words = token_packing.pack_tokens(codes, bits, axis=1)
  return TQPart(words=words, norms=token_packing.to_slot_order(nrm.astype(norm_dtype), axis=1),
                rotation=jnp.asarray(rotation_DD, jnp.float32),
                centroids=jnp.asarray(c, jnp.float32), coeffs=jnp.asarray(kernel_codebook(c, bits)[0]),
                bits=bits, channels=channels, n_coeffs=kernel_codebook(c, bits)[1])


def turboquant_dequantize(parts: Sequence[TQPart], head_dim: int):
  """x_hat [B, S, K, head_dim] float32 = ||x|| Pi^T c[idx] per part, scattered to its channels."""
  out = None
  for p in parts:
    codes = token_packing.unpack_tokens(p.words, p.bits, axis=1).astype(jnp.int32)
    nrm = token_packing.from_slot_order(p.norms, axis=1).astype(jnp.float32)
    y = jnp.take(p.centroids, codes, axis=0) * nrm[..., None]
    x = jnp.einsum("BSKe,ed->BSKd", y, p.rotation)
    if out is None:
      out = jnp.zeros(x.shape[:-1] + (head_dim,), jnp.float32)
    out = out.at[..., np.asarray(p.channels)].set(x)
  return out


def turboquant_decode_reference(q_BNH, k_parts, v_parts, lengths_B, *, sm_scale=None):
  """Dequantize-then-attend float32 reference for `turboquant_decode_attention`."""
  H = q_BNH.shape[-1]
  k = turboquant_dequantize(k_parts, H)
  v = turboquant_dequantize(v_parts, H)
  return decode_attention_reference(q_BNH, k, v, lengths_B, sm_scale=sm_scale)


def kivi_decode_reference(q_BNH, k_q: kivi_lib.KIVITensor, v_q: kivi_lib.KIVITensor, lengths_B, *,
                          sm_scale=None):
  """Dequantize-then-attend float32 reference for `kivi_decode_attention`."""
  return decode_attention_reference(q_BNH, kivi_lib.dequantize(k_q), kivi_lib.dequantize(v_q),
                                    lengths_B, sm_scale=sm_scale)


# ---------------------------------------------------------------------------------------------------
# Shared kernel pieces
# ---------------------------------------------------------------------------------------------------


def _pieces(parts_dims: Sequence[int]):
  """(part, column offset in part, width, offset in the concatenated rotated space) per piece."""
  pieces, off = [], 0
  for i, d in enumerate(parts_dims):
    c0, rem = 0, d
    while rem:
      w = 1 << (rem.bit_length() - 1)
      if w < 16:
        raise ValueError(f"part {i} of dim {d} leaves a piece of width {rem} < 16 (dims must be sums "
                         "of powers of two >= 16)")
      pieces.append((i, c0, w, off + c0))
      c0 += w
      rem -= w
    off += d
  return tuple(pieces)


def _code_float(code_u32):
  """float32(code) for codes < 2^23 with the 2^23 magic number (an OR and a subtract, no I2F)."""
  f = lax.bitcast_convert_type(code_u32 | jnp.uint32(_MAGIC), jnp.float32)
  return f - jnp.float32(8388608.0)


def _fields(w_RC, bits: int, doubled: bool = False):
  """The 4 code fields of a [16, C] tile of packed words, as uint32 [16, C] each (2*code if doubled)."""
  sb = token_packing.storage_bits(bits)
  w = w_RC.astype(jnp.uint32)
  if not doubled:
    mask = jnp.uint32((1 << sb) - 1)
    return [(w >> jnp.uint32(j * sb)) & mask if j else w & mask for j in range(token_packing.FIELDS)]
  mask2 = jnp.uint32(((1 << sb) - 1) << 1)
  return [(w >> jnp.uint32(j * sb - 1)) & mask2 if j else (w << jnp.uint32(1)) & mask2
          for j in range(token_packing.FIELDS)]


def _softmax_fields(s_list, carry_m, carry_l, tok_axis: int):
  """Online-softmax update (base 2) over the 4 field tiles of one block: (p_list, alpha, m, l).

  Tiles are [Gp, R] (tok_axis=1, "qk" orientation) or [R, Gp] (tok_axis=0, "kq" orientation).
  """
  mx = s_list[0].max(axis=tok_axis)
  for s in s_list[1:]:
    mx = jnp.maximum(mx, s.max(axis=tok_axis))
  m_new = jnp.maximum(carry_m, mx)
  alpha = jnp.exp2(carry_m - m_new)
  m_b = m_new[:, None] if tok_axis == 1 else m_new[None, :]
  p_list = [jnp.exp2(s - m_b) for s in s_list]
  l_new = alpha * carry_l
  for p in p_list:
    l_new = l_new + p.sum(axis=tok_axis)
  return p_list, alpha, m_new, l_new


def _tok(x_R, tok_axis: int):
  """A per-token [R] vector as a [1, R] row (tok_axis=1) or an [R, 1] column (tok_axis=0)."""
  return x_R[None, :] if tok_axis == 1 else x_R[:, None]


def _head(x_G, tok_axis: int):
  """A per-query-head [Gp] vector broadcast against tiles with tokens on `tok_axis`."""
  return x_G[:, None] if tok_axis == 1 else x_G[None, :]


def _init_carry(Gp, widths, transposed: bool = False):
  shape = (lambda w: (w, Gp)) if transposed else (lambda w: (Gp, w))
  return ([jnp.zeros(shape(w), jnp.float32) for w in widths],
          jnp.full((Gp,), _NEG_BIG, jnp.float32), jnp.zeros((Gp,), jnp.float32))


def _write(o_ref, lse_ref, carry, offsets_widths, transposed: bool = False):
  """Stores acc / l per piece (o block [Gp, H], or [H, Gp] when transposed) and the lse."""
  accs, m, l = carry
  nonempty = l > 0.0
  l_safe = jnp.where(nonempty, l, 1.0)
  for acc, (off, w) in zip(accs, offsets_widths):
    if transposed:
      o_ref[pl.ds(off, w), :] = (acc / l_safe[None, :]).astype(o_ref.dtype)
    else:
      o_ref[:, pl.ds(off, w)] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(l_safe)) / LOG2E, -jnp.inf)


# ---------------------------------------------------------------------------------------------------
# TurboQuant kernel
# ---------------------------------------------------------------------------------------------------


def _dot(a, b, emulate: bool):
  """float32 a @ b of bf16 tiles: the tensor-core dot on GPU; in interpret mode the same products
  in float32 (exact for bf16 inputs), since the CPU runtime has no bf16 x bf16 -> f32 dot for some
  of these operand forms."""
  if emulate:
    return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return plgpu.dot(a, b)


def _decode_fields(tile, bits: int, coeffs, lut, use_lut: bool, emulate: bool):
  """The 4 field tiles of a [R, C] tile of packed words as bf16 codebook values."""
  if use_lut and bits in LUT_BITS:
    return [_lut_decode(tile, bits, j, lut, emulate) for j in range(token_packing.FIELDS)]
  return [_codebook_eval(code, coeffs, 1 << bits).astype(jnp.bfloat16)
          for code in _fields(tile, bits, True)]


def _tq_kernel(len_ref, q_ref, coef_ref, lut_ref, *refs, k_bits, v_bits, k_terms, v_terms, k_pieces,
               v_pieces, gpi, chunk, transposed, use_lut, emulate):
  """One (row, kv head, split) program. Orientation (static):

  transposed=False ("qk"): scores s[Gp, R] = dot(q'[Gp, w], y[R, w]^T); acc[Gp, w] += dot(p, y).
  transposed=True  ("kq"): scores s[R, Gp] = dot(y[R, w], q'^T[w, Gp]); acc[w, Gp] += dot(y^T, p^T).
  In "kq" the decoded codes are always the LEFT operand of the tensor-core dot (M = tokens for the
  scores, M = channels for the values), the operand Triton can keep in registers; in "qk" they are
  the right operand. Which one is faster is measured (experiments/bench_kv_decode.py).
  """
  nk, nv = len(k_bits), len(v_bits)
  kw, kn = refs[0:2 * nk:2], refs[1:2 * nk:2]
  vw, vn = refs[2 * nk:2 * (nk + nv):2], refs[2 * nk + 1:2 * (nk + nv):2]
  o_ref, lse_ref = refs[-2:]
  b, split = pl.program_id(0), pl.program_id(2)
  tr = transposed
  ta = 0 if tr else 1  # token axis of the score / probability tiles
  Gp = q_ref.shape[1] if tr else q_ref.shape[0]
  S = kn[0].shape[0] * token_packing.FIELDS
  length = jnp.minimum(len_ref[b], S)
  R = ROWS * gpi  # packed rows per block; field j of the block = R tokens
  blk = GT * gpi
  r_idx = jnp.arange(R)
  base = (r_idx // ROWS) * GT + r_idx % ROWS  # token offset (within the block) of field 0, per row
  q_pieces = [q_ref[pl.ds(qoff, w), :] if tr else q_ref[:, pl.ds(qoff, w)]
              for (_, _, w, qoff) in k_pieces]
  kco = [[coef_ref[i, k] for k in range(k_terms[i])] for i in range(nk)]
  vco = [[coef_ref[nk + i, k] for k in range(v_terms[i])] for i in range(nv)]
  klut = [[lut_ref[i, k] for k in range(8)] if use_lut and k_bits[i] in LUT_BITS else None
          for i in range(nk)]
  vlut = [[lut_ref[nk + i, k] for k in range(8)] if use_lut and v_bits[i] in LUT_BITS else None
          for i in range(nv)]

  def block(t0, carry, lim):
    accs, m, l = carry
    r0 = pl.multiple_of(t0 // token_packing.FIELDS, R)
    rows = pl.ds(r0, R)
    part_s = [[None] * 4 for _ in range(nk)]
    for (pi, c0, w, _), qp in zip(k_pieces, q_pieces):
      ys = _decode_fields(kw[pi][rows, pl.ds(c0, w)], k_bits[pi], kco[pi], klut[pi], use_lut, emulate)
      for j, y in enumerate(ys):  # y: [R, w] bf16
        d = _dot(y, qp, emulate) if tr else _dot(qp, y.T, emulate)
        part_s[pi][j] = d if part_s[pi][j] is None else part_s[pi][j] + d
    valid = [None] * 4
    s_list = []
    for j in range(4):
      s = None
      for i in range(nk):
        t = part_s[i][j] * _tok(kn[i][rows, j].astype(jnp.float32), ta)
        s = t if s is None else s + t
      if lim is not None:
        valid[j] = (t0 + j * ROWS + base) < lim
        s = jnp.where(_tok(valid[j], ta), s, _NEG_BIG)
      s_list.append(s)
    p_list, alpha, m_new, l_new = _softmax_fields(s_list, m, l, ta)
    pw = []
    for i in range(nv):
      row = []
      for j in range(4):
        pj = p_list[j] * _tok(vn[i][rows, j].astype(jnp.float32), ta)
        if lim is not None:
          pj = jnp.where(_tok(valid[j], ta), pj, 0.0)
        row.append(pj.astype(jnp.bfloat16))
      pw.append(row)
    new_accs = []
    for acc, (pi, c0, w, _) in zip(accs, v_pieces):
      acc = acc * _head(alpha, ta)
      tile = vw[pi][rows, pl.ds(c0, w)]  # [R, w] packed words
      if tr:
        tile = tile.T  # transpose the packed words (4x fewer bytes than the decoded values)
      for j, y in enumerate(_decode_fields(tile, v_bits[pi], vco[pi], vlut[pi], use_lut, emulate)):
        acc = acc + (_dot(y, pw[pi][j], emulate) if tr else _dot(pw[pi][j], y, emulate))
      new_accs.append(acc)
    return new_accs, m_new, l_new

  start, lim, n_full, has_tail = split_range(length, split, chunk, blk)

  def body(i, c):
    return block(pl.multiple_of(start + i * blk, blk), c, None)

  carry = _init_carry(Gp, [w for (_, _, w, _) in v_pieces], tr)
  carry = lax.fori_loop(0, n_full, body, carry)
  carry = lax.cond(has_tail, lambda c: block(pl.multiple_of(start + n_full * blk, blk), c, lim),
                   lambda c: c, carry)
  _write(o_ref, lse_ref, carry, [(ooff, w) for (_, _, w, ooff) in v_pieces], tr)


def _check_parts(parts, H, what):
  if not parts:
    raise ValueError(f"{what}: need at least one TQPart")
  chans = sorted(c for p in parts for c in p.channels)
  if chans != list(range(H)):
    raise ValueError(f"{what}: the parts' channels must partition range({H}), got {chans}")
  for p in parts:
    if p.bits not in (2, 3, 4):
      raise ValueError(f"{what}: bits must be 2, 3 or 4 for the kernel, got {p.bits}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "gpi", "num_warps",
                                             "num_stages", "interpret", "return_lse", "transposed",
                                             "dequant"))
def _tq_attention(q_BNH, k_parts, v_parts, lengths_B, *, sm_scale, num_splits, gpi, num_warps,
                  num_stages, interpret, return_lse, transposed, dequant):
  B, N, H = q_BNH.shape
  _, R, K, _ = k_parts[0].words.shape
  S = R * token_packing.FIELDS
  G = N // K
  Gp = max(16, _next_pow2(G))
  # Rotate the query once per head and part: q' = Pi q (row vectors: q @ Pi^T); fold the scale in.
  q32 = q_BNH.astype(jnp.float32)
  qr = jnp.concatenate([q32[..., np.asarray(p.channels)] @ p.rotation.T for p in k_parts], axis=-1)
  qr = (qr * (sm_scale * LOG2E)).reshape(B, K, G, H)
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, Gp - G), (0, 0))).astype(jnp.bfloat16)
  if transposed:
    qr = jnp.swapaxes(qr, -1, -2)  # [B, K, H, Gp]
  coef = jnp.stack([p.coeffs for p in k_parts] + [p.coeffs for p in v_parts]).astype(jnp.float32)
  lut = jnp.stack([codebook_lut_words(p.centroids, p.bits) for p in k_parts + v_parts])
  k_pieces = _pieces([p.dim for p in k_parts])
  v_pieces = _pieces([p.dim for p in v_parts])
  while (S // GT) % gpi:  # blocks of gpi whole groups must tile S (no out-of-bounds block loads)
    gpi //= 2
  nblk = pl.cdiv(S, GT * gpi)
  P = max(1, min(num_splits, nblk))
  chunk = pl.cdiv(nblk, P) * GT * gpi
  lengths_B = jnp.clip(jnp.asarray(lengths_B, jnp.int32), 0, S)

  in_specs = [pl.BlockSpec((B,), lambda b, h, p: (0,)),
              pl.BlockSpec((None, None) + qr.shape[2:], lambda b, h, p: (b, h, 0, 0)),
              pl.BlockSpec(coef.shape, lambda b, h, p: (0, 0)),
              pl.BlockSpec(lut.shape, lambda b, h, p: (0, 0))]
  args = [lengths_B, qr, coef, lut]
  nbytes = 0
  for part in list(k_parts) + list(v_parts):
    in_specs.append(pl.BlockSpec((None, R, None, part.dim), lambda b, h, p: (b, 0, h, 0)))
    in_specs.append(pl.BlockSpec((None, R, None, token_packing.FIELDS),
                                 lambda b, h, p: (b, 0, h, 0)))
    args += [part.words, part.norms]
    nbytes += part.nbytes()
  kernel = functools.partial(_tq_kernel, k_bits=tuple(p.bits for p in k_parts),
                             v_bits=tuple(p.bits for p in v_parts),
                             k_terms=tuple(p.terms for p in k_parts),
                             v_terms=tuple(p.terms for p in v_parts), k_pieces=k_pieces,
                             v_pieces=v_pieces, gpi=gpi, chunk=chunk, transposed=transposed,
                             use_lut=dequant == "lut", emulate=interpret)
  o_blk = (H, Gp) if transposed else (Gp, H)
  o, lse = pl.pallas_call(
      kernel,
      grid=(B, K, P),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, None) + o_blk, lambda b, h, p: (b, h, p, 0, 0)),
                 pl.BlockSpec((None, None, None, Gp), lambda b, h, p: (b, h, p, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, K, P) + o_blk, jnp.float32),
                 jax.ShapeDtypeStruct((B, K, P, Gp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      cost_estimate=pl.CostEstimate(flops=4 * B * N * S * H + 24 * B * K * S * H,
                                    transcendentals=B * N * S, bytes_accessed=nbytes),
      interpret=interpret,
      name="turboquant_decode_attention",
  )(*args)
  if transposed:
    o = jnp.swapaxes(o, -1, -2)  # [B, K, P, Gp, H] (tiny: one row per split)
  out_r, lse_out = combine_splits(o, lse, N, jnp.float32, return_lse=True)
  # Rotate the values' accumulator back once per part: x = Pi^T y (row vectors: y @ Pi).
  out = jnp.zeros((B, N, H), jnp.float32)
  off = 0
  for p in v_parts:
    out = out.at[..., np.asarray(p.channels)].set(out_r[..., off:off + p.dim] @ p.rotation)
    off += p.dim
  out = out.astype(q_BNH.dtype)
  return (out, lse_out) if return_lse else out


def turboquant_decode_attention(q_BNH, k_parts: Sequence[TQPart], v_parts: Sequence[TQPart],
                                lengths_B, *, sm_scale: Optional[float] = None,
                                num_splits: Optional[int] = None, groups_per_iter: int = 2,
                                num_warps: int = 4, num_stages: int = 3, transposed: bool = False,
                                dequant: str = "lut", interpret: bool = False,
                                return_lse: bool = False):
  """GQA decode attention over TurboQuant_mse-packed K/V (Pallas; Triton on GPU, interpret on CPU).

  Args:
    q_BNH: [B, N, H] query of the one new token per row.
    k_parts, v_parts: TQParts (see `TQPart`) whose channels partition range(H); words
      [B, S/4, K, d], norms [B, S/4, K, 4] (slot order), S % 64 == 0, N % K == 0.
    lengths_B: [B] int valid lengths (clamped to [0, S]).
    sm_scale: logit scale (default 1/sqrt(H)).
    num_splits: programs per (row, kv head) along the sequence (default `default_num_splits`).
    groups_per_iter: 64-token groups per inner-loop block (halved until it divides S/64); each field
      of a block is one [16*groups_per_iter, d] tile, i.e. one tensor-core dot per field and part.
    num_warps, num_stages: Triton launch parameters.
    transposed: dot orientation (see `_tq_kernel`): False = "qk" (codes are the right operand),
      True = "kq" (codes are the left operand of every dot, accumulator [H, Gp]).
    dequant: how codes become bf16 centroids: "lut" (default: PTX prmt byte-permute tables, the
      bf16-rounded centroids exactly; see the "byte-permute table" section) or "poly" (the odd
      codebook polynomial in float32, then bf16). On the H200 at 64k "lut" is 1.5x faster at 2.5 bits.
    interpret: Pallas interpreter (CPU tests).
    return_lse: also return the log-sum-exp [B, N] float32 (to merge a full-precision window).
  Returns:
    [B, N, H] in q's dtype (and the lse with return_lse).
  """
  k_parts, v_parts = tuple(k_parts), tuple(v_parts)
  _check_launch(groups_per_iter, num_warps, num_stages, num_splits)
  if dequant not in DEQUANTS:
    raise ValueError(f"dequant must be one of {DEQUANTS}, got {dequant!r}")
  B, N, H = q_BNH.shape
  _check_parts(k_parts, H, "k_parts")
  _check_parts(v_parts, H, "v_parts")
  shape0 = k_parts[0].words.shape
  for p in k_parts + v_parts:
    if p.words.shape[:3] != shape0[:3] or p.words.shape[3] != p.dim:
      raise ValueError(f"part words must be [B, S/4, K, d] with one B, S, K; got {p.words.shape} vs "
                       f"{shape0}")
    if p.norms.shape != shape0[:3] + (4,):
      raise ValueError(f"part norms must be [B, S/4, K, 4] (slot order) = {shape0[:3] + (4,)}, got "
                       f"{p.norms.shape}")
  if shape0[0] != B or N % shape0[2]:
    raise ValueError(f"q_BNH {q_BNH.shape} does not match the parts' [B, S/4, K, d] {shape0}")
  if jnp.shape(lengths_B) != (B,):
    raise ValueError(f"lengths_B must have shape ({B},), got {jnp.shape(lengths_B)}")
  S, K = shape0[1] * 4, shape0[2]
  if num_splits is None:
    num_splits = default_num_splits(B, K, S, GT * groups_per_iter)
  scale = (1.0 / math.sqrt(H)) if sm_scale is None else float(sm_scale)
  return _tq_attention(q_BNH, k_parts, v_parts, lengths_B, sm_scale=scale, num_splits=int(num_splits),
                       gpi=int(groups_per_iter), num_warps=num_warps, num_stages=num_stages,
                       interpret=interpret, return_lse=return_lse, transposed=bool(transposed),
                       dequant=dequant)


def _check_launch(groups_per_iter, num_warps, num_stages, num_splits):
  for name, v, ok in (("groups_per_iter", groups_per_iter, lambda x: x >= 1 and not x & (x - 1)),
                      ("num_warps", num_warps, lambda x: x in (1, 2, 4, 8, 16)),
                      ("num_stages", num_stages, lambda x: x >= 1),
                      ("num_splits", num_splits, lambda x: x >= 1)):
    if v is None and name == "num_splits":
      continue
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not ok(int(v)):
      raise ValueError(f"{name} must be a positive int (groups_per_iter a power of two, num_warps "
                       f"in 1..16 a power of two), got {v!r}")


# ---------------------------------------------------------------------------------------------------
# KIVI kernel
# ---------------------------------------------------------------------------------------------------


def _kivi_kernel(len_ref, q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, o_ref, lse_ref, *,
                 k_bits, v_bits, gpi, chunk):
  b, split = pl.program_id(0), pl.program_id(2)
  Gp, H = q_ref.shape
  S = vs_ref.shape[0] * token_packing.FIELDS
  nc = H // kivi_lib.GROUP
  length = jnp.minimum(len_ref[b], S)
  q = q_ref[...]
  R = ROWS * gpi
  blk = GT * gpi
  r_idx = jnp.arange(R)
  base = (r_idx // ROWS) * GT + r_idx % ROWS
  gbase = (r_idx // ROWS) * (GT // kivi_lib.GROUP)  # key-group offset of each row's group

  def block(t0, carry, lim):
    accs, m, l = carry
    r0 = pl.multiple_of(t0 // token_packing.FIELDS, R)
    rows = pl.ds(r0, R)
    valid = [None] * 4
    s_list = []
    for j, code in enumerate(_fields(kw_ref[rows, :], k_bits)):
      if gpi == 1:  # the 16 tokens of a field lie in ONE key group: one [1, H] row, broadcast
        kg0 = t0 // kivi_lib.GROUP + j // 2
        sc = ks_ref[pl.ds(kg0, 1), :].astype(jnp.float32)
        ze = kz_ref[pl.ds(kg0, 1), :].astype(jnp.float32)
      else:
        kg = t0 // kivi_lib.GROUP + j // 2 + gbase  # [R] key group of each row's field-j token
        sc = ks_ref[kg].astype(jnp.float32)  # gathered rows [R, H]
        ze = kz_ref[kg].astype(jnp.float32)
      k_hat = (_code_float(code) * sc + ze).astype(q.dtype)
      s = plgpu.dot(q, k_hat.T)
      if lim is not None:
        valid[j] = (t0 + j * ROWS + base) < lim
        s = jnp.where(valid[j][None, :], s, _NEG_BIG)
      s_list.append(s)
    p_list, alpha, m_new, l_new = _softmax_fields(s_list, m, l, 1)
    new_accs = []
    for c, acc in enumerate(accs):
      # Per-token value scales fold into the probabilities: sum_t p_t (code_t s_t + z_t)
      # = dot(p * s, code) + sum_t p_t z_t, so the codes enter the dot as exact small integers.
      acc = acc * alpha[:, None]
      tile = vw_ref[rows, pl.ds(c * kivi_lib.GROUP, kivi_lib.GROUP)]
      zsum = None
      for j, code in enumerate(_fields(tile, v_bits)):
        sc = vs_ref[rows, c, j].astype(jnp.float32)[None, :]
        ze = vz_ref[rows, c, j].astype(jnp.float32)[None, :]
        psc, pze = p_list[j] * sc, p_list[j] * ze
        if lim is not None:  # scales past the length may be garbage (0 * NaN = NaN)
          psc = jnp.where(valid[j][None, :], psc, 0.0)
          pze = jnp.where(valid[j][None, :], pze, 0.0)
        acc = acc + plgpu.dot(psc.astype(jnp.bfloat16), _code_float(code).astype(jnp.bfloat16))
        zsum = pze.sum(axis=1) if zsum is None else zsum + pze.sum(axis=1)
      new_accs.append(acc + zsum[:, None])
    return new_accs, m_new, l_new

  start, lim, n_full, has_tail = split_range(length, split, chunk, blk)

  def body(i, c):
    return block(pl.multiple_of(start + i * blk, blk), c, None)

  carry = _init_carry(Gp, [kivi_lib.GROUP] * nc)
  carry = lax.fori_loop(0, n_full, body, carry)
  carry = lax.cond(has_tail, lambda c: block(pl.multiple_of(start + n_full * blk, blk), c, lim),
                   lambda c: c, carry)
  _write(o_ref, lse_ref, carry, [(c * kivi_lib.GROUP, kivi_lib.GROUP) for c in range(nc)])


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "gpi", "num_warps",
                                             "num_stages", "interpret", "return_lse"))
def _kivi_attention(q_BNH, k_q, v_q, lengths_B, *, sm_scale, num_splits, gpi, num_warps, num_stages,
                    interpret, return_lse):
  B, N, H = q_BNH.shape
  _, R, K, _ = k_q.codes.shape
  S = R * token_packing.FIELDS
  G = N // K
  Gp = max(16, _next_pow2(G))
  while (S // GT) % gpi:
    gpi //= 2
  q = (q_BNH.astype(jnp.float32) * (sm_scale * LOG2E)).reshape(B, K, G, H)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, Gp - G), (0, 0))).astype(jnp.bfloat16)
  nblk = pl.cdiv(S, GT * gpi)
  P = max(1, min(num_splits, nblk))
  chunk = pl.cdiv(nblk, P) * GT * gpi
  lengths_B = jnp.clip(jnp.asarray(lengths_B, jnp.int32), 0, min(S, k_q.length))
  nc = H // kivi_lib.GROUP
  kernel = functools.partial(_kivi_kernel, k_bits=k_q.bits, v_bits=v_q.bits, gpi=gpi, chunk=chunk)
  nbytes = k_q.nbytes() + v_q.nbytes()
  o, lse = pl.pallas_call(
      kernel,
      grid=(B, K, P),
      in_specs=[pl.BlockSpec((B,), lambda b, h, p: (0,)),
                pl.BlockSpec((None, None, Gp, H), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((None, R, None, H), lambda b, h, p: (b, 0, h, 0)),
                pl.BlockSpec((None, S // kivi_lib.GROUP, None, H), lambda b, h, p: (b, 0, h, 0)),
                pl.BlockSpec((None, S // kivi_lib.GROUP, None, H), lambda b, h, p: (b, 0, h, 0)),
                pl.BlockSpec((None, R, None, H), lambda b, h, p: (b, 0, h, 0)),
                pl.BlockSpec((None, R, None, nc, 4), lambda b, h, p: (b, 0, h, 0, 0)),
                pl.BlockSpec((None, R, None, nc, 4), lambda b, h, p: (b, 0, h, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, None, Gp, H), lambda b, h, p: (b, h, p, 0, 0)),
                 pl.BlockSpec((None, None, None, Gp), lambda b, h, p: (b, h, p, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, K, P, Gp, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, P, Gp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      cost_estimate=pl.CostEstimate(flops=4 * B * N * S * H + 8 * B * K * S * H,
                                    transcendentals=B * N * S, bytes_accessed=nbytes),
      interpret=interpret,
      name="kivi_decode_attention",
  )(lengths_B, q, k_q.codes, k_q.scale, k_q.zero, v_q.codes, v_q.scale, v_q.zero)
  return combine_splits(o, lse, N, q_BNH.dtype, return_lse)


def kivi_decode_attention(q_BNH, k_q: kivi_lib.KIVITensor, v_q: kivi_lib.KIVITensor, lengths_B, *,
                          sm_scale: Optional[float] = None, num_splits: Optional[int] = None,
                          groups_per_iter: int = 4, num_warps: int = 4, num_stages: int = 3,
                          interpret: bool = False, return_lse: bool = False):
  """GQA decode attention over KIVI-packed K/V (`effjax.quant.kivi` layout), no bf16 K/V in memory.

  Args:
    q_BNH: [B, N, H] query; H a multiple of 32 with H/32 a power of two.
    k_q: `kivi.quantize_keys` output (per-channel); v_q: `kivi.quantize_values` output (per-token),
      both of [B, S, K, H] tensors (codes [B, S64/4, K, H]).
    lengths_B: [B] valid lengths (clamped to [0, S]).
    Other arguments as in `turboquant_decode_attention`.
  Returns:
    [B, N, H] in q's dtype (and the lse [B, N] with return_lse).
  """
  B, N, H = q_BNH.shape
  if not (k_q.per_channel and not v_q.per_channel):
    raise ValueError("k_q must come from kivi.quantize_keys and v_q from kivi.quantize_values")
  if k_q.codes.shape != v_q.codes.shape or k_q.codes.shape[0] != B or k_q.codes.shape[3] != H:
    raise ValueError(f"codes shapes {k_q.codes.shape}, {v_q.codes.shape} do not match q_BNH {q_BNH.shape}")
  K = k_q.codes.shape[2]
  if N % K:
    raise ValueError(f"num_heads ({N}) must be a multiple of num_kv_heads ({K})")
  nc = H // kivi_lib.GROUP
  if H % kivi_lib.GROUP or nc & (nc - 1) or H < 32:
    raise ValueError(f"head_dim must be 32 * (a power of two) for the KIVI kernel, got {H}")
  if jnp.shape(lengths_B) != (B,):
    raise ValueError(f"lengths_B must have shape ({B},), got {jnp.shape(lengths_B)}")
  S = k_q.codes.shape[1] * 4
  if num_splits is None:
    num_splits = default_num_splits(B, K, S, GT * groups_per_iter)
  scale = (1.0 / math.sqrt(H)) if sm_scale is None else float(sm_scale)
  return _kivi_attention(q_BNH, k_q, v_q, lengths_B, sm_scale=scale, num_splits=int(num_splits),
                         gpi=int(groups_per_iter), num_warps=num_warps, num_stages=num_stages,
                         interpret=interpret, return_lse=return_lse)


# ---------------------------------------------------------------------------------------------------
# Adapter from effjax.quant.turboquant.TurboQuant (its own dim-packed codes) to the kernel layout
# ---------------------------------------------------------------------------------------------------


def turboquant_parts(tq, x_BSKH, norm_dtype=jnp.float16):
  """Encodes x [B, S, K, H] (S % 64 == 0) with a `TurboQuant` (kind="mse") into kernel `TQPart`s.

  Uses the quantizer's own encoder (rotation, codebook, outlier/regular split), then re-packs its
  indices along the token axis (`effjax.quant.token_packing`). Integer rates give one part; half rates
  (e.g. 2.5 bits) give [outlier part, regular part].
  """
  from effjax.quant import packing  # the quantizer's own (dim-axis) packing
  if tq.kind != "mse":
    raise ValueError(f"the decode kernels read TurboQuant kind='mse' codes, got kind={tq.kind!r}")
  if tq.is_split:
    subs = [(tq.outlier, tq.outlier_channels), (tq.regular, tq.regular_channels)]
  else:
    subs = [(tq, tuple(range(tq.dim)))]
  parts = []
  for sub, chans in subs:
    xs = jnp.take(x_BSKH, jnp.asarray(chans, jnp.int32), axis=-1)
    codes = sub.encode(xs)
    idx = packing.unpack_bits(codes.idx, sub.mse_bits, sub.dim)
    parts.append(TQPart(words=token_packing.pack_tokens(idx, sub.mse_bits, axis=1),
                        norms=token_packing.to_slot_order(codes.norm.astype(norm_dtype), axis=1),
                        rotation=sub.rotation.matrix().astype(jnp.float32),
                        centroids=sub.centroids.astype(jnp.float32),
                        coeffs=jnp.asarray(kernel_codebook(np.asarray(sub.centroids), sub.mse_bits)[0]),
                        bits=sub.mse_bits, channels=tuple(int(c) for c in chans),
                        n_coeffs=kernel_codebook(np.asarray(sub.centroids), sub.mse_bits)[1]))
  return parts
