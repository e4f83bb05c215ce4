"""Random rotations for TurboQuant.

Paper: "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate"
(Zandieh, Daliri, Hadian, Mirrokni; arXiv 2504.19874). Algorithm 1, line 2 ("generate a random
rotation matrix Pi"): after multiplying by a Haar-random orthogonal Pi, each coordinate of a unit
vector follows the density f(x) ∝ (1 - x^2)^((d-3)/2) on [-1, 1] (the paper's Lemma 1), which is
what the Lloyd-Max codebooks in `lloyd_max.py` are solved for.

Two rotations, both seeded (numpy PCG64 from `seed`, so the same seed gives the same matrix on every
jax version and backend) and stored as flax.struct pytrees (arrays are leaves, `dim` is static):

* `HaarRotation`: Pi = Q from the QR factorisation of a d x d standard Gaussian matrix, with the
  columns' signs fixed by sign(diag(R)) (Mezzadri, "How to generate random matrices from the classical
  compact groups", 2007) so that Q is exactly Haar-distributed. Built in float64, stored float32.
  `apply` is a dense [d, d] matmul, O(d^2) per vector.
* `HadamardRotation`: the randomized Hadamard transform Pi = prod_r (H D_r) / sqrt(d)^R with
  H the Sylvester-ordered Walsh-Hadamard matrix and D_r independent random +-1 diagonals,
  applied with the fast Walsh-Hadamard butterfly in O(d log d) per vector. Choices left open by the
  paper (which only analyses Haar rotations), written down here:
    - d must be a power of two; any other d raises ValueError naming the dim (no block-diagonal or
      padding fallback; use `HaarRotation` for such d).
    - `rounds` (default 2) independent H D blocks are composed. One round maps a basis vector to a
      flat +-1/sqrt(d) vector, whose coordinates are far from the Beta density; two rounds already
      give near-Gaussian coordinates. The result is orthogonal but NOT Haar-distributed, so the
      Lloyd-Max MSE is an approximation for it, not an exact value.

Convention for both: `apply(x)[..., i] = sum_j Pi[i, j] x[..., j]` (i.e. y = Pi x for row vectors
stored as x[..., d]), `apply_transpose` applies Pi^T = Pi^{-1}. `matrix()` returns the dense Pi.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = ["HaarRotation", "HadamardRotation", "Rotation", "make_rotation", "is_power_of_two"]


def is_power_of_two(n: int) -> bool:
  """True iff `n` is a positive integral power of two (1, 2, 4, ...)."""
  return isinstance(n, (int, np.integer)) and n > 0 and (n & (n - 1)) == 0


def _check_dim(dim, name="dim"):
  if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
    raise ValueError(f"{name} must be a positive int, got {dim!r}")


def _check_last_axis(x, dim, who):
  if x.ndim < 1 or x.shape[-1] != dim:
    raise ValueError(f"{who}: expected x of shape [..., {dim}], got {tuple(x.shape)}")


_QR_MEMO: dict = {}  # sha1 of the Gaussian matrix -> sign-fixed Q (float64); at most 8 entries


def _haar_from_gaussian(g_DD: np.ndarray) -> np.ndarray:
  """Sign-fixed Q of QR(g) (float64), memoized by the bytes of g.

  A QR of d = 1536 costs seconds on a small CPU and experiments build many quantizers from the
  same (seed, part) stream (e.g. mse and prod at every bit width), so identical Gaussians reuse
  their Q. Same result as recomputing (the key is the exact input).
  """
  import hashlib
  key = (g_DD.shape, hashlib.sha1(np.ascontiguousarray(g_DD).tobytes()).hexdigest())
  q_DD = _QR_MEMO.get(key)
  if q_DD is None:
    q_DD, r_DD = np.linalg.qr(g_DD)
    q_DD = q_DD * np.where(np.diag(r_DD) < 0, -1.0, 1.0)[None, :]
    if len(_QR_MEMO) >= 8:
      _QR_MEMO.pop(next(iter(_QR_MEMO)))
    _QR_MEMO[key] = q_DD
  return q_DD


@struct.dataclass
class HaarRotation:
  """Haar-random orthogonal rotation Pi stored densely.

  Attributes:
    matrix_DD: float32 [dim, dim], orthogonal; `apply(x) = x @ matrix_DD.T`.
    dim: static vector length d.
  """

  matrix_DD: jax.Array
  dim: int = struct.field(pytree_node=False)

  @classmethod
  def create(cls, dim: int, seed: int | np.random.Generator = 0) -> "HaarRotation":
    """Draws Pi = QR(Gaussian) with the sign fix; `seed` is an int or a numpy Generator."""
    _check_dim(dim)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    g_DD = rng.standard_normal((dim, dim))
    return cls(matrix_DD=jnp.asarray(_haar_from_gaussian(g_DD), jnp.float32), dim=int(dim))

  def apply(self, x_ND: jax.Array) -> jax.Array:
    """Returns Pi x for x of shape [..., dim] (row vectors), computed in float32 or wider."""
    _check_last_axis(x_ND, self.dim, "HaarRotation.apply")
    x_ND = jnp.asarray(x_ND)
    return jnp.einsum("...j,ij->...i", x_ND, self.matrix_DD.astype(_compute_dtype(x_ND)))

  def apply_transpose(self, y_ND: jax.Array) -> jax.Array:
    """Returns Pi^T y (the inverse rotation) for y of shape [..., dim]."""
    _check_last_axis(y_ND, self.dim, "HaarRotation.apply_transpose")
    y_ND = jnp.asarray(y_ND)
    return jnp.einsum("...i,ij->...j", y_ND, self.matrix_DD.astype(_compute_dtype(y_ND)))

  def matrix(self) -> jax.Array:
    """The dense [dim, dim] matrix Pi."""
    return self.matrix_DD


def _lastaxis(v_D, x_ND):
  """v [d] reshaped to [1, ..., 1, d] in x's dtype (explicit rank, no implicit promotion)."""
  return v_D.astype(x_ND.dtype).reshape((1,) * (x_ND.ndim - 1) + v_D.shape)


