"""Tests for pallas_kernels.flash_attention against effjax's float32 dense reference.

CPU: both lowerings run in Pallas interpret mode (Triton path with `interpret=True`, Mosaic TPU
path in TPU interpret mode). GPU: the same cases run compiled through Triton, plus a larger
sweep. Every test draws fresh random inputs; the seed is printed on failure.
Errors are relative: ||out - ref|| / ||ref|| for the output and each of dq, dk, dv.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention.dense import attention_reference
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
SMALL = BlockSizes(block_q=16, block_k=16, num_warps=4, num_stages=3, dq_block_q=16,
                   dq_block_k=16, dkv_block_q=16, dkv_block_k=16)
# Bounds per input dtype: (output, gradients). float32 inputs use IEEE fp32 dots in the kernel
# (no TF32), so the float32 bounds are near float32 rounding over long sums.
BOUNDS = {jnp.float32: (3e-5 if ON_GPU else 1e-5, 1e-4 if ON_GPU else 3e-5),
          jnp.bfloat16: (2e-2, 5e-2), jnp.float16: (5e-3, 1e-2)}


CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rng():
  seed = int.from_bytes(os.urandom(4), "little")
  return np.random.default_rng(seed), seed


def _segments(rng, B, L, pad_tail=True):
  """Sorted packed segment ids >= 1, with a zero (padding) tail in some rows."""
  ids = np.sort(rng.integers(1, 4, size=(B, L)), axis=1)
  if pad_tail and L > 2:
    ids[0, -rng.integers(1, max(2, L // 4)):] = 0
  return jnp.asarray(ids, jnp.int32)


def _relerr(a, b, floor=1e-30):
  """||a - b|| / max(||b||, floor)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))


def _check(B, T, S, N, K, H, *, dtype=jnp.float32, backend="triton", blocks=SMALL, scale=1.0,
           seg=None, **kw):
  rng, seed = _rng()
  shape_q, shape_k = (B, T, N, H), (B, S, K, H)
  q = jnp.asarray(rng.standard_normal(shape_q) * scale, dtype)
  k = jnp.asarray(rng.standard_normal(shape_k), dtype)
  v = jnp.asarray(rng.standard_normal(shape_k), dtype)
  do = jnp.asarray(rng.standard_normal(shape_q), dtype)
  if seg == "single":
    kw["segment_ids"] = _segments(rng, B, T)
  elif seg == "pair":
    kw["segment_ids"] = (_segments(rng, B, T), _segments(rng, B, S, pad_tail=False))

  def fwd_bwd(fn, *args):
    o, vjp = jax.vjp(fn, *args)
    return (o,) + vjp(do.astype(o.dtype))

  kernel = jax.jit(lambda q, k, v: fwd_bwd(
      lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks, backend=backend,
                                      interpret=INTERPRET, **kw), q, k, v))
  # Interpret mode compiles large CPU programs; XLA's backend optimisations only cost time here.
  kernel = kernel.lower(q, k, v).compile(compiler_options=CPU_FAST_COMPILE if INTERPRET else None)
  with jax.default_matmul_precision("highest"):
    f32 = lambda x: x.astype(jnp.float32)
    ref = jax.jit(lambda q, k, v: fwd_bwd(
        lambda q, k, v: attention_reference(q, k, v, **kw), f32(q), f32(k), f32(v)))(q, k, v)
  got = kernel(q, k, v)
  names = ("out", "dq", "dk", "dv")
  # Where an exact gradient vanishes (e.g. dq, dk with a single visible key) the error is taken
  # relative to 1% of ||dO|| instead of the (zero) reference norm.
  floor = 1e-2 * float(np.linalg.norm(np.asarray(do, np.float64)))
  errs = {n: _relerr(g, r, floor if n != "out" else 1e-30) for n, g, r in zip(names, got, ref)}
  bound_o, bound_g = BOUNDS[dtype]
  msg = f"seed={seed} shapes q{shape_q} k{shape_k} {dtype.__name__} {backend} {kw}: {errs}"
  for n, g in zip(names, got):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"non-finite {n}; {msg}"
  assert errs["out"] <= bound_o, msg
  for n in names[1:]:
    assert errs[n] <= bound_g, msg
  return got, ref


