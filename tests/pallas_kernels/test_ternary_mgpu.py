"""The Mosaic GPU ternary GEMV (pallas_kernels/ternary_mgpu.py) vs a float64 reference.

On CPU the kernel runs in the Mosaic GPU interpreter with its per-thread PTX (PRMT, DP4A) emulated
in jnp; on an H200 the compiled kernel runs the PTX. Integer accumulation is exact, so only the
final float32 scale (and the output cast) round.
"""

import jax
import jax.numpy as jnp
import pytest

from effjax.quant import ternary
from pallas_kernels import ternary_matmul as tm
from pallas_kernels import ternary_mgpu as tmg
from tests.pallas_kernels.test_ternary_matmul import _check, _rng
from tests.pallas_kernels.test_ternary_matmul import _case as _case_m

ON_HOPPER = tmg.is_hopper()


def _case(rng, k, n, extreme=False):
  """(x [1, K] int8, scale [1], int32-word PackedTernary, float64 reference [1, N]); extreme:
  every weight +1 (code 2: the masked byte 2 * 4^3 = 128) and every x = -128."""
  x, s, p, ref = _case_m(rng, 1, k, n, extreme=extreme)
  return x, s, ternary.as_words(p), ref


def test_interpret_odd_sizes_and_extremes():
  """Random odd K, N (padded by the export) and a random tiling, then the extreme case, in the
  interpreter: the tiling, the pipeline, the spare row threads (RT > groups per tile) and the
  emulated masked-DP4A arithmetic against the reference."""
  rng, seed = _rng()
  k, n = int(rng.integers(65, 700)), int(rng.integers(17, 300))
  bw = int(rng.choice([8, 16, 32]))
  x, s, p, ref = _case(rng, k, n)
  y = tm.ternary_matmul(x, s, p, impl="mgpu", block_w=bw, interpret=True)
  _check(y, ref, seed, 1e-6)
  x, s, p, ref = _case(rng, 256, 64, extreme=True)  # K/16 = 16 < RT: half the row threads idle
  y = tm.ternary_matmul(x, s, p, impl="mgpu", block_k=8, num_stages=1, interpret=True)
  _check(y, ref, seed, 1e-6)


def test_config_and_errors():
  assert tmg.mgpu_config(2048, 2048) == dict(block_w=16, block_g=64, stages=4)
  assert tmg.mgpu_config(24, 64) == dict(block_w=16, block_g=2, stages=3)  # K4/4 = 6 groups
  with pytest.raises(ValueError, match="block_w=64"):
    tmg.mgpu_config(2048, 2048, block_w=64)
  with pytest.raises(ValueError, match="block_g=16"):
    tmg.mgpu_config(24, 64, block_g=16)
  with pytest.raises(ValueError, match="K4=30"):
    tmg.mgpu_config(30, 64)
  with pytest.raises(ValueError, match="N4=12"):
    tmg.mgpu_config(32, 12)
  p = ternary.as_words(ternary.export_ternary(jnp.ones((64, 64))))
  with pytest.raises(ValueError, match="M=2"):
    tm.ternary_matmul(jnp.ones((2, 64), jnp.int8), jnp.ones((2,)), p, impl="mgpu")
  with pytest.raises(ValueError, match="split_k"):
    tm.ternary_matmul(jnp.ones((1, 64), jnp.int8), jnp.ones((1,)), p, impl="mgpu", split_k=2)
  with pytest.raises(ValueError, match="int8"):
    tmg.ternary_gemv_mgpu(jnp.ones((128,), jnp.int32), 1.0, 1.0, p.packed)
  assert tm.auto_impl(1, 64, mgpu=True) == "mgpu"
  assert tm.auto_impl(2, 64, mgpu=True) == "dp4a"


@pytest.mark.skipif(not ON_HOPPER, reason="needs an NVIDIA Hopper GPU (Mosaic GPU, TMA)")
@pytest.mark.parametrize("kn,kw", [
    ((8192, 8192), {}), ((4096, 14336), dict(block_w=32, block_k=32)),
    ((4096 + 128 * 3, 3000), dict(block_w=8)),             # odd N, K/16 = 280 -> 8-group tiles
    ((700, 1001), {}), ((2048, 512), dict(block_w=32, block_k=16, num_stages=2)),
    ((129, 77), dict(num_stages=1)),
])
def test_gpu_matches_reference(kn, kw):
  rng, seed = _rng()
  k, n = kn
  x, s, p, ref = _case(rng, k, n)
  y = jax.jit(lambda x, s, p: tm.ternary_matmul(x, s, p, impl="mgpu", **kw))(x, s, p)
  _check(y, ref, seed, 1e-6)
  y16 = jax.jit(lambda x, s, p: tm.ternary_matmul(x, s, p, impl="mgpu", out_dtype=jnp.bfloat16,
                                                  **kw))(x, s, p)
  assert y16.dtype == jnp.bfloat16
  _check(y16, ref, seed, 1e-2)


@pytest.mark.skipif(not ON_HOPPER, reason="needs an NVIDIA Hopper GPU (Mosaic GPU, TMA)")
def test_gpu_extreme_values_and_auto():
  """The largest partial sums (all codes 2, x = -128) over a long K; "auto" at M = 1 takes the
  Mosaic kernel on Hopper and gives the same values."""
  rng, seed = _rng()
  x, s, p, ref = _case(rng, 16384, 256, extreme=True)
  y = jax.jit(lambda x, s, p: tm.ternary_matmul(x, s, p, impl="mgpu"))(x, s, p)
  _check(y, ref, seed, 1e-6)
  x, s, p, ref = _case(rng, 4096, 4096)
  f = jax.jit(lambda x, s, p: tm.ternary_matmul(x, s, p))
  assert "mosaic" in f.lower(x, s, p).as_text().lower()
  _check(f(x, s, p), ref, seed, 1e-6)
