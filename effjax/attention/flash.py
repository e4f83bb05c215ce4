"""Flash-attention dispatch for `effjax.attention.attend`: Pallas kernel, cuDNN, and `auto`.

"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (Dao,
arXiv 2307.08691) through our Pallas kernels
(`pallas_kernels.flash_attention`, forward + backward; on NVIDIA GPUs the Mosaic GPU lowering
(Hopper, FlashAttention-3 warp specialisation) where the call is within its features, else the
Triton lowering; Mosaic on TPU), and cuDNN's fused attention through
`jax.nn.dot_product_attention(implementation="cudnn")`.

`auto_impl` encodes the H200 measurements in `results/attention.md`
(`experiments/bench_attention.py`): see its docstring for the rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.attention.dense import normalize_window, split_segment_ids


def attend_pallas(q, k, v, *, causal=False, segment_ids=None, window=None, softcap=None,
                  sm_scale=None):
  """Attention through the Pallas flash-attention kernels (`flash_attention`'s default lowering:
  Mosaic GPU on Hopper for bf16/fp16 without softcap or segment ids, else Triton; TPU: Mosaic).

  Raises:
    ValueError: on a backend without a compiled Pallas path (CPU: use impl="xla"; the
      kernels' interpret mode is for tests only, via `pallas_kernels.flash_attention`).
  """
  backend = jax.default_backend()
  if backend not in ("gpu", "tpu"):
    raise ValueError(f"attend: impl='pallas' needs a GPU or TPU backend, not {backend!r} "
                     "(use impl='xla' on CPU)")
  from pallas_kernels.flash_attention import flash_attention  # pylint: disable=g-import-not-at-top
  return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                         softcap=softcap, sm_scale=sm_scale)


def _cudnn_unsupported(q, k, v, *, causal, segment_ids, window, softcap):
  """The first feature cuDNN (through jax.nn.dot_product_attention) cannot do, or None."""
  if jax.default_backend() != "gpu":
    return f"backend {jax.default_backend()!r} (cuDNN needs an NVIDIA GPU)"
  if softcap is not None:
    return "softcap"
  if segment_ids is not None:
    return "segment_ids"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16/float16)"
  if not (q.dtype == k.dtype == v.dtype):
    return "mixed q/k/v dtypes"
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f"head_dim {q.shape[-1]} (cuDNN path here: multiples of 8 up to 128)"
  if (causal or window is not None) and q.shape[1] != k.shape[1]:
    return "causal/window with q_len != kv_len (cuDNN's mask is not bottom-right aligned here)"
  return None


def attend_cudnn(q, k, v, *, causal=False, segment_ids=None, window=None, softcap=None,
                 sm_scale=None):
  """Attention through cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`).

  Raises:
    ValueError: naming the feature cuDNN does not support here (softcap, segment_ids,
      float32, q_len != kv_len with causal/window, head_dim > 128, non-GPU backend).
  """
  bad = _cudnn_unsupported(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                           softcap=softcap)
  if bad is not None:
    raise ValueError(f"attend: impl='cudnn' does not support {bad}; use impl='pallas' or 'xla'")
  win = normalize_window(window, causal)
  local = None
  if win is not None:
    S = k.shape[1]
    left, right = win
    local = (S if left is None else left, S if right is None else right)
    if causal:
      local = (local[0], 0)
  return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                      local_window_size=local, implementation="cudnn")


# Longest key length at which "auto" prefers our Mosaic GPU kernels over cuDNN on Hopper (H200,
# B=4, 16/4 heads, D=64/128, results/attention_mosaic_gpu.md): at S = 1k ours is 0.99-1.76x cuDNN
# forward and 1.13-1.21x forward+backward; from 4k on cuDNN is ahead by up to 8% forward / 19%
# fwd+bwd.
MOSAIC_OVER_CUDNN_MAX_KV = 2048


def auto_impl(q, k, v, *, causal=False, segment_ids=None, window=None, softcap=None) -> str:
  """Picks "xla", "pallas" or "cudnn" for this call.

  Rule (H200 measurements, results/attention.md): on GPU cuDNN wherever it supports the call,
  except on Hopper for key lengths <= MOSAIC_OVER_CUDNN_MAX_KV when our Mosaic GPU kernels
  support it (there they are faster); else the Pallas kernels (softcap, segment ids, float32,
  head_dim 256, masks with q_len != kv_len), whose default lowering is Mosaic GPU on Hopper within
  its features and Triton otherwise; on TPU the Pallas (Mosaic) kernel; on CPU the XLA reference
  (Pallas interpret mode is for tests only).
  """
  backend = jax.default_backend()
  if backend == "gpu":
    if _cudnn_unsupported(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                          softcap=softcap) is not None:
      return "pallas"
    from pallas_kernels.flash_attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
    if (k.shape[1] <= MOSAIC_OVER_CUDNN_MAX_KV and mosaic_gpu.is_hopper() and
        mosaic_gpu.unsupported(dtype=q.dtype, head_dim=q.shape[-1], softcap=softcap,
                               has_segments=segment_ids is not None) is None):
      return "pallas"
    return "cudnn"
  if backend == "tpu":
    return "pallas"
  return "xla"