# (B, T, S, N, K, H, kwargs): each case mixes several features to keep interpret mode fast.
TRITON_CASES = [
    pytest.param(1, 1, 1, 2, 2, 64, dict(), id="len1-mha"),
    pytest.param(2, 7, 7, 4, 2, 64, dict(causal=True), id="len7-gqa2-causal"),
    pytest.param(1, 129, 129, 4, 1, 64, dict(causal=True, softcap=5.0), id="len129-gqa4-causal-softcap"),
    pytest.param(1, 7, 129, 8, 1, 64, dict(causal=True, window=40), id="decode-gqa8-causal-window"),
    pytest.param(1, 129, 7, 3, 1, 64, dict(seg="pair"), id="T>S-mqa3-segpair"),
    pytest.param(2, 129, 129, 2, 1, 128, dict(seg="single", causal=True), id="h128-seg-causal"),
    pytest.param(1, 300, 300, 2, 2, 64, dict(window=(33, 17)), id="len300-window-lr"),
    pytest.param(1, 129, 100, 4, 4, 64, dict(causal=True, window=(None, 5)), id="T>S-causal-fully-masked-rows"),
    pytest.param(1, 65, 65, 4, 2, 64, dict(scale=100.0, causal=True), id="extreme-logits"),
    pytest.param(1, 100, 131, 4, 1, 64, dict(dtype=jnp.bfloat16, causal=True, window=(50, None)), id="bf16"),
    pytest.param(1, 77, 77, 2, 1, 64, dict(dtype=jnp.float16, sm_scale=0.3, softcap=20.0), id="fp16"),
    pytest.param(1, 129, 100, 4, 1, 64,
                 dict(blocks=SMALL.replace(dkv_transposed=True), causal=True, seg="pair",
                      softcap=5.0), id="transposed-dkv-causal-seg-softcap"),
    pytest.param(1, 50, 50, 4, 2, 64, dict(blocks=SMALL.replace(dkv_transposed=True)),
                 id="transposed-dkv-unmasked"),
    # Atomic dQ (dK/dV kernel accumulates dQ with atomic_add): dkv_block_q=32/64 gives 2/4 query
    # heads per tile, so the head-chunk loop and the (t, g)-row reshape of the dQ tile are hit.
    pytest.param(1, 129, 129, 4, 1, 64,
                 dict(blocks=SMALL.replace(dq_atomic=True, dkv_block_q=32), causal=True,
                      softcap=5.0), id="atomic-dq-gqa4-causal-softcap"),
    pytest.param(1, 100, 131, 4, 2, 64,
                 dict(blocks=SMALL.replace(dq_atomic=True, dkv_transposed=True, dkv_block_q=32),
                      seg="pair", window=(20, 9)), id="atomic-dq-transposed-seg-window"),
    pytest.param(1, 7, 129, 8, 1, 64,
                 dict(blocks=SMALL.replace(dq_atomic=True, dkv_block_q=64), causal=True,
                      window=40), id="atomic-dq-decode-mqa8-window"),
    pytest.param(1, 50, 30, 4, 4, 64,
                 dict(blocks=SMALL.replace(dq_atomic=True), causal=True, window=(None, 5)),
                 id="atomic-dq-T>S-fully-masked-rows"),
    pytest.param(1, 77, 77, 4, 2, 64,
                 dict(blocks=SMALL.replace(dq_atomic=True, dkv_block_q=32),
                      dtype=jnp.bfloat16, seg="single", causal=True), id="atomic-dq-bf16-seg"),
    # FMA-folded softmax exponent (only in tiles without a mask: S multiple of the tile, or the
    # interior of a causal band), alone and with the atomic-dQ / transposed backward; the non-ftz
    # exp2 (ftz_exp2=False; the default is ex2.approx.ftz).
    pytest.param(1, 64, 96, 4, 2, 64, dict(blocks=SMALL.replace(fma_softmax=True, ftz_exp2=False)),
                 id="fma-no-ftz-unmasked-gqa2"),
    pytest.param(1, 100, 131, 4, 1, 64,
                 dict(blocks=SMALL.replace(fma_softmax=True, dq_atomic=True, dkv_block_q=32),
                      causal=True, window=(50, None)), id="fma-atomic-causal-window-pad"),
    pytest.param(1, 80, 80, 2, 1, 128,
                 dict(blocks=SMALL.replace(fma_softmax=True, dq_atomic=True, dkv_transposed=True),
                      scale=100.0), id="fma-atomic-transposed-extreme-logits"),
]


