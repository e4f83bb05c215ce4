"""Packed ternary x int8 matmul: y = (x_int8 @ unpack(W_packed)) * scale_w * scale_x.

Papers: "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (Ma et al.,
arXiv 2402.17764), Eq. for W~ and x~ (Sec. 2); "BitNet b1.58 2B4T Technical Report"
(arXiv 2504.12285) and "1-bit AI Infra: Fast and Lossless BitNet b1.58 Inference on CPUs"
(bitnet.cpp, arXiv 2410.16144) for packed-weight inference. This file implements the product of
int8 activations (per-token scale scale_x) with ternary weights in {-1, 0, 1} (per-tensor scale
scale_w = gamma), reading the weights in the planar 2-bit layout of `effjax.quant.ternary`:

  word[r, c] (int32 words, [K4, N4]) holds W[j*K4 + r, i*N4 + c] + 1 at bit 8*i + 2*j, i, j in 0..3.

So a tile of words [bk4, bw] gives, for every (i, j), a dense code tile c_ij = (w >> (8i+2j)) & 3
that multiplies x[:, j*K4 + rows] and lands in y[:, i*N4 + cols]: the kernels unpack with one shift
and one mask on contiguous tiles, and the 4 x-planes and 4 y-planes are contiguous slices.
With codes c = w + 1, sum_k x_k w_k = sum_k x_k c_k - sum_k x_k (all integer, exact).

Both kernels are split-K: grid (column tiles, K splits, row blocks); program (c, s, t) reads the
contiguous word tile rows [s*K4/split, (s+1)*K4/split) x columns [c*bw, (c+1)*bw) in steps of
[bk4, bw] words. Two ways to finish (`reduce`):
  * "xla": each program writes exact int32 partial sums (minus the sum of its own x slice) to
    out[s, rows, 4, cols]; one small XLA fusion adds the splits, scales and casts (a second kernel).
  * "fused": the program scales its partial sum in-kernel (scale_w * scale_x[row], float32) and
    adds it with `atomic_add` into a zero-initialised float32 out[rows, 4, cols] (the zeros come in
    through `input_output_aliases`); with split_k = 1 it stores the scaled result directly (in
    out_dtype, no zero buffer, no atomics). No reduction kernel; the float32 adds of the split_k
    partial sums happen in an unspecified order, so the result is not bitwise deterministic
    (each partial is exact; only the float32 scaling/adds round, ~1e-7 relative).
Many programs (the automatic configs aim at >= `TARGET_PROGRAMS` ~ 4 per SM of an H200) keep
enough loads in flight to stream the weights at HBM bandwidth, which a decode-shaped product
(M = 1) needs: its arithmetic per byte is tiny.

* `mgpu` (M = 1 under "auto" on a Hopper GPU, compiled): the Mosaic GPU kernel of
  `pallas_kernels.ternary_mgpu`: one kernel per call, no split-K, the words streamed by TMA
  through a shared-memory ring (more bytes in flight than the Triton loads keep), and DP4A on
  in-place-masked code fields (8 PRMT + 16 AND + 16 DP4A per 4 words). H200, 2026-11-23: 8.7-9.0 us
  for 8192x8192 and 4096x14336 against 10.1-10.6 us (best dp4a configs) and 10.6-12.4 us (auto
  dp4a) in the same runs (RESULTS.md).
* `dp4a` (M <= DP4A_MAX_M under "auto", K4 % 4 == 0): the int8 dot-product instruction on CUDA
  cores. The words are viewed as [K4/4, 4, N4]; a 4x4 byte transpose (8 PRMT) of the 4 words of one
  column in packed rows 4r..4r+3 gives, per plane i, a word whose byte b holds packed row 4r+b, and
  (t >> 2j) & 0x03030303 leaves the codes of K rows j*K4 + 4r + b (b = 0..3) in its 4 bytes: the
  byte order of the int8 activations x[j*K4 + 4r .. +3] read as one int32 word (a free bitcast of
  x). One DP4A per (plane i, plane j, token) then does 4 multiply-adds: per word ~3 integer ops
  plus 4 DP4A per token, against ~23 per token for `gemv`. The PTX comes in through
  `jax.experimental.pallas.triton.elementwise_inline_asm`; in interpret mode (CPU) the two
  instructions are emulated with jnp shifts (`_transpose4`, `_dp4a`), so CI checks the layout
  arithmetic and the GPU tests check the PTX.
* `gemv` (M <= GEMV_MAX_M under "auto" when K4 % 4 != 0): SIMD-within-a-register on CUDA cores. The masks
  0x00030003 on w >> 2j and on (w >> 8) >> 2j put the codes of two output columns (planes i = 0, 2
  and i = 1, 3) in the two 16-bit halves of an int32, so one int32 multiply-add by x accumulates two
  columns: per word 7 shifts, 8 ands and 8 multiply-adds per token. A half holds at most
  `_LANE_PRODUCTS` = 128 products of |code * x| <= 256, so it stays in int16 range; every `chunk`
  steps (4 * chunk <= 128 products) the halves are split (sign-extend the low half, shift out the
  high one) and summed over rows. `block_t` tokens share one unpacked tile.
* `dot` (GEMV_MAX_M < M <= DOT_MAX_M under "auto"): per (i, j) a tensor-core dot of the x tile
  [bm, bk4] with the unpacked int8 code tile [bk4, bw], int32 accumulation; M padded to bm >= 16.
* `xla_int8` / `xla_bf16`: unpack the whole weight with XLA (one fused pass that writes K*N or 2*K*N
  bytes), then an XLA int8 (int32 accumulation) or bf16 matmul: the "unpack then dense matmul" path
  for large M, where the matmul is compute bound. "auto" uses xla_int8 above DOT_MAX_M: on the H200
  (results/ternary.md, 2026-11-23) the int8 GEMM plus the unpack pass took 503.6 / 468.8 us at
  M = 4096 for 8192x8192 / 4096x14336 against 788.0 / 610.0 us for the bf16 GEMM, while xla_bf16
  (what "auto" used before) took 832.2 / 710.7 us (a bf16 GEMM plus an unpack pass cannot beat a
  bf16 GEMM). `xla_layout` picks how the unpacked weight is laid out: "nk" ([N, K], K contiguous,
  from the [K, N] unpack transposed), "nk_direct" ([N, K] computed straight from the transposed
  words) or "kn" ([K, N]); `xla_barrier=False` drops the optimization barrier so XLA may fuse the
  unpacking into the GEMM's operand loads.

`impl="auto"` picks by M (and K4 % 4 for dp4a); the thresholds come from experiments/bench_ternary.py's
sweep on an H200 (results/ternary.md). The weights should be int32 words
(`effjax.quant.ternary.as_words`, once at load time): a uint8 `packed` is converted on every call,
which XLA does as an extra full pass over the weight. Triton (GPU) lowering via
`jax.experimental.pallas.triton.CompilerParams`; `interpret=True` (the default off-GPU) runs the
kernels in the Pallas interpreter on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.layers.bitlinear import int8_act_codes
from effjax.quant.ternary import PackedTernary, unpack_2bit, words_2bit
from pallas_kernels import ptx
from pallas_kernels import ternary_mgpu

__all__ = ["ternary_matmul_reference", "ternary_matmul", "ternary_linear", "gemv_config",
           "dot_config", "dp4a_config", "auto_impl", "DP4A_MAX_M", "GEMV_MAX_M", "DOT_MAX_M", "IMPLS", "REDUCES", "XLA_LAYOUTS",
           "DEFAULT_REDUCE", "TARGET_PROGRAMS"]

IMPLS = ("auto", "mgpu", "dp4a", "gemv", "dot", "xla_int8", "xla_bf16", "reference")
REDUCES = ("xla", "fused")
XLA_LAYOUTS = ("nk", "nk_direct", "kn")
DEFAULT_REDUCE = "xla"  # the measured default; "fused" is swept by experiments/bench_ternary.py
DP4A_MAX_M = 4       # "auto": M <= this (and K4 % 4 == 0) -> dp4a (H200: M = 8, 16 -> dot)
GEMV_MAX_M = 4       # "auto" when K4 % 4 != 0: M <= this -> gemv (SWAR)
DOT_MAX_M = 256      # GEMV_MAX_M < M <= this -> dot; above: unpack + XLA int8 matmul
TARGET_PROGRAMS = 512  # automatic split-K aims at >= this many programs (H200: 132 SMs)
_LANE_PRODUCTS = 128  # products a 16-bit half may accumulate before a flush
_LANE_MASK = 0x00030003


# ----------------------------------------------------------------------------- reference


def ternary_matmul_reference(x_MK: jax.Array, scale_x_M: jax.Array, p: PackedTernary,
                             out_dtype=jnp.float32) -> jax.Array:
  """Plain jnp: unpack the codes, exact int32 matmul, then scale. Returns [M, N]."""
  codes_KN = unpack_2bit(p.packed, p.shape)
  acc_MN = lax.dot(x_MK.astype(jnp.int32), codes_KN.astype(jnp.int32),
                   preferred_element_type=jnp.int32)
  y = acc_MN.astype(jnp.float32) * (p.scale * scale_x_M.astype(jnp.float32))[:, None]
  return y.astype(out_dtype)


# ----------------------------------------------------------------------------- kernels


def _finish(o_ref, rows, i, val, scale_refs, mode):
  """Writes plane i of an exact int32 result `val` [len(rows), bw] for token rows `rows` (pl.ds).

  mode "xla": int32 partial sums to o_ref[rows, i, :] (o_ref is [tm, 4, bw], the split dim squeezed);
  "store": val * scale_w * scale_x[rows] in o_ref's dtype; "atomic": the same scaled float32 values
  added with atomic_add into the zero-initialised float32 o_ref.
  """
  if mode == "xla":
    o_ref[rows, pl.ds(i, 1), :] = val[:, None, :]
    return
  sw_ref, sx_ref = scale_refs
  s = sx_ref[rows] * sw_ref[...]                      # [rows] float32 (sw_ref is [1])
  y = val.astype(jnp.float32) * s[:, None]
  if mode == "store":
    o_ref[rows, pl.ds(i, 1), :] = y[:, None, :].astype(o_ref.dtype)
  else:
    plgpu.atomic_add(o_ref, (rows, pl.ds(i, 1), slice(None)), y[:, None, :])


def _split_refs(rest, mode):
  """(scale refs or None, output ref) from the kernel's trailing refs (see `_kernel_call`)."""
  if mode == "xla":
    return None, rest[0]
  if mode == "store":
    return (rest[0], rest[1]), rest[2]
  return (rest[0], rest[1]), rest[3]  # rest[2] is the aliased zero input (same buffer as rest[3])


