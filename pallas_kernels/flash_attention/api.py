"""Public `flash_attention`: argument checks, padding, block-size choice and the custom_vjp.

"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (Dao,
arXiv 2307.08691): the forward (Algorithm 1) saves only the output and
the per-row log-sum-exp; the backward (Algorithm 2) recomputes the probabilities tile by tile.
Both directions are Pallas kernels (`triton.py` for NVIDIA GPUs through Triton, `mosaic_gpu.py`
for Hopper GPUs through Mosaic GPU (FlashAttention-3's warp specialisation), `tpu.py` for Mosaic
TPU).

Choices: sequence lengths are padded up to whole tiles here (zeros; padded keys are masked in
the kernel, padded query rows are sliced off and get zero cotangents); a head_dim that is not a
power of two is zero-padded on the Triton path (zeros change neither logits nor outputs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import _common as C
from pallas_kernels.flash_attention.reference import normalize_window, split_segment_ids

BACKENDS = ("triton", "mosaic_gpu", "mosaic_tpu")
_TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned_blocks.json")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. On Triton `block_q` counts tile rows (query positions x heads of one group).

  Forward: block_q x block_k tiles, num_warps/num_stages. dQ kernel: dq_*. dK/dV kernel: dkv_*.
  `use_exp2` / `rescale_threshold` pick the FA4 variants (see triton.py).
  """
  block_q: int = 128
  block_k: int = 128  # H200 autotune: best forward tile for D=128 (results/attention.md)
  num_warps: int = 8
  num_stages: int = 3
  dq_block_q: int = 64
  dq_block_k: int = 64
  dq_num_warps: int = 4
  dq_num_stages: int = 2
  dkv_block_q: int = 64
  dkv_block_k: int = 64
  dkv_num_warps: int = 4
  dkv_num_stages: int = 2
  use_exp2: bool = True
  rescale_threshold: Optional[float] = None
  heads_per_tile: Optional[int] = None  # Triton: max query heads of one group per tile
  dkv_transposed: bool = False  # Triton dK/dV kernel on transposed scores K Qᵀ
  # Triton backward: True = the dK/dV kernel also accumulates dQ with float32 atomics (FA2's
  # scheme, 5 matmuls; the dq_* fields are then unused); False = separate dQ kernel (7 matmuls).
  dq_atomic: bool = False
  # Triton: FMA-folded softmax exponent in unmasked tiles (forward and backward kernels).
  fma_softmax: bool = False
  # Triton: exp2 as ex2.approx.ftz.f32 (probabilities < 2^-126 flush to 0; see pallas_kernels/ptx.py).
  # H200, D=128, S=4k/16k: forward +0.5-2%, with fma_softmax +2-4%, backward unchanged.
  ftz_exp2: bool = True


  def replace(self, **kw) -> "BlockSizes":
    return dataclasses.replace(self, **kw)


# Small tiles for float32 and head_dim 256 (shared memory: 232 KB per SM on H100/H200).
SMALL_TRITON_BLOCKS = BlockSizes(block_q=64, block_k=32, num_warps=4, num_stages=2,
                                 dq_block_q=32, dq_block_k=32, dkv_block_q=32, dkv_block_k=32)
DEFAULT_BLOCKS = {"triton": BlockSizes(), "mosaic_tpu": BlockSizes(block_q=128, block_k=128,
                                                                    dq_block_q=128, dq_block_k=128,
                                                                    dkv_block_q=128, dkv_block_k=128)}


def _seq_bucket(n: int) -> int:
  return int(min(max(C.next_pow2(n), 1024), 32768))


def table_key(backend: str, head_dim: int, dtype, seq_len: int, causal: bool) -> str:
  return f"{backend}|h{head_dim}|{jnp.dtype(dtype).name}|s{_seq_bucket(seq_len)}|" + (
      "causal" if causal else "full")


@functools.lru_cache(maxsize=1)
def _load_table() -> dict:
  if not os.path.exists(_TABLE_PATH):
    return {}
  with open(_TABLE_PATH) as f:
    return json.load(f).get("entries", {})


