"""Mosaic GPU (Hopper) lowering of the decode-shaped packed ternary product, M = 1.

Papers: "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (Ma et al.,
arXiv 2402.17764; the W~ / x~ quantizers of Sec. 2) and bitnet.cpp (arXiv 2410.16144) for
packed-weight inference. It computes the same y[N] = (x_int8 @ codes) * scale_w * scale_x as
`pallas_kernels.ternary_matmul` for one token, from the planar 2-bit words of
`effjax.quant.ternary` (word[r, c] holds W[j*K4 + r, i*N4 + c] + 1 at bit 8i + 2j).

Why a second lowering: at M = 1 the product is a pure stream of the packed weights (2 bits per
weight, ~0.5 integer op per byte), and the Triton kernels of `ternary_matmul` run out of bytes in
flight (Nsight Compute, RESULTS.md: 59% of the stall cycles wait on global loads). Here one kernel
per call streams the words with TMA: CTA c owns the column tile of `block_w` words (4 * block_w
outputs) for all of K; `plgpu.emit_pipeline` keeps `stages` tiles of [block_g, 4, block_w] words
(block_g groups of 4 packed rows) in flight in shared memory, and no split-K partial sums or
second kernel are needed.

Arithmetic per thread (128 threads, one warpgroup): thread t = rs * CT + cs (CT = block_w / 4)
owns the 4 words 4cs .. 4cs + 3 of every packed row of the groups g = rs, rs + RT, ... (RT =
128 / CT) of a tile. For one column, the 4 words of a group (packed rows 4g .. 4g + 3) are
byte-transposed with 8 PRMT, so byte b of word t_i holds the 4 codes of packed row 4g + b for
output plane i. The activations of K rows j*K4 + 4g .. + 3 are one int32 word X_j[g] (a bitcast of
the int8 x). Instead of shifting each code field down (ternary_matmul's dp4a path), the field is
masked in place: t_i & (0x03030303 << 2j) holds c * 4^j (<= 128) per byte, and one
`dp4a.u32.s32` (unsigned codes, signed x) accumulates 4^j * sum_b c x into acc[i, j]; at the end
sum_j acc[i, j] >> 2j is exact (every acc[i, j] is a multiple of 4^j). Per 4 words (64 weights)
8 PRMT + 16 AND + 16 DP4A, against 8 + 12 shifts + 16 + 16 in the Triton dp4a kernel. With
codes c = w + 1, sum_k x w = sum_k x c - sum_k x; sum x is accumulated by DP4A with 0x01010101.
The 16 column partial sums of each thread are reduced over the RT row threads in shared memory,
scaled by scale_w * scale_x in float32 and stored in the output dtype.

Measured (H200, jax 0.11.2, experiments/bench_ternary.py, M = 1, bf16 output, same-run peers;
RESULTS.md): 8.7-9.0 us per call for 8192x8192 and 4096x14336 (44-46% / 38-42% of the copy
bandwidth gross, 57-59% / 49-54% net of the benchmark chain's own cost) against 10.1-12.3 us for
the best Triton configs and 34-35 / 31-32 us for XLA's bf16 GEMV of the same runs. A TMA kernel of
the same shape that only XORs the words (no arithmetic) took 7.9 / 8.7 us, so the arithmetic costs
~1 us over the bare stream. Variants measured in the same runs and dropped (none faster; the
run-to-run spread of one config is +-0.5 us): slot loads rotated per row thread against the 2-way
shared-memory bank conflicts of 64-byte rows (+0.9 us at 8192^2, -0.1 us at 4096x14336),
programmatic dependent launch with the first tiles issued before griddepcontrol.wait (+0.3 /
+0.6 us), two compute warpgroups per CTA each streaming half of K (+0.15 / -0.07 us), and a
column-tile-major weight layout that makes each CTA's stream contiguous (+0.1 to +0.85 us at
8192^2, +-0.05 us at 4096x14336).

Interpret mode (CPU): the per-thread arithmetic (`_step_inline`, `_finish_inline`) is inline
Mosaic GPU code (`plgpu.inline_mgpu`, PTX for PRMT and DP4A), which the Pallas interpreter cannot
run; with interpret=True the same per-thread data flow is emulated with jnp on the shared-memory
tiles (thread t as the minor axis of [*, 128] arrays; the per-group arithmetic is the one
`_accumulate` routine in both), so CI checks the tiling, the pipeline and the layout arithmetic,
and the GPU tests check the PTX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import ptx
from pallas_kernels.flash_attention.mosaic_gpu import _interpret_params, is_hopper

__all__ = ["mgpu_config", "ternary_gemv_mgpu", "supported", "usable", "is_hopper"]

_WG = 128                  # threads of the one warpgroup
_ONES = 0x01010101
_MASK = 0x03030303
# PRMT selectors of the 4x4 byte transpose (the same as ternary_matmul's dp4a path).
_SEL_LO, _SEL_HI, _SEL_LO2, _SEL_HI2 = 0x5140, 0x7362, 0x5410, 0x7632
N_ACC = 4 * 4 * 4 + 1     # acc[i, j, cc] for planes i, j and the thread's 4 columns cc; sum x


def supported(k4: int, n4: int) -> str | None:
  """None if words [k4, n4] suit this kernel, else the reason (used in errors and by "auto")."""
  if k4 % 4:
    return f"packed rows K4={k4} must be a multiple of 4 (export with align >= 4)"
  if n4 % 8:
    return f"packed columns N4={n4} must be a multiple of 8 (export with align >= 8)"
  return None


def usable(m: int, k4: int, n4: int, interpret: bool) -> bool:
  """Whether `ternary_matmul(impl="auto")` takes this kernel: one token (M = 1), compiled (not
  interpret mode) on a Hopper GPU, and words [k4, n4] it `supported`."""
  return m == 1 and not interpret and is_hopper() and supported(k4, n4) is None


def _pow2_divisor(n: int, cap: int) -> int:
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def mgpu_config(k4: int, n4: int, block_w: int | None = None, block_g: int | None = None,
                stages: int | None = None) -> dict:
  """Resolved tiling for words [k4, n4]; None fields get the automatic value.

  block_w: words per column tile (a CTA), a power of two in [8, 32] dividing N4; automatic 16
    (64 B per packed row: 8192x8192 gives 128 CTAs for the H200's 132 SMs).
  block_g: groups of 4 packed rows per pipeline step (a TMA tile of [block_g, 4, block_w] words),
    a power of two dividing K4 / 4, at most 64 (TMA boxes are <= 256 per dim); automatic: the
    largest such (64 once K >= 1024: 16 KB tiles at block_w 16).
  stages: tiles in flight (shared-memory ring); automatic 4.
  """
  why = supported(k4, n4)
  if why:
    raise ValueError(f"ternary mgpu kernel: {why}")
  bw = block_w or 16
  if bw not in (8, 16, 32) or n4 % bw:
    raise ValueError(f"block_w={bw} must be 8, 16 or 32 and divide the packed columns N4={n4}")
  k16 = k4 // 4
  g = _pow2_divisor(k16, block_g or 64)
  if block_g is not None and g != block_g:
    raise ValueError(f"block_g={block_g} must be a power of two <= 64 dividing K4/4={k16}")
  st = stages or 4
  if st < 1:
    raise ValueError(f"stages={st} must be >= 1")
  return dict(block_w=bw, block_g=g, stages=min(st, k16 // g))


# ----------------------------------------------------------------------------- per-thread math


def _thread_map(bw: int, g: int):
  """(CT column threads, RT row threads, Q groups per thread per tile)."""
  ct = bw // 4
  rt = _WG // ct
  return ct, rt, -(-g // rt)


def _accumulate(regs, slots, xw, ones, prmt, mask, dp4a):
  """One group's arithmetic for one thread, shared by the GPU code and its jnp model.

  regs: the N_ACC accumulators (updated in place); slots[s][cc]: word cc of the thread's 4 columns
  in packed row 4g + s; xw[j]: activation word X_j[g]; `ones` = 0x01010101; prmt(a, b, sel),
  mask(a, m) = a & m and dp4a(a, b, c) = c + sum_bytes(unsigned a * signed b) in the caller's
  terms (PTX on the GPU, jnp in interpret mode).
  """
  for j in range(4):
    regs[N_ACC - 1] = dp4a(ones, xw[j], regs[N_ACC - 1])  # sum x
  for cc in range(4):
    a, b, c, d = (slots[s][cc] for s in range(4))
    l0, h0 = prmt(a, b, _SEL_LO), prmt(a, b, _SEL_HI)
    l1, h1 = prmt(c, d, _SEL_LO), prmt(c, d, _SEL_HI)
    planes = (prmt(l0, l1, _SEL_LO2), prmt(l0, l1, _SEL_HI2),   # byte b of planes[i]: byte i
              prmt(h0, h1, _SEL_LO2), prmt(h0, h1, _SEL_HI2))   # of the word of packed row 4g+b
    for i in range(4):
      for j in range(4):
        r = (i * 4 + j) * 4 + cc
        regs[r] = dp4a(mask(planes[i], _s32(_MASK << (2 * j))), xw[j], regs[r])


def _emulated_step(w_tile, x_tile, acc, bw: int, g: int):
  """jnp model of `_step_inline` for interpret mode: acc [N_ACC, 128] int32 (register r, thread
  t), w_tile [g, 4, bw] words, x_tile [4, g] activation words (X_j of the tile's groups).
  """
  ct, rt, q = _thread_map(bw, g)
  u32 = lambda a: lax.bitcast_convert_type(a, jnp.uint32)  # noqa: E731
  i32 = lambda a: lax.bitcast_convert_type(a, jnp.int32)  # noqa: E731

  def prmt(a, b, sel):
    return i32(ptx.prmt_emulated(u32(a), u32(b), jnp.full(a.shape, sel, jnp.uint32)))

  def dp4a_us(a, b):  # sum over bytes of unsigned a * signed b
    ab = [(lax.shift_right_logical(a, jnp.int32(8 * k)) & 0xFF) for k in range(4)]
    bb = [lax.shift_right_arithmetic(lax.shift_left(b, jnp.int32(24 - 8 * k)), jnp.int32(24))
          for k in range(4)]
    return sum(x * y for x, y in zip(ab, bb))

  accs = [acc[r] for r in range(N_ACC)]
  for qi in range(q):
    rows = jnp.arange(rt) + qi * rt                       # group of row thread rs
    valid = rows < g
    rows = rows % g
    w = w_tile[rows]                                      # [rt, 4, bw]
    w = w.reshape(rt, 4, ct, 4).transpose(1, 3, 0, 2).reshape(4, 4, _WG)   # [b, cc, t]
    xw = jnp.where(valid[None], x_tile[:, rows], 0)       # [4, rt]
    xw = jnp.broadcast_to(xw[:, :, None], (4, rt, ct)).reshape(4, _WG)     # [j, t]
    _accumulate(accs, [[w[s, cc] for cc in range(4)] for s in range(4)], xw,
                jnp.full((_WG,), _ONES, jnp.int32), prmt, lambda a, m: a & m,
                lambda a, b, c: c + dp4a_us(a, b))
  return jnp.stack(accs)


def _emulated_output(acc, bw: int):
  """jnp model of `_finish_inline`'s reduction: [4 planes, bw] int32 sums (sum x subtracted)."""
  ct, rt, _ = _thread_map(bw, 1)
  a = acc[:N_ACC - 1].reshape(4, 4, 4, _WG)               # [i, j, cc, t]
  v = sum(lax.shift_right_arithmetic(a[:, j], jnp.int32(2 * j)) for j in range(4))
  v = (v - acc[N_ACC - 1][None, None]).reshape(4, 4, rt, ct)   # [i, cc, rs, cs]
  return jnp.sum(v, axis=2).transpose(0, 2, 1).reshape(4, bw)  # [i, cs*4 + cc]


def _s32(v: int) -> int:
  """A 32-bit pattern as a signed int32 value."""
  v &= 0xFFFFFFFF
  return v - (1 << 32) if v >= 1 << 31 else v


def _mlir():
  """The MLIR builders (imported lazily: only the compiled GPU path needs them)."""
  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, vector
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  return ir, arith, gpu, llvm, memref, vector, mgpu, mgpu_utils


def _acc_layout():
  return plgpu.Layout.WG_STRIDED((N_ACC, _WG), vec_size=1)


def _step_inline(w_tile, x_tile, acc, bw: int, g: int):
  """One pipeline step on the GPU: acc (WG_STRIDED [N_ACC, 128]: register r of thread t) plus
  this thread's DP4A sums over the tile `w_tile` [g, 4, bw] with activation words `x_tile`
  [4, g]."""
  ct, rt, q = _thread_map(bw, g)
  ir, arith, gpu, llvm, memref, vector, mgpu, mgpu_utils = _mlir()

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), _acc_layout()),
                     return_type=plgpu.ShapeDtypeStruct((N_ACC, _WG), jnp.int32,
                                                        layout=_acc_layout()))
  def step(ctx, w_ref, x_ref, acc_fa):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    idx = ir.IndexType.get()
    ci = lambda v: arith.constant(idx, v)  # noqa: E731
    c32 = lambda v: arith.constant(i32, v)  # noqa: E731
    tid = arith.remui(gpu.thread_id(gpu.Dimension.x), ci(_WG))
    cs = arith.remui(tid, ci(ct))
    rs = arith.divui(tid, ci(ct))
    col = arith.muli(cs, ci(4))
    v4 = ir.VectorType.get((4,), i32)

    def asm(text, *args):
      return llvm.inline_asm(i32, list(args), text, "=r" + ",r" * len(args))

    def prmt(a, b, sel):
      return asm(f"prmt.b32 $0, $1, $2, {sel:#06x};", a, b)

    def dp4a(a, b, c):
      return asm("dp4a.u32.s32 $0, $1, $2, $3;", a, b, c)

    def ext(v, k):
      return vector.extract(v, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([k]))

    regs = [ext(r, 0) for r in acc_fa.registers.flat]  # vec_size 1: vector<1xi32> each
    ones = c32(_ONES)
    for qi in range(q):
      row = arith.addi(rs, ci(qi * rt))
      valid = None
      if q * rt > g:  # more row threads than groups: spare threads read a valid row, x = 0
        valid = arith.cmpi(arith.CmpIPredicate.ult, row, ci(g))
        row = arith.remui(row, ci(g))
      slots = [vector.load(v4, w_ref, [row, ci(s), col]) for s in range(4)]
      xw = [memref.load(x_ref, [ci(j), row]) for j in range(4)]
      if valid is not None:
        xw = [arith.select(valid, v, c32(0)) for v in xw]
      _accumulate(regs, [[ext(v, cc) for cc in range(4)] for v in slots], xw, ones, prmt,
                  lambda a, m: arith.andi(a, c32(m)), dp4a)
    v1 = ir.VectorType.get((1,), i32)
    out = [vector.broadcast(v1, r) for r in regs]
    return mgpu.FragmentedArray(_registers=np.array(out, dtype=object),
                                _layout=acc_fa.layout, _is_signed=True)

  return step(w_tile, x_tile, acc)


