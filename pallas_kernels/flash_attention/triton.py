"""Flash attention for NVIDIA GPUs through the Pallas *Triton* lowering (all Triton code lives here).

"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (Dao,
arXiv 2307.08691), Algorithm 1 (forward: tiled online softmax, Eqs. of
Sec. 3.1.1 -- running max m, running sum l, unnormalised output rescaled by exp(m_old - m_new)) and
Algorithm 2 (backward: recompute P = exp(S - LSE), dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - D) with
D = rowsum(dO ∘ O), dQ = dS K, dK = dSᵀ Q). FlashAttention-4 ideas (the flash-attention repo's
`flash_attn/cute`, no arXiv paper): exp2 with log2(e) folded into the logit scale, and
conditional rescaling (skip the O/l rescale unless the running max grew by more than a threshold,
8.0 in log2 units), both switchable through `KernelConfig` and measured in
`experiments/bench_attention.py`. Optional (`BlockSizes.fma_softmax`, as in Triton's
fused-attention tutorial): in tiles that need no mask the running max is taken over the raw
scores and the exponent is formed as raw * c - m, one FMA per score instead of a multiply and a
subtract (c = scale * log2(e)); the softmax part of the loop is issue-bound on Hopper (exp -> exp2
alone gave +11%), so one instruction less per score should show.

Choices where the papers leave room:
  * GQA: one program owns `gp` query heads of one KV group (gp = largest power of two dividing
    G, capped by the tile), so each K/V tile is loaded once for all gp heads; the q tile is the
    [block_q, gp, H] slab reshaped to [block_q * gp, H] rows ordered (t, g).
  * Backward, two options (`BlockSizes.dq_atomic`):
      - False (default): two kernels, no atomics. dK/dV parallel over key tiles, looping over
        every query head of the group and the visible query tiles; dQ parallel over query tiles.
        The dQ kernel recomputes S = Q Kᵀ and dP = dO Vᵀ: 7 matmuls per (query, key) tile pair.
      - True: FlashAttention-2's own scheme (Algorithm 2: the dQ_i <- dQ_i + dS_ij K_j update
        inside the key-tile loop; Sec. 3.2: thread blocks communicate through atomic adds): the
        dK/dV kernel also forms dS_ij K_j and adds it with `atomic_add` into a zero-initialised
        float32 [B, Tp, N, H] buffer (passed in and aliased to an output), so dQ costs one
        matmul and no recomputation: 5 matmuls. Several key tiles (and, with GQA, never two
        query heads) add into the same dQ rows, hence the atomics; the summation order is not
        fixed, so dQ is not bitwise reproducible run to run. The scale and the cast to the
        input dtype are applied by XLA afterwards (one fused elementwise pass). Costs: the
        fp32 atomics move 2 * 4 * B * Tp * N * H bytes per visited key tile through L2, and the
        dK/dV kernel holds one more [block_q, H] fp32 tile (so it wants 8 warps at H = 128).
    The dK/dV kernel comes in two orientations (`BlockSizes.dkv_transposed`): scores S = Q Kᵀ [M, bn]
    (default) or Sᵀ = K Qᵀ [bn, M]; the tuned table picks per shape (H200: the transposed one
    wins for D=128 without masks at S <= 4k and loses with causal masks). D is computed
    by XLA (a cheap fused reduction).
  * Fully masked key tiles (causal / window / padding) are not visited: the loop bounds come
    from `_common.kv_block_range`; tiles needing no mask run a mask-free loop body; with segment
    ids a tile whose id range does not meet the query tile's range is skipped by a branch.
  * Query tiles of a causal forward are launched heaviest first (reverse order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import ptx
from pallas_kernels.flash_attention import _common as C


def compiler_params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _row_positions(t0, bq: int, gp: int, off: int):
  """Aligned query positions of the (t, g)-ordered tile rows, [bq * gp, 1]."""
  iota = lax.broadcasted_iota(jnp.int32, (bq * gp, 1), 0)
  if gp > 1:
    iota = lax.div(iota, jnp.int32(gp))
  return t0 + off + iota


def _rows(x_bq_gp, bq: int, gp: int):
  """[bq, gp, ...] tile -> [bq * gp, ...]."""
  return x_bq_gp.reshape((bq * gp,) + x_bq_gp.shape[2:])


def _seg_rows(qseg_bq, bq: int, gp: int):
  if gp == 1:
    return qseg_bq[:, None]
  return jnp.broadcast_to(qseg_bq[:, None], (bq, gp)).reshape(bq * gp, 1)


def _overlap(qseg_M1, kseg_1N):
  """True unless the two tiles' segment-id ranges are disjoint (then no pair can match)."""
  return jnp.logical_and(jnp.max(kseg_1N) >= jnp.min(qseg_M1),
                         jnp.min(kseg_1N) <= jnp.max(qseg_M1))


