"""The decoder-only language model (pre-norm Llama-style transformer).

tokens -> embedding -> num_layers × [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> LM head.
The head is tied to the embedding (`logits = h · Eᵀ`) or a separate `[d_model, vocab]` kernel.
Pure flax.linen: `init` / `apply` only. Logits are float32.

`Transformer.__call__(tokens_BT, *, positions_BT=None, segment_ids_BT=None, caches=None)`:
  * training / scoring: `caches=None`, returns `logits_BTV`; `mask_BTS` (boolean
    `[B or 1, T, T]`) replaces the causal mask (block diffusion, DFlash drafters);
  * inference: `caches` is a sequence of per-layer KV caches (the `effjax.kv` protocol); returns
    `(logits_BTV, new_caches)`.
The residual stream after every block is sown as `intermediates/hidden_<i>` (apply with
`mutable=["intermediates"]` to read it; DFlash uses this), and the methods `embed` and `logits`
expose the embedding and the LM head for drafters that share them.

Switches (all off by default, see `effjax.config.ModelConfig`): `linear` (projection class),
`mlp_type` (SwiGLU / gated squared ReLU), `norm_type` (RMSNorm / single-scale RMSNorm for every
norm), `sub_ln` (2B4T sub-norms) and `emb_proj` (OSP's d×d projections after the embedding and
before the head, params `emb_proj_in/kernel`, `emb_proj_out/kernel`; `effjax.layers.embed`).

Initialisation (a choice; the Llama papers leave it open): projections are truncated normal with
variance 1/fan_in; the embedding is N(0, 1) when untied and N(0, 1/d_model) when tied so the initial
logits have unit variance.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.layers.attention import Attention
from effjax.layers.embed import EmbProj
from effjax.layers.linear import project
from effjax.layers.mlp import make_mlp
from effjax.layers.norms import make_norm

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """One pre-norm transformer block: attention then MLP, each with a residual.

  The residual stream is carried as a pair `(x, delta)` whose sum is the stream, so every residual
  add happens inside the norm that follows it (`norm(x, residual=delta)`: one fused kernel when
  decoding on a GPU, `effjax.layers.norms`). `delta_BTD` is the previous block's MLP output (None
  for the first block); the block returns `(x + delta + attn_out, mlp_out, cache)`, the same sums
  in the same order as `x + attn(norm(x)); x + mlp(norm(x))`.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT=None, cache=None, mask_BTS=None,
               delta_BTD=None):
    c = self.cfg
    attn_norm = make_norm(c, "attn_norm")
    if delta_BTD is None:
      a_BTD = attn_norm(x_BTD)
    else:
      x_BTD, a_BTD = attn_norm(x_BTD, residual=delta_BTD)
    h_BTD, cache = Attention(c, name="attn")(a_BTD, positions_BT, segment_ids_BT, cache, mask_BTS)
    x_BTD, m_BTD = make_norm(c, "mlp_norm")(x_BTD, residual=h_BTD)
    return x_BTD, make_mlp(c, "mlp")(m_BTD), cache


class Transformer(nn.Module):
  """Decoder-only LM (see module docstring)."""
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    std = c.d_model ** -0.5 if c.tie_embeddings else 1.0
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=std),
                                                  ("vocab", "embed")),
        (c.vocab_size, c.d_model), c.weight_dtype)
    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat])
    self.blocks = [block(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.final_norm = make_norm(c)
    if c.emb_proj:
      self.emb_proj_in = EmbProj(c.d_model, c.compute_dtype, c.weight_dtype)
      self.emb_proj_out = EmbProj(c.d_model, c.compute_dtype, c.weight_dtype)
    if not c.tie_embeddings:
      self.head = self.param(
          "head", nn.with_logical_partitioning(
              nn.initializers.truncated_normal(stddev=c.d_model ** -0.5), ("embed", "vocab")),
          (c.d_model, c.vocab_size), c.weight_dtype)

  def embed(self, tokens_BT):
    """Token embedding, `[B, T] int -> [B, T, D]` in the compute dtype."""
    x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(self.cfg.compute_dtype)
    if self.cfg.emb_proj:
      x_BTD = self.emb_proj_in(x_BTD)
    return x_BTD

  def logits(self, h_BTD):
    """Final norm + LM head, `[B, T, D] -> [B, T, V]` float32."""
    return self._head(self.final_norm(h_BTD))

  def _head(self, h_BTD):
    """LM head (with OSP's output projection) of the final-normed stream, float32 logits."""
    c = self.cfg
    if c.emb_proj:
      h_BTD = self.emb_proj_out(h_BTD)
    if c.tie_embeddings:  # the [V, D] embedding as it is (no transposed copy)
      return project("BTD,VD->BTV", h_BTD, self.embedding.astype(c.compute_dtype),
                     matvec_impl=c.matvec_impl, out_dtype=jnp.float32)
    return project("BTD,DV->BTV", h_BTD, self.head.astype(c.compute_dtype),
                   matvec_impl=c.matvec_impl, out_dtype=jnp.float32)

  def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None,
               caches: Optional[Sequence] = None, mask_BTS=None):
    c = self.cfg
    if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise TypeError(f"tokens must be an integer array, got dtype {tokens_BT.dtype}")
    if tokens_BT.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens_BT.shape}")
    B, T = tokens_BT.shape
    if T > c.max_seq_len:
      raise ValueError(f"sequence length {T} exceeds model.max_seq_len={c.max_seq_len}")
    if caches is not None and len(caches) != c.num_layers:
      raise ValueError(f"caches: expected {c.num_layers} per-layer caches, got {len(caches)}")
    if caches is not None and segment_ids_BT is not None:
      raise ValueError("segment_ids are for packed training sequences; not supported with caches")
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_BTD = self.embed(tokens_BT)
    delta_BTD = None
    new_caches = []
    for i, block in enumerate(self.blocks):
      cache = None if caches is None else caches[i]
      x_BTD, delta_BTD, cache = block(x_BTD, positions_BT, segment_ids_BT, cache, mask_BTS,
                                      delta_BTD)
      new_caches.append(cache)
      if self.is_mutable_collection("intermediates"):
        self.sow("intermediates", f"hidden_{i}", x_BTD + delta_BTD)
    logits_BTV = self._head(self.final_norm(x_BTD, residual=delta_BTD)[1])
    if caches is None:
      return logits_BTV
    return logits_BTV, new_caches