def _gemv_kernel(x_ref, w_ref, *rest, k4, k4s, bk4, n_chunks, chunk, mode):
  """tm tokens x one column tile (bw words = 4*bw outputs) x one K split, SWAR on CUDA cores.

  x_ref [tm, Kp] int8, w_ref [k4s, bw] int32 words; then (mode != "xla") scale_w [1] and
  scale_x [tm] float32 refs, (mode "atomic") the aliased zero buffer; last the output ref
  [tm, 4, bw] (int32 partial sums for mode "xla", see `_finish`).
  """
  scale_refs, o_ref = _split_refs(rest, mode)
  tm = x_ref.shape[0]
  bw = w_ref.shape[1]
  k0 = pl.program_id(1) * k4s  # first packed row of this K split

  def step(t, carry):
    accs, xss = list(carry[0]), list(carry[1])
    r0 = t * bk4 if isinstance(t, int) else pl.multiple_of(t * bk4, bk4)
    w = w_ref[pl.ds(r0, bk4), :]
    wh = lax.shift_right_arithmetic(w, 8)
    for j in range(4):
      lo = lax.shift_right_arithmetic(w, 2 * j) & _LANE_MASK   # planes i = 0 (low), 2 (high)
      hi = lax.shift_right_arithmetic(wh, 2 * j) & _LANE_MASK  # planes i = 1 (low), 3 (high)
      for mi in range(tm):
        xj = x_ref[mi, pl.ds(j * k4 + k0 + r0, bk4)].astype(jnp.int32)
        xss[mi] = xss[mi] + xj
        acc_lo, acc_hi = accs[mi]
        accs[mi] = (acc_lo + lo * xj[:, None], acc_hi + hi * xj[:, None])
    return tuple(accs), tuple(xss)

  def split_lanes(acc):
    low = lax.shift_right_arithmetic(lax.shift_left(acc, 16), 16)
    high = lax.shift_right_arithmetic(acc - low, 16)
    return jnp.sum(low, axis=0), jnp.sum(high, axis=0)

  def chunk_body(ci, carry):
    ys, xss = carry
    zeros = jnp.zeros((bk4, bw), jnp.int32)
    init = (tuple((zeros, zeros) for _ in range(tm)), xss)
    if chunk == 1:
      accs, xss = step(ci, init)
    else:
      accs, xss = lax.fori_loop(ci * chunk, (ci + 1) * chunk, step, init)
    new_ys = []
    for mi in range(tm):
      a0, a2 = split_lanes(accs[mi][0])
      a1, a3 = split_lanes(accs[mi][1])
      y0, y1, y2, y3 = ys[mi]
      new_ys.append((y0 + a0, y1 + a1, y2 + a2, y3 + a3))
    return tuple(new_ys), xss

  zv = jnp.zeros((bw,), jnp.int32)
  init = (tuple((zv, zv, zv, zv) for _ in range(tm)),
          tuple(jnp.zeros((bk4,), jnp.int32) for _ in range(tm)))
  if n_chunks == 1:
    ys, xss = chunk_body(0, init)
  else:
    ys, xss = lax.fori_loop(0, n_chunks, chunk_body, init)
  for mi in range(tm):
    xsum = jnp.sum(xss[mi])
    for i, yi in enumerate(ys[mi]):
      _finish(o_ref, pl.ds(mi, 1), i, (yi - xsum)[None, :], scale_refs, mode)