def _loop_segments(lo, full_lo, full_hi, hi, body, carry):
  """Runs body(j, carry, masked) over [lo, full_lo) masked, [full_lo, full_hi) unmasked,
  [full_hi, hi) masked."""
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _exp_fn(cfg: C.KernelConfig):
  """The softmax exponential: `ptx.exp2_ftz` when `cfg.ftz_exp2`, else `_common.exp_fn`."""
  if cfg.ftz_exp2:
    return functools.partial(ptx.exp2_ftz, interpret=cfg.interpret)
  return C.exp_fn(cfg)


# ----------------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *,
                cfg: C.KernelConfig, bq: int, gp: int, bn: int, nq: int, nk: int,
                padded_kv: int, reverse: bool):
  exp = _exp_fn(cfg)
  pid = pl.program_id(0)
  i = (nq - 1 - pid) if reverse else pid
  t0 = i * bq
  M = bq * gp
  H = q_ref.shape[-1]
  q = _rows(q_ref[...], bq, gp)
  qpos = _row_positions(t0, bq, gp, cfg.offset)
  qseg = _seg_rows(qseg_ref[...], bq, gp) if cfg.has_segments else None
  kv_padded = C.needs_kv_pad_mask(cfg, padded_kv)
  lo, hi, full_lo, full_hi = C.kv_block_range(t0, bq, bn, nk, cfg, padded_kv)

  def step(j, carry, masked):
    m_i, l_i, acc = carry
    sl = pl.ds(j * bn, bn)
    kseg = kseg_ref[sl][None, :] if cfg.has_segments else None

    fold = C.folds_scale(cfg) and not masked

    def compute(carry):
      m_i, l_i, acc = carry
      if fold:  # raw scores; m in the scaled domain (c > 0 commutes with max)
        s = C.dot_nt(q, k_ref[sl, :], cfg)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1) * C.logit_factor(cfg))
      else:
        s, _ = C.logits(q, k_ref[sl, :], cfg)
        if masked:
          kpos = j * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
          mask = C.block_mask(qpos, kpos, qseg, kseg, cfg, kv_padded)
          if mask is not None:
            s = jnp.where(mask, s, C.MASK_VALUE)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
      if cfg.rescale_threshold is None:
        alpha = exp(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
      else:
        def rescale(c):
          m_old, l_old, a_old = c
          alpha = exp(m_old - m_new)
          return m_new, l_old * alpha, a_old * alpha[:, None]
        grow = jnp.max(m_new - m_i)
        m_i, l_i, acc = lax.cond(grow > cfg.rescale_threshold, rescale, lambda c: c,
                                 (m_i, l_i, acc))
      p = exp(s * C.logit_factor(cfg) - m_i[:, None]) if fold else exp(s - m_i[:, None])
      l_i = l_i + jnp.sum(p, axis=1)
      v = v_ref[sl, :]
      acc = acc + C.dot_nn(p.astype(v.dtype), v, cfg)
      return m_i, l_i, acc

    if cfg.has_segments:
      return lax.cond(_overlap(qseg, kseg), compute, lambda c: c, carry)
    return compute(carry)

  carry = (jnp.full((M,), C.MASK_VALUE, jnp.float32), jnp.zeros((M,), jnp.float32),
           jnp.zeros((M, H), jnp.float32))
  m_i, l_i, acc = _loop_segments(lo, full_lo, full_hi, hi, step, carry)
  valid = m_i > 0.5 * C.MASK_VALUE
  l_safe = jnp.where(valid, l_i, 1.0)
  inv_l = jnp.where(valid, 1.0 / l_safe, 0.0)
  o = acc * inv_l[:, None]
  o_ref[...] = o.astype(o_ref.dtype).reshape(bq, gp, H)
  lse = jnp.where(valid, m_i + C.log_fn(cfg)(l_safe), jnp.inf)
  lse_ref[...] = lse.reshape(bq, gp)


def forward(q5, k4, v4, qseg, kseg, cfg: C.KernelConfig, blk: dict):
  """q5 [B, Tp, N/gp, gp, H], k4/v4 [B, Sp, K, H] -> (o5 like q5, lse [B, Tp, N/gp, gp])."""
  B, Tp, NP, gp, H = q5.shape
  Sp, K = k4.shape[1], k4.shape[2]
  bq, bn = blk["bq"], blk["bn"]
  nq, nk = Tp // bq, Sp // bn
  G = cfg.group
  reverse = cfg.right is not None
  qmap = (lambda p, b, h: (b, nq - 1 - p, h, 0, 0)) if reverse else (
      lambda p, b, h: (b, p, h, 0, 0))
  lmap = (lambda p, b, h: (b, nq - 1 - p, h, 0)) if reverse else (lambda p, b, h: (b, p, h, 0))
  kvmap = lambda p, b, h: (b, 0, lax.div(h * gp, G), 0)
  in_specs = [
      pl.BlockSpec((None, bq, None, gp, H), qmap),
      pl.BlockSpec((None, Sp, None, H), kvmap),
      pl.BlockSpec((None, Sp, None, H), kvmap),
  ]
  if cfg.has_segments:
    segmap = (lambda p, b, h: (b, nq - 1 - p)) if reverse else (lambda p, b, h: (b, p))
    in_specs += [pl.BlockSpec((None, bq), segmap), pl.BlockSpec((None, Sp), lambda p, b, h: (b, 0))]
  else:
    in_specs += [None, None]
  kernel = functools.partial(_fwd_kernel, cfg=cfg, bq=bq, gp=gp, bn=bn, nq=nq, nk=nk,
                             padded_kv=Sp, reverse=reverse)
  flops = 4 * B * NP * gp * Tp * Sp * H
  nbytes = q5.dtype.itemsize * (2 * q5.size + 2 * k4.size * (NP * gp // K))
  o5, lse = pl.pallas_call(
      kernel,
      grid=(nq, B, NP),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, gp, H), qmap),
                 pl.BlockSpec((None, bq, None, gp), lmap)],
      out_shape=[jax.ShapeDtypeStruct(q5.shape, q5.dtype),
                 jax.ShapeDtypeStruct((B, Tp, NP, gp), jnp.float32)],
      compiler_params=compiler_params(blk["warps"], blk["stages"]),
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=B * NP * gp * Tp * Sp,
                                    bytes_accessed=nbytes),
      interpret=cfg.interpret,
      name="flash_fwd_triton",
  )(q5, k4, v4, qseg, kseg)
  return o5, lse


