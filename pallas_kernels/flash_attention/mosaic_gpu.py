"""Mosaic GPU (Hopper) lowering of the flash-attention kernels: warp-specialised and TMA-fed.

"FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision" (Shah, Bikshandi,
Zhang, Thakkar, Ramani, Dao; arXiv 2407.08608). Implemented here:
  * warp specialisation (Sec. 3.1): one producer warpgroup issues the TMA copies of K/V (forward)
    or Q/dO/lse/delta (backward) into a ring of `stages` shared-memory slots, with full/consumed
    mbarriers per slot; two consumer warpgroups each own 64 query rows (forward, dQ) or 64 key rows
    (dK/dV) and run the wgmma matmuls on the shared slots;
  * inter-warpgroup pingpong (Sec. 3.1, Fig. 1): a two-party "schedule" barrier orders the two
    consumers so that one's softmax overlaps the other's matmuls;
  * the online softmax of FlashAttention-2 (Algorithm 1 of arXiv 2307.08691) with exp2 and the
    log2(e) factor folded into the logit scale (FlashAttention-4's trick), rows with no visible key
    returning zeros and `lse = +inf`;
  * the backward of FlashAttention-2 (Algorithm 2) as two kernels without atomics: dK/dV per key
    tile (looping over every query head of the GQA group and the visible query tiles), dQ per
    query tile; delta = rowsum(dO * O) is one XLA reduction.
Not implemented (FA3 Sec. 3.2-3.3): intra-warpgroup overlap of softmax with the next QK^T, and
FP8. Masks (causal bottom-right aligned, sliding window, key padding) come from `_common`, so
the semantics and the skipping of fully-masked tiles are those of the Triton and TPU kernels.
Logit softcap and segment ids are not supported by this lowering (`unsupported` names them).

Choices: tiles are 64 query rows per consumer warpgroup (128 per CTA) and 128 keys (64 for
head_dim 256) in the forward, 64 x 64 in the backward; two-slot rings (one slot in the backward
at head_dim 256, for shared memory). Inputs are bf16/fp16 with head_dim a multiple of 64 (the API
pads other head dims with zeros). Interpret mode (CPU tests) runs the same kernels under Pallas's
Mosaic GPU interpreter, except that each wgmma is a jnp matmul of the loaded operands (`_mm`: jax
0.10's interpreter handles neither transposed wgmma operands nor `run_state`). On CPU under
`jax.jit`, that interpreter (jax 0.10.2) hangs in the backward kernels (the forward runs), so the
CPU tests call them eagerly.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax._src.state import types as state_types

from pallas_kernels.flash_attention import _common as C

COMPUTE_WGS = 2  # consumer warpgroups per CTA (the producer is a third)
_SCHED_REGS = (232, 40)  # registers per thread: consumers, producer (FA3's setmaxnreg split)


def unsupported(*, dtype, head_dim: int, softcap=None, has_segments: bool = False
                ) -> Optional[str]:
  """Why this lowering cannot run a call (a message naming the feature), or None."""
  if softcap is not None:
    return "softcap"
  if has_segments:
    return "segment_ids"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (bfloat16/float16 only)"
  if head_dim > 256:
    return f"head_dim {head_dim} (at most 256)"
  return None


def is_hopper() -> bool:
  """True when the default device is an NVIDIA GPU of compute capability 9.x (wgmma)."""
  dev = jax.devices()[0]
  return jax.default_backend() == "gpu" and str(getattr(dev, "compute_capability", "")
                                                ).startswith("9")


def tiles(head_dim: int, T: int, S: int):
  """(tile dict, padded q_len, padded kv_len) for the Mosaic GPU kernels."""
  bq = 64
  bk = 64 if head_dim > 128 else 128
  # head_dim 256: one-slot rings in the backward kernels (shared memory: 227 KB per CTA)
  t = {"bq": bq, "bk": bk, "stages": 2, "bwd_stages": 1 if head_dim > 128 else 2,
       "dkv_bk": 64, "dkv_bq": 64, "dq_bq": 64, "dq_bk": 64}
  cta_q = COMPUTE_WGS * bq
  Tp = -(-T // cta_q) * cta_q
  Sp = -(-S // max(bk, COMPUTE_WGS * t["dkv_bk"])) * max(bk, COMPUTE_WGS * t["dkv_bk"])
  return t, Tp, Sp


def _interpret_params(interpret: bool):
  if not interpret:
    return None
  cls = getattr(plgpu, "InterpretGPUParams", None)
  if cls is None:  # jax 0.10 keeps it private
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls  # pylint: disable=g-import-not-at-top
  return cls()


def _t(ref):
  """The transposed view of a 2-D shared-memory ref (a wgmma operand)."""
  if not isinstance(ref, state_types.TransformedRef):
    ref = ref.at[...]
  return ref.transpose((1, 0))


def _val(x):
  """The value of a ref (loaded), or `x` itself if it is already a value."""
  is_ref = isinstance(x, state_types.TransformedRef) or isinstance(
      getattr(x, "aval", None), state_types.AbstractRef)
  return x[...] if is_ref else x


def _mm(a, b_ref, shape, interpret: bool, *, transpose_b: bool = False, while_running=None):
  """A fresh float32 wgmma accumulator `a @ b` (`a`: registers or smem, `b`: smem).

  `while_running()` is called after the wgmma is issued and before its result is read (the
  FA3 pingpong barrier goes there). In interpret mode the product is a jnp matmul of the loaded
  operands (jax 0.10's GPU interpreter handles neither transposed wgmma operands nor
  `run_state`); everything around it (TMA copies, barriers, masks, softmax) is interpreted as
  compiled.
  """
  if interpret:
    av, bv = _val(a).astype(jnp.float32), b_ref[...].astype(jnp.float32)
    out = jnp.dot(av, bv.T if transpose_b else bv, preferred_element_type=jnp.float32)
    if while_running is not None:
      while_running()
    return out
  b = _t(b_ref) if transpose_b else b_ref

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    if while_running is not None:
      while_running()
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mm_acc(acc, a, b_ref, interpret: bool):
  """`acc + a @ b` with the wgmma accumulating into the register accumulator `acc` itself."""
  if interpret:
    return acc + _mm(a, b_ref, acc.shape, interpret)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def _smem(shape, dtype, swizzled=True):
  if not swizzled:
    return plgpu.SMEM(shape, dtype)
  swizzle = 128
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // jnp.dtype(
      dtype).itemsize)), plgpu.SwizzleTransform(swizzle)))


def _iota(shape, dim, interpret: bool):
  if interpret:  # the interpreter has no register layouts
    return lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _full(shape, value, layout, interpret: bool):
  """A constant register array in `layout` (wgmma accumulator or its row reduction)."""
  x = jnp.full(shape, value, jnp.float32)
  return x if interpret else plgpu.layout_cast(x, layout)


def _mask(cfg: C.KernelConfig, t0, s0, shape, kv_padded: bool):
  """[rows, cols] visibility of queries t0 + i and keys s0 + j (`_common.block_mask`)."""
  qpos = _iota(shape, 0, cfg.interpret) + (t0 + cfg.offset)
  kpos = _iota(shape, 1, cfg.interpret) + s0
  return C.block_mask(qpos, kpos, None, None, cfg, kv_padded)


def _mask_t(cfg: C.KernelConfig, s0, t0, shape, kv_padded: bool):
  """[keys, queries] visibility (the transposed tiles of the dK/dV kernel)."""
  kpos = _iota(shape, 0, cfg.interpret) + s0
  qpos = _iota(shape, 1, cfg.interpret) + (t0 + cfg.offset)
  return C.block_mask(qpos, kpos, None, None, cfg, kv_padded)


def _drain(free_barriers, steps, stages: int):
  """Producer epilogue: observe the last `stages` "slot consumed" phases, so that every phase of
  every barrier is waited on before the CTA exits (the GPU does not need it; Pallas's GPU
  interpreter checks it)."""
  @pl.loop(jnp.maximum(steps - stages, 0), steps)
  def _(j):
    for bar in free_barriers:
      plgpu.barrier_wait(bar.at[lax.rem(j, stages)])


def _visit(step, carry, cta_lo, lo, flo, fhi, hi, cta_hi):
  """`step(j, carry, mode)` over the CTA's blocks j in [cta_lo, cta_hi): mode "skip" outside this
  warpgroup's visible range [lo, hi) (ring bookkeeping only), "full" in [flo, fhi) (no mask),
  "masked" in the rest."""
  for a, z, mode in ((cta_lo, lo, "skip"), (lo, flo, "masked"), (flo, fhi, "full"),
                     (fhi, hi, "masked"), (hi, cta_hi, "skip")):
    carry = lax.fori_loop(a, z, functools.partial(step, mode=mode), carry)
  return carry


def _run_producer(load, steps, stages: int, free_barriers, interpret: bool):
  """The producer warpgroup: fills the `stages`-slot ring with steps 0 .. steps-1 (`load(step,
  slot)` issues the TMA copies of one step), reusing a slot once every consumer has freed it."""
  if not interpret:
    plgpu.set_max_registers(_SCHED_REGS[1], action="decrease")
  for i in range(stages):
    pl.when(i < steps)(functools.partial(load, jnp.int32(i), i))

  @pl.loop(0, jnp.maximum(steps - stages, 0))
  def _(j):
    slot = lax.rem(j, stages)
    for bar in free_barriers:
      plgpu.barrier_wait(bar.at[slot])
    load(j + stages, slot)

  _drain(free_barriers, steps, stages)


def _kv_loader(k_ref, v_ref, k_smem, v_smem, k_full, v_full, b, kh, bk: int, first_block):
  """`load(step, slot)` for a ring of K/V tiles: key block `first_block + step` of KV head kh."""
  def load(step, slot):
    sl = (b, pl.ds((first_block + step) * bk, bk), kh)
    plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_full.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_full.at[slot])
  return load


def _row(x, shape):
  return lax.broadcast_in_dim(x, shape, [0])


def _scratch_call(kernel, out_type, grid, grid_names, scratch, interpret, *args):
  """Runs `kernel(*inputs, *outputs, *scratch)` as a Mosaic GPU kernel of COMPUTE_WGS + 1
  warpgroups ("wg") over `grid`, the scratch (shared memory, barriers) shared by them."""
  def entry(*refs):
    n_in, n_out = len(args), len(out_type)
    pl.run_scoped(lambda *a: kernel(*refs[:n_in], *refs[n_in:n_in + n_out], *a), *scratch,
                  collective_axes="wg")
  return plgpu.kernel(
      entry, out_type=out_type, grid=grid, grid_names=grid_names,
      num_threads=COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret))(*args)


# --------------------------------------------------------------------------------------- forward

def forward(q4, k4, v4, cfg: C.KernelConfig, tl: dict):
  """q4 [B, Tp, N, H], k4/v4 [B, Sp, K, H] (padded) -> (o4 like q4, lse [B, Tp, N], log2 units)."""
  B, Tp, N, H = q4.shape
  Sp = k4.shape[1]
  G = cfg.group
  bq, bk, stages = tl["bq"], tl["bk"], tl["stages"]
  cta_q = COMPUTE_WGS * bq
  nk = Sp // bk
  kv_padded = C.needs_kv_pad_mask(cfg, Sp)
  c = cfg.sm_scale * C.LOG2E  # softmax in log2 units
  interpret = cfg.interpret
  dtype = q4.dtype

  def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2,
             k_full, v_full, q_full, k_free, v_free, sched):
    b = lax.axis_index("batch")
    n = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_t0 = lax.axis_index("q_seq") * cta_q
    cta_lo, cta_hi, _, _ = C.kv_block_range(cta_t0, cta_q, bk, nk, cfg, Sp)
    steps = cta_hi - cta_lo

    def sync():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      if not interpret:
        plgpu.set_max_registers(_SCHED_REGS[0], action="increase")
      qo_smem = qo_smem2.at[wg]
      t0 = cta_t0 + wg * bq
      lo, hi, flo, fhi = C.kv_block_range(t0, bq, bk, nk, cfg, Sp)
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t0, bq), n], qo_smem, q_full.at[wg])
      plgpu.barrier_wait(q_full.at[wg])
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      m = _full((bq,), C.MASK_VALUE, row_layout, interpret)
      l = _full((bq,), 0.0, row_layout, interpret)
      acc = _full((bq, H), 0.0, plgpu.Layout.WGMMA, interpret)

      def step(j, carry, mode):
        """mode: 'skip' (block invisible to this warpgroup), 'masked' or 'full'."""
        acc, m, l = carry
        slot = lax.rem(j - cta_lo, stages)
        plgpu.barrier_wait(k_full.at[slot])
        if mode == "skip":
          plgpu.barrier_arrive(k_free.at[slot])
          sync()
          plgpu.barrier_arrive(sched)
          plgpu.barrier_wait(v_full.at[slot])
          plgpu.barrier_wait(sched)
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, m, l

        # pingpong: the barrier lets the other warpgroup's matmuls go first
        s = _mm(qo_smem, k_smem.at[slot], (bq, bk), interpret, transpose_b=True,
                while_running=sync)
        plgpu.barrier_arrive(k_free.at[slot])
        vis = _mask(cfg, t0, j * bk, (bq, bk), kv_padded) if mode == "masked" else None
        if vis is not None:
          s = jnp.where(vis, s * c, -jnp.inf)
          m_new = jnp.maximum(m, s.max(axis=1))
          p = jnp.exp2(s - _row(m_new, s.shape))
        else:
          m_new = jnp.maximum(m, s.max(axis=1) * c)
          p = jnp.exp2(s * c - _row(m_new, s.shape))
        alpha = jnp.exp2(m - m_new)
        acc = acc * _row(alpha, acc.shape)
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        plgpu.barrier_arrive(sched)  # softmax done
        plgpu.barrier_wait(v_full.at[slot])
        plgpu.barrier_wait(sched)  # tensor cores free
        acc = _mm_acc(acc, p16, v_smem.at[slot], interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      pl.when(wg == 1)(sync)
      acc, m, l = _visit(step, (acc, m, l), cta_lo, lo, flo, fhi, hi, cta_hi)
      pl.when(wg == 0)(sync)

      seen = l > 0
      inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
      qo_smem[...] = (acc * _row(inv, acc.shape)).astype(dtype)
      lse_smem2.at[wg][...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(t0, bq), n])
      plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, n, pl.ds(t0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      load = _kv_loader(k_ref, v_ref, k_smem, v_smem, k_full, v_full, b,
                        lax.div(n, jnp.int32(G)), bk, cta_lo)
      _run_producer(load, steps, stages, (k_free, v_free), interpret)

  scratch = (
      _smem((COMPUTE_WGS, bq, H), dtype), _smem((stages, bk, H), dtype),
      _smem((stages, bk, H), dtype), plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
      plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=COMPUTE_WGS),
      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=COMPUTE_WGS),
  )
  o4, lse = _scratch_call(kernel, (jax.ShapeDtypeStruct(q4.shape, dtype),
                                   jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
                          (N, Tp // cta_q, B), ("heads", "q_seq", "batch"), scratch, interpret,
                          q4, k4, v4)
  return o4, lse.transpose(0, 2, 1)


# -------------------------------------------------------------------------------------- backward

def _vec(ref, dim: int, interpret: bool):
  """A [64] float32 smem vector in registers, laid out along `dim` of a wgmma accumulator."""
  if interpret:
    return ref[...]
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim))


def backward(q4, k4, v4, o4, lse, do4, cfg: C.KernelConfig, tl: dict):
  """dq4, dk4, dv4 for padded q4 [B, Tp, N, H], k4/v4 [B, Sp, K, H], lse [B, Tp, N] (log2)."""
  B, Tp, N, H = q4.shape
  _, Sp, K, _ = k4.shape
  lse_t = lse.transpose(0, 2, 1)  # [B, N, Tp]: 1-D TMA copies of 64 rows
  delta = jnp.einsum("btnh,btnh->bnt", o4.astype(jnp.float32), do4.astype(jnp.float32))
  dq4 = _dq(q4, k4, v4, do4, lse_t, delta, cfg, tl)
  dk4, dv4 = _dkv(q4, k4, v4, do4, lse_t, delta, cfg, tl)
  return dq4, dk4, dv4


def _dq(q4, k4, v4, do4, lse_t, delta, cfg: C.KernelConfig, tl: dict):
  """dQ kernel: one consumer warpgroup per 64 query rows, K/V tiles streamed by the producer."""
  B, Tp, N, H = q4.shape
  Sp = k4.shape[1]
  G = cfg.group
  bq, bk, stages = tl["dq_bq"], tl["dq_bk"], tl["bwd_stages"]
  cta_q = COMPUTE_WGS * bq
  nk = Sp // bk
  kv_padded = C.needs_kv_pad_mask(cfg, Sp)
  c = cfg.sm_scale * C.LOG2E
  interpret = cfg.interpret
  dtype = q4.dtype

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
             q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem,
             own_full, k_full, v_full, k_free, v_free):
    b = lax.axis_index("batch")
    n = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_t0 = lax.axis_index("q_seq") * cta_q
    cta_lo, cta_hi, _, _ = C.kv_block_range(cta_t0, cta_q, bk, nk, cfg, Sp)
    steps = cta_hi - cta_lo

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      if not interpret:
        plgpu.set_max_registers(_SCHED_REGS[0], action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
      t0 = cta_t0 + wg * bq
      lo, hi, flo, fhi = C.kv_block_range(t0, bq, bk, nk, cfg, Sp)
      rows = pl.ds(t0, bq)
      for i, (src, dst) in enumerate(((q_ref.at[b, rows, n], q_smem),
                                      (do_ref.at[b, rows, n], do_smem),
                                      (lse_ref.at[b, n, rows], lse_smem),
                                      (delta_ref.at[b, n, rows], delta_smem))):
        plgpu.copy_gmem_to_smem(src, dst, own_full.at[wg * 4 + i])
      for i in range(4):
        plgpu.barrier_wait(own_full.at[wg * 4 + i])
      lse = _vec(lse_smem, 0, interpret)
      dlt = _vec(delta_smem, 0, interpret)
      acc = _full((bq, H), 0.0, plgpu.Layout.WGMMA, interpret)

      def step(j, acc, mode):
        slot = lax.rem(j - cta_lo, stages)
        plgpu.barrier_wait(k_full.at[slot])
        plgpu.barrier_wait(v_full.at[slot])
        if mode == "skip":
          plgpu.barrier_arrive(k_free.at[slot])
          plgpu.barrier_arrive(v_free.at[slot])
          return acc
        s = _mm(q_smem, k_smem.at[slot], (bq, bk), interpret, transpose_b=True)
        vis = _mask(cfg, t0, j * bk, (bq, bk), kv_padded) if mode == "masked" else None
        p = jnp.exp2(s * c - _row(lse, s.shape))
        if vis is not None:
          p = jnp.where(vis, p, 0.0)
        dp = _mm(do_smem, v_smem.at[slot], (bq, bk), interpret, transpose_b=True)
        plgpu.barrier_arrive(v_free.at[slot])
        ds = p * (dp - _row(dlt, dp.shape))
        acc = _mm_acc(acc, ds.astype(dtype), k_smem.at[slot], interpret)
        plgpu.barrier_arrive(k_free.at[slot])
        return acc

      acc = _visit(step, acc, cta_lo, lo, flo, fhi, hi, cta_hi)
      q_smem[...] = (acc * cfg.sm_scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, n])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      load = _kv_loader(k_ref, v_ref, k_smem, v_smem, k_full, v_full, b,
                        lax.div(n, jnp.int32(G)), bk, cta_lo)
      _run_producer(load, steps, stages, (k_free, v_free), interpret)

  scratch = (
      _smem((COMPUTE_WGS, bq, H), dtype), _smem((COMPUTE_WGS, bq, H), dtype),
      plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32), plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
      _smem((stages, bk, H), dtype), _smem((stages, bk, H), dtype),
      plgpu.Barrier(num_barriers=4 * COMPUTE_WGS),
      plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
  )
  (dq4,) = _scratch_call(kernel, (jax.ShapeDtypeStruct(q4.shape, dtype),), (N, Tp // cta_q, B),
                         ("heads", "q_seq", "batch"), scratch, interpret,
                         q4, k4, v4, do4, lse_t, delta)
  return dq4


def _dkv(q4, k4, v4, do4, lse_t, delta, cfg: C.KernelConfig, tl: dict):
  """dK/dV kernel: one consumer warpgroup per 64 key rows; for every query head of the GQA group
  the producer streams the visible Q/dO tiles (with their lse and delta)."""
  B, Tp, N, H = q4.shape
  _, Sp, K, _ = k4.shape
  G = cfg.group
  bk, bq, stages = tl["dkv_bk"], tl["dkv_bq"], tl["bwd_stages"]
  cta_k = COMPUTE_WGS * bk
  nq = Tp // bq
  kv_padded = C.needs_kv_pad_mask(cfg, Sp)
  c = cfg.sm_scale * C.LOG2E
  interpret = cfg.interpret
  dtype = q4.dtype

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
             k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem,
             own_full, q_full, do_full, lse_full, delta_full, free):
    b = lax.axis_index("batch")
    kh = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_s0 = lax.axis_index("kv_seq") * cta_k
    cta_lo, cta_hi, _, _ = C.q_block_range(cta_s0, cta_k, bq, nq, cfg, Sp)
    per_head = cta_hi - cta_lo

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      if not interpret:
        plgpu.set_max_registers(_SCHED_REGS[0], action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      s0 = cta_s0 + wg * bk
      lo, hi, flo, fhi = C.q_block_range(s0, bk, bq, nq, cfg, Sp)
      keys = pl.ds(s0, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kh], k_smem, own_full.at[2 * wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kh], v_smem, own_full.at[2 * wg + 1])
      plgpu.barrier_wait(own_full.at[2 * wg])
      plgpu.barrier_wait(own_full.at[2 * wg + 1])
      dk = _full((bk, H), 0.0, plgpu.Layout.WGMMA, interpret)
      dv = _full((bk, H), 0.0, plgpu.Layout.WGMMA, interpret)

      def step(i, carry, g, mode):
        dk, dv = carry
        slot = lax.rem(g * per_head + i - cta_lo, stages)
        for bar in (q_full, do_full, lse_full, delta_full):
          plgpu.barrier_wait(bar.at[slot])
        if mode == "skip":
          plgpu.barrier_arrive(free.at[slot])
          return dk, dv
        # transposed tiles: rows are this warpgroup's keys, columns the slot's queries
        st = _mm(k_smem, q_smem.at[slot], (bk, bq), interpret, transpose_b=True)
        lse = _vec(lse_smem.at[slot], 1, interpret)
        pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse, st.shape, [1]))
        if mode == "masked":
          vis = _mask_t(cfg, s0, i * bq, (bk, bq), kv_padded)
          if vis is not None:
            pt = jnp.where(vis, pt, 0.0)
        dv = _mm_acc(dv, pt.astype(dtype), do_smem.at[slot], interpret)
        dpt = _mm(v_smem, do_smem.at[slot], (bk, bq), interpret, transpose_b=True)
        dlt = _vec(delta_smem.at[slot], 1, interpret)
        dst = pt * (dpt - lax.broadcast_in_dim(dlt, dpt.shape, [1]))
        dk = _mm_acc(dk, dst.astype(dtype), q_smem.at[slot], interpret)
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv

      carry = (dk, dv)
      for g in range(G):  # every query head of the GQA group, same positions
        carry = _visit(functools.partial(step, g=g), carry, cta_lo, lo, flo, fhi, hi, cta_hi)
      dk, dv = carry
      k_smem[...] = (dk * cfg.sm_scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, keys, kh])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, keys, kh])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      def load(step, slot):
        g = lax.div(step, jnp.maximum(per_head, 1))
        i = cta_lo + step - g * per_head
        n = kh * G + g
        rows = pl.ds(i * bq, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q_smem.at[slot], q_full.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, n], do_smem.at[slot], do_full.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, n, rows], lse_smem.at[slot], lse_full.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, n, rows], delta_smem.at[slot],
                                delta_full.at[slot])

      _run_producer(load, G * per_head, stages, (free,), interpret)

  scratch = (
      _smem((COMPUTE_WGS, bk, H), dtype), _smem((COMPUTE_WGS, bk, H), dtype),
      _smem((stages, bq, H), dtype), _smem((stages, bq, H), dtype),
      plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.Barrier(num_barriers=2 * COMPUTE_WGS),
      plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
  )
  kv_type = jax.ShapeDtypeStruct(k4.shape, dtype)
  dk4, dv4 = _scratch_call(kernel, (kv_type, kv_type), (K, Sp // cta_k, B),
                           ("heads", "kv_seq", "batch"), scratch, interpret,
                           q4, k4, v4, do4, lse_t, delta)
  return dk4, dv4
