"""Split-K (flash-decoding) GQA decode attention in bf16, with ragged per-row lengths.

Technique: flash-decoding -- the online-softmax attention of FlashAttention-2 (Dao, "FlashAttention-2:
Faster Attention with Better Parallelism and Work Partitioning", arXiv 2307.08691, Algorithm 1) with the
key/value sequence split across programs and the partial results merged by their log-sum-exp
(Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference", 2023 blog post; the merge is
FlashAttention-2's Eq. for combining blocks:  o = sum_s exp(lse_s - lse) o_s,  lse = logsumexp_s lse_s).

One query token per sequence:

    out[b, n, :] = softmax_s( sm_scale * <q[b, n], k[b, s, n // G]> ,  s < lengths[b] ) @ v[b, :, n // G]

with G = num_heads // num_kv_heads (GQA). Choices written down here:

* Layout: q_BNH [batch, heads, head_dim]; k_BSKH / v_BSKH [batch, seq, kv_heads, head_dim] (the dense
  cache's layout). Each program reads rows of K/V that are head_dim*2 bytes contiguous (256 B at
  D=128), enough for full-width coalesced loads, so no transposed copy of the cache is made
  (jax's own `gqa` decode kernel transposes K/V to [B, K, S, H] on every call).
* Grid (batch, kv_head, split). A program loads the G query heads of its KV head as one [Gp, H] tile
  (G padded to Gp = max(16, next_pow2(G)) rows because the Triton dot needs M >= 16: a masked load
  from the row's [N, H] queries, no padded copy; the padded rows are zero and are dropped), so
  every K/V byte is read exactly once per step.
* Split: the sequence [0, S) is cut into `num_splits` equal chunks of whole `block_k` blocks. A program
  loops over the blocks of its chunk that lie below lengths[b] without any mask and runs one masked
  tail block (masked loads, so no out-of-bounds reads when S is not a multiple of block_k, and masked
  values, so garbage past the length cannot leak NaNs). Splits past the row's length do no work and
  report lse = -inf.
* The combine (tiny: B*N*num_splits*H floats) is one small Pallas kernel, one program per query
  head (`combine_splits_kernel`); its plain-jnp form `combine_splits` is the reference and serves
  `return_lse=True` and the quantized kernels.
* Rows with lengths[b] == 0 output zeros. lengths are clamped to [0, S].
* Softmax in base 2 with log2(e) folded into the scale.
* `decode_attention_append` is the same kernel for one dense-cache decode step: it also writes the
  new token's key/value into the cache (aliased in and out; written by the program whose split
  holds the position) and attends to that token from its inputs, so the cache needs no separate
  scatter (`effjax.kv.DenseCache.update_and_attend`).
* Defaults (block_k=128, num_warps=4, num_stages=3, ~1024 programs) are the best of a small sweep on
  an H200 at B=8, 32/8 heads, D=128, 64k context: 505 us per step = 4.25 TB/s of K/V
  (results/kv_decode.md; `experiments/bench_kv_decode.py`); with fewer than 64 (row, kv head)
  pairs (batch 1) ~256 programs (`default_num_splits`).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

__all__ = ["decode_attention", "decode_attention_reference", "decode_attention_append",
           "decode_attention_append_reference", "combine_splits", "combine_splits_kernel",
           "default_num_splits"]

LOG2E = math.log2(math.e)
_NEG_BIG = -0.7 * float(np.finfo(np.float32).max)


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


# ---------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------


def decode_attention_reference(q_BNH, k_BSKH, v_BSKH, lengths_B, *, sm_scale: Optional[float] = None):
  """Plain-jnp float32 GQA decode attention (the kernel's reference).

  Args:
    q_BNH: [B, N, H] query of the one new token per row.
    k_BSKH, v_BSKH: [B, S, K, H] keys and values, N % K == 0.
    lengths_B: [B] int, number of valid keys per row (positions >= length are ignored).
    sm_scale: logit scale, default 1/sqrt(H).
  Returns:
    [B, N, H] float32; rows with length 0 are zeros.
  """
  B, N, H = q_BNH.shape
  _, S, K, _ = k_BSKH.shape
  G = N // K
  scale = (1.0 / math.sqrt(H)) if sm_scale is None else float(sm_scale)
  q_BKGH = q_BNH.astype(jnp.float32).reshape(B, K, G, H)
  s_BKGS = jnp.einsum("BKGH,BSKH->BKGS", q_BKGH, k_BSKH.astype(jnp.float32)) * scale
  valid_BS = jnp.arange(S)[None, :] < jnp.asarray(lengths_B)[:, None]
  s_BKGS = jnp.where(valid_BS[:, None, None, :], s_BKGS, -jnp.inf)
  m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
  m_BKG1 = jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0)
  p_BKGS = jnp.exp(s_BKGS - m_BKG1)
  l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
  o_BKGH = jnp.einsum("BKGS,BSKH->BKGH", p_BKGS, v_BSKH.astype(jnp.float32))
  o_BKGH = jnp.where(l_BKG1 > 0, o_BKGH / jnp.where(l_BKG1 > 0, l_BKG1, 1.0), 0.0)
  return o_BKGH.reshape(B, N, H)


# ---------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------


def dot_precision(dtype):
  """Precision of the kernels' tensor-core dots: float32 operands are multiplied in full float32
  (Triton's default for them would be TF32, ~1e-3 relative error); 16-bit ones at their own."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def online_softmax_step(s_GN, v_NH, carry, *, weight_1N=None):
  """One online-softmax update (base 2) shared by the decode kernels.

  s_GN: [Gp, N] logits already in log2 units (masked entries hold a large negative number);
  v_NH: [N, H] values (any float dtype; the dot accumulates in f32);
  weight_1N: optional per-key factor applied to the probabilities before the value dot
  (the quantized kernels fold value norms/scales in here).
  """
  acc_GH, m_G, l_G = carry
  m_new = jnp.maximum(m_G, jnp.max(s_GN, axis=1))
  alpha = jnp.exp2(m_G - m_new)
  p_GN = jnp.exp2(s_GN - m_new[:, None])
  l_new = alpha * l_G + jnp.sum(p_GN, axis=1)
  pw_GN = p_GN if weight_1N is None else p_GN * weight_1N
  acc_new = acc_GH * alpha[:, None] + plgpu.dot(pw_GN.astype(v_NH.dtype), v_NH,
                                                precision=dot_precision(v_NH.dtype))
  return acc_new, m_new, l_new


def split_range(length, split, chunk: int, block_k: int):
  """[start, lim) of a split's keys, #unmasked full blocks and whether a masked tail block exists."""
  start = split * chunk
  lim = jnp.minimum(start + chunk, length)
  n = jnp.maximum(lim - start, 0)
  n_full = n // block_k
  has_tail = (n % block_k) > 0
  return start, lim, n_full, has_tail


def write_partials(o_ref, lse_ref, carry):
  """Stores the normalised partial output and its log-sum-exp (natural log; -inf if empty)."""
  acc_GH, m_G, l_G = carry
  nonempty = l_G > 0.0
  l_safe = jnp.where(nonempty, l_G, 1.0)
  o_ref[...] = (acc_GH / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(nonempty, (m_G + jnp.log2(l_safe)) / LOG2E, -jnp.inf)


def _cache_pass(q_GH, k_ref, v_ref, length, split, *, sm_scale, block_k, chunk):
  """Online-softmax carry of one program over the cache slots of its split below `length`:
  unmasked full blocks, then one masked tail block."""
  Gp, H = q_GH.shape
  qscale = sm_scale * LOG2E
  start, lim, n_full, has_tail = split_range(length, split, chunk, block_k)

  def logits(k_NH):
    return plgpu.dot(q_GH, k_NH.T, precision=dot_precision(k_NH.dtype)) * qscale

  def body(i, carry):
    sl = pl.ds(pl.multiple_of(start + i * block_k, block_k), block_k)
    return online_softmax_step(logits(k_ref[sl, :]), v_ref[sl, :], carry)

  carry = (jnp.zeros((Gp, H), jnp.float32), jnp.full((Gp,), _NEG_BIG, jnp.float32),
           jnp.zeros((Gp,), jnp.float32))
  carry = lax.fori_loop(0, n_full, body, carry)

  def tail(carry):
    t0 = start + n_full * block_k
    valid_N = t0 + jnp.arange(block_k) < lim
    sl = pl.ds(t0, block_k)
    k_NH = plgpu.load(k_ref.at[sl, :], mask=valid_N[:, None], other=0.0)
    v_NH = plgpu.load(v_ref.at[sl, :], mask=valid_N[:, None], other=0.0)
    s_GN = jnp.where(valid_N[None, :], logits(k_NH), _NEG_BIG)
    return online_softmax_step(s_GN, v_NH, carry)

  return lax.cond(has_tail, tail, lambda c: c, carry)


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale, block_k, chunk, G,
                   Gp):
  b, split = pl.program_id(0), pl.program_id(2)
  length = jnp.minimum(len_ref[b], k_ref.shape[0])
  carry = _cache_pass(_load_queries(q_ref, G, Gp).astype(k_ref.dtype), k_ref, v_ref, length,
                      split, sm_scale=sm_scale, block_k=block_k, chunk=chunk)
  write_partials(o_ref, lse_ref, carry)


def _append_kernel(pos_ref, q_ref, kn_ref, vn_ref, k_ref, v_ref, o_ref, lse_ref, ko_ref, vo_ref, *,
                   sm_scale, block_k, chunk, G, Gp):
  """`_decode_kernel` over the cache slots below the new token's position, plus the new token
  itself (read from kn/vn, not from the cache) in the program whose split holds its position;
  that program also writes the new key/value into the (aliased) cache at that position."""
  b, split = pl.program_id(0), pl.program_id(2)
  S = k_ref.shape[0]
  pos = pos_ref[b]
  has_new = (pos >= 0) & (pos < S)
  q_GH = _load_queries(q_ref, G, Gp).astype(k_ref.dtype)
  carry = _cache_pass(q_GH, k_ref, v_ref, jnp.clip(pos, 0, S), split, sm_scale=sm_scale,
                      block_k=block_k, chunk=chunk)
  owner = has_new & (pos >= split * chunk) & (pos < (split + 1) * chunk)
  kn_H, vn_H = kn_ref[...], vn_ref[...]
  # the new token: one key, so an elementwise dot (exact products of the stored-precision values)
  s_G = jnp.sum(q_GH.astype(jnp.float32) * kn_H.astype(jnp.float32)[None, :], axis=1) * (
      sm_scale * LOG2E)
  acc_GH, m_G, l_G = carry
  m_new = jnp.where(owner, jnp.maximum(m_G, s_G), m_G)
  alpha = jnp.exp2(m_G - m_new)
  p_G = jnp.where(owner, jnp.exp2(s_G - m_new), 0.0)
  carry = (acc_GH * alpha[:, None] + p_G[:, None] * vn_H.astype(jnp.float32)[None, :],
           m_new, alpha * l_G + p_G)
  write_partials(o_ref, lse_ref, carry)

  @pl.when(owner)
  def _():
    row = pl.ds(pos, 1)
    ko_ref[row, :] = kn_H[None, :].astype(ko_ref.dtype)
    vo_ref[row, :] = vn_H[None, :].astype(vo_ref.dtype)


def combine_splits(o_BKPGH, lse_BKPG, num_heads: int, out_dtype, return_lse: bool = False):
  """Merges the per-split partial outputs by their log-sum-exp; drops padded query rows.

  o_BKPGH: [B, K, P, Gp, H] normalised partial outputs; lse_BKPG: [B, K, P, Gp] (natural log,
  -inf for empty splits). Returns [B, num_heads, H] in out_dtype (zeros where all splits are empty),
  and with return_lse also the total log-sum-exp [B, num_heads] (float32, -inf for empty rows), so a
  caller can merge further parts (e.g. a full-precision window of recent tokens).
  """
  B, K, P, Gp, H = o_BKPGH.shape
  G = num_heads // K
  lse_BKPG = lse_BKPG[..., :G]
  o_BKPGH = o_BKPGH[..., :G, :]
  m_BKG = jnp.max(lse_BKPG, axis=2)
  m_BKG = jnp.where(jnp.isfinite(m_BKG), m_BKG, 0.0)
  w_BKPG = jnp.exp(lse_BKPG - m_BKG[:, :, None, :])
  den_BKG = jnp.sum(w_BKPG, axis=2)
  o_BKGH = jnp.einsum("BKPG,BKPGH->BKGH", w_BKPG, o_BKPGH.astype(jnp.float32))
  o_BKGH = o_BKGH / jnp.where(den_BKG > 0, den_BKG, 1.0)[..., None]
  out = o_BKGH.reshape(B, K * G, H).astype(out_dtype)
  if not return_lse:
    return out
  lse_BKG = jnp.where(den_BKG > 0, m_BKG + jnp.log(jnp.where(den_BKG > 0, den_BKG, 1.0)), -jnp.inf)
  return out, lse_BKG.reshape(B, K * G)


def _combine_kernel(o_ref, lse_ref, out_ref):
  """One query head: merge its P partial outputs [P, H] by their log-sum-exps [P]."""
  lse_P = lse_ref[...]
  m = jnp.max(lse_P)
  m = jnp.where(m > -jnp.inf, m, 0.0)
  w_P = jnp.exp(lse_P - m)
  den = jnp.sum(w_P)
  o_H = jnp.sum(w_P[:, None] * o_ref[...], axis=0)
  out_ref[...] = (o_H / jnp.where(den > 0.0, den, 1.0)).astype(out_ref.dtype)


def combine_splits_kernel(o_BKPGH, lse_BKPG, num_heads: int, out_dtype, *, interpret: bool = False):
  """`combine_splits` (without return_lse) as one Pallas kernel, one program per query head.

  XLA lowers the jnp merge to three kernels (max, weighted sums, divide + cast); on an H200 batch-1
  decode step these were 3.7 us of each layer's 60 (results/decode_profile_auto.md). Splits are
  padded to a power of two (Triton block sizes) with empty (-inf) partials when P is not one.
  Equals `combine_splits` up to float32 summation order.
  """
  B, K, P, Gp, H = o_BKPGH.shape
  G = num_heads // K
  Pp = _next_pow2(P)
  if Pp != P:
    o_BKPGH = jnp.pad(o_BKPGH, ((0, 0), (0, 0), (0, Pp - P), (0, 0), (0, 0)))
    lse_BKPG = jnp.pad(lse_BKPG, ((0, 0), (0, 0), (0, Pp - P), (0, 0)), constant_values=-jnp.inf)
  return pl.pallas_call(
      _combine_kernel,
      grid=(B, K, G),
      in_specs=[pl.BlockSpec((None, None, Pp, None, H), lambda b, k, g: (b, k, 0, g, 0)),
                pl.BlockSpec((None, None, Pp, None), lambda b, k, g: (b, k, 0, g))],
      out_specs=pl.BlockSpec((None, None, H), lambda b, k, g: (b, k * G + g, 0)),
      out_shape=jax.ShapeDtypeStruct((B, num_heads, H), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="decode_attention_combine",
  )(o_BKPGH, lse_BKPG)


def default_num_splits(batch: int, num_kv_heads: int, seq_len: int, block_k: int,
                       target_programs: Optional[int] = None) -> int:
  """Splits per (row, kv head) so that batch*kv_heads*splits ~ target_programs.

  Measured on an H200 (results/decode_bench.md, results/kv_decode.md): with many (row, kv head)
  pairs (>= 64, e.g. batch 8 x 8 kv heads) ~1024 programs of >= 4 blocks each are best; with
  few (batch 1) ~256 programs of >= 1 block are (more splits make the split combine costlier
  than the parallelism gained: a batch-1 1.24B-model step was 5% faster at 32k, unchanged at 2k).
  """
  rows = batch * num_kv_heads
  if target_programs is None:
    target_programs = 1024 if rows >= 64 else 256
  min_blocks = 4 if rows >= 64 else 1
  want = max(1, -(-target_programs // rows))
  most = max(1, seq_len // (min_blocks * block_k))
  return max(1, min(_next_pow2(want), most))


def _check_args(q_BNH, k_BSKH, v_BSKH, lengths_B, lengths_name="lengths_B"):
  if q_BNH.ndim != 3:
    raise ValueError(f"q_BNH must be [batch, heads, head_dim], got shape {q_BNH.shape}")
  if k_BSKH.ndim != 4 or v_BSKH.shape != k_BSKH.shape:
    raise ValueError(f"k_BSKH and v_BSKH must both be [batch, seq, kv_heads, head_dim] of one shape, "
                     f"got {k_BSKH.shape} and {v_BSKH.shape}")
  B, N, H = q_BNH.shape
  if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
    raise ValueError(f"k_BSKH {k_BSKH.shape} does not match q_BNH {q_BNH.shape} in batch/head_dim")
  K = k_BSKH.shape[2]
  if N % K:
    raise ValueError(f"num_heads ({N}) must be a multiple of num_kv_heads ({K})")
  if jnp.shape(lengths_B) != (B,):
    raise ValueError(f"{lengths_name} must have shape ({B},), got {jnp.shape(lengths_B)}")
  if H < 16 or H & (H - 1):
    raise ValueError(f"head_dim must be a power of two >= 16 for the kernel, got {H}")


def _check_block_k(block_k: int):
  if block_k < 16 or block_k & (block_k - 1):
    raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")


def _splits_and_scale(B, K, S, H, block_k, num_splits, sm_scale):
  """(num_splits, defaulted by `default_num_splits` and checked; sm_scale, default 1/sqrt(H))."""
  if num_splits is None:
    num_splits = default_num_splits(B, K, S, block_k)
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  return int(num_splits), (1.0 / math.sqrt(H)) if sm_scale is None else float(sm_scale)


def _split_layout(q_BNH, k_BSKH, block_k, num_splits):
  """(queries, group G, tile rows Gp, splits P, keys per split); the kernels cast the queries to
  the cache dtype after loading them."""
  B, N, H = q_BNH.shape
  _, S, K, _ = k_BSKH.shape
  G = N // K
  nblocks = pl.cdiv(S, block_k)
  P = max(1, min(num_splits, nblocks))
  return q_BNH, G, max(16, _next_pow2(G)), P, pl.cdiv(nblocks, P) * block_k


def _load_queries(q_ref, G: int, Gp: int):
  """The G query heads of this program's kv head (grid axis 1) from the [N, H] queries of its
  row, as a [Gp, H] tile whose rows >= G are zero (a masked load: no padded copy of q)."""
  rows = jnp.arange(Gp)
  return plgpu.load(q_ref.at[pl.ds(pl.program_id(1) * G, Gp), :], mask=(rows < G)[:, None],
                    other=0.0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret", "return_lse"))
def _decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, *, sm_scale, block_k, num_splits, num_warps,
                      num_stages, interpret, return_lse):
  B, N, H = q_BNH.shape
  _, S, K, _ = k_BSKH.shape
  q_BNH, G, Gp, P, chunk = _split_layout(q_BNH, k_BSKH, block_k, num_splits)
  lengths_B = jnp.clip(jnp.asarray(lengths_B, jnp.int32), 0, S)
  kv_bytes = 2 * B * S * K * H * k_BSKH.dtype.itemsize
  kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, block_k=block_k, chunk=chunk, G=G,
                             Gp=Gp)
  o, lse = pl.pallas_call(
      kernel,
      grid=(B, K, P),
      in_specs=[
          pl.BlockSpec((B,), lambda b, h, p: (0,)),
          pl.BlockSpec((None, N, H), lambda b, h, p: (b, 0, 0)),
          pl.BlockSpec((None, S, None, H), lambda b, h, p: (b, 0, h, 0)),
          pl.BlockSpec((None, S, None, H), lambda b, h, p: (b, 0, h, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, Gp, H), lambda b, h, p: (b, h, p, 0, 0)),
          pl.BlockSpec((None, None, None, Gp), lambda b, h, p: (b, h, p, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, K, P, Gp, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, P, Gp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      cost_estimate=pl.CostEstimate(flops=4 * B * N * S * H, transcendentals=B * N * S,
                                    bytes_accessed=kv_bytes + 2 * B * N * H * 2),
      interpret=interpret,
      name="decode_attention_bf16",
  )(lengths_B, q_BNH, k_BSKH, v_BSKH)
  if return_lse:
    return combine_splits(o, lse, N, q_BNH.dtype, return_lse=True)
  return combine_splits_kernel(o, lse, N, q_BNH.dtype, interpret=interpret)


def decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, *, sm_scale: Optional[float] = None,
                     block_k: int = 128, num_splits: Optional[int] = None, num_warps: int = 4,
                     num_stages: int = 3, interpret: bool = False, return_lse: bool = False):
  """Split-K GQA decode attention (Pallas, Triton lowering on GPU; interpret=True on CPU).

  Args:
    q_BNH: [B, N, H] query (one token per row); cast to K/V's dtype for the dots.
    k_BSKH, v_BSKH: [B, S, K, H] cache (bf16 or f16/f32), N a multiple of K, H a power of two >= 16.
    lengths_B: [B] int32 valid lengths (keys at positions >= length are ignored; clamped to [0, S]).
    sm_scale: logit scale (default 1/sqrt(H)).
    block_k: keys per inner-loop block (power of two >= 16).
    num_splits: programs per (row, kv head) along the sequence; default from `default_num_splits`.
    num_warps, num_stages: Triton launch parameters.
    interpret: run the kernel in the Pallas interpreter (CPU tests).
    return_lse: also return the log-sum-exp of the (scaled) logits, [B, N] float32.
  Returns:
    [B, N, H] in q's dtype (rows with length 0 are zeros); with return_lse, (out, lse).
  """
  _check_args(q_BNH, k_BSKH, v_BSKH, lengths_B)
  _check_block_k(block_k)
  B, S, K, H = k_BSKH.shape
  # blocks never longer than the sequence (the unmasked loop body slices whole blocks); caches
  # shorter than 16 slots are padded (a few bytes; the padded slots are past every length)
  block_k = min(block_k, max(16, 1 << (S.bit_length() - 1)))
  if S < block_k:
    pad = ((0, 0), (0, block_k - S), (0, 0), (0, 0))
    k_BSKH, v_BSKH = jnp.pad(k_BSKH, pad), jnp.pad(v_BSKH, pad)
    lengths_B = jnp.minimum(jnp.asarray(lengths_B), S)
    S = block_k
  num_splits, scale = _splits_and_scale(B, K, S, H, block_k, num_splits, sm_scale)
  return _decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, sm_scale=scale, block_k=block_k,
                           num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                           interpret=interpret, return_lse=return_lse)


# ---------------------------------------------------------------------------------------------------
# Append: write the new token's key/value into the cache and attend, in one kernel
# ---------------------------------------------------------------------------------------------------


def decode_attention_append_reference(q_BNH, k_new_BKH, v_new_BKH, k_BSKH, v_BSKH, positions_B, *,
                                      sm_scale: Optional[float] = None):
  """Plain-jnp reference of `decode_attention_append`: a scatter of the new key/value at
  `positions_B` (rows whose position is outside [0, S) write nothing), then float32 attention of
  the query over slots `0 .. positions_B` (all S slots when the position is >= S).

  Returns (out_BNH float32, k_BSKH, v_BSKH).
  """
  B, S = k_BSKH.shape[:2]
  pos_B = jnp.asarray(positions_B, jnp.int32)
  rows_B = jnp.arange(B)
  pos_B = jnp.where(pos_B < 0, S, pos_B)  # dropped (jnp would wrap negative indices)
  k_BSKH = k_BSKH.at[rows_B, pos_B].set(k_new_BKH.astype(k_BSKH.dtype), mode="drop")
  v_BSKH = v_BSKH.at[rows_B, pos_B].set(v_new_BKH.astype(v_BSKH.dtype), mode="drop")
  lengths_B = jnp.clip(pos_B + 1, 0, S)
  return (decode_attention_reference(q_BNH, k_BSKH, v_BSKH, lengths_B, sm_scale=sm_scale),
          k_BSKH, v_BSKH)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def _decode_attention_append(q_BNH, k_new_BKH, v_new_BKH, k_BSKH, v_BSKH, positions_B, *, sm_scale,
                             block_k, num_splits, num_warps, num_stages, interpret):
  B, N, H = q_BNH.shape
  _, S, K, _ = k_BSKH.shape
  q_BNH, G, Gp, P, chunk = _split_layout(q_BNH, k_BSKH, block_k, num_splits)
  kv_bytes = 2 * B * S * K * H * k_BSKH.dtype.itemsize
  kernel = functools.partial(_append_kernel, sm_scale=sm_scale, block_k=block_k, chunk=chunk, G=G,
                             Gp=Gp)
  cache_spec = pl.BlockSpec((None, S, None, H), lambda b, h, p: (b, 0, h, 0))
  new_spec = pl.BlockSpec((None, None, H), lambda b, h, p: (b, h, 0))
  o, lse, k_BSKH, v_BSKH = pl.pallas_call(
      kernel,
      grid=(B, K, P),
      in_specs=[
          pl.BlockSpec((B,), lambda b, h, p: (0,)),
          pl.BlockSpec((None, N, H), lambda b, h, p: (b, 0, 0)),
          new_spec, new_spec, cache_spec, cache_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, Gp, H), lambda b, h, p: (b, h, p, 0, 0)),
          pl.BlockSpec((None, None, None, Gp), lambda b, h, p: (b, h, p, 0)),
          cache_spec, cache_spec,
      ],
      out_shape=[jax.ShapeDtypeStruct((B, K, P, Gp, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, P, Gp), jnp.float32),
                 jax.ShapeDtypeStruct(k_BSKH.shape, k_BSKH.dtype),
                 jax.ShapeDtypeStruct(v_BSKH.shape, v_BSKH.dtype)],
      input_output_aliases={4: 2, 5: 3},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      cost_estimate=pl.CostEstimate(flops=4 * B * N * S * H, transcendentals=B * N * S,
                                    bytes_accessed=kv_bytes + 2 * B * N * H * 2),
      interpret=interpret,
      name="decode_attention_append_bf16",
  )(jnp.asarray(positions_B, jnp.int32), q_BNH, k_new_BKH.astype(k_BSKH.dtype),
    v_new_BKH.astype(v_BSKH.dtype), k_BSKH, v_BSKH)
  return combine_splits_kernel(o, lse, N, q_BNH.dtype, interpret=interpret), k_BSKH, v_BSKH


def decode_attention_append(q_BNH, k_new_BKH, v_new_BKH, k_BSKH, v_BSKH, positions_B, *,
                            sm_scale: Optional[float] = None, block_k: int = 128,
                            num_splits: Optional[int] = None, num_warps: int = 4,
                            num_stages: int = 3, interpret: bool = False):
  """One decode step of a dense cache in one kernel: write the new key/value, then attend.

  Equals `decode_attention_append_reference`: row b's new key/value go to slot `positions_B[b]`
  of the cache (nothing is written when the position lies outside [0, S)), and its query attends
  over slots `0 .. positions_B[b]`, the new token included (read from `k_new_BKH`/`v_new_BKH`,
  not back from the cache). Fusing the write into the attention kernel saves the separate
  scatter kernels of `DenseCache.update` (three small kernels per layer and step in XLA).

  Args:
    q_BNH: [B, N, H] queries of the new token (RoPE applied).
    k_new_BKH, v_new_BKH: [B, K, H] its key (RoPE applied) and value.
    k_BSKH, v_BSKH: [B, S, K, H] the cache; updated in place when the caller donates them
      (inside a jitted decode loop XLA reuses the buffers).
    positions_B: [B] int32 absolute position of the new token per row.
    sm_scale, block_k, num_splits, num_warps, num_stages, interpret: as in `decode_attention`.
  Returns:
    (out_BNH in q's dtype, k_BSKH, v_BSKH).
  """
  _check_args(q_BNH, k_BSKH, v_BSKH, positions_B, "positions_B")
  B, S, K, H = k_BSKH.shape
  for name, x in (("k_new_BKH", k_new_BKH), ("v_new_BKH", v_new_BKH)):
    if x.shape != (B, K, H):
      raise ValueError(f"{name} must be [batch, kv_heads, head_dim] = {(B, K, H)}, got {x.shape}")
  _check_block_k(block_k)
  if S < 16:
    raise ValueError(f"decode_attention_append needs a cache of >= 16 slots, got {S}")
  block_k = min(block_k, 1 << (S.bit_length() - 1))
  num_splits, scale = _splits_and_scale(B, K, S, H, block_k, num_splits, sm_scale)
  return _decode_attention_append(q_BNH, k_new_BKH, v_new_BKH, k_BSKH, v_BSKH, positions_B,
                                  sm_scale=scale, block_k=block_k, num_splits=num_splits,
                                  num_warps=num_warps, num_stages=num_stages, interpret=interpret)
