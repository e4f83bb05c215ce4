"""Ternary packing: 2-bit planar layout and base-3, round trips with odd sizes."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from effjax.quant import ternary


def _rng():
  seed = int.from_bytes(os.urandom(4), "little")
  print(f"seed={seed}")
  return np.random.default_rng(seed)


def test_2bit_round_trip_odd_sizes():
  rng = _rng()
  for _ in range(3):
    k, n = int(rng.integers(1, 150)), int(rng.integers(1, 150))
    codes = rng.integers(-1, 2, (k, n)).astype(np.int8)
    align = int(rng.choice([1, 4, 16, 32]))
    packed = ternary.pack_2bit(jnp.asarray(codes), align=align)
    kp, np_ = ternary.padded_dims(k, n, align)
    assert packed.shape == (kp // 4, np_) and packed.dtype == jnp.uint8
    assert np.array_equal(np.asarray(ternary.unpack_2bit(packed, (k, n))), codes)


def test_2bit_layout_matches_docstring():
  rng = _rng()
  k, n = 128, 256  # multiples of 4 * align: no padding
  codes = rng.integers(-1, 2, (k, n)).astype(np.int8)
  words = np.asarray(ternary.pack_2bit(jnp.asarray(codes))).view("<i4")  # [K4, N4]
  k4, n4 = k // 4, n // 4
  r, c, i, j = (int(rng.integers(0, v)) for v in (k4, n4, 4, 4))
  assert ((int(words[r, c]) >> (8 * i + 2 * j)) & 3) - 1 == codes[j * k4 + r, i * n4 + c]


def test_base3_round_trip_and_density():
  rng = _rng()
  shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3)
  codes = rng.integers(-1, 2, shape).astype(np.int8)
  packed = ternary.pack_base3(jnp.asarray(codes))
  assert packed.shape == (-(-codes.size // 5),) and int(np.asarray(packed).max()) <= 242
  assert np.array_equal(np.asarray(ternary.unpack_base3(packed, shape)), codes)
  with pytest.raises(ValueError, match="bytes"):
    ternary.unpack_base3(packed[:-1], shape) if packed.shape[0] > 1 else ternary.unpack_base3(
        packed, (codes.size + 5,))


def test_export_dequantize_matches_quantizer():
  from effjax.layers.bitlinear import ternary_weight_quant
  rng = _rng()
  w = jnp.asarray(rng.standard_normal((24, 5, 7)), jnp.float32)
  p = ternary.export_ternary(w, k_axes=1)
  assert p.shape == (24, 35)
  ref = np.asarray(ternary_weight_quant(w.reshape(24, 35)))
  assert np.array_equal(np.asarray(ternary.dequantize(p)), ref)
  assert p.nbytes == p.packed.size + 4
  with pytest.raises(ValueError, match="k_axes"):
    ternary.export_ternary(w, k_axes=3)


def test_words_form_round_trip_and_layout():
  """int32 words hold the same bytes (little-endian) and unpack to the same codes."""
  rng = _rng()
  k, n = int(rng.integers(1, 300)), int(rng.integers(1, 300))
  codes = rng.integers(-1, 2, (k, n)).astype(np.int8)
  p = ternary.export_ternary(jnp.asarray(codes, jnp.float32))
  w = ternary.as_words(p)
  assert w.packed.dtype == jnp.int32 and w.packed.shape == (p.packed.shape[0],
                                                            p.packed.shape[1] // 4)
  assert np.array_equal(np.asarray(w.packed), np.asarray(p.packed).view("<i4"))
  assert np.array_equal(np.asarray(ternary.unpack_2bit(w.packed, (k, n))), codes)
  assert w.nbytes == p.nbytes and ternary.as_words(w) is w
  with pytest.raises(ValueError, match="multiple of 4"):
    ternary.words_2bit(p.packed[:, :-1])
