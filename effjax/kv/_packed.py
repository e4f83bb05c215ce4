"""Shared machinery of the quantized KV caches (`effjax.kv.turboquant`, `effjax.kv.kivi`).

No paper of its own; it serves TurboQuant (arXiv 2504.19874) and KIVI (arXiv 2402.02750) caches:

* token-axis packed codes (`effjax.quant.token_packing`, the layout the decode kernels in
  `pallas_kernels/quant_decode_attention.py` read): scattered writes of a batch of tokens at ragged
  positions (`write_tokens`) and gathers of a few tokens' codes (`read_tokens`);
* the full-precision ring buffer of recent tokens (slot = position % W) with the positions it
  holds (`ring_write`);
* the softmax over the union of a quantized segment and the ring segment, and the log-sum-exp
  merge used by the kernel path (`merge_lse`).

Requirement (documented in the caches): within ONE update a row's positions are distinct (true for
prefill, decode and speculative verification).
"""

from __future__ import annotations

import jax.numpy as jnp

from effjax.kv.base import check_new_kv
from effjax.quant import packing, token_packing
from effjax.quant.turboquant import validate

GT = token_packing.GROUP_TOKENS  # tokens per packing group (64)
_ROWS = GT // token_packing.FIELDS  # packed rows per group (16)


def padded_len(max_len: int) -> int:
  """max_len rounded up to a multiple of the 64-token packing group."""
  return -(-max_len // GT) * GT


def _row_field(pos):
  return (pos // GT) * _ROWS + pos % _ROWS, (pos % GT) // _ROWS


def write_tokens(words_BRKD, codes_BTKD, pos_BT, valid_BT, bits: int):
  """Writes codes of T tokens per row at token positions `pos_BT` into packed words.

  A read-modify-write of the packed rows. T == 1 (a decode step): ONE gather + ONE scatter, the
  field's shift chosen per row. T > 1: one pass per field (4 passes): inside a pass every
  (row, packed word) is hit by at most one token because positions are distinct per row.
  Tokens with `valid_BT == False` (or positions past the end) are not written.
  """
  sb = token_packing.storage_bits(bits)
  B, R = words_BRKD.shape[:2]
  row_BT, field_BT = _row_field(pos_BT.astype(jnp.int32))
  b_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], pos_BT.shape)
  ok_BT = valid_BT & (pos_BT >= 0) & (row_BT < R)
  codes = codes_BTKD.astype(jnp.uint32)
  mask = jnp.uint32((1 << sb) - 1)
  if pos_BT.shape[1] == 1:
    idx_BT = jnp.where(ok_BT, row_BT, R)  # R = out of range -> dropped
    old = words_BRKD.at[b_BT, idx_BT].get(mode="fill", fill_value=0).astype(jnp.uint32)
    sh = (field_BT * sb).astype(jnp.uint32)[:, :, None, None]
    new = (old & ~(mask << sh)) | ((codes & mask) << sh)
    return words_BRKD.at[b_BT, idx_BT].set(new.astype(words_BRKD.dtype), mode="drop")
  for j in range(token_packing.FIELDS):
    idx_BT = jnp.where(ok_BT & (field_BT == j), row_BT, R)  # R = out of range -> dropped
    old = words_BRKD.at[b_BT, idx_BT].get(mode="fill", fill_value=0).astype(jnp.uint32)
    sh = jnp.uint32(j * sb)
    new = (old & ~(mask << sh)) | ((codes & mask) << sh)
    words_BRKD = words_BRKD.at[b_BT, idx_BT].set(new.astype(words_BRKD.dtype), mode="drop")
  return words_BRKD


def read_tokens(words_BRKD, pos_BW, bits: int):
  """Codes (uint8 [B, W, K, D]) of the tokens at positions `pos_BW` (clipped into range)."""
  sb = token_packing.storage_bits(bits)
  B, R = words_BRKD.shape[:2]
  pos = jnp.clip(pos_BW.astype(jnp.int32), 0, R * token_packing.FIELDS - 1)
  row_BW, field_BW = _row_field(pos)
  b_BW = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], pos.shape)
  w = words_BRKD[b_BW, row_BW].astype(jnp.uint32)
  sh = (field_BW * sb).astype(jnp.uint32)[:, :, None, None]
  return ((w >> sh) & jnp.uint32((1 << sb) - 1)).astype(jnp.uint8)


def scatter_tokens(x_BS, new_BT, pos_BT, valid_BT):
  """x[b, pos[b, t]] = new[b, t] for valid tokens (any trailing shape); others dropped."""
  B, S = x_BS.shape[:2]
  b_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], pos_BT.shape)
  idx = jnp.where(valid_BT & (pos_BT >= 0), pos_BT.astype(jnp.int32), S)
  return x_BS.at[b_BT, idx].set(new_BT.astype(x_BS.dtype), mode="drop")


