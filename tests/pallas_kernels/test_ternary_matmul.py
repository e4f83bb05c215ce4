"""Packed ternary matmul kernels vs a float64 reference (interpret mode on CPU, compiled on GPU)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.quant import ternary
from pallas_kernels import ternary_matmul as tm

ON_GPU = jax.default_backend() == "gpu"


def _rng():
  seed = int.from_bytes(os.urandom(4), "little")
  print(f"seed={seed}")
  return np.random.default_rng(seed), seed


def _case(rng, m, k, n, extreme=False):
  w = rng.standard_normal((k, n)).astype(np.float32)
  if extreme:  # every weight +1 and every activation -128: the largest partial sums
    w = np.abs(w) + 1.0
  p = ternary.export_ternary(jnp.asarray(w))
  if extreme:
    x = np.full((m, k), -128, np.int8)
  else:
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
  s = (rng.random(m) + 0.5).astype(np.float32)
  codes = np.asarray(ternary.unpack_2bit(p.packed, p.shape)).astype(np.float64)
  ref = (x.astype(np.float64) @ codes) * float(p.scale) * s.astype(np.float64)[:, None]
  return jnp.asarray(x), jnp.asarray(s), p, ref


def _check(y, ref, seed, tol):
  y = np.asarray(y, np.float64)
  assert y.shape == ref.shape, (y.shape, ref.shape)
  err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
  assert err < tol, f"relative error {err} (seed {seed})"


@pytest.mark.parametrize("impl,kw,words", [
    ("dp4a", {}, True),                                                   # automatic tiling
    ("dp4a", {"split_k": 2, "block_k": 2, "block_w": 8, "block_t": 2, "prefetch": False}, False),
    ("dp4a", {"reduce": "fused", "split_k": 2, "block_k": 4, "block_w": 16}, True),
    ("dp4a", {"reduce": "fused", "split_k": 1, "block_k": 2, "block_w": 8, "block_t": 4}, False),
    ("gemv", {}, True),                                                   # automatic tiling
    ("gemv", {"split_k": 2, "block_k": 8, "block_w": 8, "block_t": 2}, False),  # uint8 input
    ("dot", {}, True),
    ("dot", {"split_k": 2, "block_k": 32, "block_m": 16}, True),
    ("xla_int8", {}, False),
    # fused epilogue: scale in-kernel, float32 atomic adds over K splits / direct store
    ("gemv", {"reduce": "fused", "split_k": 2, "block_k": 8, "block_w": 8, "block_t": 2}, True),
    ("gemv", {"reduce": "fused", "split_k": 1, "block_k": 16, "block_w": 16}, False),
    ("dot", {"reduce": "fused", "split_k": 2, "block_k": 32}, True),
    ("xla_int8", {"xla_layout": "nk_direct"}, True),
    ("xla_int8", {"xla_layout": "kn", "xla_barrier": False}, True),
])
def test_kernel_matches_reference_odd_sizes(impl, kw, words):
  rng, seed = _rng()
  m = int(rng.integers(1, 6)) if impl in ("gemv", "dp4a") else int(rng.integers(5, 21))
  if impl in ("gemv", "dp4a") and kw.get("block_t", 1) > 1:
    m = int(rng.integers(3, 8))  # several token blocks, the last one padded
  # with split_k = 2: K/4 = 128 padded rows, 64 per split
  k = int(rng.integers(65, 300)) if kw.get("split_k", 1) == 1 else int(rng.integers(385, 513))
  n = int(rng.integers(17, 200))
  x, s, p, ref = _case(rng, m, k, n)
  if words:
    p = ternary.as_words(p)
  y = tm.ternary_matmul(x, s, p, impl=impl, **kw)
  # integer accumulation is exact; only the f32 scale multiply (and, fused, f32 adds) round
  _check(y, ref, seed, 1e-6)


def test_auto_impl_by_m():
  """"auto" takes the paths the H200 sweep measured fastest (results/ternary.md)."""
  assert [tm.auto_impl(m, 64) for m in (1, tm.DP4A_MAX_M, tm.DP4A_MAX_M + 1, tm.DOT_MAX_M,
                                        tm.DOT_MAX_M + 1, 4096)] == [
      "dp4a", "dp4a", "dot", "dot", "xla_int8", "xla_int8"]
  # K4 not a multiple of 4 (export with align < 4): the SWAR gemv for few rows
  assert [tm.auto_impl(m, 66) for m in (1, tm.GEMV_MAX_M, tm.GEMV_MAX_M + 1)] == [
      "gemv", "gemv", "dot"]


def test_auto_configs_fill_the_gpu():
  """Automatic split-K gives >= TARGET_PROGRAMS programs on the benchmark shapes at M = 1, 8."""
  for k, n in ((8192, 8192), (4096, 14336)):
    k4, n4 = k // 4, n // 4
    for m in (1, 8):
      g = tm.gemv_config(m, k4, n4)
      assert k4 % g["split_k"] == 0 and (k4 // g["split_k"]) % g["block_k"] == 0
      assert (n4 // g["block_w"]) * g["split_k"] * (-(-m // g["block_t"])) >= tm.TARGET_PROGRAMS
      g = tm.dp4a_config(m, k4, n4)
      k16 = k4 // 4
      assert k16 % g["split_k"] == 0 and (k16 // g["split_k"]) % g["block_k"] == 0
      assert (n4 // g["block_w"]) * g["split_k"] * (-(-m // g["block_t"])) >= tm.TARGET_PROGRAMS
      d = tm.dot_config(m, k4, n4)
      assert (n4 // d["block_w"]) * d["split_k"] >= tm.TARGET_PROGRAMS
  with pytest.raises(ValueError, match="split_k"):
    tm.gemv_config(1, 96, 64, split_k=5)


def test_gemv_lane_flush_worst_case():
  """K long enough for several 16-bit-lane flushes, with the largest |code * x| everywhere."""
  rng, seed = _rng()
  k = 2560 - int(rng.integers(0, 120))  # K4 = 640 -> 40 steps of 16 rows -> 2 flushes of 20
  x, s, p, ref = _case(rng, 1, k, 64, extreme=True)
  y = tm.ternary_matmul(x, s, p, impl="gemv", block_k=16, block_w=16)
  _check(y, ref, seed, 1e-6)


def test_dp4a_extreme_values():
  """Every weight +1 and every activation -128 (sign extension of both DP4A operands), and a
  K long enough for several K steps per split."""
  rng, seed = _rng()
  k = 2048 - int(rng.integers(0, 120))
  for extreme in (True, False):
    x, s, p, ref = _case(rng, int(rng.integers(1, 4)), k, 72, extreme=extreme)
    y = tm.ternary_matmul(x, s, ternary.as_words(p), impl="dp4a", block_k=2, block_w=16)
    _check(y, ref, seed, 1e-6)


def test_dp4a_emulation_matches_numpy():
  """The interpret-mode stand-ins for PRMT (byte transpose) and DP4A, on random words."""
  rng, _ = _rng()
  w = rng.integers(-2**31, 2**31, (4, 37), dtype=np.int64).astype(np.int32)
  t = np.stack([np.asarray(v) for v in tm._transpose4(*map(jnp.asarray, w), True)])
  b = w.view(np.uint8).reshape(4, 37, 4)               # [input r, elem, byte i] (little endian)
  assert np.array_equal(t.view(np.uint8).reshape(4, 37, 4), b.transpose(2, 1, 0))
  a, x, c = (rng.integers(-2**31, 2**31, 53, dtype=np.int64).astype(np.int32) for _ in range(3))
  want = c.astype(np.int64) + np.sum(a.view(np.int8).reshape(53, 4).astype(np.int64)
                                     * x.view(np.int8).reshape(53, 4), axis=1)
  got = np.asarray(tm._dp4a(jnp.asarray(a), jnp.asarray(x), jnp.asarray(c), True))
  assert np.array_equal(got.astype(np.int64), want)


def test_ternary_linear_bf16_and_auto():
  rng, seed = _rng()
  k, n = int(rng.integers(64, 160)), int(rng.integers(16, 80))
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
  p = ternary.export_ternary(w)
  y = tm.ternary_linear(x, p)
  from effjax.layers.bitlinear import int8_act_quant
  ref = np.asarray(int8_act_quant(x), np.float64) @ np.asarray(ternary.dequantize(p), np.float64)
  _check(y, ref, seed, 1e-5)
  assert y.shape == (2, 3, n) and y.dtype == x.dtype


def test_rejects_bad_inputs():
  p = ternary.export_ternary(jnp.ones((64, 64)))
  with pytest.raises(ValueError, match="int8"):
    tm.ternary_matmul(jnp.ones((1, 64), jnp.float32), jnp.ones((1,)), p)
  with pytest.raises(ValueError, match="K=32"):
    tm.ternary_matmul(jnp.ones((1, 32), jnp.int8), jnp.ones((1,)), p)
  with pytest.raises(ValueError, match="impl"):
    tm.ternary_matmul(jnp.ones((1, 64), jnp.int8), jnp.ones((1,)), p, impl="cuda")
  with pytest.raises(ValueError, match="reduce"):
    tm.ternary_matmul(jnp.ones((1, 64), jnp.int8), jnp.ones((1,)), p, reduce="atomic")
  with pytest.raises(ValueError, match="xla_layout"):
    tm.ternary_matmul(jnp.ones((1, 64), jnp.int8), jnp.ones((1,)), p, xla_layout="mk")


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("m", [1, 3, 8, 13, 64, 300])
def test_gpu_large_shapes_auto(m):
  rng, seed = _rng()
  k, n = 4096, 4096 + 64 * int(rng.integers(0, 3))
  x, s, p, ref = _case(rng, m, k, n)
  p = ternary.as_words(p) if rng.integers(0, 2) else p
  y = jax.jit(lambda x, s, p: tm.ternary_matmul(x, s, p))(x, s, p)
  _check(y, ref, seed, 1e-6)


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("impl,m,kw", [
    ("dp4a", 1, {}), ("dp4a", 1, dict(block_w=128, block_k=4)), ("dp4a", 8, {}),
    ("dp4a", 1, dict(prefetch=False)), ("dp4a", 3, dict(prefetch=False, block_t=4, block_k=2)),
    ("dp4a", 3, dict(block_t=4, block_w=32, block_k=2, num_warps=8)),
    ("dp4a", 1, dict(reduce="fused")), ("dp4a", 1, dict(reduce="fused", split_k=1, block_k=16,
                                                        num_stages=3)),
    ("dp4a", 13, dict(reduce="fused", split_k=2, block_k=8, num_stages=2)),
    ("gemv", 1, dict(block_w=128, block_k=32)), ("gemv", 1, dict(block_w=256, block_k=16,
                                                                 num_warps=8)),
    ("gemv", 1, dict(block_w=32, block_k=128, num_stages=2)), ("gemv", 8, dict(block_t=4)),
    ("dot", 8, dict(block_w=64, block_k=128, num_warps=8)),
    ("dot", 200, dict(block_m=128, block_w=32, block_k=32, split_k=1, num_warps=8)),
    ("gemv", 1, dict(reduce="fused")), ("gemv", 1, dict(reduce="fused", split_k=1, block_w=16,
                                                        block_k=128, num_stages=3)),
    ("gemv", 3, dict(reduce="fused", split_k=2, block_w=32, block_k=64, num_stages=2)),
    ("dot", 8, dict(reduce="fused")), ("xla_int8", 300, dict(xla_layout="nk_direct")),
    ("xla_int8", 300, dict(xla_layout="kn", xla_barrier=False)),
])
def test_gpu_sweep_configs(impl, m, kw):
  """A sample of the benchmark sweep's configs, on a shape with odd N, against the reference."""
  rng, seed = _rng()
  k, n = 2048 + 128 * int(rng.integers(0, 4)), 3000 + int(rng.integers(0, 100))
  x, s, p, ref = _case(rng, m, k, n)
  y = jax.jit(lambda x, s, p: tm.ternary_matmul(x, s, p, impl=impl, **kw))(
      x, s, ternary.as_words(p))
  _check(y, ref, seed, 1e-6)