def _finish_inline(acc, red_ref, sw_ref, sx_ref, o_ref, bw: int):
  """Epilogue on the GPU: per thread v[i, cc] = sum_j acc[i, j, cc] >> 2j - sum x, reduced over
  the RT row threads through `red_ref` [RT, 4, bw] (shared memory), scaled and stored to o_ref
  [4, bw] (this CTA's columns of the [4, N4] output)."""
  ct, rt, _ = _thread_map(bw, 1)
  ir, arith, gpu, llvm, memref, vector, mgpu, mgpu_utils = _mlir()
  n_out = 4 * bw

  @plgpu.inline_mgpu(arg_types=(_acc_layout(), plgpu.RefType(), plgpu.RefType(),
                                plgpu.RefType(), plgpu.RefType()))
  def finish(ctx, acc_fa, red, sw, sx, o):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    idx = ir.IndexType.get()
    ci = lambda v: arith.constant(idx, v)  # noqa: E731
    tid = arith.remui(gpu.thread_id(gpu.Dimension.x), ci(_WG))
    cs = arith.remui(tid, ci(ct))
    rs = arith.divui(tid, ci(ct))
    col = arith.muli(cs, ci(4))
    regs = [vector.extract(r, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([0]))
            for r in acc_fa.registers.flat]
    xs = regs[N_ACC - 1]
    v4 = ir.VectorType.get((4,), i32)
    for i in range(4):
      vals = []
      for cc in range(4):
        v = regs[i * 16 + cc]                                 # j = 0
        for j in range(1, 4):
          v = arith.addi(v, arith.shrsi(regs[(i * 4 + j) * 4 + cc], arith.constant(i32, 2 * j)))
        vals.append(arith.subi(v, xs))
      vec = vector.from_elements(v4, vals)
      vector.store(vec, red, [rs, ci(i), col])
    mgpu_utils.warpgroup_barrier()
    scale = arith.mulf(memref.load(sw, [ci(0)]), memref.load(sx, [ci(0)]))
    out_ty = ir.MemRefType(o.type).element_type
    for u in range(-(-n_out // _WG)):
      o_idx = arith.addi(tid, ci(u * _WG))
      with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, o_idx, ci(n_out))):
        i = arith.divui(o_idx, ci(bw))
        c = arith.remui(o_idx, ci(bw))
        tot = None
        for r in range(rt):
          v = memref.load(red, [ci(r), i, c])
          tot = v if tot is None else arith.addi(tot, v)
        y = arith.mulf(arith.sitofp(f32, tot), scale)
        if out_ty != f32:
          y = arith.truncf(out_ty, y)
        memref.store(y, o, [i, c])

  finish(acc, red_ref, sw_ref, sx_ref, o_ref)


