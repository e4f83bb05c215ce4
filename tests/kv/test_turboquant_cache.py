"""TurboQuantCache: dense result when the window covers everything / 8 bits; scores from codes equal
attention over the dequantized keys (every option); error shrinks with bits; ragged positions;
bytes; bad input; generate end to end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig
from effjax.decode.generate import generate
from effjax.kv import CacheConfig, DenseCache
from effjax.kv.turboquant import TurboQuantCache, turboquant_cache_config
from effjax.models.transformer import Transformer
from tests.conftest import rel_err

pytestmark = pytest.mark.usefixtures("float32_matmuls")  # no TF32 on GPU

INV_FREQ = tuple(float(f) for f in 1.0 / (100.0 ** (np.arange(0, 32, 2) / 32)))


def _data(rng, B, S, K, G, H):
  k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  k += 2.0 * rng.standard_normal((1, 1, K, H)).astype(np.float32)  # a shared key offset
  v = rng.standard_normal((B, S, K, H)).astype(np.float32)
  q = rng.standard_normal((B, S, K * G, H)).astype(np.float32)
  return jnp.asarray(k), jnp.asarray(v), jnp.asarray(q)


def _fill_and_attend(cls, opts, k, v, q, max_len, P, steps=2):
  """Prefill P tokens, then `steps` single-token steps with rows at ragged positions; outputs + cache."""
  B, S = k.shape[:2]

  @jax.jit
  def run(k, v, q):
    c = cls.init(B, max_len, k.shape[2], k.shape[3], jnp.float32, **opts)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    c = c.update(k[:, :P], v[:, :P], pos)
    outs = [c.attend(q[:, :P], pos)]
    # ragged: row b continues at position P - b (it overwrites its own last b positions)
    p = jnp.asarray(P - np.arange(B), jnp.int32)[:, None]
    c = c.rollback(p[:, 0])
    for _ in range(steps):
      kk = jnp.take_along_axis(k, p[:, :, None, None], axis=1)
      vv = jnp.take_along_axis(v, p[:, :, None, None], axis=1)
      qq = jnp.take_along_axis(q, p[:, :, None, None], axis=1)
      c = c.update(kk, vv, p)
      outs.append(c.attend(qq, p))
      p = p + 1
    return outs, c

  return run(k, v, q)


def test_window_covering_everything_equals_dense(rng):
  B, K, G, H, S = 2, 2, 2, 32, 21
  k, v, q = _data(rng, B, S, K, G, H)
  ref, _ = _fill_and_attend(DenseCache, {}, k, v, q, 40, 17)
  out, _ = _fill_and_attend(TurboQuantCache, dict(bits=2.5, window=64), k, v, q, 40, 17)
  for o, r in zip(out, ref):
    assert rel_err(o, r) < 1e-5


def test_eight_bit_close_to_dense_and_error_shrinks_with_bits(rng):
  B, K, G, H, S = 2, 2, 3, 64, 70
  k, v, q = _data(rng, B, S, K, G, H)
  ref, _ = _fill_and_attend(DenseCache, {}, k, v, q, 80, 66)
  errs = {}
  for bits in (2.5, 3.5, 8):
    out, _ = _fill_and_attend(TurboQuantCache, dict(bits=bits), k, v, q, 80, 66)
    errs[bits] = rel_err(jnp.concatenate(out, 1), jnp.concatenate(ref, 1))
  print(errs)
  # Lloyd-Max MSE falls ~4x per bit: 8 bits is ~2^-4.5 of the 3.5-bit error and far below 1e-1.
  assert errs[2.5] > errs[3.5] > 8 * errs[8]
  assert errs[8] < 0.03


@pytest.mark.parametrize("opts", [
    dict(bits=4, key_kind="prod", window=5),
    dict(bits=2.5, key_mean="prefill", window=8),
    dict(bits=3.5, pre_rope=True, rope_inv_freq=INV_FREQ, key_mean="prefill", window=3),
])
def test_scores_from_codes_equal_attention_over_dequantized_keys(rng, opts):
  """The codes path (rotated query, norms, QJL term, mean add-back, window) == dense attention over
  the cache's own dequantized keys/values, with the window's positions taken in full precision."""
  B, K, G, H, S = 2, 2, 2, 32, 45
  k, v, q = _data(rng, B, S, K, G, H)
  P = 41
  out, c = _fill_and_attend(TurboQuantCache, opts, k, v, q, 64, P, steps=1)
  W = c.window
  kd, vd = np.asarray(c.dequantized_keys()), np.asarray(c.dequantized_values())
  # The last single-token step: row b at position p_b = P - b + 1; window positions from the raw
  # inputs (the ring holds them), older positions from the codes.
  p = P - np.arange(B)
  kk, vv = kd.copy(), vd.copy()
  for b in range(B):
    for s in range(max(0, p[b] - W + 1), p[b] + 1):
      kk[b, s], vv[b, s] = k[b, s], v[b, s]
  dense = DenseCache(k_BSKH=jnp.asarray(kk), v_BSKH=jnp.asarray(vv),
                     lengths=jnp.asarray(p + 1, jnp.int32))
  qq = jnp.take_along_axis(q, jnp.asarray(p)[:, None, None, None], axis=1)
  ref = dense.attend(qq, jnp.asarray(p, jnp.int32)[:, None])
  assert rel_err(out[-1], ref) < 1e-4


def test_rollback_then_rewrite_equals_fresh_cache(rng):
  B, K, G, H, S = 2, 1, 2, 32, 30
  k, v, q = _data(rng, B, S, K, G, H)
  junk = jnp.asarray(rng.standard_normal(k.shape).astype(np.float32))
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))

  @jax.jit
  def run(k, v, junk, q):
    fresh = TurboQuantCache.init(B, 64, K, H, jnp.float32, bits=3).update(k, v, pos)
    c = TurboQuantCache.init(B, 64, K, H, jnp.float32, bits=3).update(k[:, :20], v[:, :20],
                                                                      pos[:, :20])
    c = c.update(junk[:, 20:], junk[:, 20:], pos[:, 20:]).rollback(jnp.full((B,), 20, jnp.int32))
    c = c.update(k[:, 20:], v[:, 20:], pos[:, 20:])
    return fresh.attend(q, pos), c.attend(q, pos)

  a, b = run(k, v, junk, q)
  assert rel_err(b, a) < 1e-6


def test_bytes_match_theory():
  B, L, K, H = 3, 100, 2, 64
  for bits, key_kind, per_channel_bits in ((4, "mse", 4 + 4), (3, "mse", 4 + 4), (2.5, "mse", None),
                                           (4, "prod", None)):
    c = TurboQuantCache.init(B, L, K, H, jnp.bfloat16, bits=bits, key_kind=key_kind,
                             value_bits=4, window=8)
    if bits == 2.5:  # 16 outlier channels at 3 bits (stored in 4-bit fields) + 48 at 2; 2 norms
      k_bytes = (16 * 4 + 48 * 2) / 8 + 2 * 2
    elif key_kind == "prod":  # 3-bit mse stage (4-bit fields) + 64 sign bits + norm + residual norm
      k_bytes = 64 * 4 / 8 + 64 / 8 + 2 + 2
    else:
      k_bytes = H * 4 / 8 + 2  # 3-bit codes occupy 4-bit fields
    v_bytes = H * 4 / 8 + 2
    assert c.bytes_per_token() == pytest.approx(K * (k_bytes + v_bytes))
    S64 = 128
    fixed = sum(x.nbytes for x in jax.tree_util.tree_leaves(c)) - c.bytes_per_token() * B * S64
    assert c.nbytes() == pytest.approx(c.bytes_per_token() * B * S64 + fixed)
    # the fixed part: ring (bf16), ring positions, mean, flags, lengths, rotations/codebooks
    ring = 2 * B * 8 * K * H * 2 + B * 8 * 4 + B * K * H * 4 + B + B * 4
    assert fixed >= ring


def test_bad_input_raises():
  with pytest.raises(ValueError, match="bits"):
    TurboQuantCache.init(1, 8, 1, 32, bits=5)
  with pytest.raises(ValueError, match="bits"):
    TurboQuantCache.init(1, 8, 1, 32, bits=2.7)
  with pytest.raises(ValueError, match="key_kind"):
    TurboQuantCache.init(1, 8, 1, 32, key_kind="qjl")
  with pytest.raises(ValueError, match="rope_inv_freq"):
    TurboQuantCache.init(1, 8, 1, 32, pre_rope=True)
  with pytest.raises(ValueError, match="window"):
    TurboQuantCache.init(1, 8, 1, 32, window=-1)
  c = TurboQuantCache.init(1, 8, 1, 32, jnp.float32, bits=4)
  k = np.ones((1, 2, 1, 32), np.float32)
  k[0, 1, 0, 3] = np.nan
  with pytest.raises(ValueError, match="k_BTKH.*non-finite"):
    c.update(jnp.asarray(k), jnp.ones((1, 2, 1, 32)), jnp.arange(2, dtype=jnp.int32)[None])
  with pytest.raises(ValueError, match="v_BTKH"):
    c.update(jnp.ones((1, 2, 1, 32)), jnp.ones((1, 2, 1, 16)), jnp.zeros((1, 2), jnp.int32))


def test_generate_end_to_end(rng):
  cfg = ModelConfig(vocab_size=100, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=96, max_seq_len=64)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(int(rng.integers(1 << 30))),
                               jnp.zeros((1, 4), jnp.int32)))
  prompts = [list(rng.integers(0, 100, size=n)) for n in (5, 12)]
  dense = generate(model, params, prompts, max_new_tokens=6).tokens
  full_window = generate(model, params, prompts, max_new_tokens=6, cache=CacheConfig(
      TurboQuantCache, options=(("bits", 2.5), ("window", 64)))).tokens
  np.testing.assert_array_equal(np.asarray(full_window), np.asarray(dense))
  out = generate(model, params, prompts, max_new_tokens=6, cache=turboquant_cache_config(
      cfg, bits=3.5, key_mean="prefill", pre_rope=True, window=4))
  assert out.tokens.shape == (2, 6) and np.all(np.asarray(out.lengths) == 6)
  assert np.all((np.asarray(out.tokens) >= 0) & (np.asarray(out.tokens) < 100))


_KERNEL_IMPL = "kernel" if jax.default_backend() == "gpu" else "interpret"


def test_kernel_path_matches_jnp(rng):
  """Single-token decode through the Pallas kernel == the jnp codes path (the real Triton kernel
  on an NVIDIA GPU, the Pallas interpreter elsewhere)."""
  B, K, G, H, S = 2, 2, 2, 64, 70
  k, v, q = _data(rng, B, S, K, G, H)
  opts = dict(bits=4, window=8, key_mean="prefill")
  out_j, _ = _fill_and_attend(TurboQuantCache, dict(opts, impl="jnp"), k, v, q, 128, 66)
  out_k, _ = _fill_and_attend(TurboQuantCache, dict(opts, impl=_KERNEL_IMPL), k, v, q, 128, 66)
  for a, b in zip(out_k[1:], out_j[1:]):
    assert rel_err(a, b) < 2e-2  # the kernel rotates the query in bf16


@pytest.mark.parametrize("bits", [4, 2.5])
def test_update_stores_the_quantizers_reconstruction(rng, bits):
  """Prefill (T > 1) and single-token (T = 1) writes -- the fused one-matmul encode and the
  single-pass packed write -- store exactly what TurboQuant.encode / decode gives."""
  from effjax.quant.turboquant import TurboQuant
  B, K, H, P = 2, 3, 64, 37
  x = jnp.asarray(rng.standard_normal((B, P + 2, K, H)).astype(np.float32) * 3)
  seed = int(rng.integers(1 << 20))
  c = TurboQuantCache.init(B, 100, K, H, jnp.float32, bits=bits, seed=seed)
  update = jax.jit(lambda c, k, v, p: c.update(k, v, p))  # one compile per T (eager is slower)
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  c = update(c, x[:, :P], x[:, :P], pos)
  for t in (P, P + 1):  # ragged single-token steps: row 1 skips position P
    p = jnp.asarray([[t], [P + 1]], jnp.int32)
    c = update(c, x[:, t:t + 1], x[:, t:t + 1], p)
  tq = TurboQuant(H, bits, seed=seed + 1)  # the value quantizer
  ref = np.asarray(tq.decode(tq.encode(x)))
  got = np.asarray(c.dequantized_values())
  np.testing.assert_allclose(got[0, :P + 2], ref[0], rtol=2e-3, atol=2e-3 * np.abs(ref).max())
  np.testing.assert_allclose(got[1, :P], ref[1, :P], rtol=2e-3, atol=2e-3 * np.abs(ref).max())
  np.testing.assert_allclose(got[1, P + 1], ref[1, P + 1], rtol=2e-3, atol=2e-3 * np.abs(ref).max())
  assert np.all(got[1, P] == 0) and np.all(got[:, P + 2:] == 0)
