"""Split-K GQA decode attention (pallas_kernels/decode_attention.py) vs its float32 reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (combine_splits, combine_splits_kernel,
                                             decode_attention, decode_attention_append,
                                             decode_attention_append_reference,
                                             decode_attention_reference)

INTERPRET = jax.default_backend() != "gpu"


def _rng():
  seed = int.from_bytes(os.urandom(4), "little")
  return np.random.default_rng(seed), seed


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_matches_reference_ragged(group):
  rng, seed = _rng()
  B, K, H = 4, 2, 32
  S = int(rng.integers(70, 110)) | 1  # odd, not a multiple of block_k
  N = K * group
  q = jnp.asarray(rng.standard_normal((B, N, H)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)) * 2, jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.bfloat16)
  mid = int(rng.integers(2, S - 1)) | 1
  lengths = jnp.asarray([1, S, mid, 0], jnp.int32)
  out, lse = decode_attention(q, k, v, lengths, block_k=16, num_splits=3, interpret=INTERPRET,
                              return_lse=True)
  ref = decode_attention_reference(q, k, v, lengths)
  assert out.dtype == q.dtype and out.shape == (B, N, H)
  live = np.asarray(lengths) > 0
  err = _rel(out[live], ref[live])
  assert err < 1e-2, f"seed={seed} S={S} rel err {err}"
  assert np.all(np.asarray(out[~live]) == 0), f"seed={seed}: length-0 rows must be zeros"
  # log-sum-exp of the scaled logits
  s = jnp.einsum("BKGH,BSKH->BKGS", q.astype(jnp.float32).reshape(B, K, group, H),
                 k.astype(jnp.float32)) / np.sqrt(H)
  s = jnp.where(jnp.arange(S)[None, None, None, :] < lengths[:, None, None, None], s, -jnp.inf)
  lse_ref = jax.scipy.special.logsumexp(s, axis=-1).reshape(B, N)
  np.testing.assert_allclose(np.asarray(lse[live]), np.asarray(lse_ref[live]), rtol=1e-4, atol=1e-4,
                             err_msg=f"seed={seed}")
  assert np.all(np.isneginf(np.asarray(lse[~live])))


@pytest.mark.parametrize("splits,group", [(3, 4), (4, 1), (1, 8)])
def test_combine_kernel_matches_jnp_combine(splits, group):
  """The Pallas split merge equals the jnp one (odd split counts padded; empty splits and rows
  whose every split is empty included)."""
  rng, seed = _rng()
  B, K, H, Gp = 3, 2, 32, 16
  o = jnp.asarray(rng.standard_normal((B, K, splits, Gp, H)), jnp.float32)
  lse = rng.standard_normal((B, K, splits, Gp)) * 4
  lse[0, :, -1] = -np.inf  # one empty split
  lse[1, 1] = -np.inf  # a (row, kv head) with no keys at all
  lse = jnp.asarray(lse, jnp.float32)
  o = jnp.where(jnp.isfinite(lse)[..., None], o, 0.0)  # empty splits store zeros
  got = combine_splits_kernel(o, lse, K * group, jnp.float32, interpret=INTERPRET)
  want = combine_splits(o, lse, K * group, jnp.float32)
  assert got.shape == (B, K * group, H)
  assert np.all(np.isfinite(np.asarray(got))), seed
  assert _rel(got, want) < 1e-6, seed
  assert np.all(np.asarray(got)[1, group:] == 0.0), seed


def test_length_one_equals_first_value():
  rng, seed = _rng()
  B, S, K, G, H = 2, 48, 1, 4, 16
  q = jnp.asarray(rng.standard_normal((B, K * G, H)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.bfloat16)
  out = decode_attention(q, k, v, jnp.ones((B,), jnp.int32), block_k=16, num_splits=2,
                         interpret=INTERPRET)
  want = jnp.broadcast_to(v[:, 0, :, None, :], (B, K, G, H)).reshape(B, K * G, H)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want), err_msg=f"seed={seed}")


def test_bad_arguments():
  q = jnp.zeros((2, 6, 32), jnp.bfloat16)
  k = jnp.zeros((2, 64, 4, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    decode_attention(q, k, k, jnp.ones((2,), jnp.int32), interpret=True)
  q = jnp.zeros((2, 8, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="lengths_B"):
    decode_attention(q, k, k, jnp.ones((3,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="block_k"):
    decode_attention(q, k, k, jnp.ones((2,), jnp.int32), block_k=24, interpret=True)
  with pytest.raises(ValueError, match="same shape|one shape"):
    decode_attention(q, k, k[:, :10], jnp.ones((2,), jnp.int32), interpret=True)


@pytest.mark.usefixtures("float32_matmuls")  # the reference's einsums (TF32 on a GPU otherwise)
@pytest.mark.parametrize("group,dtype,tol", [(1, jnp.bfloat16, 1e-2), (3, jnp.bfloat16, 1e-2),
                                             (4, jnp.float32, 1e-5)])
def test_append_writes_and_attends(group, dtype, tol):
  """decode_attention_append == scatter of the new key/value + attention over slots <= position:
  ragged positions (first slot, last slot, inside, past the end = nothing written); the caches
  equal the reference scatter bit for bit and the new token is attended from its own values."""
  rng, seed = _rng()
  B, K, H = 5, 2, 32
  S = int(rng.integers(70, 110)) | 1
  N = K * group
  q = jnp.asarray(rng.standard_normal((B, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)) * 2, dtype)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  k_new = jnp.asarray(rng.standard_normal((B, K, H)) * 2, dtype)
  v_new = jnp.asarray(rng.standard_normal((B, K, H)), dtype)
  pos = jnp.asarray([0, S - 1, int(rng.integers(17, S - 17)), S + 3, int(rng.integers(1, 16))],
                    jnp.int32)
  ref, k_ref, v_ref = decode_attention_append_reference(q, k_new, v_new, k, v, pos)
  for splits in (3, None):
    out, k_out, v_out = decode_attention_append(q, k_new, v_new, k, v, pos, block_k=16,
                                                num_splits=splits, interpret=INTERPRET)
    assert out.dtype == dtype and out.shape == (B, N, H)
    err = _rel(out, ref)
    assert err < tol, f"seed={seed} S={S} splits={splits} rel err {err}"
    np.testing.assert_array_equal(np.asarray(k_out, np.float32), np.asarray(k_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(v_out, np.float32), np.asarray(v_ref, np.float32))
  # position 0: the output is the new value itself
  want0 = jnp.broadcast_to(v_new[0][:, None, :], (K, group, H)).reshape(N, H)
  np.testing.assert_allclose(np.asarray(out[0], np.float32), np.asarray(want0, np.float32),
                             rtol=1e-2, atol=1e-2, err_msg=f"seed={seed}")


def test_append_bad_arguments():
  q = jnp.zeros((2, 8, 32), jnp.bfloat16)
  k = jnp.zeros((2, 64, 4, 32), jnp.bfloat16)
  new = jnp.zeros((2, 4, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="k_new_BKH"):
    decode_attention_append(q, new[:, :2], new, k, k, jnp.zeros((2,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="positions_B"):
    decode_attention_append(q, new, new, k, k, jnp.zeros((3,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="16 slots"):
    decode_attention_append(q, new, new, k[:, :8], k[:, :8], jnp.zeros((2,), jnp.int32),
                            interpret=True)
