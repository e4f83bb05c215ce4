"""Tests for the Mosaic GPU (Hopper, warp-specialised) flash-attention kernels.

CPU: a few small cases in Pallas's Mosaic GPU interpreter (TMA copies, mbarriers, the producer
ring, masks and the online softmax interpreted; the matmuls there are jnp dots, see
`pallas_kernels/flash_attention/mosaic_gpu.py`). H200: the full feature matrix compiled (wgmma).
Every case draws fresh random inputs; output and dq/dk/dv are compared with the float32 dense
reference by relative error (`test_flash_attention._check`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention.dense import attention_reference
from pallas_kernels.flash_attention import flash_attention
from tests.pallas_kernels.test_flash_attention import BOUNDS, ON_GPU, _check, _relerr, _rng

HOPPER = ON_GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")

# One interpreted case (~35 s on a CI core): GQA, T > S, causal + window, fully-masked rows,
# key/query padding and a padded head_dim; the GPU runs GPU_CASES compiled.
CPU_CASES = [
    pytest.param(1, 100, 60, 4, 2, 48, dict(dtype=jnp.float16, causal=True, window=(None, 5)),
                 id="T>S-causal-window-fully-masked-rows-h48"),
]

GPU_CASES = [
    pytest.param(1, 1, 1, 2, 2, 64, dict(), id="len1"),
    pytest.param(2, 7, 7, 4, 2, 64, dict(causal=True), id="len7-gqa2-causal"),
    pytest.param(1, 129, 129, 4, 1, 64, dict(causal=True), id="len129-gqa4-causal"),
    pytest.param(1, 7, 1000, 8, 1, 128, dict(causal=True, window=40), id="decode-mqa8-window"),
    pytest.param(1, 129, 7, 3, 1, 64, dict(), id="T>S-mqa3"),
    pytest.param(2, 1000, 1000, 8, 2, 128, dict(causal=True), id="len1000-gqa4-causal"),
    pytest.param(1, 1000, 1000, 8, 8, 64, dict(window=(300, 40)), id="len1000-window-lr"),
    pytest.param(1, 333, 2048, 8, 1, 128, dict(causal=True, window=(256, None)),
                 id="chunked-prefill-mqa8"),
    pytest.param(1, 129, 100, 4, 4, 64, dict(causal=True, window=(None, 5)),
                 id="T>S-fully-masked-rows"),
    pytest.param(1, 300, 300, 16, 2, 128, dict(scale=30.0, causal=True), id="extreme-logits-gqa8"),
    pytest.param(2, 777, 777, 16, 4, 128, dict(dtype=jnp.float16), id="fp16-gqa4"),
    pytest.param(1, 513, 513, 4, 2, 256, dict(causal=True), id="h256-causal"),
    pytest.param(1, 200, 200, 4, 2, 80, dict(), id="h80-padded-head-dim"),
]


def _check_eager(B, T, S, N, K, H, *, dtype, **kw):
  """`_check` with the kernels run eagerly: under jax.jit on CPU, jax 0.10's Mosaic GPU
  interpreter hangs in the backward kernels (the forward is fine), so the vjp is not jitted."""
  rng, seed = _rng()
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, backend="mosaic_gpu", interpret=True,
                                                   **kw), q, k, v)
  got = (o,) + vjp(do)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ro, rvjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), f32(q), f32(k), f32(v))
    ref = (ro,) + rvjp(f32(do))
  floor = 1e-2 * float(np.linalg.norm(np.asarray(do, np.float64)))
  names = ("out", "dq", "dk", "dv")
  errs = {n: _relerr(g, r, floor if n != "out" else 1e-30) for n, g, r in zip(names, got, ref)}
  msg = f"seed={seed} q{q.shape} k{k.shape} {dtype.__name__} {kw}: {errs}"
  for n, g in zip(names, got):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"non-finite {n}; {msg}"
  bound_o, bound_g = BOUNDS[dtype]
  assert errs["out"] <= bound_o, msg
  for n in names[1:]:
    assert errs[n] <= bound_g, msg


@pytest.mark.parametrize("B,T,S,N,K,H,kw", CPU_CASES)
def test_mosaic_gpu_interpret_matches_reference(B, T, S, N, K, H, kw):
  if ON_GPU:
    pytest.skip("interpret-mode case (the GPU runs GPU_CASES compiled)")
  _check_eager(B, T, S, N, K, H, **kw)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90, wgmma)")
@pytest.mark.parametrize("B,T,S,N,K,H,kw", GPU_CASES)
def test_mosaic_gpu_matches_reference(B, T, S, N, K, H, kw):
  kw = dict(kw)
  kw.setdefault("dtype", jnp.bfloat16)
  _check(B, T, S, N, K, H, backend="mosaic_gpu", blocks=None, **kw)


def test_mosaic_gpu_errors_name_the_feature():
  q = jnp.zeros((1, 8, 4, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  kw = dict(backend="mosaic_gpu", interpret=True)
  with pytest.raises(ValueError, match="mosaic_gpu.*softcap"):
    flash_attention(q, kv, kv, softcap=10.0, **kw)
  with pytest.raises(ValueError, match="mosaic_gpu.*segment_ids"):
    flash_attention(q, kv, kv, segment_ids=jnp.ones((1, 8), jnp.int32), **kw)
  with pytest.raises(ValueError, match="mosaic_gpu.*float32"):
    flash_attention(q.astype(jnp.float32), kv.astype(jnp.float32), kv.astype(jnp.float32), **kw)
  with pytest.raises(ValueError, match="block_sizes"):
    from pallas_kernels.flash_attention import BlockSizes  # pylint: disable=g-import-not-at-top
    flash_attention(q, kv, kv, block_sizes=BlockSizes(), **kw)
  if not HOPPER:
    with pytest.raises(ValueError, match="Hopper"):
      flash_attention(q, kv, kv, backend="mosaic_gpu")