# ---------------------------------------------------------------------------------- backward

def _probs(a, b, lse, mask_fn, cfg: C.KernelConfig, masked: bool, lse_axis: int):
  """P = exp(logits(a bᵀ) - lse) for one tile, and tanh for the softcap derivative (or None).

  `lse` broadcasts along `lse_axis` (1: rows are queries; 0: columns are, transposed tiles);
  `mask_fn()` gives the tile's mask (or None). Unmasked tiles with `fma_softmax` use one FMA.
  """
  lse_b = lse[:, None] if lse_axis == 1 else lse[None, :]
  exp = _exp_fn(cfg)
  if C.folds_scale(cfg) and not masked:
    return exp(C.dot_nt(a, b, cfg) * C.logit_factor(cfg) - lse_b), None
  s, th = C.logits(a, b, cfg)
  if masked:
    mask = mask_fn()
    if mask is not None:
      s = jnp.where(mask, s, C.MASK_VALUE)
  return exp(s - lse_b), th


def _ds(p, dp, delta, th, cfg):
  ds = p * (dp - delta[:, None])
  if cfg.softcap is not None:
    ds = ds * (1.0 - th * th)
  return ds


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: C.KernelConfig, bq: int, gp: int, bn: int, nk: int, padded_kv: int):
  i = pl.program_id(0)
  t0 = i * bq
  q = _rows(q_ref[...], bq, gp)
  do = _rows(do_ref[...], bq, gp)
  lse = _rows(lse_ref[...], bq, gp)
  delta = _rows(delta_ref[...], bq, gp)
  qpos = _row_positions(t0, bq, gp, cfg.offset)
  qseg = _seg_rows(qseg_ref[...], bq, gp) if cfg.has_segments else None
  kv_padded = C.needs_kv_pad_mask(cfg, padded_kv)
  lo, hi, full_lo, full_hi = C.kv_block_range(t0, bq, bn, nk, cfg, padded_kv)

  def step(j, dq, masked):
    sl = pl.ds(j * bn, bn)
    kseg = kseg_ref[sl][None, :] if cfg.has_segments else None

    def compute(dq):
      k = k_ref[sl, :]
      mask_fn = lambda: C.block_mask(
          qpos, j * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1), qseg, kseg, cfg, kv_padded)
      p, th = _probs(q, k, lse, mask_fn, cfg, masked, lse_axis=1)
      dp = C.dot_nt(do, v_ref[sl, :], cfg)
      ds = _ds(p, dp, delta, th, cfg)
      return dq + C.dot_nn(ds.astype(k.dtype), k, cfg)

    if cfg.has_segments:
      return lax.cond(_overlap(qseg, kseg), compute, lambda c: c, dq)
    return compute(dq)

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = _loop_segments(lo, full_lo, full_hi, hi, step, dq)
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype).reshape(q_ref.shape)


