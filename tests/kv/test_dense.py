"""DenseCache: update/attend against the dense attention reference, ragged rows, rollback, blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention.dense import attention_reference
from effjax.kv import CacheConfig, DenseCache, KVCache, as_cache_config, update_and_attend
from effjax.kv import dense as dense_mod
from tests.conftest import rel_err


pytestmark = pytest.mark.usefixtures("float32_matmuls")  # no TF32 on GPU


def _rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _reference_rows(q_BTNH, k_rows, v_rows):
  """Per-row causal reference: row b's queries are the last T of its own k/v (bottom-right)."""
  outs = [attention_reference(q_BTNH[b:b + 1], k[None], v[None], causal=True)
          for b, (k, v) in enumerate(zip(k_rows, v_rows))]
  return jnp.concatenate(outs, axis=0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_prefix_then_chunk_matches_reference(rng, dtype, tol):
  """Ragged prefixes, then a multi-token chunk per row at its own positions."""
  B, K, G, H, T = 3, 3, 2, 12, 5
  N = K * G
  S = 29
  prefix = rng.integers(1, S - T + 1, size=B)
  cache = DenseCache.init(B, S, K, H, dtype)
  assert isinstance(cache, KVCache)
  k_full = _rand(rng, B, S, K, H)
  v_full = _rand(rng, B, S, K, H)
  # Prefix write: every row writes positions 0..max(prefix)-1 (garbage past its own prefix), then
  # rolls back to its prefix -- exactly what right-padded prefill does.
  P = int(prefix.max())
  pos_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  garbage_k = _rand(rng, B, P, K, H)
  mask = (np.arange(P)[None, :] < prefix[:, None])[:, :, None, None]
  cache = cache.update(jnp.where(mask, k_full[:, :P], garbage_k),
                       jnp.where(mask, v_full[:, :P], garbage_k), pos_BP)
  np.testing.assert_array_equal(cache.lengths, np.full(B, P))
  cache = cache.rollback(jnp.asarray(prefix))
  np.testing.assert_array_equal(cache.lengths, prefix)
  pos_BT = jnp.asarray(prefix[:, None] + np.arange(T)[None, :], jnp.int32)
  rows = jnp.arange(B)[:, None]
  cache = cache.update(k_full[rows, pos_BT], v_full[rows, pos_BT], pos_BT)
  np.testing.assert_array_equal(cache.lengths, prefix + T)
  q = _rand(rng, B, T, N, H)
  out = cache.attend(q.astype(dtype), pos_BT)
  assert out.shape == (B, T, N, H) and out.dtype == dtype
  L = prefix + T
  ref = _reference_rows(q, [k_full[b, :L[b]] for b in range(B)],
                        [v_full[b, :L[b]] for b in range(B)])
  assert rel_err(out, ref) < tol


def test_sm_scale_and_mqa(rng):
  B, S, H, N = 2, 7, 8, 5
  cache = DenseCache.init(B, S, 1, H, jnp.float32)
  k, v = _rand(rng, B, S, 1, H), _rand(rng, B, S, 1, H)
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  cache = cache.update(k, v, pos)
  q = _rand(rng, B, S, N, H)
  out = cache.attend(q, pos, sm_scale=0.37)
  ref = attention_reference(q, k, v, causal=True, sm_scale=0.37)
  assert rel_err(out, ref) < 1e-5


def test_rollback_then_overwrite_equals_clean(rng):
  """Speculative-decoding pattern: write γ tokens, keep a per-row prefix, write new tokens."""
  B, S, K, H, N = 2, 23, 2, 6, 4
  k, v = _rand(rng, B, S, K, H), _rand(rng, B, S, K, H)
  base = np.array([4, 9])
  cache = DenseCache.init(B, S, K, H, jnp.float32)
  pos0 = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (B, 9))
  cache = cache.update(k[:, :9], v[:, :9], pos0).rollback(jnp.asarray(base))
  gamma = 5
  pos_g = jnp.asarray(base[:, None] + np.arange(gamma)[None], jnp.int32)
  junk_k, junk_v = _rand(rng, B, gamma, K, H), _rand(rng, B, gamma, K, H)
  cache = cache.update(junk_k, junk_v, pos_g)
  accepted = np.array([2, 0])
  cache = cache.rollback(jnp.asarray(base + accepted))
  # Accepted junk stays part of the context: model it in the reference k/v.
  k_ref, v_ref = np.array(k), np.array(v)
  for b in range(B):
    k_ref[b, base[b]:base[b] + accepted[b]] = np.asarray(junk_k[b, :accepted[b]])
    v_ref[b, base[b]:base[b] + accepted[b]] = np.asarray(junk_v[b, :accepted[b]])
  start = base + accepted
  T = 3
  pos_n = jnp.asarray(start[:, None] + np.arange(T)[None], jnp.int32)
  rows = jnp.arange(B)[:, None]
  cache = cache.update(jnp.asarray(k_ref)[rows, pos_n], jnp.asarray(v_ref)[rows, pos_n], pos_n)
  q = _rand(rng, B, T, N, H)
  out = cache.attend(q, pos_n)
  L = start + T
  ref = _reference_rows(q, [jnp.asarray(k_ref[b, :L[b]]) for b in range(B)],
                        [jnp.asarray(v_ref[b, :L[b]]) for b in range(B)])
  assert rel_err(out, ref) < 1e-5


