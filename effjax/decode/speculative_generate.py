"""Draft-model speculative decoding: the `DraftModel` drafter of `effjax.decode.generate`.

Papers: Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding",
arXiv 2211.17192 (Algorithm 1); Chen et al., "Accelerating Large Language Model Decoding with
Speculative Sampling", arXiv 2302.01318 (Algorithm 2). The verification rule itself lives in
`effjax.decode.speculative.verify`; the loop around it (prefill + one `lax.while_loop`, shared
with plain decoding and DFlash) is `effjax.decode.generate.decode_loop`; this file provides the
drafter (`DraftModel`, see `effjax.decode.generate.Drafter` for the interface) and
`speculative_generate`, a thin wrapper of `generate(..., drafter=DraftModel(draft, gamma))`.

One loop iteration, for every row at once (static shapes, batch > 1, per-row acceptance):

  1. Draft γ tokens autoregressively with the small model (a `lax.scan` of γ − 1 single-token steps
     after one 2-token "catch-up" step, see below), sampling x_i from q_i = processed_probs(draft
     logits, sampler).
  2. The target scores [last token, x_0 .. x_{γ−1}] at positions pos .. pos+γ in ONE forward pass
     through its KV cache, giving p_0 .. p_γ = processed_probs(target logits, sampler).
  3. `verify` accepts a prefix and emits 1 .. γ+1 tokens per row (greedy sampler: argmax matching).
  4. Both caches roll back to the accepted length (`cache.rollback`): the target keeps positions
     <= pos + num_accepted, the draft keeps what it wrote up to that length.

Choices (written down):

  * Draft catch-up. The draft never feeds its last draft token x_{γ−1}, so after a fully accepted
     step its cache lacks that position. Every iteration therefore starts the draft with the 2-token
     chunk [token at pos−1, token at pos] (re-writing an already cached position overwrites it with
     the same key/value, which the cache protocol allows). The draft cost is γ + 1 token-passes in γ
     calls; there is no data-dependent branch.
  * Per-row stop. A row stops at its first EOS among the emitted tokens (the EOS is kept) or when
     it has `max_new_tokens` tokens; emitted tokens past the budget are dropped. Stopped rows still
     flow through both models (static shapes) but do not advance: their positions stay put, their
     caches roll back to where they were, nothing is written to their output.
  * Statistics (`GenerateOutput`): per row the number of target verification calls while the row was
     active and the number of accepted draft tokens; `mean_accept_length` = tokens produced in the
     loop / target calls, i.e. (mean accepted + 1) per target call (τ), counting only tokens that
     were kept (truncation by EOS/budget in the last step lowers it slightly).
  * The first token comes from the target's prefill, exactly as in `generate`, so the output equals
     `generate`'s token for token under a greedy sampler (up to floating-point ties between a
     (γ+1)-token and a 1-token forward pass).
  * Rollback is required by the cache protocol (compressed/evicting caches restore state there);
     for `DenseCache` it only resets `lengths`, because every stale slot is rewritten (the next
     step writes its first token at the rolled-back length) before any query can attend to it.
  * Cache size: prompt bucket P + max_new_tokens + γ + 1 positions (verification writes γ
     positions past the last emitted token); the bucket is computed with `max_seq_len − γ − 1` so no
     position reaches the model's `max_seq_len`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from effjax.decode.generate import (Drafter, GenerateOutput, generate, generate_program, prefill,
                                    trace_count)
from effjax.decode.sampling import GREEDY, Sampler, processed_probs, sample
from effjax.kv.base import init_layer_caches
from effjax.kv.dense import DenseCache

SpecOutput = GenerateOutput  # the name `speculative_generate` used to return


class DraftState(NamedTuple):
  """The draft model's part of the loop carry."""
  prev_B: jax.Array      # token at pos_B - 1 (already in both caches)
  caches: list           # the draft model's caches


