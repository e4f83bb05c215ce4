"""Split-K matrix-vector product for decoding: y[M, N] = x[M, K] @ W, M small (1..16 rows).

No paper: this is the memory-bound building block of batch-1 decoding (each step reads every
weight once; arithmetic intensity ~M flops/byte). A decode step of a Llama-shaped model is ~110
such products; XLA's own GEMV kernels stream a [2048, 8192] bf16 weight at ~47% of the H200's copy
bandwidth (results/decode_bench.md), so this kernel exists to stream weights faster.

Choices written down:

* Layouts: `w_layout="kn"` takes W as [K, N] (an `Einsum` kernel "BTD,DF->BTF" flattened), and
  `"nk"` takes W as [N, K] and computes x @ Wᵀ (the tied embedding [V, D] used as the LM head,
  without a transposed copy).
* Grid (N // block_n, split_k): every program reads one [K / split_k, block_n] slab of W once
  (coalesced along the contiguous axis) in `block_k` steps, so ~(N / block_n) * split_k programs
  are in flight; `split_k` is chosen so that there are >= `target_programs` of them (many loads
  outstanding per SM is what a bandwidth-bound kernel needs). Partial sums [split_k, M, N] are
  float32 and a tiny XLA reduction adds them (M * N * split_k * 4 bytes, a few % of W's bytes).
* Arithmetic: "fma" multiplies the W tile by x broadcast and accumulates a [block_k, block_n]
  (or [block_n, block_k]) float32 tile, reduced once at the end (no tensor cores: at M = 1 a dot
  would waste 15/16 of its rows); "dot" pads x to 16 rows and uses the tensor-core dot (M > 1).
  `mode=None` picks fma for M <= 2 and dot above.
* Accumulation in float32, output in `out_dtype` (default: x's dtype).
* Shapes must tile exactly (K % (split_k * block_k) == 0, N % block_n == 0); `gemv` raises
  otherwise and `supported` tells a caller in advance, so a dispatcher can choose XLA for
  odd shapes explicitly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["gemv", "gemv_reference", "supported", "default_blocks", "MAX_M", "LAYOUTS"]

MAX_M = 16
LAYOUTS = ("kn", "nk")
MODES = ("fma", "dot")


def gemv_reference(x_MK: jax.Array, w: jax.Array, *, w_layout: str = "kn") -> jax.Array:
  """Plain jnp, float32: x @ W (layout "kn", W [K, N]) or x @ Wᵀ (layout "nk", W [N, K])."""
  _check_layout(w_layout)
  eqn = "MK,KN->MN" if w_layout == "kn" else "MK,NK->MN"
  return jnp.einsum(eqn, x_MK.astype(jnp.float32), w.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)


def _check_layout(w_layout):
  if w_layout not in LAYOUTS:
    raise ValueError(f"w_layout must be one of {LAYOUTS}, got {w_layout!r}")


def _kn_dims(w, w_layout):
  return (w.shape[0], w.shape[1]) if w_layout == "kn" else (w.shape[1], w.shape[0])


# ----------------------------------------------------------------------------- kernel


def _gemv_kernel(x_ref, w_ref, o_ref, *, w_layout, mode, block_k, n_iter):
  """One [K/split, block_n] slab of W. x_ref [Mp, Ks], w_ref [Ks, bn] or [bn, Ks],
  o_ref [Mp, bn] float32 partial sums."""
  mp = x_ref.shape[0]
  bn = w_ref.shape[1] if w_layout == "kn" else w_ref.shape[0]

  def w_tile(k0):
    if w_layout == "kn":
      return w_ref[pl.ds(k0, block_k), :]
    return w_ref[:, pl.ds(k0, block_k)]

  if mode == "fma":
    def body(t, accs):
      k0 = pl.multiple_of(t * block_k, block_k)
      w = w_tile(k0).astype(jnp.float32)
      out = []
      for m in range(mp):
        x_k = x_ref[m, pl.ds(k0, block_k)].astype(jnp.float32)
        out.append(accs[m] + (w * x_k[:, None] if w_layout == "kn" else w * x_k[None, :]))
      return tuple(out)

    shape = (block_k, bn) if w_layout == "kn" else (bn, block_k)
    accs = lax.fori_loop(0, n_iter, body, tuple(jnp.zeros(shape, jnp.float32)
                                                 for _ in range(mp)))
    for m in range(mp):
      o_ref[m, :] = jnp.sum(accs[m], axis=0 if w_layout == "kn" else 1)
  else:
    def body(t, acc):
      k0 = pl.multiple_of(t * block_k, block_k)
      w = w_tile(k0)
      x = x_ref[:, pl.ds(k0, block_k)].astype(w.dtype)
      # float32 weights keep full precision (no TF32)
      return acc + plgpu.dot(x, w, trans_b=w_layout == "nk",
                             allow_tf32=w.dtype != jnp.float32)

    o_ref[...] = lax.fori_loop(0, n_iter, body, jnp.zeros((mp, bn), jnp.float32))


def supported(m: int, k: int, n: int, *, block_n: int, block_k: int, split_k: int) -> bool:
  """Whether `gemv` can run these sizes with these blocks (exact tiling, M <= MAX_M)."""
  return (1 <= m <= MAX_M and n % block_n == 0 and k % (split_k * block_k) == 0)


def default_blocks(m: int, k: int, n: int, w_layout: str = "kn", *,
                   target_programs: int = 528) -> dict:
  """Block sizes used when `gemv` is called without them (from experiments/bench_gemv.py and, for
  the 2048x2048 attention output projection inside a decode step, experiments/bench_decode.py:
  128 x 128 blocks, split 16, 3% faster per step than 64-deep blocks split 8)."""
  del m
  block_n = 128 if w_layout == "kn" else 64
  block_k = 128
  while block_n > 16 and n % block_n:
    block_n //= 2
  while block_k > 16 and k % block_k:
    block_k //= 2
  split_k = 1
  n_tiles = max(1, n // block_n)
  while (n_tiles * split_k < target_programs and k % (2 * split_k * block_k) == 0
         and k // (2 * split_k) >= block_k):
    split_k *= 2
  return dict(block_n=block_n, block_k=block_k, split_k=split_k)


@functools.partial(jax.jit, static_argnames=("w_layout", "block_n", "block_k", "split_k", "mode",
                                             "num_warps", "num_stages", "out_dtype", "interpret"))
def _gemv(x_MK, w, *, w_layout, block_n, block_k, split_k, mode, num_warps, num_stages,
          out_dtype, interpret):
  m, k = x_MK.shape
  _, n = _kn_dims(w, w_layout)
  mp = m if mode == "fma" else max(16, 1 << (m - 1).bit_length())
  if mp != m:
    x_MK = jnp.pad(x_MK, ((0, mp - m), (0, 0)))
  ks = k // split_k
  w_spec = (pl.BlockSpec((ks, block_n), lambda j, s: (s, j)) if w_layout == "kn"
            else pl.BlockSpec((block_n, ks), lambda j, s: (j, s)))
  kernel = functools.partial(_gemv_kernel, w_layout=w_layout, mode=mode, block_k=block_k,
                             n_iter=ks // block_k)
  part_SMN = pl.pallas_call(
      kernel,
      grid=(n // block_n, split_k),
      in_specs=[pl.BlockSpec((mp, ks), lambda j, s: (0, s)), w_spec],
      out_specs=pl.BlockSpec((None, mp, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((split_k, mp, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=w.size * w.dtype.itemsize + x_MK.size * x_MK.dtype.itemsize
          + split_k * mp * n * 4),
      interpret=interpret,
      name=f"gemv_{w_layout}_{mode}",
  )(x_MK, w)
  y = part_SMN[0] if split_k == 1 else jnp.sum(part_SMN, axis=0)
  return y[:m].astype(out_dtype)


def gemv(x_MK: jax.Array, w: jax.Array, *, w_layout: str = "kn", block_n: int | None = None,
         block_k: int | None = None, split_k: int | None = None, mode: str | None = None,
         num_warps: int = 4, num_stages: int = 2, out_dtype=None,
         interpret: bool = False) -> jax.Array:
  """x @ W for a few rows of x (Pallas; Triton lowering on GPU, `interpret=True` on CPU).

  Args:
    x_MK: [M, K] activations, 1 <= M <= MAX_M.
    w: weights, [K, N] for w_layout="kn" or [N, K] for "nk" (result x @ Wᵀ).
    w_layout: "kn" or "nk".
    block_n, block_k, split_k: tiling (powers of two; N % block_n == 0,
      K % (split_k * block_k) == 0). Missing values come from `default_blocks`.
    mode: "fma" (broadcast multiply-add, for M <= 2) or "dot" (tensor-core dot, x padded to 16
      rows); None picks by M.
    num_warps, num_stages: Triton launch parameters.
    out_dtype: output dtype (default x's dtype).
    interpret: run in the Pallas interpreter (CPU tests).
  Returns:
    [M, N] in out_dtype, accumulated in float32.
  Raises:
    ValueError: naming the argument that is out of range or does not tile the shapes.
  """
  _check_layout(w_layout)
  if x_MK.ndim != 2 or w.ndim != 2:
    raise ValueError(f"gemv: x_MK must be [M, K] and w 2-D, got {x_MK.shape} and {w.shape}")
  m, k = x_MK.shape
  wk, n = _kn_dims(w, w_layout)
  if wk != k:
    raise ValueError(f"gemv: x_MK {x_MK.shape} and w {w.shape} (layout {w_layout!r}) disagree "
                     f"on K")
  if not 1 <= m <= MAX_M:
    raise ValueError(f"gemv: M (rows of x_MK) must be in [1, {MAX_M}], got {m}")
  d = default_blocks(m, k, n, w_layout)
  block_n = d["block_n"] if block_n is None else block_n
  block_k = d["block_k"] if block_k is None else block_k
  split_k = d["split_k"] if split_k is None else split_k
  for name, v in (("block_n", block_n), ("block_k", block_k), ("split_k", split_k)):
    if v < 1 or v & (v - 1):
      raise ValueError(f"gemv: {name} must be a power of two, got {v}")
  if not supported(m, k, n, block_n=block_n, block_k=block_k, split_k=split_k):
    raise ValueError(f"gemv: shapes M={m}, K={k}, N={n} do not tile with block_n={block_n}, "
                     f"block_k={block_k}, split_k={split_k} (need N % block_n == 0 and "
                     f"K % (split_k * block_k) == 0)")
  if mode is None:
    mode = "fma" if m <= 2 else "dot"
  if mode not in MODES:
    raise ValueError(f"gemv: mode must be one of {MODES} or None, got {mode!r}")
  return _gemv(x_MK, w, w_layout=w_layout, block_n=block_n, block_k=block_k, split_k=split_k,
               mode=mode, num_warps=num_warps, num_stages=num_stages,
               out_dtype=jnp.dtype(out_dtype or x_MK.dtype), interpret=interpret)
