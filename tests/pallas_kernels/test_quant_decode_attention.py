"""Decode attention over TurboQuant / KIVI packed K/V vs dequantize-then-attend references."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.quant import kivi
from effjax.quant.turboquant import TurboQuant
from pallas_kernels import quant_decode_attention as qda
from pallas_kernels.decode_attention import decode_attention_reference

INTERPRET = jax.default_backend() != "gpu"


def _rng():
  seed = int.from_bytes(os.urandom(4), "little")
  return np.random.default_rng(seed), seed


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(rng, B, S, K, G, H):
  q = jnp.asarray(rng.standard_normal((B, K * G, H)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)) * 2 + rng.standard_normal(H), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
  return q, k, v


def _lengths(rng, B, S):
  ls = [1, S, int(rng.integers(2, S - 1)) | 1][:B]
  return jnp.asarray(ls + [int(rng.integers(1, S))] * (B - len(ls)), jnp.int32)


@pytest.mark.parametrize("k_bits,v_bits,group,H,gpi,transposed,dequant,B,S",
                         [(4, 2.5, 4, 64, 1, False, "lut", 3, 128),
                          (3, 2, 8, 32, 2, True, "lut", 3, 256),
                          (4, 2, 2, 32, 1, False, "poly", 2, 64)])
def test_turboquant_kernel_matches_dequantized_reference(k_bits, v_bits, group, H, gpi, transposed,
                                                         dequant, B, S):
  rng, seed = _rng()
  K = 2
  q, k, v = _inputs(rng, B, S, K, group, H)
  def quantizer(bits):
    extra = dict(num_outlier_channels=16) if bits % 1 else {}
    return TurboQuant(H, bits, seed=int(rng.integers(1 << 30)), **extra)
  tq_k, tq_v = quantizer(k_bits), quantizer(v_bits)
  kp = qda.turboquant_parts(tq_k, k)
  vp = qda.turboquant_parts(tq_v, v)
  # the kernel layout decodes to exactly the quantizer's own reconstruction
  np.testing.assert_allclose(np.asarray(qda.turboquant_dequantize(vp, H)),
                             np.asarray(tq_v.decode(tq_v.encode(v))), rtol=2e-3, atol=2e-3)
  lengths = _lengths(rng, B, S)
  out, lse = qda.turboquant_decode_attention(q, kp, vp, lengths, num_splits=2, groups_per_iter=gpi,
                                             transposed=transposed, dequant=dequant,
                                             interpret=INTERPRET, return_lse=True)
  ref = qda.turboquant_decode_reference(q, kp, vp, lengths)
  assert out.shape == q.shape and out.dtype == q.dtype
  err = _rel(out, ref)
  assert err < 2e-2, f"seed={seed} rel err {err}"
  kh = qda.turboquant_dequantize(kp, H)
  s = jnp.einsum("BKGH,BSKH->BKGS", q.astype(jnp.float32).reshape(B, K, group, H), kh) / np.sqrt(H)
  s = jnp.where(jnp.arange(S)[None, None, None, :] < lengths[:, None, None, None], s, -jnp.inf)
  lse_ref = jax.scipy.special.logsumexp(s, axis=-1).reshape(B, K * group)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), rtol=1e-2, atol=5e-2,
                             err_msg=f"seed={seed}")
  # and the quantized attention is an approximation of the exact one (sanity, loose)
  exact = decode_attention_reference(q, k, v, lengths)
  assert _rel(ref, exact) < 0.6, f"seed={seed}"


@pytest.mark.parametrize("k_bits,v_bits,group,gpi", [(2, 2, 4, 2), (4, 4, 1, 1)])
def test_kivi_kernel_matches_dequantized_reference(k_bits, v_bits, group, gpi):
  rng, seed = _rng()
  B, S, K, H = 3, 128, 2, 64
  q, k, v = _inputs(rng, B, S, K, group, H)
  kq, vq = kivi.quantize_keys(k, k_bits), kivi.quantize_values(v, v_bits)
  lengths = _lengths(rng, B, S)
  out = qda.kivi_decode_attention(q, kq, vq, lengths, num_splits=2, groups_per_iter=gpi,
                                  interpret=INTERPRET)
  ref = qda.kivi_decode_reference(q, kq, vq, lengths)
  err = _rel(out, ref)
  assert err < 2e-2, f"seed={seed} rel err {err}"


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_polynomial_is_exact(bits):
  from effjax.quant.lloyd_max import lloyd_max_codebook
  rng, _ = _rng()
  d = int(rng.integers(16, 300))
  c = lloyd_max_codebook(d, bits).centroids
  a = qda.codebook_poly_coeffs(c)
  n = 1 << bits
  vals = qda._codebook_eval(2 * jnp.arange(n, dtype=jnp.uint32), [jnp.float32(x) for x in a], n)
  np.testing.assert_allclose(np.asarray(vals), c, rtol=1e-6, atol=1e-6 * np.max(np.abs(c)))


def test_fast_codebook_within_bf16_rounding():
  """The kernels' 4-bit codebook (fewer polynomial terms, `FAST_CODEBOOK_TERMS`) stays far below the
  bf16 rounding (2^-9 relative) its values get before the tensor-core dot."""
  from effjax.quant.lloyd_max import lloyd_max_codebook
  rng, seed = _rng()
  for d in (int(rng.integers(16, 2000)), 128):
    c = lloyd_max_codebook(d, 4).centroids
    a, m = qda.kernel_codebook(c, 4)
    assert 0 < m < 8
    vals = qda._codebook_eval(2 * jnp.arange(16, dtype=jnp.uint32), [jnp.float32(x) for x in a[:m]],
                              16)
    err = np.max(np.abs(np.asarray(vals) - c) / np.abs(c))
    assert err < 5e-4, f"seed={seed} d={d} max rel err {err}"


def test_bad_input():
  with pytest.raises(ValueError, match="symmetric"):
    qda.codebook_poly_coeffs([-1.0, 0.1, 0.5, 1.0])
  rng, _ = _rng()
  q, k, v = _inputs(rng, 1, 64, 1, 2, 32)
  tq = TurboQuant(32, 4)
  kp = qda.turboquant_parts(tq, k)
  with pytest.raises(ValueError, match="partition"):
    qda.turboquant_decode_attention(q, kp + kp, kp, jnp.ones((1,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="groups_per_iter"):
    qda.turboquant_decode_attention(q, kp, kp, jnp.ones((1,), jnp.int32), groups_per_iter=3,
                                    interpret=True)
  with pytest.raises(ValueError, match="num_warps"):
    qda.turboquant_decode_attention(q, kp, kp, jnp.ones((1,), jnp.int32), num_warps=3,
                                    interpret=True)
  with pytest.raises(ValueError, match="kind='mse'"):
    qda.turboquant_parts(TurboQuant(32, 3, kind="prod"), k)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_instruction_sequence_gives_the_bf16_codebook(bits):
  """The prmt instruction sequence of the "lut" dequantization (emulated bit for bit) and the
  interpret-mode lookup both return bf16(c[code]) for every code of every field: all 256 byte
  words at 2 bits, fresh random words at 3 bits (fields < 8) and 4 bits."""
  from effjax.quant.lloyd_max import lloyd_max_codebook
  rng, seed = _rng()
  c = np.asarray(lloyd_max_codebook(int(rng.choice([64, 128, 96])), bits).centroids, np.float32)
  lut = list(qda.codebook_lut_words(c, bits))
  if bits == 2:
    w = rng.permutation(256).astype(np.uint8).reshape(16, 16)
  else:
    w = rng.integers(0, 1 << 16, (16, 64)).astype(np.uint16)
    if bits == 3:
      w &= 0x7777
  fw = 2 if bits == 2 else 4
  for j in range(4):
    code = (w.astype(np.int64) >> (j * fw)) & ((1 << fw) - 1)
    want = np.asarray(jnp.asarray(c[code]).astype(jnp.bfloat16), np.float32)
    got = np.asarray(qda._lut_decode_emulated(jnp.asarray(w), bits, j, lut), np.float32)
    np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} field {j}")
    got = np.asarray(qda._lut_decode(jnp.asarray(w), bits, j, lut, emulate=True), np.float32)
    np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} field {j}")