def _dkdv_outputs(rest, dq_atomic: bool):
  """(dk_ref, dv_ref, dq_ref or None) from the refs after delta_ref."""
  if dq_atomic:
    _, dk_ref, dv_ref, dq_ref = rest  # rest[0] is the aliased dQ input (same buffer as dq_ref)
    return dk_ref, dv_ref, dq_ref
  dk_ref, dv_ref = rest
  return dk_ref, dv_ref, None


def _dq_atomic_add(dq_ref, sl, hs, dq_MH, bq: int, gp: int):
  """dq_ref[sl, hs, :] += dq tile ((t, g)-ordered rows), with atomics (FA2's dQ update)."""
  plgpu.atomic_add(dq_ref, (sl, hs, slice(None)), dq_MH.reshape(bq, gp, dq_MH.shape[-1]))


def _dkdv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, *rest,
                 cfg: C.KernelConfig, bq: int, gp: int, bn: int, nq: int, padded_kv: int,
                 dq_atomic: bool = False):
  """dK, dV for one key tile (scores S = Q Kᵀ [M, bn]); with `dq_atomic` also dQ (atomics)."""
  dk_ref, dv_ref, dq_ref = _dkdv_outputs(rest, dq_atomic)
  j = pl.program_id(0)
  s0 = j * bn
  G = cfg.group
  k = k_ref[...]
  v = v_ref[...]
  H = k.shape[-1]
  kpos = s0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
  kseg = kseg_ref[...][None, :] if cfg.has_segments else None
  kv_padded = C.needs_kv_pad_mask(cfg, padded_kv)
  lo, hi, full_lo, full_hi = C.q_block_range(s0, bn, bq, nq, cfg, padded_kv)

  def head_chunk(c, carry):
    hs = pl.ds(c * gp, gp) if gp != G else slice(None)

    def step(i, carry, masked):
      sl = pl.ds(i * bq, bq)
      qseg = _seg_rows(qseg_ref[sl], bq, gp) if cfg.has_segments else None

      def compute(carry):
        dk, dv = carry
        q = _rows(q_ref[sl, hs, :], bq, gp)
        do = _rows(do_ref[sl, hs, :], bq, gp)
        lse = _rows(lse_ref[sl, hs], bq, gp)
        delta = _rows(delta_ref[sl, hs], bq, gp)
        mask_fn = lambda: C.block_mask(_row_positions(i * bq, bq, gp, cfg.offset), kpos, qseg,
                                       kseg, cfg, kv_padded)
        p, th = _probs(q, k, lse, mask_fn, cfg, masked, lse_axis=1)
        dv = dv + C.dot_tn(p.astype(do.dtype), do, cfg)
        dp = C.dot_nt(do, v, cfg)
        ds = _ds(p, dp, delta, th, cfg).astype(q.dtype)
        dk = dk + C.dot_tn(ds, q, cfg)
        if dq_ref is not None:
          _dq_atomic_add(dq_ref, sl, hs, C.dot_nn(ds, k, cfg), bq, gp)
        return dk, dv

      if cfg.has_segments:
        return lax.cond(_overlap(qseg, kseg), compute, lambda c: c, carry)
      return compute(carry)

    return _loop_segments(lo, full_lo, full_hi, hi, step, carry)

  carry = (jnp.zeros((bn, H), jnp.float32), jnp.zeros((bn, H), jnp.float32))
  n_chunks = G // gp
  if n_chunks == 1:
    dk, dv = head_chunk(0, carry)
  else:
    dk, dv = lax.fori_loop(0, n_chunks, head_chunk, carry)
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_kernel_transposed(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
                            delta_ref, *rest, cfg: C.KernelConfig, bq: int, gp: int, bn: int,
                            nq: int, padded_kv: int, dq_atomic: bool = False):
  """dK, dV for one key tile. Works on transposed scores sT = K Qᵀ [bn, M] (as Triton's own
  fused-attention tutorial does) so that dV += Pᵀ dO and dK += dSᵀ Q need no register-tile
  transpose; only the loaded Q / dO operands are read transposed. With `dq_atomic` also
  dQ += dSᵀᵀ K through atomics."""
  dk_ref, dv_ref, dq_ref = _dkdv_outputs(rest, dq_atomic)
  j = pl.program_id(0)
  s0 = j * bn
  G = cfg.group
  M = bq * gp
  k = k_ref[...]
  v = v_ref[...]
  H = k.shape[-1]
  kpos = s0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
  kseg = kseg_ref[...][:, None] if cfg.has_segments else None
  kv_padded = C.needs_kv_pad_mask(cfg, padded_kv)
  lo, hi, full_lo, full_hi = C.q_block_range(s0, bn, bq, nq, cfg, padded_kv)

  def head_chunk(c, carry):
    hs = pl.ds(c * gp, gp) if gp != G else slice(None)

    def step(i, carry, masked):
      sl = pl.ds(i * bq, bq)
      qseg = _seg_rows(qseg_ref[sl], bq, gp).reshape(1, M) if cfg.has_segments else None

      def compute(carry):
        dk, dv = carry
        q = _rows(q_ref[sl, hs, :], bq, gp)
        do = _rows(do_ref[sl, hs, :], bq, gp)
        lse = _rows(lse_ref[sl, hs], bq, gp)
        delta = _rows(delta_ref[sl, hs], bq, gp)
        mask_fn = lambda: C.block_mask(_row_positions(i * bq, bq, gp, cfg.offset).reshape(1, M),
                                       kpos, qseg, kseg, cfg, kv_padded)
        pt, th = _probs(k, q, lse, mask_fn, cfg, masked, lse_axis=0)  # [bn, M]
        dv = dv + C.dot_nn(pt.astype(do.dtype), do, cfg)
        dpt = C.dot_nt(v, do, cfg)
        dst = pt * (dpt - delta[None, :])
        if cfg.softcap is not None:
          dst = dst * (1.0 - th * th)
        dst = dst.astype(q.dtype)
        dk = dk + C.dot_nn(dst, q, cfg)
        if dq_ref is not None:
          _dq_atomic_add(dq_ref, sl, hs, C.dot_tn(dst, k, cfg), bq, gp)
        return dk, dv

      if cfg.has_segments:
        return lax.cond(_overlap(qseg, kseg), compute, lambda c: c, carry)
      return compute(carry)

    return _loop_segments(lo, full_lo, full_hi, hi, step, carry)

  carry = (jnp.zeros((bn, H), jnp.float32), jnp.zeros((bn, H), jnp.float32))
  n_chunks = G // gp
  if n_chunks == 1:
    dk, dv = head_chunk(0, carry)
  else:
    dk, dv = lax.fori_loop(0, n_chunks, head_chunk, carry)
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q4, k4, v4, qseg, kseg, o4, lse4, do4, cfg: C.KernelConfig, blk: dict):
  """Gradients (dq, dk, dv) for padded arrays q4/do4/o4 [B,Tp,N,H], k4/v4 [B,Sp,K,H]."""
  B, Tp, N, _ = q4.shape
  delta = jnp.sum(o4.astype(jnp.float32) * do4.astype(jnp.float32), axis=-1)  # [B, Tp, N]
  lse = lse4.reshape(B, Tp, N)
  if blk.get("dq_atomic", False):
    dk, dv, dq_acc = _dkdv_call(q4, k4, v4, qseg, kseg, do4, lse, delta, cfg, blk,
                                dq_atomic=True)
    return (dq_acc * cfg.sm_scale).astype(q4.dtype).reshape(q4.shape), dk, dv
  dq5 = _dq_call(q4, k4, v4, qseg, kseg, do4, lse, delta, cfg, blk)
  dk, dv = _dkdv_call(q4, k4, v4, qseg, kseg, do4, lse, delta, cfg, blk, dq_atomic=False)
  return dq5.reshape(q4.shape), dk, dv