@pytest.mark.parametrize("B,T,S,N,K,H,kw", TRITON_CASES)
def test_triton_matches_reference(B, T, S, N, K, H, kw):
  _check(B, T, S, N, K, H, backend="triton", **kw)


TPU_CASES = [
    pytest.param(1, 20, 36, 4, 2, 64, dict(causal=True, window=9), id="tpu-gqa2-causal-window"),
    pytest.param(2, 24, 24, 3, 1, 64, dict(seg="single", softcap=4.0), id="tpu-mqa-seg-softcap"),
    pytest.param(1, 40, 17, 8, 1, 128, dict(causal=True), id="tpu-gqa8-T>S-h128"),
]
TPU_BLOCKS = BlockSizes(block_q=8, block_k=8, dq_block_q=8, dq_block_k=8, dkv_block_q=8,
                        dkv_block_k=8)


@pytest.mark.parametrize("B,T,S,N,K,H,kw", TPU_CASES)
def test_mosaic_tpu_interpret_matches_reference(B, T, S, N, K, H, kw):
  if ON_GPU:
    pytest.skip("TPU interpret mode is a CPU test")
  _check(B, T, S, N, K, H, backend="mosaic_tpu", blocks=TPU_BLOCKS, **kw)


def test_fully_masked_rows_are_zero():
  """Segment id 0 rows and causal rows before the first key return exact zeros, no NaN."""
  got, _ = _check(1, 40, 24, 2, 1, 64, causal=True, seg="pair")
  out = np.asarray(got[0])
  assert np.all(out[:, :16] == 0.0)  # t + S - T < 0: no key is visible


def test_reference_module_agrees_with_effjax_dense():
  rng, seed = _rng()
  q = jnp.asarray(rng.standard_normal((2, 9, 4, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 13, 2, 16)), jnp.float32)
  kw = dict(causal=True, window=(4, None), softcap=3.0,
            segment_ids=(_segments(rng, 2, 9), _segments(rng, 2, 13, pad_tail=False)))
  with jax.default_matmul_precision("highest"):
    err = _relerr(flash_attention_reference(q, k, k, **kw), attention_reference(q, k, k, **kw))
  assert err < 1e-6, f"seed={seed}: {err}"


def test_bad_arguments_raise():
  q = jnp.zeros((1, 8, 4, 16))
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    flash_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)), interpret=True)
  with pytest.raises(ValueError, match="backend"):
    flash_attention(q, q, q, backend="cuda", interpret=True)
  with pytest.raises(ValueError, match="window"):
    flash_attention(q, q, q, window=(-1, 2), interpret=True)
  with pytest.raises(ValueError, match="dq_atomic"):
    flash_attention(q, q, q, backend="mosaic_tpu", interpret=True,
                    block_sizes=BlockSizes(dq_atomic=True))


GPU_SWEEP = [
    pytest.param(2, 1000, 1000, 8, 2, 128, dict(causal=True), id="gpu-1000-causal-gqa4"),
    pytest.param(1, 1000, 1000, 8, 8, 64, dict(seg="single"), id="gpu-1000-seg"),
    pytest.param(1, 333, 2048, 8, 1, 128, dict(causal=True, window=(256, None)), id="gpu-chunked-prefill"),
    pytest.param(1, 1000, 1000, 4, 1, 256, dict(causal=True), id="gpu-h256"),
    pytest.param(2, 1000, 1000, 16, 4, 128, dict(dtype=jnp.float16, softcap=30.0), id="gpu-fp16-softcap"),
    pytest.param(1, 1000, 1000, 4, 1, 256, dict(dtype=jnp.float32, causal=True), id="gpu-h256-f32"),
    pytest.param(1, 333, 2048, 8, 1, 128, dict(dtype=jnp.float32, causal=True, window=(256, None)),
                 id="gpu-chunked-prefill-f32"),
]


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("B,T,S,N,K,H,kw", GPU_SWEEP)
def test_gpu_sweep_default_blocks(B, T, S, N, K, H, kw):
  kw = dict(kw)
  kw.setdefault("dtype", jnp.bfloat16)
  _check(B, T, S, N, K, H, backend="triton", blocks=None, **kw)


