"""KIVICache: dense result when the residual covers everything; key groups sealed from ragged
updates equal the offline KIVI quantizer; error shrinks with bits; bytes; bad input; generate."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig
from effjax.decode.generate import generate
from effjax.kv import CacheConfig, DenseCache
from effjax.kv.kivi import KIVICache
from effjax.models.transformer import Transformer
from effjax.quant import kivi as kivi_lib
from tests.conftest import rel_err

pytestmark = pytest.mark.usefixtures("float32_matmuls")  # no TF32 on GPU


def _data(rng, B, S, K, G, H):
  k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  v = rng.standard_normal((B, S, K, H)).astype(np.float32)
  q = rng.standard_normal((B, S, K * G, H)).astype(np.float32)
  return jnp.asarray(k), jnp.asarray(v), jnp.asarray(q)


def _run(cls, opts, k, v, q, max_len, chunks):
  """Writes the sequence in `chunks` (ragged per row: row b is one token behind row 0) and attends
  each chunk's queries; returns (list of outputs, final cache)."""
  B = k.shape[0]

  @jax.jit
  def run(k, v, q):
    c = cls.init(B, max_len, k.shape[2], k.shape[3], jnp.float32, **opts)
    outs, start = [], 0
    for i, n in enumerate(chunks):
      lag = 0 if i == 0 else jnp.arange(B, dtype=jnp.int32)[:, None]
      pos = jnp.broadcast_to((start + jnp.arange(n, dtype=jnp.int32))[None, :] - lag, (B, n))
      take = lambda x: jnp.take_along_axis(x, pos[:, :, None, None], axis=1)
      c = c.update(take(k), take(v), pos)
      outs.append(c.attend(take(q), pos))
      if i == 0:  # row b keeps n - b tokens of the prefill (ragged, as generate's rollback)
        c = c.rollback(n - jnp.arange(B, dtype=jnp.int32))
      start += n
    return outs, c

  return run(k, v, q)


def test_residual_covering_everything_equals_dense(rng):
  B, K, G, H, S = 2, 2, 2, 32, 50
  k, v, q = _data(rng, B, S, K, G, H)
  chunks = (9, 1, 1, 30, 1)
  ref, _ = _run(DenseCache, {}, k, v, q, 64, chunks)
  out, _ = _run(KIVICache, dict(bits=2, residual=64), k, v, q, 64, chunks)
  for o, r in zip(out, ref):
    assert rel_err(o, r) < 1e-5


def test_sealed_key_groups_equal_offline_quantizer_and_error_shrinks(rng):
  K, G, H, S = 2, 2, 64, 100
  k, v, q = _data(rng, 1, S, K, G, H)
  chunks = (13, 1, 50, 29)  # 93 tokens: groups 0, 1 sealed across ragged updates
  ref, _ = _run(DenseCache, {}, k, v, q, 128, chunks)
  errs = {}
  for bits in (2, 4):
    out, c = _run(KIVICache, dict(bits=bits, residual=32), k, v, q, 128, chunks)
    kd, vd = c.dequantized()
    ko = kivi_lib.dequantize(kivi_lib.quantize_keys(k[:, :64], bits))
    vo = kivi_lib.dequantize(kivi_lib.quantize_values(v[:, :93], bits))
    assert rel_err(kd[:, :64], ko) < 1e-6
    assert rel_err(vd[:, :93], vo) < 1e-6
    errs[bits] = rel_err(jnp.concatenate(out, 1), jnp.concatenate(ref, 1))
  print(errs)
  assert errs[4] < 0.5 * errs[2]
  assert errs[4] < 0.1


def test_bytes_match_theory():
  B, L, K, H, R = 2, 100, 2, 64, 32
  for bits in (2, 4):
    c = KIVICache.init(B, L, K, H, jnp.bfloat16, bits=bits, residual=R)
    # codes (K and V) + key scale/zero per 32 tokens per channel + value scale/zero per token per
    # 32 channels, float16
    per_tok = K * (2 * H * bits / 8 + 2 * 2 * H / 32 + 2 * 2 * H / 32)
    assert c.bytes_per_token() == pytest.approx(per_tok)
    ring = 2 * B * R * K * H * 2 + B * R * 4 + B * 4
    assert c.nbytes() == pytest.approx(per_tok * B * 128 + ring)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="bits"):
    KIVICache.init(1, 8, 1, 32, bits=3)
  with pytest.raises(ValueError, match="residual"):
    KIVICache.init(1, 8, 1, 32, residual=16)
  with pytest.raises(ValueError, match="head_dim"):
    KIVICache.init(1, 8, 1, 48)
  c = KIVICache.init(1, 8, 1, 32, jnp.float32)
  k = np.ones((1, 2, 1, 32), np.float32)
  k[0, 0, 0, 0] = np.inf
  with pytest.raises(ValueError, match="k_BTKH.*non-finite"):
    c.update(jnp.asarray(k), jnp.ones((1, 2, 1, 32)), jnp.arange(2, dtype=jnp.int32)[None])


def test_generate_end_to_end(rng):
  cfg = ModelConfig(vocab_size=100, d_model=64, num_layers=2, num_heads=2, num_kv_heads=1,
                    mlp_dim=96, max_seq_len=96)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(int(rng.integers(1 << 30))),
                               jnp.zeros((1, 4), jnp.int32)))
  prompts = [list(rng.integers(0, 100, size=n)) for n in (7, 40)]
  dense = generate(model, params, prompts, max_new_tokens=5).tokens
  full = generate(model, params, prompts, max_new_tokens=5, cache=CacheConfig(
      KIVICache, options=(("bits", 2), ("residual", 96)))).tokens
  np.testing.assert_array_equal(np.asarray(full), np.asarray(dense))
  out = generate(model, params, prompts, max_new_tokens=5, cache=CacheConfig(
      KIVICache, options=(("bits", 2), ("residual", 32))))
  assert out.tokens.shape == (2, 5) and np.all(np.asarray(out.lengths) == 5)


_KERNEL_IMPL = "kernel" if jax.default_backend() == "gpu" else "interpret"


def test_kernel_path_matches_jnp(rng):
  """Single-token decode through the Pallas kernel == the jnp codes path (the real Triton kernel
  on an NVIDIA GPU, the Pallas interpreter elsewhere)."""
  B, K, G, H, S = 2, 2, 2, 64, 80
  k, v, q = _data(rng, B, S, K, G, H)
  chunks = (70, 1, 1)
  out_j, _ = _run(KIVICache, dict(bits=4, residual=32, impl="jnp"), k, v, q, 128, chunks)
  out_k, _ = _run(KIVICache, dict(bits=4, residual=32, impl=_KERNEL_IMPL), k, v, q, 128, chunks)
  for a, b in zip(out_k[1:], out_j[1:]):
    assert rel_err(a, b) < 2e-2  # the kernel's dots run in bf16