def test_query_blocks_match_single_block(rng, monkeypatch):
  """The blocked (lax.map) path for long T equals the one-block path."""
  B, S, K, H, N, T = 2, 19, 1, 4, 3, 13
  cache = DenseCache.init(B, S, K, H, jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  cache = cache.update(_rand(rng, B, T, K, H), _rand(rng, B, T, K, H), pos)
  q = _rand(rng, B, T, N, H)
  full = cache.attend(q, pos)
  monkeypatch.setattr(dense_mod, "_Q_BLOCK", 4)
  blocked = cache.attend(q, pos)
  assert rel_err(blocked, full) < 1e-6


def test_jit_update_attend_and_nbytes(rng):
  B, S, K, H = 2, 11, 2, 4
  cache = DenseCache.init(B, S, K, H, jnp.bfloat16)
  assert cache.nbytes() == 2 * B * S * K * H * 2 + B * 4
  assert cache.max_len == S

  @jax.jit
  def step(c, k, v, q, pos):
    c = c.update(k, v, pos)
    return c, c.attend(q, pos)

  pos = jnp.asarray([[3], [7]], jnp.int32)
  cache, out = step(cache, _rand(rng, B, 1, K, H), _rand(rng, B, 1, K, H),
                    _rand(rng, B, 1, 2 * K, H), pos)
  assert out.shape == (B, 1, 2 * K, H)
  np.testing.assert_array_equal(cache.lengths, [4, 8])


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="max_len"):
    DenseCache.init(1, 0, 1, 4, jnp.float32)
  cache = DenseCache.init(2, 8, 2, 4, jnp.float32)
  with pytest.raises(ValueError, match="k_BTKH"):
    cache.update(jnp.zeros((2, 1, 3, 4)), jnp.zeros((2, 1, 2, 4)), jnp.zeros((2, 1), jnp.int32))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    cache.attend(jnp.zeros((2, 1, 3, 4)), jnp.zeros((2, 1), jnp.int32))
  with pytest.raises(TypeError, match="cache"):
    as_cache_config("dense")
  with pytest.raises(TypeError, match="protocol"):
    CacheConfig(int)
  assert as_cache_config(DenseCache) == CacheConfig(DenseCache)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_pallas_decode_attend_equals_xla(rng, dtype, tol):
  """attend_impl="pallas" (split-K decode kernel; interpret mode on CPU) == the einsum path for
  one-token queries at ragged positions; multi-token queries keep the einsum path."""
  B, K, G, H = 3, 2, 3, 32
  S = int(rng.integers(40, 90)) | 1
  ref_c = DenseCache.init(B, S, K, H, dtype, attend_impl="xla")
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  ref_c = ref_c.update(k, v, jnp.broadcast_to(jnp.arange(S)[None], (B, S)))
  pal_c = ref_c.replace(attend_impl="pallas")
  q = jnp.asarray(rng.standard_normal((B, 1, K * G, H)), dtype)
  pos = jnp.asarray([[0], [S - 1], [int(rng.integers(1, S - 1))]], jnp.int32)
  out = jax.jit(lambda c, q, p: c.attend(q, p))(pal_c, q, pos)
  assert out.dtype == dtype and out.shape == q.shape
  assert rel_err(out, ref_c.attend(q, pos)) < tol
  q2 = jnp.asarray(rng.standard_normal((B, 2, K * G, H)), dtype)
  pos2 = jnp.concatenate([pos, pos], axis=1)
  np.testing.assert_array_equal(np.asarray(pal_c.attend(q2, pos2), np.float32),
                                np.asarray(ref_c.attend(q2, pos2), np.float32))
  with pytest.raises(ValueError, match="attend_impl"):
    DenseCache.init(B, S, K, H, dtype, attend_impl="cudnn")


@pytest.mark.usefixtures("float32_matmuls")  # the einsum path (TF32 on a GPU otherwise)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_update_and_attend_equals_update_then_attend(rng, dtype, tol):
  """`effjax.kv.update_and_attend` on a "pallas" dense cache (one kernel that writes the new
  key/value and attends; interpret mode on CPU) == `update` then `attend` on the einsum path, for
  one-token steps at ragged positions; multi-token steps take the two-call path."""
  B, K, G, H = 3, 2, 3, 32
  S = int(rng.integers(40, 90)) | 1
  ref_c = DenseCache.init(B, S, K, H, dtype, attend_impl="xla")
  fill = int(rng.integers(2, S - 2))
  k = jnp.asarray(rng.standard_normal((B, fill, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, fill, K, H)), dtype)
  ref_c = ref_c.update(k, v, jnp.broadcast_to(jnp.arange(fill)[None], (B, fill)))
  pal_c = ref_c.replace(attend_impl="pallas")
  for T in (1, 2):
    q = jnp.asarray(rng.standard_normal((B, T, K * G, H)), dtype)
    k1 = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
    v1 = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
    pos = jnp.asarray([[0], [fill], [fill - 1]], jnp.int32) + jnp.arange(T)[None]
    want_c, want = update_and_attend(ref_c, k1, v1, q, pos)
    got_c, got = jax.jit(update_and_attend)(pal_c, k1, v1, q, pos)
    jaxpr = str(jax.make_jaxpr(update_and_attend)(pal_c, k1, v1, q, pos))
    assert ("decode_attention_append" in jaxpr) == (T == 1)
    assert got.dtype == dtype and got.shape == q.shape
    assert rel_err(got, want) < tol, T
    np.testing.assert_array_equal(np.asarray(got_c.k_BSKH, np.float32),
                                  np.asarray(want_c.k_BSKH, np.float32))
    np.testing.assert_array_equal(np.asarray(got_c.v_BSKH, np.float32),
                                  np.asarray(want_c.v_BSKH, np.float32))
    np.testing.assert_array_equal(np.asarray(got_c.lengths), np.asarray(want_c.lengths))
    # the generic helper on the einsum cache is exactly update then attend
    two = ref_c.update(k1, v1, pos)
    np.testing.assert_array_equal(np.asarray(want, np.float32),
                                  np.asarray(two.attend(q, pos), np.float32))
