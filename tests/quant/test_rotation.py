"""Tests for effjax.quant.rotation (Haar and randomized Hadamard rotations)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from effjax.quant import HaarRotation, HadamardRotation, fwht, make_rotation
from tests.conftest import rel_err

pytestmark = pytest.mark.usefixtures("float32_matmuls")  # float32 bounds: no TF32 on GPU


def test_haar_orthogonal_and_apply_matches_matrix(rng):
  dim = int(rng.integers(3, 97))
  rot = HaarRotation.create(dim, seed=int(rng.integers(2**31)))
  q = np.asarray(rot.matrix(), np.float64)
  assert np.abs(q.T @ q - np.eye(dim)).max() < 1e-5
  x = rng.standard_normal((5, 3, dim)).astype(np.float32)
  y = rot.apply(x)
  assert y.shape == x.shape
  assert rel_err(y, x @ q.T) < 1e-5
  assert rel_err(rot.apply_transpose(y), x) < 1e-5
  assert rel_err(jax.jit(lambda r, v: r.apply(v))(rot, x), x @ q.T) < 1e-5


def test_haar_is_seeded():
  a, b, c = (HaarRotation.create(17, s).matrix_DD for s in (3, 3, 4))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1


def test_haar_sign_fix_gives_unbiased_entries(rng):
  # Haar: every entry has mean 0 and E[Q_ij^2] = 1/d. Without the sign fix, LAPACK's QR returns
  # a biased Q[0, 0] (its sign follows the Householder convention), which this detects.
  dim, n = 4, 600
  base = int(rng.integers(2**31))
  q00 = np.array([float(HaarRotation.create(dim, base + i).matrix_DD[0, 0]) for i in range(n)])
  se = q00.std() / np.sqrt(n)
  assert abs(q00.mean()) < 5 * se, (q00.mean(), se)
  assert abs(np.mean(q00**2) - 1 / dim) < 5 * np.std(q00**2) / np.sqrt(n)


def _dense_hadamard(signs_RD):
  dim = signs_RD.shape[1]
  h = scipy.linalg.hadamard(dim).astype(np.float64) / np.sqrt(dim)
  m = np.eye(dim)
  for s in signs_RD:
    m = h @ np.diag(s) @ m
  return m


def test_hadamard_equals_dense_matrix(rng):
  dim = int(2 ** rng.integers(1, 9))
  rounds = int(rng.integers(1, 4))
  rot = HadamardRotation.create(dim, seed=int(rng.integers(2**31)), rounds=rounds)
  dense = _dense_hadamard(np.asarray(rot.signs_RD, np.float64))
  x = rng.standard_normal((7, dim)).astype(np.float32)
  assert rel_err(rot.apply(x), x @ dense.T) < 1e-5
  assert rel_err(rot.apply_transpose(x), x @ dense) < 1e-5
  assert rel_err(rot.matrix(), dense) < 1e-5
  q = np.asarray(rot.matrix(), np.float64)
  assert np.abs(q.T @ q - np.eye(dim)).max() < 1e-5


def test_fwht_matches_sylvester_matrix(rng):
  dim = int(2 ** rng.integers(0, 8))
  x = rng.standard_normal((3, dim))
  assert rel_err(fwht(jnp.asarray(x)), x @ scipy.linalg.hadamard(dim)) < 1e-5


@pytest.mark.parametrize("dim", [3, 96, 100, 1536])
def test_hadamard_rejects_non_power_of_two(dim):
  with pytest.raises(ValueError, match=f"dim={dim}.*power of two"):
    HadamardRotation.create(dim)


def test_bad_arguments():
  with pytest.raises(ValueError, match="rotation must be"):
    make_rotation("dct", 8)
  with pytest.raises(ValueError, match="dim must be"):
    HaarRotation.create(0)
  rot = HaarRotation.create(8)
  with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
    rot.apply(jnp.ones((2, 9)))
