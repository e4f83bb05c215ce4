"""DFlash speculative decoding: the `DFlash` drafter of `effjax.decode.generate`.

Paper: "DFlash: Block Diffusion for Flash Speculative Decoding", arXiv 2602.06036. The drafter
(`effjax.models.dflash.DFlashDrafter`) denoises the block `[last token, MASK × γ]` in one
parallel forward pass conditioned on the target's hidden states; verification is the lossless
speculative-sampling rule of Leviathan et al. (arXiv 2211.17192, Algorithm 1) / Chen et al. (arXiv
2302.01318, Algorithm 2), `effjax.decode.speculative.verify`. The loop (prefill + one
`lax.while_loop`, shared with plain decoding and draft-model speculation) is
`effjax.decode.generate.decode_loop`; this file provides the drafter (`DFlash`, see
`effjax.decode.generate.Drafter` for the interface) and `dflash_generate`, a thin wrapper of
`generate(..., drafter=DFlash(drafter, dcfg))`.

One loop iteration, all rows at once (static shapes, batch > 1, per-row acceptance):

  1. Draft (`draft_block`): embed `[x_pos, MASK × γ]` at positions `pos .. pos+γ` with the
     target's frozen embedding, run the drafter once against its context K/V cache, read block
     positions 1..γ out through the target's final norm + LM head; draft token i is sampled from
     q_i = processed_probs(drafter logits at block position i + 1, sampler), all γ independently
     and in parallel (q_i does not depend on the other drafts, which the verification rule
     allows: it needs x_i ~ q_i for a q_i fixed before x_i is drawn).
  2. The target scores `[x_pos, x_0 .. x_{γ−1}]` at `pos .. pos+γ` in ONE forward pass through
     its KV cache, giving p_0..p_γ and the hidden states of those γ+1 positions.
  3. `verify` accepts a prefix per row; 1..γ+1 tokens are emitted (greedy sampler: argmax
     matching, so the output equals the target's greedy decode token for token).
  4. Roll back: the target cache to `pos + kept`; the drafter's context cache gets the context
     K/V of positions `pos .. pos+γ` (overwriting the noise block it held) and is rolled back to
     `pos + kept` too, so exactly the accepted prefix remains as context.

Choices (written down):

  * Context extent: the drafter sees the target hidden states of the whole accepted prefix
     (prompt included), kept as per-layer context K/V in `effjax.kv.DenseCache`s (see
     `effjax.models.dflash`); the drafter's cache is always dense whatever `cache` the target
     uses. Cost per step: one drafter pass over γ+1 queries against `pos + γ + 1` keys, and the
     context projection of γ+1 new positions.
  * The noise block's K/V are written into the drafter's cache only for the drafting pass and are
     overwritten by the context K/V of the verified positions right after ("dropped each step").
  * Per-row stop, statistics and cache sizes follow `effjax.decode.speculative_generate` (a row
     stops at its first emitted EOS or after `max_new_tokens`; stopped rows still flow through both
     models but do not advance). τ (`mean_accept_length`) = tokens produced in the loop / target
     verification calls = mean (accepted + 1) per call, over all rows; per-row `target_calls` and
     `accepted` are returned too. The first token comes from the target's prefill.
  * Cache size: prompt bucket P + max_new_tokens + γ + 1 positions; the bucket is chosen with
     `max_seq_len − γ − 1`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from effjax.decode.generate import (Drafter, GenerateOutput, generate, generate_program,
                                    trace_count)
from effjax.decode.sampling import GREEDY, Sampler, processed_probs, sample
from effjax.kv.base import init_layer_caches
from effjax.kv.dense import DenseCache
from effjax.models.dflash import DFlashConfig, DFlashDrafter

DFlashOutput = GenerateOutput  # the name `dflash_generate` used to return


def draft_block(target, t_params, drafter: DFlashDrafter, d_params, dcfg: DFlashConfig, d_caches,
                token_B, pos_B, key, sampler: Sampler):
  """One DFlash drafting pass: γ draft tokens and their distributions from one forward.

  Args:
    target, t_params: the target `Transformer` and its variables (embedding + head are used).
    drafter, d_params: the `DFlashDrafter` and its variables (`{"params": ...}`).
    dcfg: the drafter's `DFlashConfig` (block size, MASK id).
    d_caches: per-drafter-layer context caches holding positions `< pos_B`.
    token_B: the last emitted token of each row (the block's anchor), at `pos_B`.
    key: PRNG key (ignored by a greedy sampler).
    sampler: applied to the drafter's logits (the same sampler must be applied to the target).

  Returns:
    `(x_BG int32, q_BGV float32 or None when greedy, d_caches)`; the caches hold the noise block
    at `pos .. pos+γ` until the caller overwrites it with context (see module docstring).
  """
  B = token_B.shape[0]
  G = dcfg.gamma
  blk_BL = jnp.concatenate([token_B[:, None].astype(jnp.int32),
                            jnp.full((B, G), dcfg.mask_id, jnp.int32)], axis=1)
  pos_BL = pos_B[:, None].astype(jnp.int32) + jnp.arange(G + 1, dtype=jnp.int32)[None, :]
  x_BLD = target.apply(t_params, blk_BL, method="embed")
  h_BLD, d_caches = drafter.apply(d_params, x_BLD, pos_BL, d_caches, method="decode")
  logits_BGV = target.apply(t_params, h_BLD[:, 1:], method="logits")
  x_BG = sample(logits_BGV, key, sampler).astype(jnp.int32)
  q_BGV = None if sampler.is_greedy else processed_probs(logits_BGV, sampler)
  return x_BG, q_BGV, d_caches


@dataclasses.dataclass(frozen=True)
class DFlash(Drafter):
  """The DFlash drafter (see the module docstring); its state is the per-layer context caches.

  Attributes:
    drafter: the `DFlashDrafter` module (built with
      `effjax.models.dflash.drafter_model_config(target.cfg, config)`).
    config: its `DFlashConfig` (γ = block_size − 1 drafts per step, target layers, MASK id).
  """
  drafter: Any
  config: DFlashConfig

  def __post_init__(self):
    if not isinstance(self.config, DFlashConfig):
      raise TypeError(f"DFlash: config must be an effjax.models.dflash.DFlashConfig, got "
                      f"{self.config!r}")

  @property
  def gamma(self) -> int:
    return self.config.gamma

  @property
  def target_layers(self) -> tuple:
    return self.config.target_layers

  def check(self, target) -> None:
    self.config.check_target(target.cfg)
    if self.drafter.cfg.d_model != target.cfg.d_model:
      raise ValueError(f"drafter.cfg.d_model={self.drafter.cfg.d_model} must equal the target's "
                       f"d_model={target.cfg.d_model} (it reads the target's embedding and head)")
    if self.drafter.num_context_layers != len(self.config.target_layers):
      raise ValueError(f"drafter.num_context_layers={self.drafter.num_context_layers} must equal "
                       f"len(dcfg.target_layers)={len(self.config.target_layers)}")

  def init(self, params, target, target_params, *, tokens_BP, lengths_B, hidden_BPC, max_len,
           cache_config):
    """Dense context caches holding the prompt's context K/V (positions < lengths_B)."""
    del target, target_params, cache_config  # the drafter's cache is always dense
    B, P = tokens_BP.shape
    c = self.drafter.cfg
    caches = init_layer_caches(DenseCache, c.num_layers, B, max_len, c.num_kv_heads, c.head_dim,
                               c.compute_dtype)
    pos_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    caches = self.drafter.apply(params, hidden_BPC, pos_BP, caches, method="write_context")
    return [cache.rollback(lengths_B) for cache in caches]

  def propose(self, params, state, target, target_params, token_B, pos_B, key, sampler):
    """One parallel drafting pass over `[token, MASK × γ]` (`draft_block`)."""
    return draft_block(target, target_params, self.drafter, params, self.config, state, token_B,
                       pos_B, key, sampler)

  def commit(self, params, state, *, seq_BL, pos_B, keep_B, hidden_BLC):
    """Overwrites the noise block with the context of the verified positions, then rolls back
    to the accepted prefix."""
    del seq_BL
    L = self.config.block_size
    pos_BL = pos_B[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
    caches = self.drafter.apply(params, hidden_BLC, pos_BL, state, method="write_context")
    return [cache.rollback(pos_B + keep_B) for cache in caches]


def dflash_program(t_params, d_params, tokens_BP, prompt_lengths_B, key, *, target, drafter,
                   dcfg: DFlashConfig, sampler: Sampler, cache_config, max_new_tokens: int,
                   eos_ids: tuple, pad_id: int):
  """`generate_program` with `DFlash(drafter, dcfg)` (traceable).

  Returns:
    `(tokens_BN, lengths_B, steps, calls_B, accepted_B)`.
  """
  return generate_program(t_params, tokens_BP, prompt_lengths_B, key, model=target,
                          sampler=sampler, cache_config=cache_config,
                          max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                          drafter=DFlash(drafter, dcfg), drafter_params=d_params)


def dflash_generate(target, target_params, drafter: DFlashDrafter, drafter_params,
                    dcfg: DFlashConfig, prompts, *, max_new_tokens: int,
                    sampler: Sampler = GREEDY, cache=DenseCache, key=None, eos_id=None,
                    prompt_lengths=None, pad_id: int = 0,
                    bucket: int | None = None) -> GenerateOutput:
  """DFlash speculative decoding: `generate(..., drafter=DFlash(drafter, dcfg))`.

  Args:
    target, target_params: the target `Transformer` and its variables (`{"params": ...}`).
    drafter, drafter_params: the `DFlashDrafter` (built with
      `effjax.models.dflash.drafter_model_config(target.cfg, dcfg)`) and its variables.
    dcfg: the drafter's `DFlashConfig` (γ = block_size − 1 drafts per step).
    prompts: list of token-id sequences, or a right-padded 2-D array with `prompt_lengths`.
    max_new_tokens: tokens per row (static, >= 1).
    sampler: applied to BOTH target and drafter distributions (lossless for any sampler).
    cache: the target's KV-cache class or `effjax.kv.CacheConfig` (the drafter's is dense).
    key: PRNG key (required unless greedy).
    eos_id, pad_id, bucket: as in `effjax.decode.generate.generate`.

  Returns:
    `GenerateOutput` (tokens, lengths, steps, target_calls, accepted, mean_accept_length,
    prompt_bucket).
  """
  if not isinstance(dcfg, DFlashConfig):
    raise TypeError(f"dcfg must be an effjax.models.dflash.DFlashConfig, got {dcfg!r}")
  return generate(target, target_params, prompts, max_new_tokens=max_new_tokens,
                  sampler=sampler, cache=cache, key=key, eos_id=eos_id,
                  prompt_lengths=prompt_lengths, pad_id=pad_id, bucket=bucket,
                  drafter=DFlash(drafter, dcfg), drafter_params=drafter_params)


__all__ = ["DFlash", "DFlashOutput", "dflash_generate", "dflash_program", "draft_block",
           "trace_count"]