def _dot_kernel(x_ref, w_ref, *rest, k4, k4s, bk4, n_iter, mode):
  """Row block bm x column tile bw words x one K split: 16 tensor-core dots per K step.

  x_ref [bm, Kp] int8, w_ref [k4s, bw] int32 words; the trailing refs as in `_gemv_kernel`,
  output [bm, 4, bw].
  """
  scale_refs, o_ref = _split_refs(rest, mode)
  bm = x_ref.shape[0]
  bw = w_ref.shape[1]
  k0 = pl.program_id(1) * k4s

  def body(t, carry):
    accs, xs = list(carry[:4]), carry[4]
    r0 = pl.multiple_of(t * bk4, bk4)
    w = w_ref[pl.ds(r0, bk4), :]
    for j in range(4):
      xj = x_ref[:, pl.ds(j * k4 + k0 + r0, bk4)]
      xs = xs + jnp.sum(xj.astype(jnp.int32), axis=1)
      for i in range(4):
        c = (lax.shift_right_arithmetic(w, 8 * i + 2 * j) & 3).astype(jnp.int8)
        accs[i] = accs[i] + jnp.dot(xj, c, preferred_element_type=jnp.int32)
    return (*accs, xs)

  za = jnp.zeros((bm, bw), jnp.int32)
  out = lax.fori_loop(0, n_iter, body, (za, za, za, za, jnp.zeros((bm,), jnp.int32)))
  for i in range(4):
    _finish(o_ref, pl.ds(0, bm), i, out[i] - out[4][:, None], scale_refs, mode)