def lookup_block_sizes(backend: str, head_dim: int, dtype, seq_len: int,
                       causal: bool) -> BlockSizes:
  """Tuned block sizes from tuned_blocks.json (nearest sequence bucket), else the defaults."""
  table = _load_table()
  if jnp.dtype(dtype) == jnp.float16:  # same tile constraints as bf16; tuned on bf16
    dtype = jnp.bfloat16
  base = DEFAULT_BLOCKS[backend]
  if backend == "triton" and (head_dim > 128 or jnp.dtype(dtype) == jnp.float32):
    base = SMALL_TRITON_BLOCKS
  for bucket in sorted({_seq_bucket(seq_len), 1024, 4096, 16384, 32768},
                       key=lambda b: (abs(np.log2(b) - np.log2(_seq_bucket(seq_len))), b)):
    entry = table.get(table_key(backend, head_dim, dtype, bucket, causal))
    if entry is not None:
      return base.replace(**entry)
  return base


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _triton_tiles(blk: BlockSizes, T: int, S: int, G: int):
  """Concrete Triton tiles: heads per tile (gp), query positions per tile (bq), keys (bn)."""
  out = {}
  gmax = C.largest_pow2_divisor(G)
  for prefix, bq_rows, bk, warps, stages in (
      ("", blk.block_q, blk.block_k, blk.num_warps, blk.num_stages),
      ("dq_", blk.dq_block_q, blk.dq_block_k, blk.dq_num_warps, blk.dq_num_stages),
      ("dkv_", blk.dkv_block_q, blk.dkv_block_k, blk.dkv_num_warps, blk.dkv_num_stages)):
    gp = max(1, min(gmax, bq_rows // 16, blk.heads_per_tile or gmax))
    bq = max(bq_rows // gp, 1)
    bq = max(min(bq, C.next_pow2(T)), max(1, 16 // gp))
    bn = max(16, min(bk, C.next_pow2(S)))
    out.update({prefix + "gp": gp, prefix + "bq": bq, prefix + "bn": bn,
                prefix + "warps": warps, prefix + "stages": stages})
  out["dkv_transposed"] = blk.dkv_transposed
  out["dq_atomic"] = blk.dq_atomic
  used = ("", "dkv_") if blk.dq_atomic else ("", "dq_", "dkv_")  # dq_* tiles unused with atomics
  Tp = _round_up(T, max(out[p + "bq"] for p in used))
  Sp = _round_up(S, max(out[p + "bn"] for p in used))
  return out, Tp, Sp


def _tpu_tiles(blk: BlockSizes, T: int, S: int):
  bq = min(blk.block_q, _round_up(T, 8))
  bk = min(blk.block_k, _round_up(S, 8))
  return {"bq": bq, "bk": bk}, _round_up(T, bq), _round_up(S, bk)


# ------------------------------------------------------------------------------ custom_vjp core

def _fwd_impl(q4, k4, v4, qseg, kseg, cfg, tiles, backend):
  B, Tp, N, H = q4.shape
  K = k4.shape[2]
  G = N // K
  if backend == "mosaic_gpu":
    from pallas_kernels.flash_attention import mosaic_gpu as backend_mod  # pylint: disable=g-import-not-at-top
    return backend_mod.forward(q4, k4, v4, cfg, tiles)
  if backend == "triton":
    from pallas_kernels.flash_attention import triton as backend_mod  # pylint: disable=g-import-not-at-top
    gp = tiles["gp"]
    o5, lse = backend_mod.forward(q4.reshape(B, Tp, N // gp, gp, H), k4, v4, qseg, kseg, cfg,
                                  tiles)
    return o5.reshape(q4.shape), lse.reshape(B, Tp, N)
  from pallas_kernels.flash_attention import tpu as backend_mod  # pylint: disable=g-import-not-at-top
  qT = q4.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
  oT, lse = backend_mod.forward(qT, k4.transpose(0, 2, 1, 3), v4.transpose(0, 2, 1, 3),
                                _tpu_seg(qseg, kseg)[0], _tpu_seg(qseg, kseg)[1], cfg, tiles)
  o4 = oT.transpose(0, 3, 1, 2, 4).reshape(q4.shape)
  return o4, lse[..., 0].transpose(0, 3, 1, 2).reshape(B, Tp, N)


def _tpu_seg(qseg, kseg):
  if qseg is None:
    return None, None
  return qseg[:, :, None], kseg[:, None, :]


def _bwd_impl(q4, k4, v4, qseg, kseg, o4, lse, do4, cfg, tiles, backend):
  B, Tp, N, H = q4.shape
  K = k4.shape[2]
  G = N // K
  if backend == "mosaic_gpu":
    from pallas_kernels.flash_attention import mosaic_gpu as backend_mod  # pylint: disable=g-import-not-at-top
    return backend_mod.backward(q4, k4, v4, o4, lse, do4, cfg, tiles)
  if backend == "triton":
    from pallas_kernels.flash_attention import triton as backend_mod  # pylint: disable=g-import-not-at-top
    return backend_mod.backward(q4, k4, v4, qseg, kseg, o4, lse, do4, cfg, tiles)
  from pallas_kernels.flash_attention import tpu as backend_mod  # pylint: disable=g-import-not-at-top
  toT = lambda x: x.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
  lseT = lse.reshape(B, Tp, K, G).transpose(0, 2, 3, 1)[..., None]
  qs, ks = _tpu_seg(qseg, kseg)
  dqT, dkT, dvT = backend_mod.backward(toT(q4), k4.transpose(0, 2, 1, 3), v4.transpose(0, 2, 1, 3),
                                       qs, ks, toT(o4), lseT, toT(do4), cfg, tiles)
  return (dqT.transpose(0, 3, 1, 2, 4).reshape(q4.shape), dkT.transpose(0, 2, 1, 3),
          dvT.transpose(0, 2, 1, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q4, k4, v4, qseg, kseg, cfg, tiles_items, backend):
  return _fwd_impl(q4, k4, v4, qseg, kseg, cfg, dict(tiles_items), backend)[0]


def _flash_fwd(q4, k4, v4, qseg, kseg, cfg, tiles_items, backend):
  o4, lse = _fwd_impl(q4, k4, v4, qseg, kseg, cfg, dict(tiles_items), backend)
  return o4, (q4, k4, v4, qseg, kseg, o4, lse)


def _flash_bwd(cfg, tiles_items, backend, res, do4):
  q4, k4, v4, qseg, kseg, o4, lse = res
  dq, dk, dv = _bwd_impl(q4, k4, v4, qseg, kseg, o4, lse, do4, cfg, dict(tiles_items), backend)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------- public API

def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, window=None,
                    softcap: Optional[float] = None, sm_scale: Optional[float] = None,
                    block_sizes: Optional[BlockSizes] = None, backend: Optional[str] = None,
                    interpret: bool = False):
  """Fused flash attention (forward and backward are Pallas kernels).

  Args:
    q: `[batch, q_len, heads, head_dim]`, bf16/fp16/fp32.
    k, v: `[batch, kv_len, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA/MQA, K/V never
      repeated).
    causal: causal mask, bottom-right aligned when q_len != kv_len.
    segment_ids: `[batch, seq]` int array (needs q_len == kv_len) or a `(q_ids, kv_ids)` pair;
      id 0 marks padding (such query rows return zeros).
    window: int or `(left, right)`; key s visible to aligned query t' iff
      `t' - left <= s <= t' + right` (None = unbounded on that side); an int w means (w, 0)
      when causal, (w, w) otherwise.
    softcap: Gemma-2 logit softcap `softcap * tanh(logits / softcap)`.
    sm_scale: logit scale, default `head_dim ** -0.5`.
    block_sizes: `BlockSizes`; default from tuned_blocks.json, else `DEFAULT_BLOCKS`.
    backend: "triton", "mosaic_gpu" (Hopper, sm_90; bf16/fp16; no softcap or segment ids;
      fixed tiles, so `block_sizes` must be None) or "mosaic_tpu"; None picks "mosaic_tpu" on
      TPU, "mosaic_gpu" on a Hopper GPU when the call is within its features and no
      `block_sizes` are given (H200: 1.3-1.5x faster than the Triton lowering,
      results/attention.md), else "triton".
    interpret: run the kernels in Pallas interpret mode (CPU tests; TPU interpret mode for
      "mosaic_tpu", the Mosaic GPU interpreter for "mosaic_gpu").

  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype. Rows with no visible key are zeros.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash_attention: q, k, v must be [batch, seq, heads, head_dim], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != H or v.shape[3] != H:
    raise ValueError(f"flash_attention: k {k.shape} / v {v.shape} must be [batch={B}, kv_len, "
                     f"kv_heads, head_dim={H}] (same head_dim for q, k and v)")
  if N % K:
    raise ValueError(f"flash_attention: heads ({N}) must be a multiple of kv_heads ({K})")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"flash_attention: dtype must be bfloat16, float16 or float32, got {q.dtype}")
  from pallas_kernels.flash_attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
  mgpu_why_not = mosaic_gpu.unsupported(dtype=q.dtype, head_dim=H, softcap=softcap,
                                        has_segments=segment_ids is not None)
  if backend is None:
    if jax.default_backend() == "tpu":
      backend = "mosaic_tpu"
    elif mgpu_why_not is None and block_sizes is None and mosaic_gpu.is_hopper():
      backend = "mosaic_gpu"
    else:
      backend = "triton"
  if backend not in BACKENDS:
    raise ValueError(f"flash_attention: backend must be None or one of {BACKENDS}, got {backend!r}")
  if backend == "triton" and jax.default_backend() != "gpu" and not interpret:
    raise ValueError("flash_attention: backend='triton' needs an NVIDIA GPU; on "
                     f"{jax.default_backend()!r} pass interpret=True (tests only)")
  if backend == "mosaic_gpu" and not interpret and not mosaic_gpu.is_hopper():
    dev = jax.devices()[0]
    raise ValueError("flash_attention: backend='mosaic_gpu' needs a Hopper GPU (compute "
                     f"capability 9.x, wgmma); this is {dev.device_kind!r}; use "
                     "backend='triton', or interpret=True for tests")
  if backend == "mosaic_gpu" and mgpu_why_not is not None:
    raise ValueError(f"flash_attention: backend='mosaic_gpu' does not support {mgpu_why_not}; "
                     "use backend='triton'")
  if backend == "mosaic_gpu" and block_sizes is not None:
    raise ValueError("flash_attention: block_sizes applies to backend 'triton'/'mosaic_tpu'; the "
                     "'mosaic_gpu' kernels have fixed tiles (pass block_sizes=None)")
  if backend == "mosaic_tpu" and jax.default_backend() != "tpu" and not interpret:
    raise ValueError("flash_attention: backend='mosaic_tpu' needs a TPU; on "
                     f"{jax.default_backend()!r} pass interpret=True (tests only)")
  if block_sizes is not None and block_sizes.dq_atomic and backend != "triton":
    raise ValueError(f"flash_attention: block_sizes.dq_atomic=True needs backend='triton' "
                     f"(float32 atomics); backend {backend!r} has only the two-kernel backward")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"flash_attention: softcap must be > 0 or None, got {softcap}")
  win = normalize_window(window, causal)
  left, right = (None, None) if win is None else win
  if causal:
    right = 0 if right is None else min(right, 0)
  q_seg, kv_seg = split_segment_ids(segment_ids, T, S)
  scale = float(H ** -0.5 if sm_scale is None else sm_scale)
  tuned_h = C.next_pow2(max(H, 16)) if backend == "triton" else H  # Triton pads head_dim
  if backend == "mosaic_gpu":  # fixed tiles (mosaic_gpu.tiles); no tuned table to look up
    blk = BlockSizes()
  else:
    blk = block_sizes or lookup_block_sizes(backend, tuned_h, q.dtype, max(T, S), causal)

  cfg = C.KernelConfig(
      q_len=T, kv_len=S, num_heads=N, num_kv_heads=K, head_dim=H, sm_scale=scale,
      left=left, right=right, softcap=None if softcap is None else float(softcap),
      has_segments=q_seg is not None, use_exp2=blk.use_exp2,
      rescale_threshold=blk.rescale_threshold, interpret=bool(interpret),
      fma_softmax=blk.fma_softmax and backend == "triton",
      ftz_exp2=blk.ftz_exp2 and blk.use_exp2 and backend == "triton",
      exact_f32=q.dtype == jnp.float32)
  if backend == "mosaic_gpu":
    Hp = _round_up(H, 64)  # wgmma K-dimension granularity; zero columns change nothing
    tiles, Tp, Sp = mosaic_gpu.tiles(Hp, T, S)
  elif backend == "triton":
    tiles, Tp, Sp = _triton_tiles(blk, T, S, N // K)
    Hp = C.next_pow2(max(H, 16))
  else:
    tiles, Tp, Sp = _tpu_tiles(blk, T, S)
    Hp = H
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, Hp - H)))
  q4, k4, v4 = pad(q, Tp), pad(k, Sp), pad(v, Sp)
  if q_seg is not None:
    q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, Tp - T)))
    kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, Sp - S)))
  o4 = _flash(q4, k4, v4, q_seg, kv_seg, cfg, tuple(sorted(tiles.items())), backend)
  return o4[:, :T, :, :H]
