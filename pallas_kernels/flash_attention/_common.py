"""Backend-neutral pieces of the flash-attention kernels: static config, block geometry, masks.

Both lowerings (`triton.py`, `tpu.py`) build their kernel bodies from these helpers so that the
masking semantics and the fully-masked-block skipping rules live in exactly one place.

Conventions (shared with `effjax.attention.dense.attention_reference`):
  * query row `t` sits at key position `t' = t + off` with `off = S - T` (bottom-right aligned);
  * causal means `s <= t'`; a window `(left, right)` means `t' - left <= s <= t' + right`
    (`None` = unbounded on that side); causal and a window combine to `right_eff = min(right, 0)`;
  * segment ids: `q_seg[t] == kv_seg[s]` and `q_seg[t] != 0` (id 0 marks padding);
  * rows with no visible key output zeros and get `lse = +inf`, so their backward terms are 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# A finite "minus infinity": keeps `s - m` finite for rows that have seen only masked keys.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one flash-attention call (hashable; a custom_vjp nondiff arg).

  Positions are in *unpadded* units: `q_len`/`kv_len` are the caller's T and S; the arrays the
  kernels see may be padded past them.
  """
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  sm_scale: float
  left: Optional[int]  # window left extent (None = unbounded)
  right: Optional[int]  # effective right extent (0 when causal; None = unbounded)
  softcap: Optional[float]
  has_segments: bool
  use_exp2: bool
  rescale_threshold: Optional[float]  # FA4 conditional rescaling (log2 units); None = always
  interpret: bool
  exact_f32: bool = False  # float32 inputs: IEEE fp32 dots (no TF32 on GPU)
  # Triton: in tiles that need no mask, exponentiate exp2(qkᵀ * c - m) with c = scale * log2(e)
  # (one FMA per score) instead of scaling the scores first and subtracting after (mul + sub).
  fma_softmax: bool = False
  # Triton: exp2 as PTX ex2.approx.ftz.f32 (`pallas_kernels.ptx.exp2_ftz`): one MUFU per value
  # instead of ptxas's subnormal-handling expansion of the non-ftz form.
  ftz_exp2: bool = False

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def logit_unit(self) -> float:
    """Factor from natural-log logits to the kernel's softmax domain (log2(e) with exp2)."""
    return LOG2E if self.use_exp2 else 1.0


def exp_fn(cfg: KernelConfig):
  return jnp.exp2 if cfg.use_exp2 else jnp.exp


def log_fn(cfg: KernelConfig):
  return jnp.log2 if cfg.use_exp2 else jnp.log


def _precision(cfg):
  return lax.Precision.HIGHEST if (cfg is not None and cfg.exact_f32) else None


def dot_nt(a, b, cfg: KernelConfig | None = None):
  """a @ b.T with float32 accumulation (a: [M, H], b: [N, H])."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=_precision(cfg))


def dot_tn(a, b, cfg: KernelConfig | None = None):
  """a.T @ b with float32 accumulation (a: [M, N], b: [M, H])."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=_precision(cfg))


