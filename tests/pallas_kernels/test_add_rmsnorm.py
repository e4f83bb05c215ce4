"""Fused residual add + RMSNorm (pallas_kernels/add_rmsnorm.py) vs its float32 reference, and its
use by the model's norms (effjax.layers.norms, `ModelConfig.norm_impl`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ConfigError, ModelConfig
from effjax.layers.norms import RMSNorm
from effjax.models.transformer import Transformer
from pallas_kernels.add_rmsnorm import add_rms_norm, add_rms_norm_reference
from tests.conftest import rel_err

INTERPRET = jax.default_backend() != "gpu"


@pytest.mark.parametrize("rows,dim,dtype,per_channel", [(1, 2048, jnp.bfloat16, True),
                                                         (5, 96, jnp.bfloat16, False),
                                                         (3, 133, jnp.float32, True)])
def test_matches_reference(rng, rows, dim, dtype, per_channel):
  x = jnp.asarray(rng.standard_normal((rows, dim)) * 3, dtype)
  r = jnp.asarray(rng.standard_normal((rows, dim)), dtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, (dim,) if per_channel else ()), jnp.float32)
  s, y = add_rms_norm(x, r, scale, eps=1e-5, interpret=INTERPRET)
  assert s.dtype == dtype and y.dtype == dtype and s.shape == y.shape == (rows, dim)
  # float32 reference of the same (rounded) stream
  s_ref = np.asarray(x, np.float64) + np.asarray(r, np.float64)
  assert rel_err(s, s_ref) < (4e-3 if dtype == jnp.bfloat16 else 1e-7)
  s64 = np.asarray(s, np.float64)
  y_ref = s64 / np.sqrt(np.mean(s64 ** 2, axis=-1, keepdims=True) + 1e-5) * np.asarray(scale)
  assert rel_err(y, y_ref) < (4e-3 if dtype == jnp.bfloat16 else 1e-6)
  s2, y2 = add_rms_norm_reference(x, r, scale, eps=1e-5, out_dtype=dtype)
  assert np.array_equal(np.asarray(s, np.float32), np.asarray(s2, np.float32))


def test_gradient_is_the_references(rng):
  x = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
  g = jnp.asarray(rng.uniform(0.5, 1.5, (40,)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)

  def loss(fn):
    def f(x, r, g):
      s, y = fn(x, r, g)
      return jnp.sum(s * w[0]) + jnp.sum(jnp.sin(y) * w[1])
    return f

  kern = loss(lambda x, r, g: add_rms_norm(x, r, g, eps=1e-6, interpret=INTERPRET))
  ref = loss(lambda x, r, g: add_rms_norm_reference(x, r, g, eps=1e-6, out_dtype=jnp.float32))
  for a, b in zip(jax.grad(kern, argnums=(0, 1, 2))(x, r, g),
                  jax.grad(ref, argnums=(0, 1, 2))(x, r, g)):
    assert rel_err(a, b) < 1e-5


def test_errors_name_the_argument():
  x = jnp.ones((2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="r_RD"):
    add_rms_norm(x, jnp.ones((2, 7), jnp.bfloat16), jnp.ones((8,)), eps=1e-6)
  with pytest.raises(ValueError, match="scale"):
    add_rms_norm(x, x, jnp.ones((4,)), eps=1e-6)
  with pytest.raises(ValueError, match="norm impl"):
    RMSNorm(impl="triton").init(jax.random.PRNGKey(0), x, residual=x)
  with pytest.raises(ConfigError, match="model.norm_impl"):
    ModelConfig(norm_impl="fused")


@pytest.mark.parametrize("norm_type", ["rmsnorm", "ssnorm"])
def test_model_with_fused_norms_equals_xla(rng, norm_type):
  """Every block's residual add + norm through the kernel: same logits, and the kernel is used."""
  cfg = ModelConfig(d_model=64, num_heads=2, num_kv_heads=1, mlp_dim=96, num_layers=2,
                    dtype="bfloat16", param_dtype="bfloat16", norm_type=norm_type, norm_impl="xla")
  toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
  params = Transformer(cfg).init(jax.random.PRNGKey(int(rng.integers(1 << 30))), toks)
  fused = Transformer(dataclasses.replace(cfg, norm_impl="pallas"))
  want = Transformer(cfg).apply(params, toks)
  got = fused.apply(params, toks)
  # bf16 stream: the sums are bit-equal; the norms' float32 summation order may differ
  assert rel_err(got, want) < 1e-2
  jaxpr = str(jax.make_jaxpr(lambda p, t: fused.apply(p, t))(params, toks))
  # the mlp norms, the attention norms of blocks 2.., the final norm
  assert jaxpr.count("name=add_rms_norm") == 2 * cfg.num_layers
