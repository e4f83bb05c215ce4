"""KIVI KV cache: keys quantized per channel in groups of 32 tokens, values per token, 2/4 bits.

Paper: "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (Liu, Yuan, Jin, Zhong, Xu,
Braverman, Chen, Hu; arXiv 2402.02750). Implements Algorithm 1 with the quantizer of Eq. (1)
(`effjax.quant.kivi`: asymmetric round-to-nearest with a float16 scale and zero-point):

* keys: per-channel quantization over groups of G = 32 consecutive positions; a group is
  quantized once all 32 of its positions are written (until then its keys stay in full precision),
* values: per-token quantization (one scale/zero per token and 32 channels), on write,
* a full-precision residual of the R most recent positions (the paper's residual length; R >= 32
  so that an incomplete key group always lies inside it), kept in a ring buffer (slot = pos % R).

A query at position p reads positions (p - R, p] from the ring when the ring holds them and every
other position <= p from the codes. Within one multi-token update (prefill) only the row's last R
written positions enter the ring, so earlier prefill queries read older positions of their own
window from the codes (prefill attention is itself quantized; pessimistic vs. the paper's
implementation, which attends the prefill in full precision).

Choices the paper leaves open, written down here:
* Key groups are aligned to absolute positions (group g = positions 32g .. 32g+31).
* When a group completes, its 32 keys are taken from the update, else from the ring, else (only
  after a rollback past the ring) from the group's previous codes, dequantized; `rollback` itself
  only resets `lengths` (O(B)): stale codes of rolled-back positions are never read because
  positions are rewritten before any query at or after them attends.
* Codes are stored in the token-packed layout of `effjax.quant.token_packing` (what
  `pallas_kernels.quant_decode_attention.kivi_decode_attention` reads). On an NVIDIA GPU a
  single-token decode calls that kernel for positions <= p - R and merges the residual window by
  log-sum-exp. The portable jnp path (CPU, prefill) DEQUANTIZES the whole context to float32 per
  attend call (reference path, not a fast path).

Requirements: head_dim a multiple of 32 (value channel groups); positions distinct within one
update of a row. Bad input: bits not in {2, 4}, residual < 32, NaN/Inf keys or values (eager
calls) raise ValueError naming the argument.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from effjax.kv import _packed
from effjax.kv.base import check_attend_args
from effjax.quant import kivi as kivi_lib
from effjax.quant import token_packing

__all__ = ["KIVICache"]

_Q_BLOCK = 256
GROUP = kivi_lib.GROUP
_IMPLS = ("auto", "jnp", "kernel", "interpret")


@flax.struct.dataclass
class KIVICache:
  """Per-layer KIVI KV cache (see module docstring). Build with `KIVICache.init`."""
  k_codes: jax.Array    # words [B, S64/4, K, H]
  k_scale: jax.Array    # float16 [B, S64/32, K, H]
  k_zero: jax.Array
  v_codes: jax.Array    # words [B, S64/4, K, H]
  v_scale: jax.Array    # float16 [B, S64/4, K, H/32, 4] (token-packing slot order)
  v_zero: jax.Array
  ring_k: jax.Array     # [B, R, K, H]
  ring_v: jax.Array
  ring_pos: jax.Array   # int32 [B, R] (-1 = empty)
  lengths: jax.Array
  capacity: int = flax.struct.field(pytree_node=False)
  bits: int = flax.struct.field(pytree_node=False)
  impl: str = flax.struct.field(pytree_node=False)

  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16,
           *, bits: int = 2, residual: int = 128, impl: str = "auto") -> "KIVICache":
    """An empty cache for positions `0 .. max_len - 1`.

    Args:
      batch, max_len, num_kv_heads, head_dim: sizes (head_dim a multiple of 32).
      dtype: storage dtype of the full-precision residual.
      bits: 2 or 4.
      residual: R >= 32 recent positions kept in full precision.
      impl: "auto" (Pallas kernel for GPU single-token decode), "jnp", "kernel", "interpret".
    """
    for name, v, lo in (("batch", batch, 1), ("max_len", max_len, 1),
                        ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1),
                        ("residual", residual, GROUP)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"KIVICache.init: {name} must be an int >= {lo}, got {v!r}")
    if bits not in (2, 4) or isinstance(bits, bool):
      raise ValueError(f"KIVICache.init: bits must be 2 or 4, got {bits!r}")
    if head_dim % GROUP:
      raise ValueError(f"KIVICache.init: head_dim must be a multiple of {GROUP}, got {head_dim}")
    if impl not in _IMPLS:
      raise ValueError(f"KIVICache.init: impl must be one of {_IMPLS}, got {impl!r}")
    B, K, H, R = batch, num_kv_heads, head_dim, residual
    S64 = _packed.padded_len(max_len)
    wd = token_packing.word_dtype(bits)
    f16 = jnp.float16
    return cls(k_codes=jnp.zeros((B, S64 // 4, K, H), wd),
               k_scale=jnp.ones((B, S64 // GROUP, K, H), f16),
               k_zero=jnp.zeros((B, S64 // GROUP, K, H), f16),
               v_codes=jnp.zeros((B, S64 // 4, K, H), wd),
               v_scale=jnp.ones((B, S64 // 4, K, H // GROUP, 4), f16),
               v_zero=jnp.zeros((B, S64 // 4, K, H // GROUP, 4), f16),
               ring_k=jnp.zeros((B, R, K, H), dtype), ring_v=jnp.zeros((B, R, K, H), dtype),
               ring_pos=jnp.full((B, R), -1, jnp.int32), lengths=jnp.zeros((B,), jnp.int32),
               capacity=int(max_len), bits=int(bits), impl=impl)

  @property
  def max_len(self) -> int:
    """Number of positions the cache holds (static)."""
    return self.capacity

  @property
  def residual(self) -> int:
    return self.ring_pos.shape[1]

  def nbytes(self) -> int:
    """Device bytes of every array of the cache (codes, scales, zeros, residual ring, lengths)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self)))

  def bytes_per_token(self) -> float:
    """Stored bytes per position and row (codes + scales + zeros of K and V, all kv heads)."""
    arrs = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero)
    B, S64 = self.ring_k.shape[0], _packed.padded_len(self.capacity)
    return sum(x.size * x.dtype.itemsize for x in arrs) / (B * S64)

  # ---- update ---------------------------------------------------------------------------------
  def _check_new(self, name, x_BTKH, positions_BT):
    _packed.check_new_finite("KIVICache", name, x_BTKH, positions_BT, self.ring_k.shape)

  def update(self, k_BTKH, v_BTKH, positions_BT) -> "KIVICache":
    """Writes new keys/values: values quantized per token now, key groups once complete."""
    self._check_new("k_BTKH", k_BTKH, positions_BT)
    self._check_new("v_BTKH", v_BTKH, positions_BT)
    if not jnp.issubdtype(positions_BT.dtype, jnp.integer):
      raise TypeError(f"KIVICache.update: positions_BT must be integer, got {positions_BT.dtype}")
    B, R, K, H = self.ring_k.shape
    T = positions_BT.shape[1]
    S64 = _packed.padded_len(self.capacity)
    pos = positions_BT.astype(jnp.int32)
    valid = (pos >= 0) & (pos < self.capacity)
    bits = self.bits
    b_idx = jnp.arange(B)[:, None]

    # Values: per-token quantization of the new tokens.
    vq = kivi_lib.quantize_values(v_BTKH.astype(jnp.float32), bits)
    v_codes_new = token_packing.unpack_tokens(vq.codes, bits, axis=1)[:, :T]
    v_codes = _packed.write_tokens(self.v_codes, v_codes_new, pos, valid, bits)
    vs_new, vz_new = kivi_lib.value_scales(vq)
    v_scale = _packed.scatter_slots(self.v_scale, vs_new[:, :T], pos, valid)
    v_zero = _packed.scatter_slots(self.v_zero, vz_new[:, :T], pos, valid)

    # Keys: (re)quantize every 32-position group this update touches and completes.
    nG = -(-T // GROUP) + 1
    big = jnp.int32(2 ** 30)
    pmin = jnp.min(jnp.where(valid, pos, big), axis=1)
    pmax = jnp.max(jnp.where(valid, pos, -1), axis=1)
    g_BG = jnp.minimum(pmin, S64)[:, None] // GROUP + jnp.arange(nG, dtype=jnp.int32)[None, :]
    gpos_BM = (g_BG[:, :, None] * GROUP + jnp.arange(GROUP, dtype=jnp.int32)[None, None, :]
               ).reshape(B, nG * GROUP)
    match_BMT = (gpos_BM[:, :, None] == pos[:, None, :]) & valid[:, None, :]
    in_upd_BM = jnp.any(match_BMT, axis=2)
    k_upd = jnp.take_along_axis(k_BTKH.astype(jnp.float32),
                                jnp.argmax(match_BMT, axis=2)[:, :, None, None], axis=1)
    slot = jnp.mod(gpos_BM, R)
    held = jnp.take_along_axis(self.ring_pos, slot, axis=1) == gpos_BM
    k_ring = self.ring_k[b_idx, slot].astype(jnp.float32)
    k_old = self._dequant_keys_at(gpos_BM)
    src = jnp.where(in_upd_BM[..., None, None], k_upd,
                    jnp.where(held[..., None, None], k_ring, k_old))
    touched_BG = jnp.any(in_upd_BM.reshape(B, nG, GROUP), axis=2)
    sealed_BG = touched_BG & (g_BG * GROUP + GROUP - 1 <= pmax[:, None]) & (g_BG * GROUP < S64)
    kq = kivi_lib.quantize_keys(src.reshape(B * nG, GROUP, K, H), bits)
    k_codes_new = token_packing.unpack_tokens(kq.codes, bits, axis=1)[:, :GROUP]
    k_codes_new = k_codes_new.reshape(B, nG * GROUP, K, H)
    seal_BM = jnp.repeat(sealed_BG, GROUP, axis=1)
    k_codes = _packed.write_tokens(self.k_codes, k_codes_new, gpos_BM, seal_BM, bits)
    k_scale = _packed.scatter_tokens(self.k_scale, kq.scale[:, 0].reshape(B, nG, K, H), g_BG,
                                     sealed_BG)
    k_zero = _packed.scatter_tokens(self.k_zero, kq.zero[:, 0].reshape(B, nG, K, H), g_BG,
                                    sealed_BG)

    rpos = jnp.where(valid, pos, -1)
    ring_k, ring_v, ring_pos = _packed.ring_write(self.ring_k, self.ring_v, self.ring_pos,
                                                  k_BTKH, v_BTKH, rpos)
    lengths = jnp.maximum(self.lengths, pmax + 1)
    return self.replace(k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, v_codes=v_codes,
                        v_scale=v_scale, v_zero=v_zero, ring_k=ring_k, ring_v=ring_v,
                        ring_pos=ring_pos, lengths=lengths)

  def rollback(self, lengths_B) -> "KIVICache":
    """Truncates row b to its first `lengths_B[b]` positions (O(B); see module docstring)."""
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    if lengths_B.shape != self.lengths.shape:
      raise ValueError(f"KIVICache.rollback: lengths_B must be {self.lengths.shape}, got "
                       f"{lengths_B.shape}")
    return self.replace(lengths=lengths_B)

  # ---- dequantization helpers -----------------------------------------------------------------
  def _dequant_keys_at(self, pos_BM):
    b = jnp.arange(pos_BM.shape[0])[:, None]
    p = jnp.clip(pos_BM, 0, _packed.padded_len(self.capacity) - 1)
    c = _packed.read_tokens(self.k_codes, p, self.bits).astype(jnp.float32)
    g = p // GROUP
    return c * self.k_scale[b, g].astype(jnp.float32) + self.k_zero[b, g].astype(jnp.float32)

  def _dequant_values_at(self, pos_BM):
    B, M = pos_BM.shape
    K, H = self.ring_k.shape[2:]
    p = jnp.clip(pos_BM, 0, _packed.padded_len(self.capacity) - 1)
    c = _packed.read_tokens(self.v_codes, p, self.bits).astype(jnp.float32)
    c = c.reshape(B, M, K, H // GROUP, GROUP)
    x = (c * _packed.gather_slots(self.v_scale, p).astype(jnp.float32)[..., None]
         + _packed.gather_slots(self.v_zero, p).astype(jnp.float32)[..., None])
    return x.reshape(B, M, K, H)

  def _tensors(self):
    S64 = _packed.padded_len(self.capacity)
    kt = kivi_lib.KIVITensor(codes=self.k_codes, scale=self.k_scale, zero=self.k_zero, length=S64,
                             bits=self.bits, per_channel=True)
    vt = kivi_lib.KIVITensor(codes=self.v_codes, scale=self.v_scale, zero=self.v_zero, length=S64,
                             bits=self.bits, per_channel=False)
    return kt, vt

  def dequantized(self):
    """(keys, values) float32 [B, S64, K, H] from the codes (for tests and the jnp path)."""
    kt, vt = self._tensors()
    return kivi_lib.dequantize(kt), kivi_lib.dequantize(vt)

  # ---- attend ---------------------------------------------------------------------------------
  def attend(self, q_BTNH, positions_BT, *, sm_scale: float | None = None):
    """Causal-by-position attention over the codes and the full-precision residual.

    Args:
      q_BTNH: queries [batch, T, heads, head_dim], heads a multiple of the kv heads.
      positions_BT: int positions of the queries.
      sm_scale: logit scale, default head_dim ** -0.5.

    Returns:
      [batch, T, heads, head_dim] in q's dtype.
    """
    B, R, K, H = self.ring_k.shape
    T, N = check_attend_args("KIVICache", q_BTNH, positions_BT, batch=B, kv_heads=K,
                             head_dim=H)
    scale = H ** -0.5 if sm_scale is None else float(sm_scale)
    pos = positions_BT.astype(jnp.int32)
    nc = H // GROUP
    kernel_ok = nc & (nc - 1) == 0
    use_kernel = T == 1 and (self.impl in ("kernel", "interpret") or (
        self.impl == "auto" and jax.default_backend() == "gpu" and kernel_ok))
    if use_kernel:
      if not kernel_ok:
        raise ValueError(f"KIVICache.attend: the kernel needs head_dim = 32 * a power of two, got "
                         f"{H}")
      return self._attend_kernel(q_BTNH[:, 0], pos[:, 0], scale)[:, None].astype(q_BTNH.dtype)
    return self._attend_jnp(q_BTNH, pos, scale).astype(q_BTNH.dtype)

  def _attend_jnp(self, q_BTNH, pos_BT, scale):
    B, R, K, H = self.ring_k.shape
    _, T, N, _ = q_BTNH.shape
    G = N // K
    k_hat, v_hat = self.dequantized()
    S64 = k_hat.shape[1]
    held_BS = _packed.ring_held_BS(self.ring_pos, S64)
    ring_k = self.ring_k.astype(jnp.float32)
    ring_v = self.ring_v.astype(jnp.float32)

    def block(q_BTKGH, p_BT):
      s_q = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_hat)
      s_idx = jnp.arange(S64, dtype=jnp.int32)[None, None, :]
      p_BT1 = p_BT[:, :, None]
      m_q = (s_idx <= p_BT1) & ~((s_idx > p_BT1 - R) & held_BS[:, None, :])
      s_r = jnp.einsum("BTKGH,BWKH->BKGTW", q_BTKGH, ring_k)
      rp = self.ring_pos[:, None, :]
      m_r = (rp >= 0) & (rp <= p_BT1) & (rp > p_BT1 - R)
      p1, p2, inv = _packed.softmax_two_segments(s_q * scale, m_q, s_r * scale, m_r)
      o = (jnp.einsum("BKGTS,BSKH->BTKGH", p1, v_hat)
           + jnp.einsum("BKGTW,BWKH->BTKGH", p2, ring_v))
      return o * jnp.transpose(inv, (0, 3, 1, 2, 4))

    q_BTKGH = q_BTNH.astype(jnp.float32).reshape(B, T, K, G, H)
    if T <= _Q_BLOCK:
      out = block(q_BTKGH, pos_BT)
    else:
      nb = -(-T // _Q_BLOCK)
      pad = nb * _Q_BLOCK - T
      qp = jnp.pad(q_BTKGH, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
      pp = jnp.pad(pos_BT, ((0, 0), (0, pad)))
      qn = jnp.moveaxis(qp.reshape(B, nb, _Q_BLOCK, K, G, H), 1, 0)
      pn = jnp.moveaxis(pp.reshape(B, nb, _Q_BLOCK), 1, 0)
      on = jax.lax.map(lambda a: block(a[0], a[1]), (qn, pn))
      out = jnp.moveaxis(on, 0, 1).reshape(B, nb * _Q_BLOCK, K, G, H)[:, :T]
    return out.reshape(B, T, N, H)

  def _attend_kernel(self, q_BNH, pos_B, scale):
    """Single-token decode: Pallas KIVI kernel over positions <= p - R, residual merged by LSE."""
    from pallas_kernels.quant_decode_attention import kivi_decode_attention
    B, R, K, H = self.ring_k.shape
    kt, vt = self._tensors()
    n_quant = jnp.maximum(pos_B - R + 1, 0)
    o_q, lse_q = kivi_decode_attention(q_BNH, kt, vt, n_quant, sm_scale=scale,
                                       interpret=self.impl == "interpret", return_lse=True)
    wpos = pos_B[:, None] - R + 1 + jnp.arange(R, dtype=jnp.int32)[None, :]
    slot = jnp.mod(wpos, R)
    held = jnp.take_along_axis(self.ring_pos, slot, axis=1) == wpos
    b = jnp.arange(B)[:, None]
    k_w = jnp.where(held[..., None, None], self.ring_k[b, slot].astype(jnp.float32),
                    self._dequant_keys_at(wpos))
    v_w = jnp.where(held[..., None, None], self.ring_v[b, slot].astype(jnp.float32),
                    self._dequant_values_at(wpos))
    o_w, lse_w = _packed.dense_lse(q_BNH, k_w, v_w, wpos >= 0, scale)
    return _packed.merge_lse(o_q.astype(jnp.float32), lse_q, o_w, lse_w)
