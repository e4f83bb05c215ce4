"""Tests for effjax.quant.turboquant (TurboQuant_mse / TurboQuant_prod, arXiv 2504.19874)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.quant import TurboQuant, lloyd_max_codebook, validate
from tests.conftest import rel_err

pytestmark = pytest.mark.usefixtures("float32_matmuls")  # float32 bounds: no TF32 on GPU


def _sphere(rng, n, d, scale=True):
  x = rng.standard_normal((n, d))
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  if scale:  # any norm: the relative error must not depend on it
    x *= np.exp(rng.uniform(-3, 3, size=(n, 1)))
  return x.astype(np.float32)


_roundtrip = jax.jit(lambda q, x: q.decode(q.encode(x)))


def _stack(qs):
  return jax.tree.map(lambda *leaves: np.stack(leaves), *qs)  # np: much faster than jnp here


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_mse_reconstruction_matches_lloyd_max(rng, bits, rotation):
  """E||x - x_hat||^2 / ||x||^2 = d * C(f_d, b) for uniform directions (any fixed orthogonal Pi)."""
  dim = int(2 ** rng.integers(5, 8)) if rotation == "hadamard" else int(rng.integers(20, 90))
  q = TurboQuant(dim, bits, "mse", seed=int(rng.integers(2**31)), rotation=rotation)
  x = _sphere(rng, 2000, dim)
  x_hat = np.asarray(_roundtrip(q, x), np.float64)
  e = np.sum((x_hat - x) ** 2, -1) / np.sum(np.float64(x) ** 2, -1)
  want = lloyd_max_codebook(dim, bits).mse_times_dim
  se = e.std() / math.sqrt(e.size)
  assert abs(e.mean() - want) < 5 * se + 1e-4 * want, (e.mean(), want, se)


def test_prod_reconstruction_and_unbiased_inner_products(rng):
  """prod: E_S <y, x_hat> = <y, x> (Theorem 2), tested over many independent quantizers.

  Also E||x - x_hat||^2 = d C(f_d, b-1) (pi/2 - 1/d) ||x||^2 (QJL adds (pi/2 - 1/d) ||r||^2).
  """
  dim, bits, n_q = int(rng.integers(17, 40)), int(rng.integers(1, 5)), 500
  base = int(rng.integers(2**30))
  qs = _stack([TurboQuant(dim, bits, "prod", seed=base + i) for i in range(n_q)])
  x = _sphere(rng, 1, dim)[0]
  y = (0.8 * x / np.linalg.norm(x) + 0.6 * _sphere(rng, 1, dim, scale=False)[0]).astype(np.float32)
  y *= np.float32(np.exp(rng.uniform(-2, 2)))

  def one(q):
    codes = q.encode(x)
    return q.inner_product(y, codes), q.decode(codes)

  est, x_hat = jax.vmap(one)(qs)
  err = np.asarray(est, np.float64) - float(np.dot(np.float64(x), np.float64(y)))
  se = err.std() / math.sqrt(n_q)
  assert abs(err.mean()) < 5 * se, (err.mean(), se)
  assert se < 0.2 * abs(np.dot(x, y))  # the test has power: the bias control below is detectable
  e = np.sum((np.asarray(x_hat, np.float64) - x) ** 2, -1) / np.sum(np.float64(x) ** 2)
  want = (lloyd_max_codebook(dim, bits - 1).mse_times_dim if bits > 1 else 1.0) * (
      math.pi / 2 - 1 / dim)
  assert abs(e.mean() - want) < 5 * e.std() / math.sqrt(n_q) + 1e-4, (e.mean(), want)


def test_mse_inner_products_are_biased_negative_control(rng):
  """mse at b=1,2: E<y, x_hat> = (1 - d C(f_d, b)) <y, x> != <y, x>; the same test must fail."""
  dim, bits, n_q = int(rng.integers(17, 40)), int(rng.integers(1, 3)), 500
  base = int(rng.integers(2**30))
  qs = _stack([TurboQuant(dim, bits, "mse", seed=base + i) for i in range(n_q)])
  x = _sphere(rng, 1, dim)[0]
  y = (0.8 * x / np.linalg.norm(x) + 0.6 * _sphere(rng, 1, dim, scale=False)[0]).astype(np.float32)
  est = np.asarray(jax.vmap(lambda q: q.inner_product(y, q.encode(x)))(qs), np.float64)
  true = float(np.dot(np.float64(x), np.float64(y)))
  se = est.std() / math.sqrt(n_q)
  assert abs(est.mean() - true) > 5 * se, "the unbiasedness test above could not detect this bias"
  shrink = 1 - lloyd_max_codebook(dim, bits).mse_times_dim
  assert abs(est.mean() - shrink * true) < 5 * se + 1e-6, (est.mean(), shrink * true, se)


@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_inner_product_equals_decode_and_broadcasts(rng, kind):
  dim = int(rng.integers(8, 70))
  bits = int(rng.integers(1, 5))
  q = TurboQuant(dim, bits, kind, seed=int(rng.integers(2**31)))
  k = rng.standard_normal((2, 5, 3, dim)).astype(np.float32)  # [B, S, K, H]
  qry = rng.standard_normal((2, 1, 3, dim)).astype(np.float32)  # [B, 1, K, H]
  codes = q.encode(k)
  assert codes.norm.shape == (2, 5, 3) and codes.idx is not None or bits == 1
  got = q.inner_product(qry, codes)
  assert got.shape == (2, 5, 3)
  ref = np.einsum("bskh,bskh->bsk", np.broadcast_to(qry, k.shape), np.asarray(q.decode(codes)))
  assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_jit_matches_eager_and_leading_dims(rng, kind):
  dim = 32
  q = TurboQuant(dim, int(rng.integers(2, 5)), kind, seed=1, rotation="hadamard")
  x = rng.standard_normal((2, 3, 4, dim)).astype(np.float32)  # [B, T, K, H]
  eager = q.encode(x)
  jitted = jax.jit(lambda qq, v: qq.encode(v))(q, x)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    assert a.shape[:3] == (2, 3, 4)
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert rel_err(jax.jit(lambda qq, c: qq.decode(c))(q, jitted), q.decode(eager)) < 1e-6


def test_zero_vector_and_scale_equivariance(rng):
  dim = int(rng.integers(5, 50))
  q = TurboQuant(dim, 3, "prod", seed=int(rng.integers(2**31)))
  x = rng.standard_normal((4, dim)).astype(np.float32)
  x[1] = 0
  x_hat = np.asarray(q.decode(q.encode(x)))
  np.testing.assert_array_equal(x_hat[1], 0)
  big = np.asarray(q.decode(q.encode(x * 1000.0)))
  assert rel_err(big, 1000.0 * x_hat) < 1e-5


def test_half_rate_split(rng):
  """2.5 bits: outlier channels (caller-given) at 3 bits, the rest at 2, each its own quantizer."""
  dim = 128
  out = tuple(int(c) for c in rng.choice(dim, size=32, replace=False))
  q = TurboQuant(dim, 2.5, "mse", seed=int(rng.integers(2**31)), outlier_channels=out)
  assert q.index_bits_per_channel == 2.25 and q.outlier.bits == 3 and q.regular.bits == 2
  x = _sphere(rng, 3000, dim)
  codes = q.encode(x)
  x_hat = np.asarray(q.decode(codes), np.float64)
  e = np.sum((x_hat - x) ** 2, -1) / np.sum(np.float64(x) ** 2, -1)
  want = (32 / dim) * lloyd_max_codebook(32, 3).mse_times_dim + (
      96 / dim) * lloyd_max_codebook(96, 2).mse_times_dim
  assert abs(e.mean() - want) < 5 * e.std() / math.sqrt(e.size) + 1e-4 * want, (e.mean(), want)
  y = rng.standard_normal((3000, dim)).astype(np.float32)
  assert rel_err(q.inner_product(y, codes), np.sum(y * x_hat, -1)) < 1e-5
  # default: the first dim // 4 channels are the outliers
  assert TurboQuant(dim, 3.5).outlier_channels == tuple(range(32))


def test_bad_inputs():
  with pytest.raises(ValueError, match="dim must be"):
    TurboQuant(2, 2)
  with pytest.raises(ValueError, match="dim=96.*hadamard"):
    TurboQuant(96, 2, rotation="hadamard")
  with pytest.raises(ValueError, match="96 channels"):
    TurboQuant(128, 2.5, rotation="hadamard")  # default split 32 + 96
  for bits in (0, 5, 2.25, 9, True):
    with pytest.raises(ValueError, match="bits"):
      TurboQuant(64, bits, "mse")
  with pytest.raises(ValueError, match="bits"):
    TurboQuant(64, 6, "prod")
  with pytest.raises(ValueError, match="kind must be"):
    TurboQuant(64, 2, "qjl")
  with pytest.raises(ValueError, match="outlier_channels"):
    TurboQuant(64, 2.5, outlier_channels=(0, 0, 1))
  q = TurboQuant(16, 2)
  with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
    q.encode(jnp.ones((3, 15)))
  x = np.ones((3, 16), np.float32)
  x[1, 4] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    q.encode(x)
  with pytest.raises(ValueError, match="non-finite"):
    validate(x)
  # Under jit no error can be raised: documented behaviour is NaN propagation to that row only.
  out = np.asarray(jax.jit(lambda qq, v: qq.decode(qq.encode(v)))(q, x))
  assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2]]))