# ----------------------------------------------------------------------------- the kernel


def ternary_gemv_mgpu(x_K: jax.Array, scale_x: jax.Array, scale_w: jax.Array,
                      words_K4N4: jax.Array, *, out_dtype=jnp.float32, block_w: int | None = None,
                      block_g: int | None = None, stages: int | None = None,
                      interpret: bool = False) -> jax.Array:
  """y [4*N4] = (x_K @ codes) * scale_w * scale_x for one token, from planar words [K4, N4].

  x_K: int8 activations [4*K4] (padded with zeros to the packed K); scale_x, scale_w: float32
  scalars (shape () or (1,)); words_K4N4: int32 planar words (`effjax.quant.ternary.as_words`).
  Tiling: `mgpu_config`. interpret: run in the Mosaic GPU interpreter with the per-thread
  arithmetic emulated in jnp (see the module docstring).
  """
  k4, n4 = words_K4N4.shape
  if x_K.shape != (4 * k4,) or x_K.dtype != jnp.int8:
    raise ValueError(f"x_K must be int8 [{4 * k4}] (the packed K), got {x_K.dtype} "
                     f"{tuple(x_K.shape)}")
  if words_K4N4.dtype != jnp.int32:
    raise ValueError(f"words must be int32 (as_words), got {words_K4N4.dtype}")
  cfg = mgpu_config(k4, n4, block_w, block_g, stages)
  bw, g, st = cfg["block_w"], cfg["block_g"], cfg["stages"]
  k16 = k4 // 4
  ct, rt, _ = _thread_map(bw, g)
  # X_j[g] as [4, k16 / L, L] words (a free bitcast; TMA boxes are <= 256 per dim); L >= g
  lw = _pow2_divisor(k16, 64)
  x_JG = lax.bitcast_convert_type(x_K.reshape(4, k16 // lw, lw, 4), jnp.int32)
  w3 = words_K4N4.reshape(k16, 4, n4)
  sw = jnp.asarray(scale_w, jnp.float32).reshape(1)
  sx = jnp.asarray(scale_x, jnp.float32).reshape(1)
  n_tiles = n4 // bw

  def kernel(x_gmem, w_gmem, sw_gmem, sx_gmem, o_gmem, x_smem, red_smem, xbar):
    c = lax.axis_index("c")
    plgpu.copy_gmem_to_smem(x_gmem, x_smem, xbar)   # all of x, once
    plgpu.barrier_wait(xbar)
    acc0 = jnp.zeros((N_ACC, _WG), jnp.int32)
    if not interpret:
      acc0 = plgpu.layout_cast(acc0, _acc_layout())

    def body(idx, w_tile, acc):
      g0 = idx[0] * g
      x_tile = x_smem.at[:, g0 // lw, pl.ds(g0 % lw, g)]
      if interpret:
        return _emulated_step(w_tile[...], x_tile[...], acc, bw, g)
      return _step_inline(w_tile, x_tile, acc, bw, g)

    acc = plgpu.emit_pipeline(
        body, grid=(k16 // g,),
        in_specs=[plgpu.BlockSpec((g, 4, bw), lambda k: (k, 0, c))],
        max_concurrent_steps=st, init_carry=acc0)(w_gmem)
    o_tile = o_gmem.at[:, pl.ds(c * bw, bw)]
    if interpret:
      y = _emulated_output(acc, bw).astype(jnp.float32) * (sw_gmem[0] * sx_gmem[0])
      o_tile[...] = y.astype(o_gmem.dtype)
    else:
      _finish_inline(acc, red_smem, sw_gmem, sx_gmem, o_tile, bw)

  out = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((4, n4), out_dtype),
      scratch_types=[plgpu.SMEM((4, k16 // lw, lw), jnp.int32), plgpu.SMEM((rt, 4, bw), jnp.int32),
                     plgpu.Barrier(num_arrivals=1)],
      grid=(n_tiles,), grid_names=("c",),
      interpret=_interpret_params(interpret))(x_JG, w3, sw, sx)
  return out.reshape(4 * n4)
