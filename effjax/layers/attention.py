"""Multi-head attention with grouped KV heads (MHA / GQA / MQA).

GQA: Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints", arXiv 2305.13245 (`num_kv_heads` groups; `num_kv_heads = 1` is MQA, Shazeer 2019,
arXiv 1911.02150). Queries, keys and values are projected with einsums, rotated by RoPE, optionally
RMS-normalised per head before RoPE (Qwen3 q/k norm), and combined by `effjax.attention.attend`.

With a KV cache the layer never touches the cache's internals: it calls
`cache = cache.update(k, v, positions)` and `out = cache.attend(q, positions)` (the protocol in
`effjax.kv`; through `effjax.kv.update_and_attend`, which lets a cache fuse the two), so
compressed caches can attend without materialising bf16 keys.

Switches (default off): `cfg.linear` picks the projection class (`effjax.layers.projection`:
full-precision Einsum, BitNet b1.58 BitEinsum, or packed ternary inference); `cfg.sub_ln` adds the
BitNet b1.58 2B4T SubLN ("BitNet b1.58 2B4T Technical Report", arXiv 2504.12285): a norm over the
concatenated heads (N*H features) of the attention output before `o_proj`; `cfg.norm_type` picks
RMSNorm or single-scale RMSNorm for that norm and for the q/k norms.
"""

from __future__ import annotations

import flax.linen as nn

from effjax.attention import attend
from effjax.kv.base import update_and_attend
from effjax.config import ModelConfig
from effjax.layers.norms import make_norm
from effjax.layers.projection import make_projection
from effjax.layers.rope import apply_rope, rope_inv_freq


class Attention(nn.Module):
  """Causal self-attention for the decoder (see module docstring)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT=None, cache=None, mask_BTS=None):
    c = self.cfg
    D, N, K, H = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, use_bias=c.attention_bias,
              matvec_impl=c.matvec_impl)
    q_BTNH = make_projection(c.linear, (D, N, H), "BTD,DNH->BTNH", ("embed", "heads", "head_dim"),
                             name="q_proj", **kw)(x_BTD)
    k_BTKH = make_projection(c.linear, (D, K, H), "BTD,DKH->BTKH",
                             ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x_BTD)
    v_BTKH = make_projection(c.linear, (D, K, H), "BTD,DKH->BTKH",
                             ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x_BTD)
    if c.qk_norm:
      q_BTNH = make_norm(c, "q_norm", axis_name="head_dim")(q_BTNH)
      k_BTKH = make_norm(c, "k_norm", axis_name="head_dim")(k_BTKH)
    inv_freq = rope_inv_freq(H, c.rope_theta, c.rope_scaling, factor=c.rope_scaling_factor,
                             low_freq_factor=c.rope_low_freq_factor,
                             high_freq_factor=c.rope_high_freq_factor,
                             original_max_len=c.rope_original_max_len)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
    if cache is None:
      # an explicit mask (block diffusion, drafters) replaces the causal mask entirely
      out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, causal=mask_BTS is None,
                        segment_ids=segment_ids_BT, mask=mask_BTS, impl=c.attention_impl)
    else:
      if mask_BTS is not None:
        raise ValueError("an explicit attention mask is not supported together with a KV cache")
      cache, out_BTNH = update_and_attend(cache, k_BTKH, v_BTKH, q_BTNH, positions_BT)
    if c.sub_ln:
      B, T = out_BTNH.shape[:2]
      out_BTF = make_norm(c, "attn_sub_norm", axis_name="heads")(out_BTNH.reshape(B, T, N * H))
      out_BTNH = out_BTF.reshape(B, T, N, H)
    y_BTD = make_projection(c.linear, (N, H, D), "BTNH,NHD->BTD", ("heads", "head_dim", "embed"),
                            name="o_proj", dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                            matvec_impl=c.matvec_impl)(
                                out_BTNH.astype(c.compute_dtype))
    return y_BTD, cache
