"""KIVI quantizer (effjax/quant/kivi.py) and the token-axis packing it stores codes in."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from effjax.quant import kivi, token_packing


def _rng():
  seed = int.from_bytes(os.urandom(4), "little")
  return np.random.default_rng(seed), seed


def _expand_scale(t, S):
  if t.per_channel:
    return np.repeat(np.asarray(t.scale, np.float32), kivi.GROUP, axis=-3)[..., :S, :, :]
  s = np.asarray(kivi.value_scales(t)[0], np.float32)
  return np.repeat(s, kivi.GROUP, axis=-1)[..., :S, :, :]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("keys", [True, False])
def test_error_bound_and_shapes(bits, keys):
  rng, seed = _rng()
  B, K, D = 2, 3, 64
  S = int(rng.integers(1, 150))
  x = rng.standard_normal((B, S, K, D)).astype(np.float32) * rng.uniform(0.1, 5)
  x[..., 5] *= 20  # an outlier channel, as in real keys
  t = (kivi.quantize_keys if keys else kivi.quantize_values)(jnp.asarray(x), bits)
  S64 = -(-S // 64) * 64
  assert t.codes.shape == (B, S64 // 4, K, D)
  assert t.codes.dtype == token_packing.word_dtype(bits)
  assert t.scale.dtype == jnp.float16
  x_hat = np.asarray(kivi.dequantize(t))
  assert x_hat.shape == x.shape
  s = _expand_scale(t, S)
  err = np.abs(x - x_hat)
  bound = s / 2 * (1 + 1e-5) + 1e-6 * np.abs(x)
  assert np.all(err <= bound), f"seed={seed} worst {np.max(err / s)} x scale"
  # nontrivial: the error is not far below the bound on average (codes really are b-bit); with a
  # handful of tokens per key group the group min/max are exact, so only check with full groups
  if S >= 32:
    assert np.mean(err / s) > 0.1, f"seed={seed} S={S}"
  # group ranges: every per-group scale is ~ range / (2^b - 1)
  assert np.all(np.asarray(t.scale, np.float32) > 0)


@pytest.mark.parametrize("bits", [2, 4])
def test_round_trip_of_representable_values(bits):
  """Values already on a group's grid come back exactly (codes survive packing)."""
  rng, seed = _rng()
  B, S, K, D = 1, 64 * 2, 2, 32
  codes = rng.integers(0, 1 << bits, size=(B, S, K, D))
  codes[:, ::32] = 0
  codes[:, 1::32] = (1 << bits) - 1  # each key group spans the full code range
  x = codes.astype(np.float32) * 0.25 - 1.0
  t = kivi.quantize_keys(jnp.asarray(x), bits)
  np.testing.assert_array_equal(np.asarray(kivi.dequantize(t)), x, err_msg=f"seed={seed}")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_token_packing_round_trip_and_write(bits):
  rng, seed = _rng()
  B, S, K, D = 2, 128, 3, 5
  codes = rng.integers(0, 1 << bits, size=(B, S, K, D)).astype(np.uint8)
  w = token_packing.pack_tokens(jnp.asarray(codes), bits, axis=1)
  assert w.shape == (B, S // 4, K, D)
  np.testing.assert_array_equal(np.asarray(token_packing.unpack_tokens(w, bits, axis=1)), codes)
  # field layout: packed row 16 g + t holds tokens 64 g + 16 j + t
  g, t, j = 1, 5, 2
  sb = token_packing.storage_bits(bits)
  got = (np.asarray(w[:, 16 * g + t]).astype(np.uint32) >> (j * sb)) & ((1 << sb) - 1)
  np.testing.assert_array_equal(got, codes[:, 64 * g + 16 * j + t])
  pos = rng.integers(0, S, size=(B,))
  new = rng.integers(0, 1 << bits, size=(B, K, D)).astype(np.uint8)
  w2 = token_packing.write_token(w, jnp.asarray(new), jnp.asarray(pos), bits)
  want = codes.copy()
  want[np.arange(B), pos] = new
  np.testing.assert_array_equal(np.asarray(token_packing.unpack_tokens(w2, bits, axis=1)), want,
                                err_msg=f"seed={seed}")


def test_bad_input():
  x = jnp.zeros((1, 64, 2, 32))
  with pytest.raises(ValueError, match="bits must be 2 or 4"):
    kivi.quantize_keys(x, 3)
  with pytest.raises(ValueError, match="multiple of 32"):
    kivi.quantize_values(jnp.zeros((1, 64, 2, 48)), 2)
  with pytest.raises(ValueError, match=r"\[..., S, K, D\]"):
    kivi.quantize_keys(jnp.zeros((64, 32)), 2)
  with pytest.raises(ValueError, match="multiple of 64"):
    token_packing.pack_tokens(jnp.zeros((1, 63, 2, 4), jnp.uint8), 2, axis=1)


def test_float16_step_matches_nextafter():
  """The bit-level float16 step used for the scale/zero rounding equals numpy's nextafter, including
  zeros, subnormals and the largest finite values (fresh random magnitudes over 12 decades)."""
  rng = np.random.default_rng()
  x = rng.standard_normal(4001) * 10.0 ** rng.integers(-8, 4, 4001)
  x = np.concatenate([x, [0.0, -0.0, 6e-8, -6e-8, 65504.0, -65504.0, 1.0, -1.0]]).astype(np.float16)
  for up in (True, False):
    got = np.asarray(kivi._f16_step(jnp.asarray(x), up=up))
    with np.errstate(over="ignore"):  # +-65504 steps to +-inf
      want = np.nextafter(x, np.float16(np.inf if up else -np.inf))
    np.testing.assert_array_equal(got, want)
