"""Packed ternary weights for BitNet b1.58 inference: 2-bit (4 per byte) and base-3 (5 per byte).

Papers: "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (Ma et al.,
arXiv 2402.17764), Sec. 2 (absmean ternarization W~ = RoundClip(W/(gamma+eps), -1, 1), one scale
gamma per tensor); "BitNet b1.58 2B4T Technical Report" (arXiv 2504.12285) and bitnet.cpp's I2_S
format (4 weights per byte with one per-tensor scale). Base-3 packing (5 trits per byte, since
3^5 = 243 <= 256, i.e. 1.6 bits per weight) is the TL2-style dense alternative.

Export: `export_ternary(w)` ternarizes a latent weight with `effjax.layers.bitlinear`'s quantizer
and packs it; the de-quantized weight is `codes * scale` with `scale = gamma`.

2-bit layout ("planar", the one `pallas_kernels/ternary_matmul.py` reads). For W of shape [K, N]
(contracted dim first, as in x @ W), K and N are zero-padded to Kp = ceil(K/(4a))*4a and
Np = ceil(N/(4a))*4a (a = `align`, default 32, so K/4 and N/4 are multiples of 32: the kernels'
tiles are powers of two and int8 tensor-core tiles need K >= 32), and with K4 = Kp/4, N4 = Np/4:

    packed[r, 4*c + i]  (uint8, shape [K4, Np])  holds at bits 2j..2j+1 the code
    W[j*K4 + r, i*N4 + c] + 1  in {0, 1, 2}        for j, i in 0..3.

Read as little-endian int32 words (`packed.view(int32)`, shape [K4, N4]), word [r, c] holds the 16
weights {W[j*K4 + r, i*N4 + c]} at bit 8*i + 2*j. So a contiguous tile of words unpacks with one
shift and one mask per (i, j) into 16 dense tiles, each matching a contiguous slice of x (plane j:
x[:, j*K4 + r]) and a contiguous slice of the output (plane i: y[:, i*N4 + c]) -- no interleaving
in the kernel. Padding holds the code of weight 0. The code offset (+1) makes codes non-negative:
sum_k x_k w_k = sum_k x_k code_k - sum_k x_k.

Word storage: the same bytes may be held as int32 words [K4, N4] (`words_2bit`, `as_words`). The
Pallas kernels read words; giving them the uint8 form makes XLA convert it on every call (XLA
expands a width-changing bitcast into a shift/or pass over the whole weight, i.e. an extra read and
write of the packed bytes), so inference should convert once at load time (`as_words`).

Base-3 layout: the codes w + 1 of the row-major flattened tensor, padded with weight 0 to a
multiple of 5, byte b = sum_{t<5} code_{5b+t} * 3^t (values 0..242).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from effjax.layers.bitlinear import WEIGHT_EPS, ternary_weight_codes

__all__ = [
    "PackedTernary", "padded_dims", "pack_2bit", "unpack_2bit", "words_2bit", "pack_base3",
    "unpack_base3", "export_ternary", "dequantize", "as_words",
]


def _check_codes(codes, ndim, who):
  if codes.ndim != ndim:
    raise ValueError(f"{who}: codes must be {ndim}-D, got shape {tuple(codes.shape)}")
  if not (jnp.issubdtype(codes.dtype, jnp.integer)):
    raise ValueError(f"{who}: codes must be an integer array with values in {{-1, 0, 1}}, "
                     f"got dtype {codes.dtype}")


def padded_dims(k: int, n: int, align: int = 32) -> tuple[int, int]:
  """(Kp, Np): K and N rounded up to a multiple of 4 * align (the 2-bit layout's padding)."""
  if not isinstance(align, int) or align < 1:
    raise ValueError(f"align must be a positive int, got {align!r}")
  m = 4 * align
  return -(-k // m) * m, -(-n // m) * m


def pack_2bit(codes_KN: jax.Array, align: int = 32) -> jax.Array:
  """Packs ternary codes [K, N] (values in {-1, 0, 1}) into the planar 2-bit layout [Kp/4, Np].

  See the module docstring for the layout; K and N are padded with zero weights to multiples of
  4 * align.
  """
  _check_codes(codes_KN, 2, "pack_2bit")
  k, n = codes_KN.shape
  kp, np_ = padded_dims(k, n, align)
  k4, n4 = kp // 4, np_ // 4
  c = jnp.pad(codes_KN.astype(jnp.int32) + 1, ((0, kp - k), (0, np_ - n)), constant_values=1)
  # c[j*K4 + r, i*N4 + col] -> t[r, col, i, j]
  t = c.reshape(4, k4, 4, n4).transpose(1, 3, 2, 0)
  byte = (t[..., 0] | (t[..., 1] << 2) | (t[..., 2] << 4) | (t[..., 3] << 6))  # [K4, N4, 4]
  return byte.reshape(k4, np_).astype(jnp.uint8)


def words_2bit(packed_K4Np: jax.Array) -> jax.Array:
  """uint8 [K4, Np] planar bytes -> the same bytes as little-endian int32 words [K4, Np/4].

  An explicit shift/or (not a bitcast), so the result does not depend on the host byte order.
  """
  if packed_K4Np.ndim != 2 or packed_K4Np.dtype != jnp.uint8 or packed_K4Np.shape[1] % 4:
    raise ValueError(f"words_2bit: packed must be a 2-D uint8 array with a multiple of 4 columns, "
                     f"got {packed_K4Np.dtype} {tuple(packed_K4Np.shape)}")
  k4, np_ = packed_K4Np.shape
  b = packed_K4Np.reshape(k4, np_ // 4, 4).astype(jnp.uint32)
  w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
  return jax.lax.bitcast_convert_type(w, jnp.int32)


def unpack_2bit(packed: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Inverse of `pack_2bit`: returns int8 codes of the original `shape` = (K, N).

  `packed` is the uint8 form [K4, Np] or the int32 word form [K4, Np/4] (`words_2bit`).
  """
  if packed.ndim != 2 or packed.dtype not in (jnp.uint8, jnp.int32):
    raise ValueError(f"unpack_2bit: packed must be a 2-D uint8 [K4, Np] or int32 [K4, Np/4] "
                     f"array, got {packed.dtype} {tuple(packed.shape)}")
  k, n = shape
  if packed.dtype == jnp.int32:
    k4, n4 = packed.shape
    if k > 4 * k4 or n > 4 * n4:
      raise ValueError(f"unpack_2bit: words of shape {tuple(packed.shape)} cannot hold {shape}")
    sh = (8 * jnp.arange(4, dtype=jnp.int32)[None, :] + 2 * jnp.arange(4, dtype=jnp.int32)[:, None])
    planes = (packed[None, None] >> sh[:, :, None, None]) & 3           # [j, i, r, col]
    c = planes.transpose(0, 2, 1, 3).reshape(4 * k4, 4 * n4)            # [j*K4 + r, i*N4 + col]
    return (c[:k, :n] - 1).astype(jnp.int8)
  k4, np_ = packed.shape
  if np_ % 4 or k > 4 * k4 or n > np_:
    raise ValueError(f"unpack_2bit: packed shape {tuple(packed.shape)} cannot hold shape {shape}")
  n4 = np_ // 4
  b = packed.astype(jnp.int32).reshape(k4, n4, 4)                       # [r, col, i]
  planes = jnp.stack([(b >> (2 * j)) & 3 for j in range(4)], axis=0)  # [j, r, col, i]
  c = planes.transpose(0, 1, 3, 2).reshape(4 * k4, np_)                 # [j*K4 + r, i*N4 + col]
  return (c[:k, :n] - 1).astype(jnp.int8)


def pack_base3(codes: jax.Array) -> jax.Array:
  """Packs ternary codes of any shape into bytes, 5 trits per byte (1.6 bits per weight)."""
  _check_codes(codes, codes.ndim, "pack_base3")
  flat = codes.reshape(-1).astype(jnp.int32) + 1
  n = flat.shape[0]
  nb = -(-n // 5)
  flat = jnp.pad(flat, (0, 5 * nb - n), constant_values=1).reshape(nb, 5)
  powers = jnp.asarray([1, 3, 9, 27, 81], jnp.int32)
  return jnp.sum(flat * powers[None, :], axis=1).astype(jnp.uint8)


def unpack_base3(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `pack_base3`: int8 codes of `shape`."""
  if packed.ndim != 1 or packed.dtype != jnp.uint8:
    raise ValueError(f"unpack_base3: packed must be a 1-D uint8 array, got {packed.dtype} "
                     f"{tuple(packed.shape)}")
  n = math.prod(shape)
  if packed.shape[0] != -(-n // 5):
    raise ValueError(f"unpack_base3: {packed.shape[0]} bytes do not hold shape {shape} "
                     f"(need {-(-n // 5)})")
  b = packed.astype(jnp.int32)
  trits = []
  for _ in range(5):
    trits.append(b % 3)
    b = b // 3
  flat = jnp.stack(trits, axis=1).reshape(-1)[:n]
  return (flat - 1).astype(jnp.int8).reshape(shape)


@struct.dataclass
class PackedTernary:
  """A ternary weight [K, N] in the planar 2-bit layout with its per-tensor scale.

  Attributes:
    packed: uint8 [Kp/4, Np] or the same bytes as int32 words [Kp/4, Np/4] (see module docstring;
      `as_words` converts, and the kernels want words).
    scale: float32 scalar gamma; the weight is codes * scale.
    shape: static (K, N) before padding.
  """
  packed: jax.Array
  scale: jax.Array
  shape: tuple[int, int] = struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    """Bytes of the packed weights plus the scale."""
    return int(self.packed.size) * self.packed.dtype.itemsize + 4

  def codes(self) -> jax.Array:
    """int8 codes [K, N] in {-1, 0, 1}."""
    return unpack_2bit(self.packed, self.shape)


def export_ternary(w: jax.Array, k_axes: int = 1, align: int = 32, eps: float = WEIGHT_EPS
                   ) -> PackedTernary:
  """Ternarizes a latent weight (absmean, per tensor) and packs it in the planar 2-bit layout.

  `w` may have more than two dims (an einsum kernel): its first `k_axes` dims are the contracted
  (input) ones and are flattened to K, the rest to N, e.g. a [D, N, H] query kernel with k_axes=1
  becomes [D, N*H].
  """
  if not isinstance(k_axes, int) or not 1 <= k_axes < max(w.ndim, 2):
    raise ValueError(f"export_ternary: k_axes must be in [1, {w.ndim - 1}] for a weight of shape "
                     f"{tuple(w.shape)}, got {k_axes!r}")
  k = math.prod(w.shape[:k_axes])
  n = math.prod(w.shape[k_axes:])
  codes, gamma = ternary_weight_codes(jnp.asarray(w).reshape(k, n), eps)
  return PackedTernary(packed=pack_2bit(codes, align), scale=gamma.astype(jnp.float32),
                       shape=(int(k), int(n)))


def as_words(p: PackedTernary) -> PackedTernary:
  """`p` with its packed bytes held as int32 words [K4, N4] (no-op when they already are).

  Do this once when loading weights for inference: the kernels read words, and a uint8 `packed`
  costs an extra pass over the weight on every call.
  """
  if p.packed.dtype == jnp.int32:
    return p
  return p.replace(packed=words_2bit(p.packed))


def dequantize(p: PackedTernary) -> jax.Array:
  """float32 [K, N] weight codes * scale."""
  return p.codes().astype(jnp.float32) * p.scale