@dataclasses.dataclass(frozen=True)
class DraftModel(Drafter):
  """A small autoregressive LM as drafter (same vocabulary as the target).

  Attributes:
    model: the draft `effjax.models.Transformer` (its params are `drafter_params`).
    gamma: γ, draft tokens per step (>= 1).
  """
  model: Any
  gamma: int

  def __post_init__(self):
    if not (isinstance(self.gamma, int) and self.gamma >= 1):
      raise ValueError(f"DraftModel: gamma must be an int >= 1, got {self.gamma!r}")

  def check(self, target) -> None:
    if target.cfg.vocab_size != self.model.cfg.vocab_size:
      raise ValueError(f"draft.cfg.vocab_size={self.model.cfg.vocab_size} must equal "
                       f"target.cfg.vocab_size={target.cfg.vocab_size}")

  def max_seq_len(self) -> int:
    return self.model.cfg.max_seq_len

  def init(self, params, target, target_params, *, tokens_BP, lengths_B, hidden_BPC, max_len,
           cache_config) -> DraftState:
    """Prefills the draft model's caches (same cache kind as the target's) with the prompts."""
    del target, target_params, hidden_BPC
    c = self.model.cfg
    caches = init_layer_caches(cache_config, c.num_layers, tokens_BP.shape[0], max_len,
                               c.num_kv_heads, c.head_dim, c.compute_dtype)
    _, caches = prefill(self.model, params, tokens_BP, lengths_B, caches)
    prev_B = jnp.take_along_axis(tokens_BP, (lengths_B - 1)[:, None], axis=1)[:, 0]
    return DraftState(prev_B=prev_B.astype(jnp.int32), caches=list(caches))

  def propose(self, params, state: DraftState, target, target_params, token_B, pos_B, key,
              sampler: Sampler):
    """γ drafts: one 2-token catch-up step `[prev, token]`, then a `lax.scan` of γ − 1 steps."""
    del target, target_params
    model, G = self.model, self.gamma
    toks_B2 = jnp.stack([state.prev_B, token_B], axis=1)
    pos_B2 = jnp.stack([pos_B - 1, pos_B], axis=1)
    logits_B2V, caches = model.apply(params, toks_B2, positions_BT=pos_B2, caches=state.caches)

    def pick(logits_BV, k):
      x_B = sample(logits_BV, k, sampler).astype(jnp.int32)
      return x_B, (None if sampler.is_greedy else processed_probs(logits_BV, sampler))

    keys = jax.random.split(key, G)
    x0_B, q0_BV = pick(logits_B2V[:, 1], keys[0])

    def step(carry, k):
      x_B, p_B, caches = carry
      logits_B1V, caches = model.apply(params, x_B[:, None], positions_BT=p_B[:, None],
                                       caches=caches)
      nx_B, nq_BV = pick(logits_B1V[:, 0], k)
      return (nx_B, p_B + 1, caches), (nx_B, nq_BV)

    (_, _, caches), (xs_GB, qs_GBV) = jax.lax.scan(step, (x0_B, pos_B + 1, caches), keys[1:])
    x_BG = jnp.concatenate([x0_B[:, None], jnp.moveaxis(xs_GB, 0, 1)], axis=1)
    q_BGV = None
    if not sampler.is_greedy:
      q_BGV = jnp.concatenate([q0_BV[:, None], jnp.moveaxis(qs_GBV, 0, 1)], axis=1)
    return x_BG, q_BGV, state._replace(caches=list(caches))

  def commit(self, params, state: DraftState, *, seq_BL, pos_B, keep_B, hidden_BLC):
    """Rolls the draft caches back to the accepted length; remembers the token before the last."""
    del params, hidden_BLC
    new_pos_B = pos_B + keep_B
    d_len_B = jnp.minimum(new_pos_B, state.caches[0].lengths)
    caches = [c.rollback(d_len_B) for c in state.caches]
    prev_B = jnp.take_along_axis(seq_BL, jnp.maximum(keep_B - 1, 0)[:, None], axis=1)[:, 0]
    return DraftState(prev_B=jnp.where(keep_B > 0, prev_B, state.prev_B), caches=caches)


def speculative_program(t_params, d_params, tokens_BP, prompt_lengths_B, key, *, target, draft,
                        gamma: int, sampler: Sampler, cache_config, max_new_tokens: int,
                        eos_ids: tuple, pad_id: int):
  """`generate_program` with `DraftModel(draft, gamma)` (traceable).

  Returns:
    `(tokens_BN, lengths_B, steps, calls_B, accepted_B)`.
  """
  return generate_program(t_params, tokens_BP, prompt_lengths_B, key, model=target,
                          sampler=sampler, cache_config=cache_config,
                          max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                          drafter=DraftModel(draft, gamma), drafter_params=d_params)


def speculative_generate(target, target_params, draft, draft_params, prompts, *,
                         max_new_tokens: int, gamma: int, sampler: Sampler = GREEDY,
                         cache=DenseCache, key=None, eos_id=None, prompt_lengths=None,
                         pad_id: int = 0, bucket: int | None = None) -> GenerateOutput:
  """Speculative decoding with a draft LM: `generate(..., drafter=DraftModel(draft, gamma))`.

  Args:
    target, target_params: the target `Transformer` and its variables (`{"params": ...}`).
    draft, draft_params: the draft `Transformer` (same vocabulary) and its variables.
    prompts: list of token-id sequences, or a right-padded 2-D array with `prompt_lengths`.
    max_new_tokens: tokens per row (static, >= 1).
    gamma: draft length γ (static, >= 1).
    sampler: applied to BOTH target and draft distributions (lossless for any sampler).
    cache: KV-cache class or `effjax.kv.CacheConfig`, used for both models.
    key: PRNG key (required unless greedy).
    eos_id, pad_id, bucket: as in `effjax.decode.generate.generate`.

  Returns:
    `GenerateOutput` (tokens, lengths, steps, target_calls, accepted, mean_accept_length,
    prompt_bucket).
  """
  return generate(target, target_params, prompts, max_new_tokens=max_new_tokens,
                  sampler=sampler, cache=cache, key=key, eos_id=eos_id,
                  prompt_lengths=prompt_lengths, pad_id=pad_id, bucket=bucket,
                  drafter=DraftModel(draft, gamma), drafter_params=draft_params)


__all__ = ["DraftModel", "DraftState", "SpecOutput", "speculative_generate",
           "speculative_program", "trace_count"]