def _compute_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def fwht(x_ND: jax.Array) -> jax.Array:
  """Unnormalised fast Walsh-Hadamard transform over the last axis (Sylvester order).

  Computes x @ H with H[i, j] = (-1)^popcount(i & j); the last axis must be a power of two.
  O(d log d): log2(d) butterfly stages, each a reshape + add/sub.
  """
  d = x_ND.shape[-1]
  if not is_power_of_two(d):
    raise ValueError(f"fwht: last axis must be a power of two, got {d}")
  lead = x_ND.shape[:-1]
  h = 1
  while h < d:
    # Pair element i (bit h clear) with i + h (bit h set) inside each block of 2h.
    x4 = x_ND.reshape(*lead, d // (2 * h), 2, h)
    a, b = x4[..., 0, :], x4[..., 1, :]
    x_ND = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, d)
    h *= 2
  return x_ND


@struct.dataclass
class HadamardRotation:
  """Randomized Hadamard rotation Pi = (H D_R) ... (H D_1) / d^(R/2), applied in O(d log d).

  Attributes:
    signs_RD: float32 [rounds, dim] of +-1, the diagonals D_1..D_R (row r is applied r-th).
    dim: static vector length d (a power of two).
  """

  signs_RD: jax.Array
  dim: int = struct.field(pytree_node=False)

  @classmethod
  def create(cls, dim: int, seed: int | np.random.Generator = 0, rounds: int = 2
             ) -> "HadamardRotation":
    """Draws the random sign diagonals; raises ValueError if `dim` is not a power of two."""
    _check_dim(dim)
    if not is_power_of_two(dim):
      raise ValueError(
          f"HadamardRotation: dim={dim} is not a power of two; the fast Walsh-Hadamard transform "
          "needs d = 2^k (use rotation='haar' for this dim)")
    if not isinstance(rounds, int) or rounds < 1:
      raise ValueError(f"HadamardRotation: rounds must be a positive int, got {rounds!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    signs = np.where(rng.random((rounds, dim)) < 0.5, -1.0, 1.0)
    return cls(signs_RD=jnp.asarray(signs, jnp.float32), dim=int(dim))

  def apply(self, x_ND: jax.Array) -> jax.Array:
    """Returns Pi x for x of shape [..., dim]."""
    _check_last_axis(x_ND, self.dim, "HadamardRotation.apply")
    x_ND = jnp.asarray(x_ND)
    x_ND = x_ND.astype(_compute_dtype(x_ND))
    scale = 1.0 / math.sqrt(self.dim)
    for r in range(self.signs_RD.shape[0]):
      x_ND = fwht(x_ND * _lastaxis(self.signs_RD[r], x_ND)) * scale
    return x_ND

  def apply_transpose(self, y_ND: jax.Array) -> jax.Array:
    """Returns Pi^T y = D_1 H ... D_R H y / d^(R/2) (H is symmetric) for y of shape [..., dim]."""
    _check_last_axis(y_ND, self.dim, "HadamardRotation.apply_transpose")
    y_ND = jnp.asarray(y_ND)
    y_ND = y_ND.astype(_compute_dtype(y_ND))
    scale = 1.0 / math.sqrt(self.dim)
    for r in reversed(range(self.signs_RD.shape[0])):
      y_ND = fwht(y_ND) * scale * _lastaxis(self.signs_RD[r], y_ND)
    return y_ND

  def matrix(self) -> jax.Array:
    """The dense [dim, dim] matrix Pi (Pi[:, j] = apply(e_j)); for tests and matmul-based kernels."""
    return self.apply(jnp.eye(self.dim, dtype=jnp.float32)).T


Rotation = HaarRotation | HadamardRotation


def make_rotation(kind: str, dim: int, seed: int | np.random.Generator = 0) -> Rotation:
  """Builds a rotation by name: kind is "haar" or "hadamard"."""
  if kind == "haar":
    return HaarRotation.create(dim, seed)
  if kind == "hadamard":
    return HadamardRotation.create(dim, seed)
  raise ValueError(f"rotation must be 'haar' or 'hadamard', got {kind!r}")
