"""Token-axis bit packing of small integer codes, the layout the quantized decode kernels read.

Used by the KIVI (arXiv 2402.02750) and TurboQuant (arXiv 2504.19874) KV caches for the layout that
`pallas_kernels/quant_decode_attention.py` reads; no paper prescribes a packing, so this is our choice:

* Codes of `bits` in {2, 4, 8} bits (3-bit codes are stored in 4-bit fields) are packed FOUR PER WORD,
  along the TOKEN axis: word dtype uint8 for 2 bits, uint16 for 4 bits, uint32 for 8 bits.
* Tokens are taken in packing groups of 64 (`GROUP_TOKENS`); inside group g, packed row
  `r = 16 g + t` (t in 0..15) holds tokens `64 g + 16 j + t` for field j = 0..3 in bits
  `[j*bits, (j+1)*bits)`. So `words[..., r, ...]` has the same trailing shape as one token's codes,
  and a kernel that loads the 16 packed rows of a group and extracts field j gets the codes of 16
  CONSECUTIVE tokens `64 g + 16 j + [0, 16)` for all channels at once: shift + mask, no shuffles,
  and tiles of >= 16 rows for the tensor-core dots regardless of the head dimension.
* Token axis: `axis` (default -3, i.e. [..., S, K, D] like the dense cache's [B, S, K, D]); S must be a
  multiple of 64 (callers pad; the caches allocate max_len rounded up to 64).
* Writing ONE new token is a read-modify-write of one word per channel (`write_token`).
* Per-token side data (TurboQuant norms) is stored in the same "slot order" ([..., S/4, ..., 4]:
  entry [r, ..., j] belongs to the token in field j of packed row r; `to_slot_order`), so a kernel
  reads the norms of field j of R packed rows as one strided [R] vector.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["GROUP_TOKENS", "FIELDS", "word_dtype", "storage_bits", "pack_tokens", "unpack_tokens",
           "write_token", "to_slot_order", "from_slot_order", "token_slot"]

GROUP_TOKENS = 64
FIELDS = 4
_ROWS = GROUP_TOKENS // FIELDS  # 16 packed rows per group


def storage_bits(bits: int) -> int:
  """Field width used to store `bits`-bit codes (3 -> 4)."""
  if bits not in (1, 2, 3, 4, 8):
    raise ValueError(f"bits must be one of 1, 2, 3, 4, 8, got {bits!r}")
  return {1: 2, 2: 2, 3: 4, 4: 4, 8: 8}[bits]


def word_dtype(bits: int):
  """Word dtype holding four fields of `storage_bits(bits)` bits."""
  return {2: jnp.uint8, 4: jnp.uint16, 8: jnp.uint32}[storage_bits(bits)]


def _norm_axis(axis: int, ndim: int) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} out of range for an array of rank {ndim}")
  return axis % ndim


def pack_tokens(codes, bits: int, axis: int = -3):
  """Packs integer codes in [0, 2^bits) along the token `axis` (length a multiple of 64).

  Returns words of dtype `word_dtype(bits)` whose `axis` has length S / 4.
  """
  sb = storage_bits(bits)
  ax = _norm_axis(axis, codes.ndim)
  S = codes.shape[ax]
  if S % GROUP_TOKENS:
    raise ValueError(f"token axis length must be a multiple of {GROUP_TOKENS}, got {S}")
  wdt = word_dtype(bits)
  c = jnp.moveaxis(codes, ax, 0).astype(jnp.uint32)
  rest = c.shape[1:]
  c = c.reshape((S // GROUP_TOKENS, FIELDS, _ROWS) + rest)
  w = jnp.zeros((S // GROUP_TOKENS, _ROWS) + rest, jnp.uint32)
  for j in range(FIELDS):
    w = w | (c[:, j] << (j * sb))
  w = w.reshape((S // FIELDS,) + rest).astype(wdt)
  return jnp.moveaxis(w, 0, ax)


def unpack_tokens(words, bits: int, axis: int = -3):
  """Inverse of `pack_tokens`: returns uint8 codes with the token `axis` 4x longer."""
  sb = storage_bits(bits)
  ax = _norm_axis(axis, words.ndim)
  R = words.shape[ax]
  if R % _ROWS:
    raise ValueError(f"packed axis length must be a multiple of {_ROWS}, got {R}")
  w = jnp.moveaxis(words, ax, 0).astype(jnp.uint32)
  rest = w.shape[1:]
  w = w.reshape((R // _ROWS, _ROWS) + rest)
  mask = (1 << sb) - 1
  c = jnp.stack([(w >> (j * sb)) & mask for j in range(FIELDS)], axis=1)
  c = c.reshape((R * FIELDS,) + rest).astype(jnp.uint8)
  return jnp.moveaxis(c, 0, ax)


def write_token(words, codes_BKD, positions_B, bits: int):
  """Writes one token's codes per batch row into words [B, S/4, K, D] at token positions_B [B].

  A read-modify-write of the word holding each (row, channel): O(K*D) per row.
  """
  sb = storage_bits(bits)
  positions_B = jnp.asarray(positions_B, jnp.int32)
  row_B = (positions_B // GROUP_TOKENS) * _ROWS + positions_B % _ROWS
  shift_B = ((positions_B % GROUP_TOKENS) // _ROWS) * sb
  mask = (1 << sb) - 1
  b_idx = jnp.arange(words.shape[0])
  old_BKD = words[b_idx, row_B].astype(jnp.uint32)
  sh = shift_B.astype(jnp.uint32)[:, None, None]
  new_BKD = (old_BKD & ~(jnp.uint32(mask) << sh)) | ((codes_BKD.astype(jnp.uint32) & mask) << sh)
  return words.at[b_idx, row_B].set(new_BKD.astype(words.dtype))


def token_slot(positions):
  """(packed row, field) of token positions (int arrays)."""
  positions = jnp.asarray(positions, jnp.int32)
  row = (positions // GROUP_TOKENS) * _ROWS + positions % _ROWS
  field = (positions % GROUP_TOKENS) // _ROWS
  return row, field


def to_slot_order(x, axis: int = 1):
  """Per-token data x [..., S, ...] (token `axis`, S % 64 == 0) -> [..., S/4, ..., 4] (field last)."""
  ax = _norm_axis(axis, x.ndim)
  S = x.shape[ax]
  if S % GROUP_TOKENS:
    raise ValueError(f"token axis length must be a multiple of {GROUP_TOKENS}, got {S}")
  y = jnp.moveaxis(x, ax, -1)
  lead = y.shape[:-1]
  y = y.reshape(lead + (S // GROUP_TOKENS, FIELDS, _ROWS))
  y = jnp.swapaxes(y, -1, -2).reshape(lead + (S // FIELDS, FIELDS))
  return jnp.moveaxis(y, -2, ax)


def from_slot_order(y, axis: int = 1):
  """Inverse of `to_slot_order`."""
  ax = _norm_axis(axis, y.ndim - 1)
  R = y.shape[ax]
  z = jnp.moveaxis(y, ax, -2)
  lead = z.shape[:-2]
  z = z.reshape(lead + (R // _ROWS, _ROWS, FIELDS))
  z = jnp.swapaxes(z, -1, -2).reshape(lead + (R * FIELDS,))
  return jnp.moveaxis(z, -1, ax)