def ring_write(ring_k, ring_v, ring_pos_BW, k_BTKH, v_BTKH, pos_BT):
  """Stores the newest tokens of the update in the ring (slot = position % W).

  Only the tokens with position > max_t(pos) - W of their row are written (their slots are
  distinct); older tokens of a long update are not kept in full precision.
  """
  W = ring_pos_BW.shape[1]
  if W == 0:
    return ring_k, ring_v, ring_pos_BW
  pos = pos_BT.astype(jnp.int32)
  keep = (pos >= 0) & (pos > (jnp.max(pos, axis=1, keepdims=True) - W))
  slot = pos % W
  ring_k = scatter_tokens(ring_k, k_BTKH, slot, keep)
  ring_v = scatter_tokens(ring_v, v_BTKH, slot, keep)
  ring_pos_BW = scatter_tokens(ring_pos_BW, pos, slot, keep)
  # A rewritten position that is not kept must not stay visible with its old (pre-rollback) value.
  stale = jnp.take_along_axis(ring_pos_BW, slot, axis=1) == pos
  ring_pos_BW = scatter_tokens(ring_pos_BW, jnp.full_like(pos, -1), slot, ~keep & stale & (pos >= 0))
  return ring_k, ring_v, ring_pos_BW


def ring_held_BS(ring_pos_BW, S: int):
  """held[b, s]: the ring of row b holds position s in full precision (W > 0)."""
  W = ring_pos_BW.shape[1]
  s = jnp.arange(S, dtype=jnp.int32)
  return jnp.take(ring_pos_BW, s % W, axis=1) == s[None, :]


def softmax_two_segments(s1_BKGTS, m1_BTS, s2_BKGTW, m2_BTW):
  """Softmax over the union of two masked score sets; returns (p1, p2, inv_denominator)."""
  s1 = jnp.where(m1_BTS[:, None, None], s1_BKGTS, -jnp.inf)
  s2 = jnp.where(m2_BTW[:, None, None], s2_BKGTW, -jnp.inf)
  m = jnp.max(s1, axis=-1, keepdims=True, initial=-jnp.inf)
  m = jnp.maximum(m, jnp.max(s2, axis=-1, keepdims=True, initial=-jnp.inf))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p1, p2 = jnp.exp(s1 - m), jnp.exp(s2 - m)
  den = jnp.sum(p1, axis=-1, keepdims=True) + jnp.sum(p2, axis=-1, keepdims=True)
  return p1, p2, 1.0 / jnp.where(den == 0, 1.0, den)


def merge_lse(o1_BNH, lse1_BN, o2_BNH, lse2_BN):
  """Merges two normalised attention outputs over disjoint key sets by their log-sum-exps."""
  m = jnp.maximum(lse1_BN, lse2_BN)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w1, w2 = jnp.exp(lse1_BN - m), jnp.exp(lse2_BN - m)
  den = w1 + w2
  out = (o1_BNH * w1[..., None] + o2_BNH * w2[..., None]) / jnp.where(den > 0, den, 1.0)[..., None]
  return out


def dense_lse(q_BNH, k_BWKH, v_BWKH, mask_BW, scale):
  """Small float32 GQA attention of one query per row over W keys: (out [B,N,H], lse [B,N])."""
  B, N, H = q_BNH.shape
  K = k_BWKH.shape[2]
  G = N // K
  q = q_BNH.astype(jnp.float32).reshape(B, K, G, H)
  s = jnp.einsum("BKGH,BWKH->BKGW", q, k_BWKH.astype(jnp.float32)) * scale
  s = jnp.where(mask_BW[:, None, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  den = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("BKGW,BWKH->BKGH", p, v_BWKH.astype(jnp.float32))
  o = o / jnp.where(den > 0, den, 1.0)
  lse = jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)[..., 0]
  return o.reshape(B, N, H), lse.reshape(B, N)


def scatter_slots(x_BR_4, new_BT, pos_BT, valid_BT):
  """Writes per-token side data stored in token-packing slot order ([B, S/4, ..., 4], see
  `token_packing.to_slot_order`): x[b, row(p), ..., field(p)] = new[b, t]; invalid tokens dropped."""
  B, R = x_BR_4.shape[:2]
  row_BT, field_BT = token_packing.token_slot(pos_BT)
  b_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], pos_BT.shape)
  idx = jnp.where(valid_BT & (pos_BT >= 0), row_BT, R)
  # Advanced indices on axes 0, 1 and -1 with slices between: the indexed shape is [B, T, ...]
  # (numpy rules), so this is one scatter into x in place, no transposed copy of x.
  ix = (b_BT, idx) + (slice(None),) * (x_BR_4.ndim - 3) + (field_BT,)
  return x_BR_4.at[ix].set(new_BT.astype(x_BR_4.dtype), mode="drop")


def gather_slots(x_BR_4, pos_BW):
  """Per-token side data [B, W, ...] at positions pos_BW (clipped) from slot order."""
  B, R = x_BR_4.shape[:2]
  pos = jnp.clip(pos_BW.astype(jnp.int32), 0, 4 * R - 1)
  row, field = token_packing.token_slot(pos)
  b = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], pos.shape)
  return x_BR_4[(b, row) + (slice(None),) * (x_BR_4.ndim - 3) + (field,)]


def check_new_finite(cache_name: str, name: str, x_BTKH, positions_BT, ring_shape):
  """`check_new_kv` against the ring's `[B, W, K, H]` shape, plus a NaN/Inf check outside jit."""
  B, _, K, H = ring_shape
  check_new_kv(cache_name, name, x_BTKH, positions_BT, batch=B, kv_heads=K, head_dim=H)
  if not packing.is_traced(x_BTKH):
    try:
      validate(x_BTKH)
    except ValueError as e:
      raise ValueError(f"{cache_name}.update: {name}: {e}") from None
