"""Tests for effjax.quant.lloyd_max (codebooks of the rotated-coordinate density)."""
import math

import numpy as np
import pytest
import scipy.integrate as si

from effjax.quant import density_pdf, lloyd_max_codebook, quantizer_mse


def _rand_dim(rng):
  return int(rng.choice([int(rng.integers(3, 40)), int(rng.integers(40, 3000))]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_symmetric_monotone_midpoints(rng, bits):
  dim = _rand_dim(rng)
  cb = lloyd_max_codebook(dim, bits)
  c, t = cb.centroids, cb.boundaries
  assert c.shape == (2**bits,) and t.shape == (2**bits - 1,)
  assert np.all(np.diff(c) > 0)
  np.testing.assert_allclose(c, -c[::-1], rtol=0, atol=1e-12 * np.abs(c).max())
  np.testing.assert_allclose(t, (c[1:] + c[:-1]) / 2, rtol=1e-12)
  assert np.all(t > c[:-1]) and np.all(t < c[1:])
  assert -1 < c[0] and c[-1] < 1
  # Theorem 1 (upper) and 3 (lower) bounds on d * C(f_d, b). The lower bound is attained at d = 3
  # (the coordinate density is uniform there: d * C = 3 * (2 / 2^b)^2 / 12 = 4^-b exactly), so it
  # is checked up to float64 rounding of the computed cost.
  lower = 4.0**-bits * (1 - 1e-12)
  assert lower <= cb.mse_times_dim <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_centroid_condition_and_mse_by_quadrature(rng):
  """Each centroid is its cell's conditional mean; mse equals an independent quad integral."""
  dim, bits = _rand_dim(rng), int(rng.integers(1, 5))
  cb = lloyd_max_codebook(dim, bits)
  edges = np.concatenate([[-1.0], cb.boundaries, [1.0]])
  pdf = lambda x: density_pdf(x, dim)
  total = 0.0
  for i, c in enumerate(cb.centroids):
    kw = dict(epsabs=0, epsrel=1e-10, limit=200)
    p = si.quad(pdf, edges[i], edges[i + 1], **kw)[0]
    m = si.quad(lambda x: x * pdf(x), edges[i], edges[i + 1], **kw)[0] / p
    assert abs(m - c) <= 1e-7 * abs(cb.centroids).max(), (i, m, c)
    total += si.quad(lambda x: (x - c) ** 2 * pdf(x), edges[i], edges[i + 1], **kw)[0]
  assert abs(total - cb.mse) <= 1e-7 * cb.mse
  assert abs(quantizer_mse(cb.centroids, dim) - cb.mse) <= 1e-9 * cb.mse


def test_mse_matches_monte_carlo_of_sphere_coordinates(rng):
  """Coordinates of uniform unit vectors really have density f_d: empirical MSE ~ cb.mse."""
  dim, bits = int(rng.integers(3, 60)), int(rng.integers(1, 5))
  cb = lloyd_max_codebook(dim, bits)
  x = rng.standard_normal((200_000 // dim + 1, dim))
  u = (x / np.linalg.norm(x, axis=-1, keepdims=True))[:, 0]  # one coordinate per vector
  u = np.concatenate([u, (x / np.linalg.norm(x, axis=-1, keepdims=True))[:, 1:].ravel()])[:200_000]
  err = (u - cb.centroids[np.searchsorted(cb.boundaries, u)]) ** 2
  se = err.std() / np.sqrt(err.size)
  assert abs(err.mean() - cb.mse) < 5 * se + 1e-12, (err.mean(), cb.mse, se)


def test_known_closed_forms():
  # d = 3: the coordinate is uniform on [-1, 1]; Lloyd-Max is the uniform quantizer, d*C = 4^-b.
  for b in (1, 2, 3, 4):
    assert abs(lloyd_max_codebook(3, b).mse_times_dim - 4.0**-b) < 1e-12
  # Gaussian, 1 bit: centroids +-sqrt(2/pi)/sqrt(d), d*C = 1 - 2/pi.
  cb = lloyd_max_codebook(50, 1, "gaussian")
  np.testing.assert_allclose(cb.centroids, [-math.sqrt(2 / math.pi / 50), math.sqrt(2 / math.pi / 50)],
                             rtol=1e-12)
  assert abs(cb.mse_times_dim - (1 - 2 / math.pi)) < 1e-12
  # Large d: the Beta density tends to N(0, 1/d).
  for b in (1, 2, 4, 8):
    beta = lloyd_max_codebook(200_000, b).mse_times_dim
    gauss = lloyd_max_codebook(200_000, b, "gaussian").mse_times_dim
    assert abs(beta - gauss) < 1e-3 * gauss, (b, beta, gauss)


def test_bad_arguments():
  for bits in (0, 9, 2.5, True):
    with pytest.raises(ValueError, match="bits must be"):
      lloyd_max_codebook(128, bits)
  with pytest.raises(ValueError, match="dim must be >= 3"):
    lloyd_max_codebook(2, 2)
  with pytest.raises(ValueError, match="density must be"):
    lloyd_max_codebook(16, 2, "laplace")
