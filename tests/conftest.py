"""Test setup: rank promotion raises (catches silent broadcasting bugs), fresh seeds per run."""
import os

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request):
  """A numpy Generator with a fresh seed, printed on failure so a failing draw can be replayed."""
  seed = int.from_bytes(os.urandom(4), "little")
  request.node.user_properties.append(("seed", seed))
  print(f"[rng seed {seed}]")
  return np.random.default_rng(seed)


@pytest.fixture
def float32_matmuls():
  """float32 products in float32 on every backend. XLA on a GPU multiplies float32 in TF32 by
  default (~5e-4 relative); tests whose float32 bounds are about float32 arithmetic use this
  (`pytestmark = pytest.mark.usefixtures("float32_matmuls")`)."""
  with jax.default_matmul_precision("float32"):
    yield


def rel_err(out, ref) -> float:
  """‖out − ref‖ / ‖ref‖ in float64."""
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