GPU_ATOMIC = [
    pytest.param(2, 1000, 1000, 8, 2, 128, dict(causal=True), id="gpu-atomic-1000-causal-gqa4"),
    pytest.param(1, 1000, 1000, 8, 8, 64, dict(seg="single", window=(300, 40)),
                 id="gpu-atomic-1000-seg-window"),
    pytest.param(2, 777, 777, 16, 4, 128, dict(dtype=jnp.float16, softcap=30.0, transposed=True),
                 id="gpu-atomic-fp16-softcap-transposed"),
    pytest.param(1, 333, 2048, 8, 1, 128, dict(dtype=jnp.float32, causal=True, window=(256, None)),
                 id="gpu-atomic-chunked-prefill-f32"),
]


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("B,T,S,N,K,H,kw", GPU_ATOMIC)
def test_gpu_atomic_dq_tuned_blocks(B, T, S, N, K, H, kw):
  """The atomic-dQ backward compiled for the GPU with the tuned tiles of that shape."""
  from pallas_kernels.flash_attention import lookup_block_sizes  # pylint: disable=g-import-not-at-top
  kw = dict(kw)
  kw.setdefault("dtype", jnp.bfloat16)
  blocks = lookup_block_sizes("triton", H, kw["dtype"], max(T, S), bool(kw.get("causal")))
  blocks = blocks.replace(dq_atomic=True, dkv_transposed=kw.pop("transposed", False))
  _check(B, T, S, N, K, H, backend="triton", blocks=blocks, **kw)


# ------------------------------------------------------------ effjax.attention.flash dispatch

def test_dispatch_errors_name_feature_and_impl():
  from effjax.attention import flash  # pylint: disable=g-import-not-at-top
  q = jnp.zeros((1, 8, 4, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="impl='cudnn'.*softcap" if ON_GPU else "impl='cudnn'"):
    flash.attend_cudnn(q, kv, kv, softcap=10.0)
  if ON_GPU:
    with pytest.raises(ValueError, match="impl='cudnn'.*segment_ids"):
      flash.attend_cudnn(q, kv, kv, segment_ids=jnp.ones((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="impl='cudnn'.*float32"):
      flash.attend_cudnn(q.astype(jnp.float32), kv.astype(jnp.float32), kv.astype(jnp.float32))
    from pallas_kernels.flash_attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
    # Hopper: our Mosaic GPU kernels up to MOSAIC_OVER_CUDNN_MAX_KV keys, cuDNN beyond.
    L = flash.MOSAIC_OVER_CUDNN_MAX_KV + 1
    q_long = jnp.zeros((1, L, 4, 64), jnp.bfloat16)
    kv_long = jnp.zeros((1, L, 2, 64), jnp.bfloat16)
    short = "pallas" if mosaic_gpu.is_hopper() else "cudnn"
    assert flash.auto_impl(q, kv, kv, causal=True) == short
    assert flash.auto_impl(q_long, kv_long, kv_long, causal=True) == "cudnn"
    assert flash.auto_impl(q, kv, kv, softcap=5.0) == "pallas"
  else:
    with pytest.raises(ValueError, match="impl='pallas'"):
      flash.attend_pallas(q, kv, kv)
    assert flash.auto_impl(q, kv, kv, causal=True) == "xla"


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("impl", ["pallas", "cudnn", "auto"])
def test_attend_impls_match_reference_on_gpu(impl):
  from effjax.attention import attend  # pylint: disable=g-import-not-at-top
  rng, seed = _rng()
  q = jnp.asarray(rng.standard_normal((2, 513, 8, 128)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((2, 513, 2, 128)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((2, 513, 2, 128)), jnp.bfloat16)
  kw = dict(causal=True, window=100)
  got = attend(q, k, v, impl=impl, **kw)
  with jax.default_matmul_precision("highest"):
    ref = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                              **kw)
  err = _relerr(got, ref)
  assert err < BOUNDS[jnp.bfloat16][0], f"seed={seed} {impl}: {err}"