def dot_nn(a, b, cfg: KernelConfig | None = None):
  """a @ b with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=_precision(cfg))


def logits(q_MH, k_NH, cfg: KernelConfig):
  """Scaled (and soft-capped) logits in the kernel's softmax domain; also returns tanh for bwd.

  With exp2 the log2(e) factor is folded into the single scale multiply (FA4 trick), so the
  softmax uses `exp2(s - m)` directly.
  """
  s_MN = dot_nt(q_MH, k_NH, cfg)
  if cfg.softcap is None:
    return s_MN * (cfg.sm_scale * cfg.logit_unit), None
  th_MN = jnp.tanh(s_MN * (cfg.sm_scale / cfg.softcap))
  return th_MN * (cfg.softcap * cfg.logit_unit), th_MN


def folds_scale(cfg: KernelConfig) -> bool:
  """True when unmasked tiles use the FMA form `exp(raw * c - m)` (no softcap: tanh needs the
  scaled logits)."""
  return cfg.fma_softmax and cfg.softcap is None


def logit_factor(cfg: KernelConfig) -> float:
  """c with `softmax-domain logit = c * q.k` (no softcap)."""
  return cfg.sm_scale * cfg.logit_unit


def needs_kv_pad_mask(cfg: KernelConfig, padded_kv_len: int) -> bool:
  return padded_kv_len != cfg.kv_len


def block_mask(qpos_M1, kpos_1N, qseg_M1, kseg_1N, cfg: KernelConfig, kv_padded: bool):
  """Boolean [M, N] visibility of a (query tile, key tile) pair, or None if nothing masks.

  `qpos_M1` are aligned query positions (t + S - T); `kpos_1N` key positions.
  """
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if cfg.right is not None:
    mask = _and(mask, kpos_1N <= qpos_M1 + cfg.right)
  if cfg.left is not None:
    mask = _and(mask, kpos_1N >= qpos_M1 - cfg.left)
  if kv_padded:
    mask = _and(mask, kpos_1N < cfg.kv_len)
  if cfg.has_segments:
    mask = _and(mask, jnp.logical_and(qseg_M1 == kseg_1N, qseg_M1 != 0))
  return mask


def _i32(x):
  return jnp.asarray(x, jnp.int32)


def _cdiv(a, b: int):
  return lax.div(a + (b - 1), _i32(b))


def _fdiv(a, b: int):
  return lax.div(a, _i32(b))


def kv_block_range(t0, bq: int, bn: int, nk: int, cfg: KernelConfig, padded_kv_len: int):
  """Key-block range for query rows [t0, t0 + bq): returns (lo, hi, full_lo, full_hi).

  Blocks outside [lo, hi) are fully masked and skipped; blocks in [full_lo, full_hi) are fully
  visible to every row of the tile and need no mask (never the case with segment ids).
  All arithmetic is on int32 scalars so it lowers inside Triton/Mosaic kernels and index maps.
  """
  t0 = _i32(t0)
  off = cfg.offset
  zero = _i32(0)
  if cfg.left is not None:
    lo = _fdiv(jnp.maximum(t0 + (off - cfg.left), zero), bn)
    full_lo = _cdiv(jnp.maximum(t0 + (bq - 1 + off - cfg.left), zero), bn)
  else:
    lo = zero
    full_lo = zero
  if cfg.right is not None:
    last = jnp.clip(t0 + (bq - 1 + off + cfg.right + 1), 0, cfg.kv_len)
    hi = _cdiv(last, bn)
    full_hi = _fdiv(jnp.maximum(t0 + (off + cfg.right + 1), zero), bn)
  else:
    hi = _i32(pl_cdiv(cfg.kv_len, bn))
    full_hi = _i32(nk)
  hi = jnp.minimum(hi, _i32(nk))
  lo = jnp.minimum(lo, hi)
  if needs_kv_pad_mask(cfg, padded_kv_len):
    full_hi = jnp.minimum(full_hi, _i32(cfg.kv_len // bn))
  if cfg.has_segments:
    full_lo, full_hi = lo, lo
  full_lo = jnp.clip(full_lo, lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  return lo, hi, full_lo, full_hi


def q_block_range(s0, bn: int, bq: int, nq: int, cfg: KernelConfig, padded_kv_len: int):
  """Query-block range for key rows [s0, s0 + bn): returns (lo, hi, full_lo, full_hi).

  Only blocks holding real query rows (t < T) are visited: padded rows carry zero cotangents.
  """
  s0 = _i32(s0)
  off = cfg.offset
  zero = _i32(0)
  nq_real = _i32(pl_cdiv(cfg.q_len, bq))
  if cfg.right is not None:
    # t >= s - off - right for some s in the block; all rows of the tile for every s.
    lo = _fdiv(jnp.maximum(s0 - (off + cfg.right), zero), bq)
    full_lo = _cdiv(jnp.maximum(s0 + (bn - 1 - off - cfg.right), zero), bq)
  else:
    lo = zero
    full_lo = zero
  if cfg.left is not None:
    hi = _fdiv(jnp.maximum(s0 + (bn - 1 - off + cfg.left + bq), zero), bq)
    full_hi = _fdiv(jnp.maximum(s0 + (-off + cfg.left + 1), zero), bq)
  else:
    hi = nq_real
    full_hi = _i32(nq)
  hi = jnp.minimum(hi, nq_real)
  lo = jnp.minimum(lo, hi)
  if needs_kv_pad_mask(cfg, padded_kv_len):
    # A key tile reaching past S needs the padding mask in every query tile.
    full_hi = jnp.where(s0 + bn > cfg.kv_len, full_lo, full_hi)
  if cfg.has_segments:
    full_lo, full_hi = lo, lo
  full_lo = jnp.clip(full_lo, lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  return lo, hi, full_lo, full_hi


def pl_cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def largest_pow2_divisor(x: int) -> int:
  return x & (-x)
