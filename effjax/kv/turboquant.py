"""TurboQuant KV cache: keys and values stored as TurboQuant codes, attended from the codes.

Paper: "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate" (Zandieh, Daliri,
Hadian, Mirrokni; arXiv 2504.19874). The cache applies the quantizer of `effjax.quant.turboquant`
to every key and value vector (one per token and kv head, length head_dim) as it is written:

* Algorithm 1 (TurboQuant_mse) for values and, by default, for keys: x is stored as ||x|| and the
  indices idx = Q(Pi x / ||x||) of the Lloyd-Max codebook c; x_hat = ||x|| Pi^T c[idx].
* Algorithm 2 (TurboQuant_prod) for keys when `key_kind="prod"`: a (b-1)-bit mse stage plus the QJL
  signs of the residual and its norm; scores use the unbiased estimator
  <q, k_mse> + sqrt(pi/2)/d * ||r|| * <S Pi q, sign(S Pi r)>.
* Fractional rates (2.5, 3.5 bits): the outlier/regular channel split of the quantizer (each set its
  own rotation, codebook and norm), the paper's KV-cache setting (Section 4.3).
* Generated tokens are quantized too (every `update` encodes its tokens), as in the paper.

Scores and outputs are computed from the codes (never from bf16 keys in the original basis):
    <q, k_hat_s> = sum_parts ||k_s|| <Pi q, c[idx_s]>       (query rotated once per head and part)
    sum_s p_s v_hat_s = Pi^T sum_s p_s ||v_s|| c[idx_s]      (values accumulated in the rotated basis)
On an NVIDIA GPU, a single-token decode (`T == 1`) with mse keys calls the Pallas kernel
`pallas_kernels.quant_decode_attention.turboquant_decode_attention`, which reads the packed words.
The portable jnp path (CPU, prefill, `prod` keys, 8-bit codes) DEQUANTIZES IN THE ROTATED BASIS for
the whole context in float32 (c[idx] * ||x|| per part, no Pi^T on keys), i.e. it materialises a
float32 [B, S, K, H] array per attend; it is the reference path, not a fast path.

Options that independent implementations reported to matter (each a flag, each measured in
`experiments/kv_quality.py`, see results/kv_quality.md):
* `key_kind`: "mse" (default; QJL off) or "prod" (QJL on).
* `key_mean`: "none" (default) or "prefill": a per-(row, kv head) key mean mu is computed from the
  row's FIRST update (the prefill, in `generate` including its right-padding tokens), frozen, and
  subtracted before quantization; scores add it back as <q, mu> (for post-RoPE keys a constant per
  query on the quantized segment, which matters only relative to the full-precision window). Any
  mu gives the same exact-arithmetic scores, so the choice only affects quantization error.
* `pre_rope`: quantize keys BEFORE RoPE. The attention layer passes post-RoPE keys, so the cache
  undoes RoPE exactly (a rotation by -position * inv_freq, `rope_inv_freq` given as an option, see
  `turboquant_cache_config`), quantizes (mean removal then acts on the un-rotated keys, whose mean
  is not smeared by position), and re-applies RoPE at each key's position after dequantizing. This
  needs the per-key position rotation, so pre-RoPE caches always take the jnp path, which then
  materialises float32 keys in the original basis (documented cost; no kernel reads it).
* `window`: W recent positions kept in full precision in a ring buffer (slot = position % W).
  A query at position p reads positions (p - W, p] from the ring when the ring holds them, every
  other position <= p from the codes. Within one multi-token update (prefill) only the row's last
  W written positions enter the ring, so earlier prefill queries read their own window from the
  codes (prefill attention is itself quantized: a pessimistic choice vs. implementations that
  attend to raw K/V during prefill). After a rollback, window positions the ring no longer holds
  are read from the codes.

Storage (S64 = max_len rounded up to 64): per quantizer part (1 part, or 2 for half rates) words
[B, S64/4, K, d] in the `effjax.quant.token_packing` layout (3-bit codes occupy 4-bit fields and
1-bit mse stages 2-bit fields: `bytes_per_token` counts what is stored), norms [B, S64/4, K, 4] (the
kernel's token-packing slot order, `token_packing.to_slot_order`) in `norm_dtype` (float16 default); prod keys add packed QJL signs uint32 [B, S64, K, ceil(d/32)] and
residual norms [B, S64, K]. Every position is encoded when written, so `rollback` only resets
`lengths` (O(B)).

Encode cost (a decode step writes one token): when keys and values are mse with <= 4-bit parts, the
rotations of ALL parts of keys AND values run as one batched [2, H, H] matmul (each side's matrix
is block-diagonal per part up to the channel permutation, `_fused_tables` / `_joint_tables`), then
one quantizing fusion (compare against per-column boundaries); a single-token write is one gather +
one scatter per packed array and one scatter per norm array (`_packed.write_tokens`,
`_packed.scatter_slots`). Same arithmetic as `TurboQuant.encode` (normalise per part, rotate,
count boundaries) up to float summation order inside the matmul.

Bad input: bits / kinds / options are checked at `init` (ValueError naming the option); keys or
values with NaN/Inf raise ValueError in eager `update` calls (under jit the check cannot run and
NaN propagates into the stored norm, documented in `effjax.quant.turboquant`).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from effjax.kv import _packed
from effjax.kv.base import check_attend_args
from effjax.layers.rope import apply_rope, rope_inv_freq
from effjax.quant import packing, token_packing
from effjax.quant.turboquant import TurboQuant

__all__ = ["TurboQuantCache", "turboquant_cache_config"]

_Q_BLOCK = 256
_IMPLS = ("auto", "jnp", "kernel", "interpret")


def _subs(tq: TurboQuant):
  """[(integer-rate quantizer, its channels)] of a TurboQuant (2 parts for half rates)."""
  if tq.is_split:
    return [(tq.outlier, tq.outlier_channels), (tq.regular, tq.regular_channels)]
  return [(tq, tuple(range(tq.dim)))]


def _merge_channels(parts_out, subs, head_dim):
  """Concatenates per-part [..., d] arrays and permutes them back to head-dim channel order."""
  chans = [c for _, ch in subs for c in ch]
  x = jnp.concatenate(parts_out, axis=-1) if len(parts_out) > 1 else parts_out[0]
  if chans == list(range(head_dim)):
    return x
  return jnp.take(x, jnp.asarray(np.argsort(np.asarray(chans)), jnp.int32), axis=-1)


def _encode(sub: TurboQuant, x_BTKd):
  """(idx uint8, norm f32, qjl words | None, residual norm | None) of integer-rate `sub`."""
  x = x_BTKd.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1))
  u = x / jnp.where(norm > 0, norm, 1.0)[..., None]
  u_rot = sub.rotation.apply(u)
  idx = sub.quantize_rotated(u_rot)
  if sub.kind == "mse":
    return idx, norm, None, None
  r_rot = u_rot - sub.centroids[idx.astype(jnp.int32)]
  rnorm = norm * jnp.sqrt(jnp.sum(r_rot * r_rot, axis=-1))
  proj = jnp.einsum("...j,ij->...i", r_rot, sub.qjl_DD)
  qjl = packing.pack_bits((proj >= 0).astype(jnp.uint8), 1, jnp.uint32, check=False)
  return idx, norm, qjl, rnorm


def _fused_tables(tq: TurboQuant, head_dim: int):
  """(M [H, H], boundaries [H, nb]) for `_encode_fused`, or () when a part is not mse <= 4 bits.

  M maps head-dim channels to the concatenated rotated coordinates of all parts:
  M[ch_i[a], off_i + b] = Pi_i[b, a] (block-diagonal up to the channel permutation), so ONE
  [.., H] @ [H, H] matmul rotates every part; row c of the boundary table holds the Lloyd-Max
  boundaries of the part owning rotated column c (padded with +inf).
  """
  subs = _subs(tq)
  if any(sub.kind != "mse" or not 1 <= sub.mse_bits <= 4 for sub, _ in subs):
    return ()
  nb = max(int(sub.boundaries.shape[0]) for sub, _ in subs)
  m_HH = jnp.zeros((head_dim, head_dim), jnp.float32)
  bnd_Hn = jnp.full((head_dim, nb), jnp.inf, jnp.float32)
  off = 0
  for sub, ch in subs:
    d, nbi = len(ch), int(sub.boundaries.shape[0])
    m_HH = m_HH.at[np.asarray(ch)[:, None], off + np.arange(d)[None, :]].set(
        sub.rotation.matrix().astype(jnp.float32).T)
    bnd_Hn = bnd_Hn.at[off:off + d, :nbi].set(
        jnp.broadcast_to(sub.boundaries.astype(jnp.float32)[None, :], (d, nbi)))
    off += d
  return (m_HH, bnd_Hn)


def _take_channels(x, ch):
  """x[..., ch] as a slice when `ch` is a contiguous range (fuses), else a gather."""
  if list(ch) == list(range(ch[0], ch[0] + len(ch))):
    return x[..., ch[0]:ch[0] + len(ch)]
  return jnp.take(x, jnp.asarray(ch, jnp.int32), axis=-1)


def _normalized(subs, x_BTKH):
  """(u = x / ||x_part|| per channel, [||x_part||]) in float32 (parts of `subs`)."""
  x = x_BTKH.astype(jnp.float32)
  norms = [jnp.sqrt(jnp.sum(jnp.square(_take_channels(x, ch)), axis=-1)) for _, ch in subs]
  if len(subs) == 1:
    norm_c = norms[0][..., None]
  else:
    part_of = np.zeros(x.shape[-1], np.int32)
    for i, (_, ch) in enumerate(subs):
      part_of[np.asarray(ch)] = i
    norm_c = jnp.take(jnp.stack(norms, axis=-1), jnp.asarray(part_of), axis=-1)
  return x / jnp.where(norm_c > 0, norm_c, 1.0), norms


def _split_parts(subs, idx, norms):
  out, off = [], 0
  for (_, ch), n in zip(subs, norms):
    out.append((idx[..., off:off + len(ch)], n))
    off += len(ch)
  return out


def _encode_fused(tables, subs, x_BTKH):
  """[(idx uint8 [B, T, K, d], norm f32 [B, T, K])] per part, all parts with one matmul.

  Same arithmetic as `_encode` per part (u = x_part / ||x_part||, y = Pi u, idx = #{bnd < y}),
  only the rotations of all parts share one [H, H] matmul (`_fused_tables`); a decode step then
  costs one matmul and a few fusions instead of one matmul + gather chain per part.
  """
  m_HH, bnd_Hn = tables
  u, norms = _normalized(subs, x_BTKH)
  y = jnp.einsum("...h,hg->...g", u, m_HH)
  bnd = bnd_Hn.reshape((1,) * (y.ndim - 1) + bnd_Hn.shape)
  return _split_parts(subs, jnp.sum(y[..., None] > bnd, axis=-1, dtype=jnp.uint8), norms)


def _joint_tables(k_tables, v_tables):
  """Keys' and values' `_fused_tables` stacked ([2, H, H], [2, H, nb]) for `_encode_fused_kv`."""
  if not (k_tables and v_tables):
    return ()
  nb = max(k_tables[1].shape[1], v_tables[1].shape[1])
  pad = lambda t: jnp.pad(t, ((0, 0), (0, nb - t.shape[1])), constant_values=jnp.inf)
  return (jnp.stack([k_tables[0], v_tables[0]]), jnp.stack([pad(k_tables[1]), pad(v_tables[1])]))


def _encode_fused_kv(kv_tables, k_subs, k_BTKH, v_subs, v_BTKH):
  """`_encode_fused` of keys AND values in one batched matmul + one quantizing fusion."""
  m_2HH, bnd_2Hn = kv_tables
  u_k, n_k = _normalized(k_subs, k_BTKH)
  u_v, n_v = _normalized(v_subs, v_BTKH)
  y = jnp.einsum("s...h,shg->s...g", jnp.stack([u_k, u_v]), m_2HH)
  bnd = bnd_2Hn.reshape((2,) + (1,) * (y.ndim - 2) + bnd_2Hn.shape[1:])
  idx = jnp.sum(y[..., None] > bnd, axis=-1, dtype=jnp.uint8)
  return _split_parts(k_subs, idx[0], n_k), _split_parts(v_subs, idx[1], n_v)


def _check_int(name, v, lo):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
    raise ValueError(f"TurboQuantCache.init: {name} must be an int >= {lo}, got {v!r}")


@flax.struct.dataclass
class TurboQuantCache:
  """Per-layer TurboQuant KV cache (see module docstring). Build with `TurboQuantCache.init`."""
  k_words: tuple
  k_norms: tuple
  k_qjl: tuple
  k_rnorm: tuple
  v_words: tuple
  v_norms: tuple
  ring_k: jax.Array      # [B, W, K, H] full-precision recent keys (post-RoPE)
  ring_v: jax.Array      # [B, W, K, H]
  ring_pos: jax.Array    # int32 [B, W], position held by each slot (-1 = empty)
  mean_BKH: jax.Array    # float32 [B, K, H] key mean (zeros when key_mean="none")
  mean_set: jax.Array    # bool [B]
  lengths: jax.Array     # int32 [B]
  k_quant: TurboQuant
  v_quant: TurboQuant
  k_coeffs: tuple        # kernel codebook polynomials per part (empty when not kernel-readable)
  v_coeffs: tuple
  k_enc: tuple           # `_fused_tables` of the key / value quantizer (empty: per-part encode)
  v_enc: tuple
  kv_enc: tuple          # both stacked (`_joint_tables`; empty unless keys and values are fused)
  capacity: int = flax.struct.field(pytree_node=False)
  key_kind: str = flax.struct.field(pytree_node=False)
  key_mean: str = flax.struct.field(pytree_node=False)
  pre_rope: bool = flax.struct.field(pytree_node=False)
  inv_freq: tuple = flax.struct.field(pytree_node=False)
  impl: str = flax.struct.field(pytree_node=False)

  # ---- construction ---------------------------------------------------------------------------
  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16,
           *, bits: float = 4, value_bits: float | None = None, key_kind: str = "mse",
           key_mean: str = "none", pre_rope: bool = False, rope_inv_freq: tuple | None = None,
           window: int = 0, norm_dtype="float16", seed: int = 0, rotation: str = "haar",
           impl: str = "auto") -> "TurboQuantCache":
    """An empty cache for positions `0 .. max_len - 1`.

    Args:
      batch, max_len, num_kv_heads, head_dim: sizes (positive ints).
      dtype: storage dtype of the full-precision window.
      bits: key bits: 2, 3, 4, 8 or a half rate 2.5 / 3.5 (mse); 2..5 or 2.5..4.5 for "prod"
        (total incl. the QJL bit).
      value_bits: value bits (mse), default = `bits` (for prod keys: default 4 if bits > 4).
      key_kind: "mse" (QJL off, default) or "prod" (QJL on).
      key_mean: "none" or "prefill" (see module docstring).
      pre_rope: quantize keys before RoPE; needs `rope_inv_freq` (the model's RoPE inverse
        frequencies, a tuple of head_dim // 2 floats).
      window: full-precision ring of the W most recent positions (0 = off).
      norm_dtype: dtype of the stored norms ("float16" or "float32").
      seed: seed of the key quantizer (values use seed + 1).
      rotation: "haar" or "hadamard".
      impl: "auto" (Pallas kernel for GPU single-token decode when the settings allow it, else
        jnp), "jnp", "kernel" (always the kernel for T == 1; error if the settings do not allow
        it), "interpret" (the kernel in the Pallas interpreter, for CPU tests).
    """
    for name, v in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim)):
      _check_int(name, v, 1)
    _check_int("window", window, 0)
    if key_kind not in ("mse", "prod"):
      raise ValueError(f"TurboQuantCache.init: key_kind must be 'mse' or 'prod', got {key_kind!r}")
    if key_mean not in ("none", "prefill"):
      raise ValueError(f"TurboQuantCache.init: key_mean must be 'none' or 'prefill', got "
                       f"{key_mean!r}")
    if impl not in _IMPLS:
      raise ValueError(f"TurboQuantCache.init: impl must be one of {_IMPLS}, got {impl!r}")
    if np.dtype(norm_dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
      raise ValueError(f"TurboQuantCache.init: norm_dtype must be float16 or float32, got "
                       f"{norm_dtype!r}")
    if pre_rope:
      if rope_inv_freq is None or len(rope_inv_freq) != head_dim // 2 or head_dim % 2:
        raise ValueError("TurboQuantCache.init: pre_rope=True needs rope_inv_freq, a tuple of "
                         f"head_dim // 2 = {head_dim // 2} floats (see turboquant_cache_config)")
      inv_freq = tuple(float(f) for f in rope_inv_freq)
    else:
      inv_freq = ()
    if value_bits is None:
      value_bits = bits if bits <= 4 else (8 if key_kind == "mse" else 4)
    try:
      k_quant = TurboQuant(head_dim, bits, kind=key_kind, seed=seed, rotation=rotation)
    except ValueError as e:
      raise ValueError(f"TurboQuantCache.init: bits={bits!r} (key_kind={key_kind!r}, "
                       f"head_dim={head_dim}) is not supported: {e}") from None
    try:
      v_quant = TurboQuant(head_dim, value_bits, kind="mse", seed=seed + 1, rotation=rotation)
    except ValueError as e:
      raise ValueError(f"TurboQuantCache.init: value_bits={value_bits!r} (head_dim={head_dim}) "
                       f"is not supported: {e}") from None
    for sub, _ in _subs(k_quant):
      if key_kind == "prod" and sub.mse_bits < 1:
        raise ValueError(f"TurboQuantCache.init: key_kind='prod' needs >= 2 bits per channel set "
                         f"(1 mse bit + 1 QJL bit), got bits={bits!r}")
    B, K, H, W = batch, num_kv_heads, head_dim, window
    S64 = _packed.padded_len(max_len)
    nd = np.dtype(norm_dtype)

    def store(tq):
      words, norms, qjl, rnorm = [], [], [], []
      for sub, ch in _subs(tq):
        d = len(ch)
        words.append(jnp.zeros((B, S64 // 4, K, d), token_packing.word_dtype(sub.mse_bits)))
        norms.append(jnp.zeros((B, S64 // 4, K, 4), nd))  # slot order (token_packing)
        if sub.kind == "prod":
          qjl.append(jnp.zeros((B, S64, K, packing.packed_length(d, 1)), jnp.uint32))
          rnorm.append(jnp.zeros((B, S64, K), nd))
      return tuple(words), tuple(norms), tuple(qjl), tuple(rnorm)

    k_enc, v_enc = _fused_tables(k_quant, H), _fused_tables(v_quant, H)
    kw, kn, kq, kr = store(k_quant)
    vw, vn, _, _ = store(v_quant)
    return cls(k_words=kw, k_norms=kn, k_qjl=kq, k_rnorm=kr, v_words=vw, v_norms=vn,
               ring_k=jnp.zeros((B, W, K, H), dtype), ring_v=jnp.zeros((B, W, K, H), dtype),
               ring_pos=jnp.full((B, W), -1, jnp.int32),
               mean_BKH=jnp.zeros((B, K, H), jnp.float32), mean_set=jnp.zeros((B,), bool),
               lengths=jnp.zeros((B,), jnp.int32), k_quant=k_quant, v_quant=v_quant,
               k_coeffs=_coeffs(k_quant), v_coeffs=_coeffs(v_quant),
               k_enc=k_enc, v_enc=v_enc, kv_enc=_joint_tables(k_enc, v_enc),
               capacity=int(max_len),
               key_kind=key_kind, key_mean=key_mean, pre_rope=bool(pre_rope), inv_freq=inv_freq,
               impl=impl)

  # ---- properties -----------------------------------------------------------------------------
  @property
  def max_len(self) -> int:
    """Number of positions the cache holds (static)."""
    return self.capacity

  @property
  def window(self) -> int:
    """Size of the full-precision ring (static)."""
    return self.ring_pos.shape[1]

  @property
  def head_dim(self) -> int:
    return self.ring_k.shape[3]

  def nbytes(self) -> int:
    """Device bytes of every array of the cache (codes, norms, ring, mean, rotations, ...)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self)))

  def bytes_per_token(self) -> float:
    """Stored bytes per position and batch row for keys + values of all kv heads (codes+norms)."""
    arrs = self.k_words + self.k_norms + self.k_qjl + self.k_rnorm + self.v_words + self.v_norms
    B, S64 = self.ring_k.shape[0], _packed.padded_len(self.capacity)
    return sum(x.size * x.dtype.itemsize for x in arrs) / (B * S64)

  # ---- update ---------------------------------------------------------------------------------
  def _check_new(self, name, x_BTKH, positions_BT):
    _packed.check_new_finite("TurboQuantCache", name, x_BTKH, positions_BT, self.ring_k.shape)

  def update(self, k_BTKH, v_BTKH, positions_BT) -> "TurboQuantCache":
    """Encodes the new keys/values and writes them at their absolute positions.

    Positions must lie in [0, max_len) (others are dropped) and be distinct within a row.
    """
    self._check_new("k_BTKH", k_BTKH, positions_BT)
    self._check_new("v_BTKH", v_BTKH, positions_BT)
    if not jnp.issubdtype(positions_BT.dtype, jnp.integer):
      raise TypeError(f"TurboQuantCache.update: positions_BT must be integer, got "
                      f"{positions_BT.dtype}")
    pos = positions_BT.astype(jnp.int32)
    valid = (pos >= 0) & (pos < self.capacity)
    k_in = k_BTKH.astype(jnp.float32)
    if self.pre_rope:
      k_in = apply_rope(k_in, -pos, np.asarray(self.inv_freq))
    mean, mean_set = self.mean_BKH, self.mean_set
    if self.key_mean == "prefill":
      w = valid.astype(jnp.float32)[:, :, None, None]
      new_mean = jnp.sum(k_in * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
      mean = jnp.where(mean_set[:, None, None], mean, new_mean)
      mean_set = mean_set | jnp.any(valid, axis=1)
      k_in = k_in - mean[:, None]
    rep = {}

    joint = (_encode_fused_kv(self.kv_enc, _subs(self.k_quant), k_in, _subs(self.v_quant), v_BTKH)
             if self.kv_enc else (None, None))

    def write(tq, x, words, norms, qjl, rnorm, tables, fused):
      words, norms, qjl, rnorm = list(words), list(norms), list(qjl), list(rnorm)
      subs = _subs(tq)
      if fused is None and tables:
        fused = _encode_fused(tables, subs, x)
      for i, (sub, ch) in enumerate(subs):
        if fused is not None:
          (idx, nrm), q1, r1 = fused[i], None, None
        else:
          idx, nrm, q1, r1 = _encode(sub, _take_channels(x, ch))
        words[i] = _packed.write_tokens(words[i], idx, pos, valid, sub.mse_bits)
        norms[i] = _packed.scatter_slots(norms[i], nrm, pos, valid)
        if q1 is not None:
          qjl[i] = _packed.scatter_tokens(qjl[i], q1, pos, valid)
          rnorm[i] = _packed.scatter_tokens(rnorm[i], r1, pos, valid)
      return tuple(words), tuple(norms), tuple(qjl), tuple(rnorm)

    rep["k_words"], rep["k_norms"], rep["k_qjl"], rep["k_rnorm"] = write(
        self.k_quant, k_in, self.k_words, self.k_norms, self.k_qjl, self.k_rnorm, self.k_enc,
        joint[0])
    rep["v_words"], rep["v_norms"], _, _ = write(self.v_quant, v_BTKH, self.v_words, self.v_norms,
                                                 (), (), self.v_enc, joint[1])
    rpos = jnp.where(valid, pos, -1)
    rep["ring_k"], rep["ring_v"], rep["ring_pos"] = _packed.ring_write(
        self.ring_k, self.ring_v, self.ring_pos, k_BTKH, v_BTKH, rpos)
    lengths = jnp.maximum(self.lengths, jnp.max(jnp.where(valid, pos + 1, 0), axis=1))
    return self.replace(mean_BKH=mean, mean_set=mean_set, lengths=lengths, **rep)

  def rollback(self, lengths_B) -> "TurboQuantCache":
    """Truncates row b to its first `lengths_B[b]` positions (O(B); every position has codes)."""
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    if lengths_B.shape != self.lengths.shape:
      raise ValueError(f"TurboQuantCache.rollback: lengths_B must be {self.lengths.shape}, got "
                       f"{lengths_B.shape}")
    return self.replace(lengths=lengths_B)

  # ---- decoding helpers -----------------------------------------------------------------------
  def _rotated(self, tq, words, norms, qjl=(), rnorm=()):
    """Per part: float32 [B, S64, K, d] = ||x|| c[idx] (+ the QJL term when `with_qjl`)."""
    out = []
    for i, (sub, _) in enumerate(_subs(tq)):
      idx = token_packing.unpack_tokens(words[i], sub.mse_bits, axis=1).astype(jnp.int32)
      nrm = token_packing.from_slot_order(norms[i], axis=1).astype(jnp.float32)
      out.append(sub.centroids[idx] * nrm[..., None])
    return out

  def _signs_scaled(self, i, sub):
    """sqrt(pi/2)/d * ||r|| * sign(S Pi r), float32 [B, S64, K, d] (prod keys, part i)."""
    s = packing.unpack_bits(self.k_qjl[i], 1, sub.dim).astype(jnp.float32) * 2.0 - 1.0
    scale = math.sqrt(math.pi / 2) / sub.dim * self.k_rnorm[i].astype(jnp.float32)
    return s * scale[..., None]

  def dequantized_keys(self):
    """Keys x_hat float32 [B, S64, K, H] as the scores see them (post-RoPE; mean added back).

    For tests and the pre-RoPE path; the attend paths do not call it otherwise.
    """
    subs = _subs(self.k_quant)
    rot = self._rotated(self.k_quant, self.k_words, self.k_norms)
    parts = []
    for i, (sub, _) in enumerate(subs):
      r = rot[i]
      if sub.kind == "prod":
        r = r + self._signs_scaled(i, sub) @ sub.qjl_DD
      parts.append(sub.rotation.apply_transpose(r))
    k = _merge_channels(parts, subs, self.head_dim) + self.mean_BKH[:, None]
    if self.pre_rope:
      B, S64 = k.shape[:2]
      pos = jnp.broadcast_to(jnp.arange(S64, dtype=jnp.int32)[None], (B, S64))
      k = apply_rope(k, pos, np.asarray(self.inv_freq))
    return k

  def dequantized_values(self):
    """Values x_hat float32 [B, S64, K, H] (for tests)."""
    subs = _subs(self.v_quant)
    rot = self._rotated(self.v_quant, self.v_words, self.v_norms)
    return _merge_channels([s.rotation.apply_transpose(r) for (s, _), r in zip(subs, rot)], subs,
                           self.head_dim)

  # ---- attend ---------------------------------------------------------------------------------
  def kernel_readable(self) -> bool:
    """True when the Pallas decode kernel can read this cache (mse keys, post-RoPE, 2-4 bits)."""
    if self.key_kind != "mse" or self.pre_rope:
      return False
    for tq in (self.k_quant, self.v_quant):
      for sub, ch in _subs(tq):
        if sub.mse_bits not in (2, 3, 4) or len(ch) % 16:
          return False
    return True

  def attend(self, q_BTNH, positions_BT, *, sm_scale: float | None = None):
    """Causal-by-position attention over the codes and the full-precision window.

    Args:
      q_BTNH: queries [batch, T, heads, head_dim], heads a multiple of the kv heads.
      positions_BT: int positions of the queries.
      sm_scale: logit scale, default head_dim ** -0.5.

    Returns:
      [batch, T, heads, head_dim] in q's dtype.
    """
    B, W, K, H = self.ring_k.shape
    T, N = check_attend_args("TurboQuantCache", q_BTNH, positions_BT, batch=B, kv_heads=K,
                             head_dim=H)
    scale = H ** -0.5 if sm_scale is None else float(sm_scale)
    pos = positions_BT.astype(jnp.int32)
    use_kernel = T == 1 and (self.impl in ("kernel", "interpret") or (
        self.impl == "auto" and jax.default_backend() == "gpu" and self.kernel_readable()))
    if use_kernel:
      if not self.kernel_readable():
        raise ValueError("TurboQuantCache.attend: impl='kernel' needs key_kind='mse', "
                         "pre_rope=False, 2-4 bits and channel sets of multiples of 16")
      return self._attend_kernel(q_BTNH[:, 0], pos[:, 0], scale)[:, None].astype(q_BTNH.dtype)
    return self._attend_jnp(q_BTNH, pos, scale).astype(q_BTNH.dtype)

  def _attend_jnp(self, q_BTNH, pos_BT, scale):
    B, W, K, H = self.ring_k.shape
    _, T, N, _ = q_BTNH.shape
    G = N // K
    S64 = _packed.padded_len(self.capacity)
    ksubs, vsubs = _subs(self.k_quant), _subs(self.v_quant)
    if self.pre_rope:
      keys = ("dense", self.dequantized_keys())
    else:
      krot = self._rotated(self.k_quant, self.k_words, self.k_norms)
      qjl = [self._signs_scaled(i, s) if s.kind == "prod" else None
             for i, (s, _) in enumerate(ksubs)]
      keys = ("rot", krot, qjl)
    vrot = self._rotated(self.v_quant, self.v_words, self.v_norms)
    held_BS = (_packed.ring_held_BS(self.ring_pos, S64) if W else
               jnp.zeros((B, S64), bool))
    ring_k = self.ring_k.astype(jnp.float32)
    ring_v = self.ring_v.astype(jnp.float32)

    def block(q_BTKGH, p_BT):
      t = q_BTKGH.shape[1]
      if keys[0] == "dense":
        s_q = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, keys[1])
      else:
        s_q = jnp.zeros((B, K, G, t, S64), jnp.float32)
        for i, (sub, ch) in enumerate(ksubs):
          qp = q_BTKGH if len(ch) == H else jnp.take(q_BTKGH, jnp.asarray(ch, jnp.int32), axis=-1)
          qr = sub.rotation.apply(qp)
          s_q = s_q + jnp.einsum("BTKGd,BSKd->BKGTS", qr, keys[1][i])
          if keys[2][i] is not None:
            sq = jnp.einsum("BTKGj,ij->BTKGi", qr, sub.qjl_DD)
            s_q = s_q + jnp.einsum("BTKGd,BSKd->BKGTS", sq, keys[2][i])
        s_q = s_q + jnp.einsum("BTKGH,BKH->BKGT", q_BTKGH, self.mean_BKH)[..., None]
      s_idx = jnp.arange(S64, dtype=jnp.int32)[None, None, :]
      p_BT1 = p_BT[:, :, None]
      in_win = (s_idx > p_BT1 - W) & held_BS[:, None, :]
      m_q = (s_idx <= p_BT1) & ~in_win
      s_r = jnp.einsum("BTKGH,BWKH->BKGTW", q_BTKGH, ring_k)
      rp = self.ring_pos[:, None, :]
      m_r = (rp >= 0) & (rp <= p_BT1) & (rp > p_BT1 - W)
      p1, p2, inv = _packed.softmax_two_segments(s_q * scale, m_q, s_r * scale, m_r)
      outs = []
      for i, (sub, _) in enumerate(vsubs):
        acc = jnp.einsum("BKGTS,BSKd->BTKGd", p1, vrot[i])
        outs.append(sub.rotation.apply_transpose(acc))
      o = _merge_channels(outs, vsubs, H) + jnp.einsum("BKGTW,BWKH->BTKGH", p2, ring_v)
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

  def _kernel_parts(self, tq, words, norms, coeffs):
    from pallas_kernels.quant_decode_attention import FAST_CODEBOOK_TERMS, TQPart
    return [TQPart(words=words[i], norms=norms[i], rotation=sub.rotation.matrix(),
                   centroids=sub.centroids, coeffs=coeffs[i], bits=sub.mse_bits,
                   channels=tuple(int(c) for c in ch),
                   n_coeffs=FAST_CODEBOOK_TERMS.get(sub.mse_bits, 0))  # as `_coeffs` fitted them
            for i, (sub, ch) in enumerate(_subs(tq))]

  def _attend_kernel(self, q_BNH, pos_B, scale):
    """Single-token decode: Pallas kernel over positions <= p - W, window merged by LSE."""
    from pallas_kernels.quant_decode_attention import turboquant_decode_attention
    B, W, K, H = self.ring_k.shape
    N = q_BNH.shape[1]
    kp = self._kernel_parts(self.k_quant, self.k_words, self.k_norms, self.k_coeffs)
    vp = self._kernel_parts(self.v_quant, self.v_words, self.v_norms, self.v_coeffs)
    n_quant = jnp.maximum(pos_B - W + 1, 0)
    o_q, lse_q = turboquant_decode_attention(q_BNH, kp, vp, n_quant, sm_scale=scale,
                                             interpret=self.impl == "interpret", return_lse=True)
    o_q = o_q.astype(jnp.float32)
    if self.key_mean != "none":
      q_BKGH = q_BNH.astype(jnp.float32).reshape(B, K, N // K, H)
      lse_q = lse_q + scale * jnp.einsum("BKGH,BKH->BKG", q_BKGH, self.mean_BKH).reshape(B, N)
    if W == 0:
      return o_q
    wpos = pos_B[:, None] - W + 1 + jnp.arange(W, dtype=jnp.int32)[None, :]
    slot = jnp.mod(wpos, W)
    held = jnp.take_along_axis(self.ring_pos, slot, axis=1) == wpos
    b = jnp.arange(B)[:, None]
    rk = self.ring_k[b, slot].astype(jnp.float32)
    rv = self.ring_v[b, slot].astype(jnp.float32)
    k_w = jnp.where(held[..., None, None], rk, self._decode_at(self.k_quant, self.k_words,
                                                                self.k_norms, wpos)
                    + self.mean_BKH[:, None])
    v_w = jnp.where(held[..., None, None], rv, self._decode_at(self.v_quant, self.v_words,
                                                                self.v_norms, wpos))
    o_w, lse_w = _packed.dense_lse(q_BNH, k_w, v_w, wpos >= 0, scale)
    return _packed.merge_lse(o_q, lse_q, o_w, lse_w)

  def _decode_at(self, tq, words, norms, pos_BW):
    """x_hat float32 [B, W, K, H] of the (mse) codes at positions pos_BW (window fallback)."""
    subs = _subs(tq)
    p = jnp.clip(pos_BW, 0, _packed.padded_len(self.capacity) - 1)
    parts = []
    for i, (sub, _) in enumerate(subs):
      idx = _packed.read_tokens(words[i], p, sub.mse_bits).astype(jnp.int32)
      y = sub.centroids[idx] * _packed.gather_slots(norms[i], p).astype(jnp.float32)[..., None]
      parts.append(sub.rotation.apply_transpose(y))
    return _merge_channels(parts, subs, self.head_dim)


def _coeffs(tq):
  """Kernel codebook polynomials per part (empty tuple when a part is not kernel-readable)."""
  out = []
  for sub, _ in _subs(tq):
    if sub.mse_bits not in (1, 2, 3, 4):
      return ()
    from pallas_kernels.quant_decode_attention import kernel_codebook
    from effjax.quant.lloyd_max import lloyd_max_codebook  # numpy (concrete under jit)
    cents = np.asarray(lloyd_max_codebook(sub.dim, sub.mse_bits).centroids)
    out.append(jnp.asarray(kernel_codebook(cents, sub.mse_bits)[0]))
  return tuple(out)


def turboquant_cache_config(model_cfg=None, **options):
  """A `CacheConfig` for `generate(cache=...)`; with `pre_rope=True` it fills `rope_inv_freq`
  from `model_cfg` (an `effjax.config.ModelConfig`).

  Example: `turboquant_cache_config(cfg, bits=3.5, key_mean="prefill", pre_rope=True, window=32)`.
  """
  from effjax.kv.base import CacheConfig
  opts = dict(options)
  if opts.get("pre_rope") and "rope_inv_freq" not in opts:
    if model_cfg is None:
      raise ValueError("turboquant_cache_config: pre_rope=True needs model_cfg (for the RoPE "
                       "frequencies) or rope_inv_freq")
    c = model_cfg
    opts["rope_inv_freq"] = tuple(float(f) for f in rope_inv_freq(
        c.head_dim, c.rope_theta, c.rope_scaling, factor=c.rope_scaling_factor,
        low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
        original_max_len=c.rope_original_max_len))
  return CacheConfig(TurboQuantCache, options=tuple(sorted(opts.items())))