# DP4A path. PTX for the two instructions the integer dot product needs: PRMT (byte permute; 8 of
# them make a 4x4 byte transpose of four words) and DP4A (4-way int8 dot product with int32
# accumulation, sm_61+). One instruction per inline-asm op: jax's Pallas Triton lowering of
# `elementwise_inline_asm` returns only one result (a multi-result asm fails with "4 outvars do
# not match 1 outvals", jax 0.11.2).
_DP4A_ASM = "dp4a.s32.s32 $0, $1, $2, $3;"
_CODE_MASK = 0x03030303
_ONES = 0x01010101


def _prmt(a, b, selector: int, emulate: bool):
  """PTX prmt.b32 (default mode): byte k of the result = byte (selector >> 4k) & 7 of {b, a}."""
  if emulate:
    w = lambda x: lax.bitcast_convert_type(x, jnp.uint32)  # noqa: E731
    out = ptx.prmt_emulated(w(a), w(b), jnp.full(a.shape, selector, jnp.uint32))
    return lax.bitcast_convert_type(out, jnp.int32)
  [out] = plgpu.elementwise_inline_asm(
      f"prmt.b32 $0, $1, $2, {selector:#06x};", args=[a, b], constraints="=r,r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])
  return out


def _transpose4(a, b, c, d, emulate: bool):
  """Words t_i with byte r of t_i = byte i of the r-th input (a 4x4 byte transpose, 8 PRMT)."""
  l0, h0 = _prmt(a, b, 0x5140, emulate), _prmt(a, b, 0x7362, emulate)  # a0 b0 a1 b1 | a2 b2 a3 b3
  l1, h1 = _prmt(c, d, 0x5140, emulate), _prmt(c, d, 0x7362, emulate)
  return (_prmt(l0, l1, 0x5410, emulate), _prmt(l0, l1, 0x7632, emulate),
          _prmt(h0, h1, 0x5410, emulate), _prmt(h0, h1, 0x7632, emulate))


def _dp4a(a, b, c, emulate: bool):
  """c + sum over the 4 bytes of a * b (both as signed int8), int32 (PTX dp4a.s32.s32)."""
  if emulate:
    def sbyte(w, k):
      return lax.shift_right_arithmetic(lax.shift_left(w, jnp.int32(24 - 8 * k)), jnp.int32(24))
    return c + sum(sbyte(a, k) * sbyte(b, k) for k in range(4))
  [out] = plgpu.elementwise_inline_asm(
      _DP4A_ASM, args=[a, b, c], constraints="=r,r,r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.int32)])
  return out


def _dp4a_kernel(x_ref, w_ref, *rest, k16, k16s, bk, n_iter, mode, emulate, prefetch):
  """tm tokens x one column tile (bw words = 4*bw outputs) x one K split, DP4A on CUDA cores.

  x_ref [tm, 4*k16] int32: the int8 activations, 4 consecutive K positions per word (word
  j*k16 + r holds x[j*K4 + 4r .. j*K4 + 4r + 3]); w_ref [k16s, 4, bw] int32: the planar words
  viewed as [K4/4, 4, N4] (row r, slot b = packed row 4r + b). A byte transpose of the 4 slots
  gives, per plane i, a word whose byte b holds the 4 codes of packed row 4r + b of column
  i*N4 + c; `>> 2j & 0x03030303` then leaves the codes of K rows j*K4 + 4r + b in the bytes, which
  is exactly the byte order of x word j*k16 + r: one DP4A per (i, j). Per 4 words (64 weights)
  8 PRMT + 12 shifts + 16 ands + 16 DP4A per token. prefetch: the loop carries the next
  iteration's words, loaded before this iteration's arithmetic (register double buffering), so
  the load latency overlaps the DP4A work instead of following it.
  """
  scale_refs, o_ref = _split_refs(rest, mode)
  tm = x_ref.shape[0]
  bw = w_ref.shape[2]
  k0 = pl.program_id(1) * k16s

  ones = jnp.full((bk,), _ONES, jnp.int32)

  def load(t):  # t: traced loop index, or the Python int 0 (no multiple_of hint on a constant)
    r0 = t * bk if isinstance(t, int) else pl.multiple_of(t * bk, bk)
    return tuple(w_ref[pl.ds(r0, bk), b, :] for b in range(4))

  def body(t, carry):
    if prefetch:
      accs, xss, slots = carry
      nxt = load(jnp.minimum(t + 1, n_iter - 1))
    else:
      accs, xss = carry
      slots = load(t)
    r0 = pl.multiple_of(t * bk, bk)
    planes = _transpose4(*slots, emulate)
    codes = [[(lax.shift_right_logical(planes[i], jnp.int32(2 * j)) if j else planes[i])
              & _CODE_MASK for j in range(4)] for i in range(4)]
    new_accs, new_xss = [], []
    for mi in range(tm):
      acc, xs = list(accs[mi]), xss[mi]
      for j in range(4):
        xw = x_ref[mi, pl.ds(j * k16 + k0 + r0, bk)]
        xs = _dp4a(ones, xw, xs, emulate)
        xb = jnp.broadcast_to(xw[:, None], (bk, bw))
        for i in range(4):
          acc[i] = _dp4a(codes[i][j], xb, acc[i], emulate)
      new_accs.append(tuple(acc))
      new_xss.append(xs)
    if prefetch:
      return tuple(new_accs), tuple(new_xss), nxt
    return tuple(new_accs), tuple(new_xss)

  za = jnp.zeros((bk, bw), jnp.int32)
  init = (tuple((za, za, za, za) for _ in range(tm)),
          tuple(jnp.zeros((bk,), jnp.int32) for _ in range(tm)))
  if prefetch:
    init = init + (load(0),)
  accs, xss = lax.fori_loop(0, n_iter, body, init)[:2]
  for mi in range(tm):
    xsum = jnp.sum(xss[mi])
    for i in range(4):
      _finish(o_ref, pl.ds(mi, 1), i, (jnp.sum(accs[mi][i], axis=0) - xsum)[None, :], scale_refs,
              mode)


# ----------------------------------------------------------------------------- configs


def _pow2_divisor(n: int, target: int) -> int:
  """Largest power of two <= target that divides n (>= 1)."""
  b = 1
  while b * 2 <= target and n % (b * 2) == 0:
    b *= 2
  return b


def _pow2_ceil(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _largest_divisor_at_most(n: int, cap: int) -> int:
  for d in range(min(n, cap), 0, -1):
    if n % d == 0:
      return d
  return 1


def _auto_split(k4: int, bk4: int, other_programs: int) -> int:
  """Smallest power-of-two split with >= TARGET_PROGRAMS programs (bk4 divides K4/split)."""
  split = 1
  while (other_programs * split < TARGET_PROGRAMS and k4 % (2 * split) == 0
         and (k4 // (2 * split)) % bk4 == 0):
    split *= 2
  return split


def _resolve_split(rows: int, bk: int, other_programs: int, split_k: int | None,
                   what: str) -> tuple[int, int]:
  """(split_k, block rows): the automatic split when split_k is None (else checked: it must
  divide the `rows` K rows, named `what` in the error), and `bk` rounded down to a power of two
  dividing rows / split_k."""
  if split_k is None:
    split_k = _auto_split(rows, _pow2_divisor(rows, bk), other_programs)
  if split_k < 1 or rows % split_k:
    raise ValueError(f"split_k={split_k} must be >= 1 and divide the {what}={rows}")
  return split_k, _pow2_divisor(rows // split_k, bk)


def _token_tiles(m: int, n4: int, block_t: int | None, block_w: int | None):
  """(tokens per program, words per column tile, programs before split-K) for gemv / dp4a."""
  tm = block_t or min(8, _pow2_ceil(m))
  tm = _pow2_divisor(tm, tm)
  bw = _pow2_divisor(n4, block_w or 64)
  return tm, bw, (n4 // bw) * (-(-m // tm))


def gemv_config(m: int, k4: int, n4: int, block_t: int | None = None, block_w: int | None = None,
                block_k: int | None = None, split_k: int | None = None) -> dict:
  """Resolved gemv tiling for M tokens and words [k4, n4]; None fields get the automatic value.

  Automatic: tm = block_t = min(8, pow2 >= M) tokens per program; bw = 64 words (256 contiguous
  bytes per row, 16-byte vector loads); bk4 = 64 // tm rows (the per-token accumulators live in
  registers: 2 * tm tiles of bk4 x bw int32), at least 8; split_k = `_auto_split`.
  """
  tm, bw, programs = _token_tiles(m, n4, block_t, block_w)
  split_k, bk4 = _resolve_split(k4, block_k or max(8, 64 // tm), programs, split_k,
                                "packed rows K4")
  return dict(block_t=tm, block_w=bw, block_k=bk4, split_k=split_k)


def dot_config(m: int, k4: int, n4: int, block_m: int | None = None, block_w: int | None = None,
               block_k: int | None = None, split_k: int | None = None) -> dict:
  """Resolved dot tiling; None fields get the automatic value.

  Automatic: bm = pow2 >= M in [16, 64]; bw = 32 words; bk4 = 64 rows (int8 tensor-core tiles
  need bm >= 16, bw >= 16 and bk4 >= 32); split_k = `_auto_split`.
  """
  bm = block_m or min(64, max(16, _pow2_ceil(m)))
  bm = max(16, _pow2_divisor(bm, bm))
  bw = _pow2_divisor(n4, block_w or 32)
  split_k, bk4 = _resolve_split(k4, block_k or 64, (n4 // bw) * (-(-m // bm)), split_k,
                                "packed rows K4")
  if bw < 16 or bk4 < 32:
    raise ValueError(f"dot kernel needs N/4 divisible by 16 and K/(4*split_k) by 32 (int8 "
                     f"tensor-core tiles); got packed words [{k4}, {n4}], split_k={split_k} "
                     "(export with align >= 32)")
  return dict(block_m=bm, block_w=bw, block_k=bk4, split_k=split_k)


def dp4a_config(m: int, k4: int, n4: int, block_t: int | None = None,
                block_w: int | None = None, block_k: int | None = None,
                split_k: int | None = None) -> dict:
  """Resolved dp4a tiling for M tokens and words [k4, n4] (k4 % 4 == 0); None = automatic.

  `block_k` counts groups of 4 packed rows (one DP4A step covers 4 packed rows = 16 K rows).
  Automatic: tm = block_t = min(8, pow2 >= M); bw = 64 words; bk = 8 groups for one token, fewer
  for more tokens (4 accumulator tiles of bk x bw int32 per token live in registers); split_k =
  `_auto_split` over the k4 / 4 groups.
  """
  if k4 % 4:
    raise ValueError(f"the dp4a kernel needs the packed rows K4={k4} to be a multiple of 4 "
                     "(export with align >= 4), use impl='gemv'")
  k16 = k4 // 4
  tm, bw, programs = _token_tiles(m, n4, block_t, block_w)
  split_k, bk = _resolve_split(k16, block_k or max(2, 8 // tm), programs, split_k,
                               "row groups K4/4")
  return dict(block_t=tm, block_w=bw, block_k=bk, split_k=split_k)


# ----------------------------------------------------------------------------- pallas_call wrappers


def _pad_rows(x_MKp, s_M, mp):
  m = x_MKp.shape[0]
  if mp == m:
    return x_MKp, s_M
  return jnp.pad(x_MKp, ((0, mp - m), (0, 0))), jnp.pad(s_M, (0, mp - m))


def _kernel_call(kind, x_MKp, sx_M, sw, words_K4N4, *, cfg, reduce, num_warps, num_stages,
                 out_dtype, interpret):
  """One pallas_call of the gemv or dot kernel; returns y [M, 4*n4] in out_dtype.

  Grid (column tiles, K splits, row blocks). reduce "xla": int32 partials [split, mp, 4, n4] and
  an XLA sum + scale; "fused": scaled float32 results added atomically into zeros (split_k > 1)
  or stored directly (split_k = 1).
  """
  m, kp = x_MKp.shape
  k4, n4 = words_K4N4.shape
  rows = cfg["block_m"] if kind == "dot" else cfg["block_t"]
  bw, bk4, split_k = cfg["block_w"], cfg["block_k"], cfg["split_k"]
  mp = -(-m // rows) * rows
  x_MKp, sx_M = _pad_rows(x_MKp, sx_M, mp)
  k4s = k4 // split_k
  n_iter = k4s // bk4
  mode = "xla" if reduce == "xla" else ("store" if split_k == 1 else "atomic")
  x_spec = pl.BlockSpec((rows, kp), lambda c, s, t: (t, 0))
  w_spec = pl.BlockSpec((k4s, bw), lambda c, s, t: (s, c))
  if kind == "gemv":
    chunk = _largest_divisor_at_most(n_iter, _LANE_PRODUCTS // 4)
    kernel = functools.partial(_gemv_kernel, k4=k4, k4s=k4s, bk4=bk4, n_chunks=n_iter // chunk,
                               chunk=chunk, mode=mode)
  elif kind == "dp4a":  # bk4 counts groups of 4 packed rows here; x as int32 words of 4 bytes
    k16, k16s = k4 // 4, k4s // 4
    kernel = functools.partial(_dp4a_kernel, k16=k16, k16s=k16s, bk=bk4, n_iter=k16s // bk4,
                               mode=mode, emulate=interpret, prefetch=cfg["prefetch"])
    x_MKp = lax.bitcast_convert_type(x_MKp.reshape(mp, kp // 4, 4), jnp.int32)
    words_K4N4 = words_K4N4.reshape(k16, 4, n4)
    x_spec = pl.BlockSpec((rows, kp // 4), lambda c, s, t: (t, 0))
    w_spec = pl.BlockSpec((k16s, 4, bw), lambda c, s, t: (s, 0, c))
  else:
    kernel = functools.partial(_dot_kernel, k4=k4, k4s=k4s, bk4=bk4, n_iter=n_iter, mode=mode)
  tile_spec = pl.BlockSpec((rows, 4, bw), lambda c, s, t: (t, 0, c))
  args, in_specs, aliases = [x_MKp, words_K4N4], [x_spec, w_spec], {}
  if mode == "xla":
    out_spec = pl.BlockSpec((None, rows, 4, bw), lambda c, s, t: (s, t, 0, c))
    out_shape = jax.ShapeDtypeStruct((split_k, mp, 4, n4), jnp.int32)
    out_bytes = split_k * mp * 4 * n4 * 4
  else:
    args += [sw.reshape(1), sx_M]
    in_specs += [pl.BlockSpec((1,), lambda c, s, t: (0,)),
                 pl.BlockSpec((rows,), lambda c, s, t: (t,))]
    out_spec = tile_spec
    dt = jnp.dtype(out_dtype) if mode == "store" else jnp.dtype(jnp.float32)
    out_shape = jax.ShapeDtypeStruct((mp, 4, n4), dt)
    out_bytes = split_k * mp * 4 * n4 * dt.itemsize
    if mode == "atomic":
      args.append(jnp.zeros((mp, 4, n4), jnp.float32))
      in_specs.append(tile_spec)
      aliases = {len(args) - 1: 0}
  cost = pl.CostEstimate(flops=2 * mp * 16 * k4 * n4, transcendentals=0,
                         bytes_accessed=(mp // rows) * 4 * k4 * n4 + (n4 // bw) * mp * kp
                         + out_bytes)
  out = pl.pallas_call(
      kernel,
      grid=(n4 // bw, split_k, mp // rows),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      cost_estimate=cost,
      interpret=interpret,
      name=f"ternary_{kind}" + ("" if mode == "xla" else f"_{mode}"),
  )(*args)
  if mode == "xla":  # add the K splits' exact int32 partial sums, scale, cast
    acc = jnp.sum(out, axis=0)
    out = acc.astype(jnp.float32) * (sx_M * sw)[:, None, None]
  return out.astype(out_dtype).reshape(mp, 4 * n4)[:m]


def _codes_for_xla(p: PackedTernary, dt, layout: str, barrier: bool) -> jax.Array:
  """The whole weight unpacked by XLA in dtype dt: [N, K] for "nk*" layouts, else [K, N]."""
  k, n = p.shape
  if layout == "nk_direct":
    w_T = (p.packed if p.packed.dtype == jnp.int32 else words_2bit(p.packed)).T                                                      # [N4, K4]
    n4, k4 = w_T.shape
    sh = (8 * jnp.arange(4, dtype=jnp.int32)[:, None] + 2 * jnp.arange(4, dtype=jnp.int32)[None])
    planes = (w_T[None, :, None, :] >> sh[:, None, :, None]) & 3          # [i, c, j, r]
    codes = (planes.reshape(4 * n4, 4 * k4)[:n, :k] - 1).astype(dt)       # [i*N4 + c, j*K4 + r]
  else:
    codes = unpack_2bit(p.packed, p.shape).astype(dt)
    if layout != "kn":
      codes = codes.T
  return lax.optimization_barrier(codes) if barrier else codes


# ----------------------------------------------------------------------------- public wrapper


def auto_impl(m: int, k4: int = 0, mgpu: bool = False) -> str:
  """The impl "auto" uses for M tokens and K4 packed rows: mgpu (the Mosaic GPU kernel of
  `pallas_kernels.ternary_mgpu`) for M = 1 when `mgpu` (a compiled run on a Hopper GPU with words
  that suit it); dp4a for M <= DP4A_MAX_M when K4 % 4 == 0 (always with the default export
  alignment), else gemv for M <= GEMV_MAX_M; dot up to DOT_MAX_M; above, unpack + XLA int8
  matmul."""
  if m == 1 and mgpu:
    return "mgpu"
  if m <= DP4A_MAX_M and k4 % 4 == 0:
    return "dp4a"
  return "gemv" if m <= GEMV_MAX_M else ("dot" if m <= DOT_MAX_M else "xla_int8")


def ternary_matmul(x_MK: jax.Array, scale_x_M: jax.Array, p: PackedTernary, *,
                   impl: str = "auto", out_dtype=jnp.float32, interpret: bool | None = None,
                   block_m: int | None = None, block_t: int | None = None,
                   block_w: int | None = None, block_k: int | None = None,
                   split_k: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                   reduce: str | None = None, xla_layout: str = "nk",
                   xla_barrier: bool = True, prefetch: bool = True) -> jax.Array:
  """y[M, N] = (x_MK @ codes) * p.scale * scale_x_M[:, None] from packed ternary weights.

  Args:
    x_MK: int8 activations [M, K] (K = p.shape[0]).
    scale_x_M: float32 per-token scales [M] (x = x_MK * scale_x).
    p: `PackedTernary` from `effjax.quant.ternary.export_ternary`; pass it through
      `effjax.quant.ternary.as_words` once (a uint8 `packed` is converted on every call).
    impl: one of IMPLS; "auto" = `auto_impl(M, K4, mgpu)`: mgpu for M = 1 when compiled on a
      Hopper GPU and the words suit it (`ternary_mgpu.usable`); else dp4a for M <= DP4A_MAX_M
      (K4 % 4 == 0), else gemv for M <= GEMV_MAX_M; dot for M <= DOT_MAX_M, else xla_int8
      (unpack to int8 + XLA int8 matmul). impl="mgpu" takes only M = 1 (an error otherwise)
      and runs emulated in interpret mode.
    interpret: run Pallas kernels in the interpreter; default True off-GPU, False on GPU.
    block_t (gemv/dp4a tokens per program), block_m (dot rows per program), block_w (words per
      column tile), block_k (packed rows per step; dp4a: groups of 4 packed rows), split_k (K
      splits, must divide K/4; dp4a: K/16): None = the automatic choice of `gemv_config` /
      `dp4a_config` / `dot_config`; block sizes are rounded down to powers of two dividing the
      packed dims. mgpu: block_w (words per CTA column tile), block_k (groups of 4 packed rows
      per pipeline step) and num_stages (tiles in flight), see `ternary_mgpu.mgpu_config`;
      the other tiling arguments do not apply to it.
    num_warps, num_stages: Triton launch parameters; num_stages None = 1 for gemv and dp4a (with the
      automatic split-K a program makes few K steps: its loads in flight come from many programs,
      not from pipelining; pass 2-3 with split_k = 1) and 3 for dot (Triton pipelines the weight
      loads of its K loop).
    reduce: gemv/dp4a/dot only, one of REDUCES; None = DEFAULT_REDUCE. "xla": int32 partial sums per K
      split plus an XLA reduction (exact sums, one more kernel); "fused": scale in-kernel and
      float32 atomic adds across K splits (plain stores when split_k = 1), no reduction kernel.
    xla_layout: one of XLA_LAYOUTS, for the xla_* paths (see the module docstring).
    xla_barrier: xla_* paths: keep the unpacked weight a separate array (an optimization
      barrier); False lets XLA fuse the unpacking into the matmul.
    prefetch: dp4a only: load the next loop iteration's weight words before this one's arithmetic
      (register double buffering; see `_dp4a_kernel`). H200, M = 1, 8192x8192: 11.6 -> 10.1 us.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if xla_layout not in XLA_LAYOUTS:
    raise ValueError(f"xla_layout must be one of {XLA_LAYOUTS}, got {xla_layout!r}")
  reduce_arg, reduce = reduce, DEFAULT_REDUCE if reduce is None else reduce
  if reduce not in REDUCES:
    raise ValueError(f"reduce must be one of {REDUCES} or None, got {reduce!r}")
  if x_MK.ndim != 2 or x_MK.dtype != jnp.int8:
    raise ValueError(f"x_MK must be int8 [M, K], got {x_MK.dtype} {tuple(x_MK.shape)}")
  m, k = x_MK.shape
  if k != p.shape[0]:
    raise ValueError(f"x_MK has K={k} but the packed weight has shape {p.shape}")
  if scale_x_M.shape != (m,):
    raise ValueError(f"scale_x_M must have shape ({m},), got {tuple(scale_x_M.shape)}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  n = p.shape[1]
  if impl == "auto":
    k4_, n4_ = p.packed.shape[0], p.packed.shape[1] // (4 if p.packed.dtype != jnp.int32 else 1)
    # packed rows K4 (uint8 bytes or int32 words)
    impl = auto_impl(m, k4_, mgpu=ternary_mgpu.usable(m, k4_, n4_, interpret))
  if impl == "reference":
    return ternary_matmul_reference(x_MK, scale_x_M, p, out_dtype)
  if impl in ("xla_int8", "xla_bf16"):
    dt = jnp.int8 if impl == "xla_int8" else jnp.bfloat16
    acc_t = jnp.int32 if impl == "xla_int8" else jnp.float32
    codes = _codes_for_xla(p, dt, xla_layout, xla_barrier)
    if xla_layout == "kn":
      acc = lax.dot(x_MK.astype(dt), codes, preferred_element_type=acc_t)
    else:  # K-contiguous weight ("TN" GEMM, the layout int8 tensor cores want)
      acc = lax.dot_general(x_MK.astype(dt), codes, (((1,), (1,)), ((), ())),
                            preferred_element_type=acc_t)
    return (acc.astype(jnp.float32) * (p.scale * scale_x_M.astype(jnp.float32))[:, None]
            ).astype(out_dtype)
  words = p.packed if p.packed.dtype == jnp.int32 else words_2bit(p.packed)
  k4, n4 = words.shape
  x_MKp = x_MK if 4 * k4 == k else jnp.pad(x_MK, ((0, 0), (0, 4 * k4 - k)))
  if impl == "mgpu":
    if m != 1:
      raise ValueError(f"impl='mgpu' computes one token (M = 1), got M={m}; use impl='auto'")
    extra = dict(block_m=block_m, block_t=block_t, split_k=split_k, reduce=reduce_arg)
    given = [k_ for k_, v in extra.items() if v is not None]
    if given:
      raise ValueError(f"impl='mgpu' takes block_w, block_k and num_stages only; got {given}")
    y = ternary_mgpu.ternary_gemv_mgpu(
        x_MKp[0], scale_x_M[0], p.scale, words, out_dtype=out_dtype, block_w=block_w,
        block_g=block_k, stages=num_stages, interpret=interpret)[None]
    return y if 4 * n4 == n else y[:, :n]
  if impl == "gemv":
    cfg = gemv_config(m, k4, n4, block_t, block_w, block_k, split_k)
    num_stages = 1 if num_stages is None else num_stages
  elif impl == "dp4a":
    cfg = dict(dp4a_config(m, k4, n4, block_t, block_w, block_k, split_k), prefetch=prefetch)
    num_stages = 1 if num_stages is None else num_stages
  else:
    cfg = dot_config(m, k4, n4, block_m, block_w, block_k, split_k)
    num_stages = 3 if num_stages is None else num_stages
  y = _kernel_call(impl, x_MKp, scale_x_M.astype(jnp.float32), jnp.asarray(p.scale, jnp.float32),
                   words, cfg=cfg, reduce=reduce, num_warps=num_warps, num_stages=num_stages,
                   out_dtype=out_dtype, interpret=interpret)
  return y if 4 * n4 == n else y[:, :n]


def ternary_linear(x: jax.Array, p: PackedTernary, **kwargs) -> jax.Array:
  """BitLinear inference from packed weights: per-token int8 absmax of x [..., K], then
  `ternary_matmul`. Returns [..., N] in x.dtype (float32 accumulation inside)."""
  lead = x.shape[:-1]
  codes, scale = int8_act_codes(x.reshape(-1, x.shape[-1]))
  y = ternary_matmul(codes, scale[:, 0], p, out_dtype=kwargs.pop("out_dtype", x.dtype), **kwargs)
  return y.reshape(*lead, p.shape[1])