def _dq_call(q4, k4, v4, qseg, kseg, do4, lse, delta, cfg: C.KernelConfig, blk: dict):
  """Separate dQ kernel (two-kernel backward): dq [B, Tp, N/gp, gp, H] in q's dtype."""
  B, Tp, N, H = q4.shape
  Sp, K = k4.shape[1], k4.shape[2]
  G = N // K
  # dQ: like the forward, one program per (query tile, batch, head chunk).
  gp, bq, bn = blk["dq_gp"], blk["dq_bq"], blk["dq_bn"]
  NP, nq, nk = N // gp, Tp // bq, Sp // bn
  qmap = lambda p, b, h: (b, p, h, 0, 0)
  lmap = lambda p, b, h: (b, p, h, 0)
  kvmap = lambda p, b, h: (b, 0, lax.div(h * gp, G), 0)
  specs = [pl.BlockSpec((None, bq, None, gp, H), qmap), pl.BlockSpec((None, Sp, None, H), kvmap),
           pl.BlockSpec((None, Sp, None, H), kvmap)]
  if cfg.has_segments:
    specs += [pl.BlockSpec((None, bq), lambda p, b, h: (b, p)),
              pl.BlockSpec((None, Sp), lambda p, b, h: (b, 0))]
  else:
    specs += [None, None]
  specs += [pl.BlockSpec((None, bq, None, gp, H), qmap), pl.BlockSpec((None, bq, None, gp), lmap),
            pl.BlockSpec((None, bq, None, gp), lmap)]
  r5 = lambda x: x.reshape(B, Tp, NP, gp, *x.shape[3:])
  dq5 = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, bq=bq, gp=gp, bn=bn, nk=nk, padded_kv=Sp),
      grid=(nq, B, NP), in_specs=specs,
      out_specs=pl.BlockSpec((None, bq, None, gp, H), qmap),
      out_shape=jax.ShapeDtypeStruct((B, Tp, NP, gp, H), q4.dtype),
      compiler_params=compiler_params(blk["dq_warps"], blk["dq_stages"]),
      cost_estimate=pl.CostEstimate(flops=6 * B * N * Tp * Sp * H,
                                    transcendentals=B * N * Tp * Sp,
                                    bytes_accessed=q4.dtype.itemsize * 4 * q4.size),
      interpret=cfg.interpret, name="flash_dq_triton",
  )(r5(q4), k4, v4, qseg, kseg, r5(do4), r5(lse), r5(delta))
  return dq5


