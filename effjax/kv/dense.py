"""The dense KV cache: keys and values stored as they are, one slot per absolute position.

No paper: this is the uncompressed reference of the `effjax.kv` protocol (see `effjax.kv.base`),
the cache every compressed or evicting cache is compared against. Slot `s` of row `b` holds the
key/value of position `s`, so

* `update` is a scatter at `[b, positions_BT[b, t]]` (rows may sit at different positions: ragged
  batches, speculative verification),
* `attend` is softmax(q·kᵀ·scale)·v over all `max_len` slots with the mask `s <= position(q)`
  (static shapes; unwritten or stale slots beyond a query's position are masked, never read as
  context),
* `rollback` only resets `lengths`: stale slots are overwritten before any query can see them.

`attend_impl` (a static field, set through `init(..., attend_impl=...)` or
`CacheConfig(DenseCache, options=(("attend_impl", "auto"),))`) picks the kernel of one-token
queries (decode steps): "xla" (the einsums above, reading all `max_len` slots), "pallas"
(`pallas_kernels.decode_attention`: split-K flash-decoding that reads only the `position + 1`
valid slots of each row; interpret mode off-GPU) or "auto" ("pallas" on a GPU when head_dim is a
power of two >= 16, else "xla"; the default). Multi-token calls always use the einsums. On an
H200 the kernel made a batch-1 decode step of a 1.24B model 7% faster at 2k context and 23%
faster at 32k (results/decode_bench.md). With the "pallas" kernel, `update_and_attend` (the
protocol's optional fusion, which the attention layer calls) of a one-token step writes the new
key/value inside the attention kernel (`decode_attention_append`) instead of a scatter.

GQA is computed without repeating K/V: query heads are grouped as `[K, G]` and the einsums read
each kv head once (`BTKGH,BSKH->BKGTS`). Scores and the softmax are float32; the cache is read in
its storage dtype with float32 accumulation (no float32 copy of the cache is made). Long
multi-token calls (prefill) are split into query blocks of `_Q_BLOCK` rows so the score tensor
stays `[B, K, G, _Q_BLOCK, S]`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from effjax.kv.base import check_attend_args, check_new_kv
from pallas_kernels.decode_attention import decode_attention, decode_attention_append

ATTEND_IMPLS = ("xla", "pallas", "auto")

_Q_BLOCK = 256


def _check_positive(name: str, v):
  if not isinstance(v, (int, np.integer)) or v <= 0:
    raise ValueError(f"DenseCache.init: {name} must be a positive int, got {v!r}")


@flax.struct.dataclass
class DenseCache:
  """Uncompressed per-layer KV cache (see module docstring).

  Attributes:
    k_BSKH: keys `[batch, max_len, kv_heads, head_dim]` (already RoPE'd).
    v_BSKH: values `[batch, max_len, kv_heads, head_dim]`.
    lengths: int32 `[batch]`, number of valid positions per row.
    attend_impl: kernel of one-token queries, one of ATTEND_IMPLS (static; module docstring).
  """
  k_BSKH: jax.Array
  v_BSKH: jax.Array
  lengths: jax.Array
  attend_impl: str = flax.struct.field(pytree_node=False, default="auto")

  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
           dtype=jnp.bfloat16, attend_impl: str = "auto") -> "DenseCache":
    """An empty cache (zeros, `lengths = 0`) holding positions `0 .. max_len - 1`.

    `attend_impl` ("xla", "pallas" or "auto") picks the decode-step attention kernel.
    """
    if attend_impl not in ATTEND_IMPLS:
      raise ValueError(f"DenseCache.init: attend_impl must be one of {ATTEND_IMPLS}, got "
                       f"{attend_impl!r}")
    for name, v in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim)):
      _check_positive(name, v)
    shape = (batch, max_len, num_kv_heads, head_dim)
    return cls(k_BSKH=jnp.zeros(shape, dtype), v_BSKH=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32), attend_impl=attend_impl)

  @property
  def max_len(self) -> int:
    """Number of position slots (static)."""
    return self.k_BSKH.shape[1]

  def _check_new(self, name, x_BTKH, positions_BT):
    B, _, K, H = self.k_BSKH.shape
    check_new_kv("DenseCache", name, x_BTKH, positions_BT, batch=B, kv_heads=K, head_dim=H)

  def _check_update(self, k_BTKH, v_BTKH, positions_BT):
    self._check_new("k_BTKH", k_BTKH, positions_BT)
    self._check_new("v_BTKH", v_BTKH, positions_BT)
    if not jnp.issubdtype(positions_BT.dtype, jnp.integer):
      raise TypeError(f"DenseCache.update: positions_BT must be integer, got {positions_BT.dtype}")

  def update(self, k_BTKH, v_BTKH, positions_BT) -> "DenseCache":
    """Writes keys/values at their absolute positions (overwriting what was there).

    Positions must lie in `[0, max_len)`; writes outside that range are dropped (it cannot be
    checked inside jit -- `generate` sizes the cache so it never happens).
    """
    self._check_update(k_BTKH, v_BTKH, positions_BT)
    B, T = positions_BT.shape
    pos_BT = positions_BT.astype(jnp.int32)
    row_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
    k = self.k_BSKH.at[row_BT, pos_BT].set(k_BTKH.astype(self.k_BSKH.dtype), mode="drop")
    v = self.v_BSKH.at[row_BT, pos_BT].set(v_BTKH.astype(self.v_BSKH.dtype), mode="drop")
    lengths = jnp.maximum(self.lengths, jnp.max(pos_BT, axis=1) + 1)
    return self.replace(k_BSKH=k, v_BSKH=v, lengths=lengths)

  def rollback(self, lengths_B) -> "DenseCache":
    """Truncates row b to its first `lengths_B[b]` positions (O(B): slots are overwritten later)."""
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    if lengths_B.shape != self.lengths.shape:
      raise ValueError(f"DenseCache.rollback: lengths_B must be {self.lengths.shape}, got "
                       f"{lengths_B.shape}")
    return self.replace(lengths=lengths_B)

  def attend(self, q_BTNH, positions_BT, *, sm_scale: float | None = None):
    """Causal-by-position attention: the query at position p sees slots `s <= p` of its row.

    Args:
      q_BTNH: queries `[batch, T, heads, head_dim]`, heads a multiple of the cache's kv heads.
      positions_BT: int positions of the queries.
      sm_scale: logit scale, default `head_dim ** -0.5`.

    Returns:
      `[batch, T, heads, head_dim]` in `q`'s dtype.
    """
    B, S, K, H = self.k_BSKH.shape
    T, N = check_attend_args("DenseCache", q_BTNH, positions_BT, batch=B, kv_heads=K,
                             head_dim=H)
    G = N // K
    scale = H ** -0.5 if sm_scale is None else sm_scale
    if T == 1 and self._pallas_decode():
      out_BNH = decode_attention(q_BTNH[:, 0], self.k_BSKH, self.v_BSKH,
                                 positions_BT[:, 0].astype(jnp.int32) + 1, sm_scale=scale,
                                 interpret=jax.default_backend() != "gpu")
      return out_BNH[:, None].astype(q_BTNH.dtype)
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    pos_BT = positions_BT.astype(jnp.int32)
    if T <= _Q_BLOCK:
      out_BTKGH = _attend_block(q_BTKGH, pos_BT, self.k_BSKH, self.v_BSKH, scale)
    else:
      nb = -(-T // _Q_BLOCK)
      pad = nb * _Q_BLOCK - T
      q_pad = jnp.pad(q_BTKGH, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
      pos_pad = jnp.pad(pos_BT, ((0, 0), (0, pad)))
      q_nBtKGH = jnp.moveaxis(q_pad.reshape(B, nb, _Q_BLOCK, K, G, H), 1, 0)
      pos_nBt = jnp.moveaxis(pos_pad.reshape(B, nb, _Q_BLOCK), 1, 0)
      out_nBtKGH = jax.lax.map(
          lambda a: _attend_block(a[0], a[1], self.k_BSKH, self.v_BSKH, scale),
          (q_nBtKGH, pos_nBt))
      out_BTKGH = jnp.moveaxis(out_nBtKGH, 0, 1).reshape(B, nb * _Q_BLOCK, K, G, H)[:, :T]
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)

  def update_and_attend(self, k_BTKH, v_BTKH, q_BTNH, positions_BT, *, sm_scale=None):
    """`update(k, v, positions)` then `attend(q, positions)`: returns (cache, out_BTNH).

    One-token steps on the "pallas" attend path run as one kernel that writes the new key/value
    and attends (`pallas_kernels.decode_attention.decode_attention_append`); everything else is
    the two calls.
    """
    B, S, K, H = self.k_BSKH.shape
    T = q_BTNH.shape[1] if q_BTNH.ndim == 4 else None
    if T != 1 or not self._pallas_decode() or S < 16:
      cache = self.update(k_BTKH, v_BTKH, positions_BT)
      return cache, cache.attend(q_BTNH, positions_BT, sm_scale=sm_scale)
    self._check_update(k_BTKH, v_BTKH, positions_BT)
    check_attend_args("DenseCache", q_BTNH, positions_BT, batch=B, kv_heads=K, head_dim=H)
    pos_B = positions_BT[:, 0].astype(jnp.int32)
    out_BNH, k, v = decode_attention_append(
        q_BTNH[:, 0], k_BTKH[:, 0], v_BTKH[:, 0], self.k_BSKH, self.v_BSKH, pos_B,
        sm_scale=H ** -0.5 if sm_scale is None else sm_scale,
        interpret=jax.default_backend() != "gpu")
    cache = self.replace(k_BSKH=k, v_BSKH=v, lengths=jnp.maximum(self.lengths, pos_B + 1))
    return cache, out_BNH[:, None].astype(q_BTNH.dtype)

  def _pallas_decode(self) -> bool:
    if self.attend_impl == "pallas":
      return True
    H = self.k_BSKH.shape[3]
    return (self.attend_impl == "auto" and jax.default_backend() == "gpu" and H >= 16
            and H & (H - 1) == 0)

  def nbytes(self) -> int:
    """Device bytes of the cache arrays (keys, values and lengths)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self)))


def _attend_block(q_BTKGH, pos_BT, k_BSKH, v_BSKH, scale):
  """softmax(q kᵀ·scale, masked to slots <= position) v for one query block; float32 out."""
  S = k_BSKH.shape[1]
  s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH.astype(k_BSKH.dtype), k_BSKH,
                       preferred_element_type=jnp.float32) * scale
  mask_BTS = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= pos_BT[:, :, None]
  mask_B11TS = mask_BTS[:, None, None]
  s_BKGTS = jnp.where(mask_B11TS, s_BKGTS, -jnp.inf)
  m_BKGT1 = jnp.max(s_BKGTS, axis=-1, keepdims=True)
  m_BKGT1 = jnp.where(jnp.isfinite(m_BKGT1), m_BKGT1, 0.0)
  p_BKGTS = jnp.exp(s_BKGTS - m_BKGT1)
  denom_BKGT1 = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
  o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                       preferred_element_type=jnp.float32)
  inv_BKGT = 1.0 / jnp.where(denom_BKGT1 == 0, 1.0, denom_BKGT1)[..., 0]
  return o_BTKGH * jnp.transpose(inv_BKGT, (0, 3, 1, 2))[..., None]
