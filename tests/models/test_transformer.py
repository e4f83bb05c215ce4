"""Model properties: causality (through logits and gradients), GQA == MHA with repeated KV heads,
jit == no-jit, input errors."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ConfigError, ModelConfig
from effjax.models import Transformer
from tests.conftest import rel_err

CFG = ModelConfig(vocab_size=260, d_model=48, num_layers=2, num_heads=6, num_kv_heads=2,
                  mlp_dim=96, max_seq_len=64)


def _init(cfg, T=8, seed=0):
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, T), jnp.int32)))
  return model, params


def test_causality_logits_and_grads(rng):
  model, params = _init(CFG)
  T = 19
  toks = jnp.asarray(rng.integers(0, 260, (2, T)), jnp.int32)
  t = int(rng.integers(1, T))
  toks2 = toks.at[:, t].set((toks[:, t] + 1) % 260)
  apply = jax.jit(model.apply)
  l1, l2 = apply(params, toks), apply(params, toks2)
  np.testing.assert_array_equal(np.asarray(l1[:, :t]), np.asarray(l2[:, :t]))
  assert not np.allclose(l1[:, t:], l2[:, t:])
  # gradient of an early position's loss w.r.t. the embeddings of later positions is zero
  def loss(x_BTD, pos):
    logits = model.apply(params, x_BTD, method=lambda m, x: m.logits(_blocks(m, x)))
    return logits[:, pos].sum()
  x = model.apply(params, toks, method=Transformer.embed)
  g = jax.jit(jax.grad(loss), static_argnums=1)(x, t - 1)
  assert np.all(np.asarray(g[:, t:]) == 0) and np.any(np.asarray(g[:, :t]) != 0)


def _blocks(m, x_BTD):
  B, T, _ = x_BTD.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  delta_BTD = None
  for blk in m.blocks:
    x_BTD, delta_BTD, _ = blk(x_BTD, pos, delta_BTD=delta_BTD)
  return x_BTD + delta_BTD


def test_gqa_equals_mha_with_repeated_kv(rng):
  model, params = _init(CFG)
  G = CFG.num_heads // CFG.num_kv_heads
  mha_cfg = dataclasses.replace(CFG, num_kv_heads=CFG.num_heads)
  mha = Transformer(mha_cfg)
  mha_params = jax.tree_util.tree_map(lambda x: x, params)
  for i in range(CFG.num_layers):
    attn = mha_params["params"][f"layers_{i}"]["attn"]
    for name in ("k_proj", "v_proj"):
      attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], G, axis=1)}
  toks = jnp.asarray(rng.integers(0, 260, (3, 17)), jnp.int32)
  assert rel_err(mha.apply(mha_params, toks), model.apply(params, toks)) < 1e-5


def test_jit_equals_nojit_and_bf16_close(rng):
  model, params = _init(CFG)
  toks = jnp.asarray(rng.integers(0, 260, (2, 13)), jnp.int32)
  eager = model.apply(params, toks)
  jitted = jax.jit(model.apply)(params, toks)
  assert rel_err(jitted, eager) < 1e-5
  bf16 = Transformer(dataclasses.replace(CFG, dtype="bfloat16"))
  out = bf16.apply(params, toks)
  assert out.dtype == jnp.float32 and rel_err(out, eager) < 3e-2


def test_untied_head_qk_norm_bias_variants(rng):
  cfg = dataclasses.replace(CFG, tie_embeddings=False, qk_norm=True, attention_bias=True,
                            num_kv_heads=1)
  model, params = _init(cfg)
  p = params["params"]
  assert p["head"].shape == (48, 260)
  assert p["layers_0"]["attn"]["q_norm"]["scale"].shape == (8,)
  assert p["layers_0"]["attn"]["q_proj"]["bias"].shape == (6, 8)
  toks = jnp.asarray(rng.integers(0, 260, (2, 9)), jnp.int32)
  assert np.all(np.isfinite(jax.jit(model.apply)(params, toks)))


def test_bad_inputs():
  model, params = _init(CFG)
  with pytest.raises(TypeError, match="integer"):
    model.apply(params, jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="max_seq_len"):
    model.apply(params, jnp.zeros((1, 65), jnp.int32))


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_heads=6, num_kv_heads=4), "model.num_kv_heads"),
    (dict(d_model=50, num_heads=6, head_dim=0), "model.num_heads"),
    (dict(attention_impl="flash"), "model.attention_impl"),
    (dict(dtype="float64"), "model.dtype"),
    (dict(num_layers=0), "model.num_layers"),
])
def test_bad_model_config(kwargs, field):
  with pytest.raises(ConfigError, match=field):
    dataclasses.replace(CFG, **kwargs)