def _dkdv_call(q4, k4, v4, qseg, kseg, do4, lse, delta, cfg: C.KernelConfig, blk: dict, *,
               dq_atomic: bool):
  """dK/dV kernel: one program per (key tile, batch, kv head), looping over all G heads of the
  group. Returns (dk, dv), plus the float32 unscaled dQ sum [B, Tp, K, G, H] with `dq_atomic`."""
  B, Tp, N, H = q4.shape
  Sp, K = k4.shape[1], k4.shape[2]
  G = N // K
  gp, bq, bn = blk["dkv_gp"], blk["dkv_bq"], blk["dkv_bn"]
  nq, nk = Tp // bq, Sp // bn
  r5 = lambda x: x.reshape(B, Tp, K, G, *x.shape[3:])
  fullq = lambda p, b, h: (b, 0, h, 0, 0)
  fulll = lambda p, b, h: (b, 0, h, 0)
  kvmap = lambda p, b, h: (b, p, h, 0)
  specs = [pl.BlockSpec((None, Tp, None, G, H), fullq), pl.BlockSpec((None, bn, None, H), kvmap),
           pl.BlockSpec((None, bn, None, H), kvmap)]
  if cfg.has_segments:
    specs += [pl.BlockSpec((None, Tp), lambda p, b, h: (b, 0)),
              pl.BlockSpec((None, bn), lambda p, b, h: (b, p))]
  else:
    specs += [None, None]
  specs += [pl.BlockSpec((None, Tp, None, G, H), fullq), pl.BlockSpec((None, Tp, None, G), fulll),
            pl.BlockSpec((None, Tp, None, G), fulll)]
  kernel = _dkdv_kernel_transposed if blk["dkv_transposed"] else _dkdv_kernel
  out_specs = [pl.BlockSpec((None, bn, None, H), kvmap), pl.BlockSpec((None, bn, None, H), kvmap)]
  out_shape = [jax.ShapeDtypeStruct(k4.shape, k4.dtype), jax.ShapeDtypeStruct(v4.shape, v4.dtype)]
  args = [r5(q4), k4, v4, qseg, kseg, r5(do4), r5(lse), r5(delta)]
  aliases = {}
  nbytes = q4.dtype.itemsize * 4 * q4.size
  if dq_atomic:
    # Zero-initialised float32 dQ accumulator, the same buffer in and out (input_output_aliases).
    specs.append(pl.BlockSpec((None, Tp, None, G, H), fullq))
    out_specs.append(pl.BlockSpec((None, Tp, None, G, H), fullq))
    out_shape.append(jax.ShapeDtypeStruct((B, Tp, K, G, H), jnp.float32))
    args.append(jnp.zeros((B, Tp, K, G, H), jnp.float32))
    aliases = {len(jax.tree.leaves(args)) - 1: 2}  # flat index: absent segment ids are None
    nbytes += 4 * q4.size * 2 * pl.cdiv(Sp, bn)  # every key tile reads+writes its dQ rows
  outs = pl.pallas_call(
      functools.partial(kernel, cfg=cfg, bq=bq, gp=gp, bn=bn, nq=nq, padded_kv=Sp,
                        dq_atomic=dq_atomic),
      grid=(nk, B, K), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=compiler_params(blk["dkv_warps"], blk["dkv_stages"]),
      cost_estimate=pl.CostEstimate(flops=(10 if dq_atomic else 8) * B * N * Tp * Sp * H,
                                    transcendentals=B * N * Tp * Sp, bytes_accessed=nbytes),
      interpret=cfg.interpret, name="flash_dkdvdq_triton" if dq_atomic else "flash_dkdv_triton",
  )(*args)
  return tuple(outs)
