"""Packed ternary layer from int32 words (what the GPU kernels read) equals the uint8 export."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effjax.config import ModelConfig
from effjax.layers.packed_ternary import PackedTernaryEinsum, export_packed_ternary
from effjax.models.transformer import Transformer
from effjax.quant.ternary import as_words, export_ternary
from tests.conftest import rel_err

TINY = dict(vocab_size=259, d_model=36, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=56,
            max_seq_len=16, linear="bitlinear", mlp_type="relu2", sub_ln=True)


def test_words_export_matches_bytes_export(rng):
  cfg = ModelConfig(**TINY)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
  params = nn.unbox(Transformer(cfg).init(
      jax.random.PRNGKey(int(rng.integers(0, 2**31 - 1))), tokens))
  packed_b, pcfg = export_packed_ternary(params, cfg)
  packed_w, pcfg_w = export_packed_ternary(params, cfg, words=True)
  assert pcfg_w == pcfg
  q_b = packed_b["params"]["layers_0"]["attn"]["q_proj"]["packed"]
  q_w = packed_w["params"]["layers_0"]["attn"]["q_proj"]["packed"]
  assert q_w.dtype == jnp.int32 and np.array_equal(np.asarray(q_w), np.asarray(q_b).view("<i4"))
  model = Transformer(pcfg)
  lb = jax.jit(model.apply)(packed_b, tokens)
  lw = jax.jit(model.apply)(packed_w, tokens)
  assert rel_err(lw, lb) < 1e-6


def test_layer_reads_words_through_gemv(rng):
  D, H = int(rng.integers(20, 60)), int(rng.integers(5, 30))
  w = jnp.asarray(rng.standard_normal((D, H)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((1, 2, D)), jnp.float32)
  p = export_ternary(w)
  layer = PackedTernaryEinsum((D, H), "BTD,DH->BTH", impl="gemv")
  out_b = layer.apply({"params": {"packed": p.packed, "scale": p.scale}}, x)
  pw = as_words(p)
  out_w = layer.apply({"params": {"packed": pw.packed, "scale": pw.scale}}, x)
  ref = PackedTernaryEinsum((D, H), "BTD,DH->BTH", impl="reference").apply(
      {"params": {"packed": p.packed, "scale": p.scale}}, x)
  assert rel_err(out_w, ref) < 1e-5 and rel_err(out_b, ref) < 1e-5
