"""Autoregressive generation as ONE jitted program: prefill, then a `lax.while_loop` decode loop,
optionally speculative (a drafter proposes γ tokens per step, the target verifies them).

No paper for the plain loop; the design follows effjax's DESIGN.md ("Generation is one jitted
program"). Speculative decoding: Leviathan, Kalman, Matias, arXiv 2211.17192 (Algorithm 1) and
Chen et al., arXiv 2302.01318 (Algorithm 2); the verification rule is
`effjax.decode.speculative.verify`. The drafters live in their own modules
(`effjax.decode.speculative_generate.DraftModel`, `effjax.decode.dflash.DFlash`).

Layout choices (written down, relied on by the tests):
* **Right padding.** Prompts are packed into `[B, P]` with row b's tokens at positions
  `0 .. len_b - 1` and `pad_id` after them. Every row uses positions `0 .. P - 1` in the prefill,
  which is therefore plain causal attention; the pad tokens' keys land in cache slots
  `len_b .. P - 1` and the caches are then rolled back to `len_b` (`cache.rollback`), so row b's
  first generated token is written at position `len_b` and overwrites the pad garbage before any
  query can see it (causal-by-position masking, `effjax.kv.base`). Each row decodes at its own
  position, so a ragged batch gives, row for row, the tokens each prompt gives alone.
* **Prompt buckets.** `P` is the next power of two >= the longest prompt (at least
  `MIN_BUCKET`), capped at `max_seq_len - max_new_tokens` (with a drafter: `max_seq_len − γ − 1`
  of the smaller model, since verification writes γ positions past the last emitted token); the
  cache holds `P + max_new_tokens` positions (+ γ + 1 with a drafter). The jitted program is
  compiled once per (model, drafter, sampler, cache config, batch, P, max_new_tokens, eos ids)
  and reused (jax's jit cache; `trace_count()` counts traces).
* **Per-row stop.** A row stops after emitting an EOS id (the EOS is kept in its output) or when
  it has `max_new_tokens` tokens (emitted tokens past the budget are dropped); the loop runs while
  some row is active. Stopped rows still flow through the models (static shapes) but their
  outputs are not written and not counted.
* **Prefill logits.** Only the last prompt position's logits are computed (the final hidden state
  is gathered at `len_b - 1` and sent through `model.logits`); the full `[B, P, V]` logits are
  dead code that XLA removes.
* **Randomness.** One key per loop iteration, split from `key` (`sampler` greedy ignores it);
  with a drafter it is split once more into a drafting and a verification key.
* **Statistics.** Per row: `target_calls` (loop iterations, i.e. target forward passes, while
  the row was active) and `accepted` (draft tokens accepted and kept); `mean_accept_length`
  τ = tokens produced in the loop / target calls = mean (accepted + 1) per call over all rows
  (1 for plain decoding; truncation by EOS / budget in a row's last call lowers it slightly).

The loop body never leaves the device: no host callbacks, no Python-side control flow on values.

One loop iteration (`decode_loop`), all rows at once:

  plain (`drafter=None`): the target runs the last token at `pos`, one token is sampled.
  speculative:
    1. `drafter.propose` -> γ draft tokens x and their (processed) distributions q;
    2. the target scores `[last token, x_0 .. x_{γ−1}]` at `pos .. pos+γ` in ONE forward pass
       (also returning the hidden states of `drafter.target_layers` there, if any);
    3. `verify` accepts a prefix per row; 1 .. γ+1 tokens are emitted (greedy sampler: argmax
       matching, so the output equals plain greedy decoding token for token);
    4. the target caches roll back to the accepted length, `drafter.commit` updates/rolls back the
       drafter's own state.
  both: per-row EOS / budget cut, write the kept tokens, update the statistics.

The drafter interface (`Drafter`): a drafter is a frozen, hashable dataclass (a static argument
of the jitted program) describing the drafting model; its parameters are passed separately
(`drafter_params`, traced). It provides pure functions:

  * `gamma` (int): draft tokens per step; `target_layers` (tuple of ints): target layers whose
    hidden states (`hidden_<ℓ>`, concatenated on the feature axis) `init` and `commit` receive
    (empty: none are gathered);
  * `check(target)`: raises a clear error if the drafter does not fit the target;
    `max_seq_len()`: the drafter's own position limit (None: the target's);
  * `init(params, target, target_params, *, tokens_BP, lengths_B, hidden_BPC, max_len,
    cache_config) -> state` after the target's prefill (`hidden_BPC`: the target's hidden states
    of the padded prompts, or None);
  * `propose(params, state, target, target_params, token_B, pos_B, key, sampler)
    -> (x_BG int32, q_BGV float32 or None when greedy, state)`: γ drafts following the last
    emitted token `token_B` at `pos_B` (positions `< pos_B` are in every cache). x_i must be
    drawn from q_i (processed with `sampler`) for the verification to be lossless;
  * `commit(params, state, *, seq_BL, pos_B, keep_B, hidden_BLC) -> state` after verification:
    `seq_BL[:, i]` is the token at `pos_B + i` on the accepted path (`seq_BL[:, 0]` = `token_B`,
    then the verifier's tokens), `keep_B` the tokens kept this step (the new last token sits at
    `pos_B + keep_B`, in no cache), `hidden_BLC` the target's hidden states of the verified
    positions `pos_B .. pos_B + γ` (or None). Positions `>= pos_B + keep_B` must be dropped.
  The state is any pytree (part of the `while_loop` carry).
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from effjax.decode.sampling import GREEDY, Sampler, processed_probs, sample
from effjax.decode.speculative import verify
from effjax.kv.base import as_cache_config, init_layer_caches
from effjax.kv.dense import DenseCache
from effjax.models.dflash import gather_hidden

MIN_BUCKET = 16
_TRACES = collections.Counter()


class Drafter:
  """Base class of the drafters of speculative decoding (see the module docstring).

  Subclasses are frozen dataclasses (hashable static jit arguments) that define `gamma`,
  `target_layers` (class attribute or property), `check`, `init`, `propose` and `commit`.
  """
  gamma: int              # set by every subclass (a field or a property)
  target_layers: tuple = ()

  def check(self, target) -> None:
    """Raises ValueError if the drafter does not fit `target` (default: nothing to check)."""
    del target

  def max_seq_len(self) -> Optional[int]:
    """The drafter's own position limit, or None when only the target's applies."""
    return None

  def init(self, params, target, target_params, *, tokens_BP, lengths_B, hidden_BPC, max_len,
           cache_config):
    raise NotImplementedError

  def propose(self, params, state, target, target_params, token_B, pos_B, key, sampler):
    raise NotImplementedError

  def commit(self, params, state, *, seq_BL, pos_B, keep_B, hidden_BLC):
    raise NotImplementedError


class GenerateOutput(NamedTuple):
  """What `generate` returns.

  Attributes:
    tokens: int32 `[B, max_new_tokens]`, generated tokens; `pad_id` after a row stopped.
    lengths: int32 `[B]`, tokens generated per row (including the EOS that stopped it).
    steps: int32 scalar, loop iterations (target forward passes after the prefill) while some
      row was active (plain decoding: <= max_new_tokens - 1).
    target_calls: int32 `[B]`, loop iterations while the row was active.
    accepted: int32 `[B]`, draft tokens accepted (and kept) per row (0 without a drafter).
    mean_accept_length: float32 scalar τ = tokens produced in the loop / target calls (all rows).
    prompt_bucket: the static padded prompt length `P` used.
  """
  tokens: jax.Array
  lengths: jax.Array
  steps: jax.Array
  target_calls: jax.Array
  accepted: jax.Array
  mean_accept_length: jax.Array
  prompt_bucket: int


class DecodeState(NamedTuple):
  """The `lax.while_loop` carry of the decode loop."""
  step: jax.Array        # int32: loop iterations run (incl. masked ones, see `unroll`)
  limit: jax.Array       # int32: a row stops once it has this many tokens (<= max_new_tokens)
  token_B: jax.Array     # last produced token, not yet in any cache
  pos_B: jax.Array       # its position
  caches: list           # the target's caches (positions < pos_B)
  drafter_state: Any     # the drafter's pytree (None without a drafter)
  out_BN: jax.Array      # produced tokens
  done_B: jax.Array      # row stopped
  n_gen_B: jax.Array     # tokens counted per row
  calls_B: jax.Array     # target calls while the row was active
  accepted_B: jax.Array  # draft tokens accepted and kept
  key: jax.Array


def trace_count() -> int:
  """How many times `generate_program` has been traced (compilations of `generate`)."""
  return sum(_TRACES.values())


def prompt_bucket(length: int, max_seq_len: int, max_new_tokens: int) -> int:
  """The padded prompt length for a longest prompt of `length` tokens (see module docstring).

  Raises:
    ValueError: when `length + max_new_tokens > max_seq_len`.
  """
  limit = max_seq_len - max_new_tokens
  if length < 1 or length > limit:
    raise ValueError(f"prompt length {length} + max_new_tokens {max_new_tokens} must be <= "
                     f"model.max_seq_len={max_seq_len} (and prompts non-empty)")
  bucket = max(MIN_BUCKET, 1 << (length - 1).bit_length())
  return min(bucket, limit)


def _is_eos(tok_B, eos_ids: tuple):
  done = jnp.zeros(tok_B.shape, bool)
  for e in eos_ids:
    done = done | (tok_B == e)
  return done


def _prefill(model, params, tokens_BP, prompt_lengths_B, caches):
  """`prefill` that also returns the sown intermediates (`hidden_<ℓ>` of every position)."""
  B, P = tokens_BP.shape
  positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  (_, caches), state = model.apply(params, tokens_BP, positions_BT=positions_BP, caches=caches,
                                   mutable=["intermediates"])
  inter = state["intermediates"]
  h_BPD = inter[f"hidden_{model.cfg.num_layers - 1}"][0]
  idx_B11 = (prompt_lengths_B - 1).astype(jnp.int32)[:, None, None]
  h_B1D = jnp.take_along_axis(h_BPD, idx_B11, axis=1)
  logits_B1V = model.apply(params, h_B1D, method="logits")
  caches = [c.rollback(prompt_lengths_B) for c in caches]
  return logits_B1V[:, 0], caches, inter


def prefill(model, params, tokens_BP, prompt_lengths_B, caches):
  """Runs the right-padded prompts through the model, filling `caches`.

  Returns:
    `(last_logits_BV, caches)`: float32 logits at each row's last prompt position, and the
    caches rolled back to `prompt_lengths_B`.
  """
  logits_BV, caches, _ = _prefill(model, params, tokens_BP, prompt_lengths_B, caches)
  return logits_BV, caches


def _verify(key, x_BG, q_BGV, t_logits_BLV, sampler: Sampler, pad_id: int):
  """`verify` of γ drafts against the target logits of the γ+1 verified positions, with the
  sampler applied to p (q was processed by the drafter); greedy: argmax matching."""
  if sampler.is_greedy:
    return verify(None, x_BG, None, t_logits_BLV, greedy=True, pad_id=pad_id)
  return verify(key, x_BG, q_BGV, processed_probs(t_logits_BLV, sampler), pad_id=pad_id)


def _keep_and_write(emit_BL, n_emit_B, *, done_B, n_gen_B, limit, out_BN, eos_ids: tuple,
                    pad_id: int):
  """Per-row stop and output write, shared by plain and speculative steps.

  Cuts each row's `n_emit_B` emitted tokens at its first EOS and at its budget `limit`
  (rows already done keep nothing) and writes the kept ones at the row's offset `n_gen_B`
  (columns past the buffer are dropped; slots past `keep` get `pad_id` and are rewritten later).

  Returns:
    `(keep_B, new_done_B, out_BN)`.
  """
  B, L = emit_BL.shape
  idx_1L = jnp.arange(L, dtype=jnp.int32)[None, :]
  eos_BL = _is_eos(emit_BL, eos_ids) & (idx_1L < n_emit_B[:, None])
  first_eos_B = jnp.where(jnp.any(eos_BL, axis=1), jnp.argmax(eos_BL, axis=1) + 1, L + 1)
  keep_B = jnp.minimum(jnp.minimum(n_emit_B, first_eos_B), limit - n_gen_B)
  keep_B = jnp.where(done_B, 0, keep_B).astype(jnp.int32)
  new_done_B = done_B | (first_eos_B <= keep_B) | (n_gen_B + keep_B >= limit)
  rows_BL = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, L))
  cols_BL = n_gen_B[:, None] + idx_1L
  vals_BL = jnp.where(idx_1L < keep_B[:, None], emit_BL, pad_id)
  out_BN = out_BN.at[rows_BL, cols_BL].set(vals_BL, mode="drop")
  return keep_B, new_done_B, out_BN


def decode_loop(model, params, caches, token_B, pos_B, key, *, max_new_tokens: int,
                sampler: Sampler, eos_ids: tuple = (), pad_id: int = 0, first_done_B=None,
                limit=None, unroll: int = 1, drafter: Optional[Drafter] = None,
                drafter_params=None, drafter_state=None) -> DecodeState:
  """The `lax.while_loop` decode loop, starting from one produced token per row.

  Args:
    model, params: the target LM (`effjax.models.Transformer`) and its variables.
    caches: per-layer caches holding positions `< pos_B` of every row.
    token_B: the first produced token of each row (stored as output 0), at position `pos_B`.
    key: PRNG key for sampling.
    max_new_tokens: static length of the output buffer.
    sampler, eos_ids, pad_id: see `generate`.
    first_done_B: rows already stopped (default: `token_B` is an EOS).
    limit: optional traced int <= max_new_tokens: stop after that many tokens (benchmarks).
    unroll: static number of loop iterations per `while` iteration (one loop-condition check
      per `unroll` iterations). Iterations after every row stopped change no output.
    drafter, drafter_params, drafter_state: speculative decoding (see the module docstring);
      `drafter_state` is what `drafter.init` returned. None: plain decoding.

  Returns:
    the final `DecodeState` (`out_BN` has `max_new_tokens` columns).
  """
  if not (isinstance(unroll, int) and unroll >= 1):
    raise ValueError(f"decode_loop: unroll must be an int >= 1, got {unroll!r}")
  B = token_B.shape[0]
  N = max_new_tokens
  G = 0 if drafter is None else drafter.gamma
  layers = () if drafter is None else tuple(drafter.target_layers)
  limit = jnp.int32(N) if limit is None else jnp.minimum(jnp.asarray(limit, jnp.int32), N)
  token_B = token_B.astype(jnp.int32)
  done_B = _is_eos(token_B, eos_ids) if first_done_B is None else first_done_B
  state = DecodeState(
      step=jnp.int32(0), limit=limit, token_B=token_B, pos_B=pos_B.astype(jnp.int32),
      caches=list(caches), drafter_state=drafter_state,
      out_BN=jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(token_B),
      done_B=done_B | (limit <= 1), n_gen_B=jnp.ones((B,), jnp.int32),
      calls_B=jnp.zeros((B,), jnp.int32), accepted_B=jnp.zeros((B,), jnp.int32), key=key)

  def forward(s, tok_BL, pos_BL):
    """Target logits of `tok_BL` at `pos_BL` (+ hidden states of `layers`), caches updated."""
    if not layers:
      logits_BLV, caches = model.apply(params, tok_BL, positions_BT=pos_BL, caches=s.caches)
      return logits_BLV, caches, None
    (logits_BLV, caches), st = model.apply(params, tok_BL, positions_BT=pos_BL, caches=s.caches,
                                           mutable=["intermediates"])
    return logits_BLV, caches, gather_hidden(st["intermediates"], layers)

  def iteration(s: DecodeState):
    key, sub = jax.random.split(s.key)
    dstate = s.drafter_state
    if drafter is None:
      logits_B1V, caches, _ = forward(s, s.token_B[:, None], s.pos_B[:, None])
      emit_BL = sample(logits_B1V[:, 0], sub, sampler).astype(jnp.int32)[:, None]
      n_emit_B = jnp.ones((B,), jnp.int32)
    else:
      k_draft, k_verify = jax.random.split(sub)
      x_BG, q_BGV, dstate = drafter.propose(drafter_params, dstate, model, params, s.token_B,
                                            s.pos_B, k_draft, sampler)
      tok_BL = jnp.concatenate([s.token_B[:, None], x_BG.astype(jnp.int32)], axis=1)
      pos_BL = s.pos_B[:, None] + jnp.arange(G + 1, dtype=jnp.int32)[None, :]
      logits_BLV, caches, hidden_BLC = forward(s, tok_BL, pos_BL)
      emit_BL, n_emit_B = _verify(k_verify, x_BG, q_BGV, logits_BLV, sampler, pad_id)
    keep_B, done_B, out_BN = _keep_and_write(
        emit_BL, n_emit_B, done_B=s.done_B, n_gen_B=s.n_gen_B, limit=s.limit, out_BN=s.out_BN,
        eos_ids=eos_ids, pad_id=pad_id)
    if drafter is None:
      new_pos_B = s.pos_B + 1  # stopped rows move on too (their writes land past their output)
    else:
      # Roll back to the accepted prefix: the new last token sits at pos + keep, in no cache.
      new_pos_B = s.pos_B + keep_B
      caches = [c.rollback(new_pos_B) for c in caches]
      seq_BL = jnp.concatenate([s.token_B[:, None], emit_BL], axis=1)  # token at pos + i
      dstate = drafter.commit(drafter_params, dstate, seq_BL=seq_BL, pos_B=s.pos_B,
                              keep_B=keep_B, hidden_BLC=hidden_BLC)
    last_B = jnp.take_along_axis(emit_BL, jnp.maximum(keep_B - 1, 0)[:, None], axis=1)[:, 0]
    active_B = (~s.done_B).astype(jnp.int32)
    return DecodeState(
        step=s.step + 1, limit=s.limit, token_B=jnp.where(keep_B > 0, last_B, s.token_B),
        pos_B=new_pos_B, caches=list(caches), drafter_state=dstate, out_BN=out_BN,
        done_B=done_B, n_gen_B=s.n_gen_B + keep_B, calls_B=s.calls_B + active_B,
        accepted_B=s.accepted_B + jnp.maximum(keep_B - 1, 0) * active_B, key=key)

  def body(s: DecodeState):
    for _ in range(unroll):
      s = iteration(s)
    return s

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), body, state)


def generate_program(params, tokens_BP, prompt_lengths_B, key, *, model, sampler: Sampler,
                     cache_config, max_new_tokens: int, eos_ids: tuple, pad_id: int,
                     unroll: int = 1, drafter: Optional[Drafter] = None, drafter_params=None):
  """The whole generation (prefill + decode loop) as one traceable function.

  Returns:
    `(tokens_BN, lengths_B, steps, calls_B, accepted_B)` (see `GenerateOutput`).
  """
  _TRACES[(model, drafter, sampler, cache_config, max_new_tokens, eos_ids, pad_id, unroll)] += 1
  cfg = model.cfg
  B, P = tokens_BP.shape
  max_len = P + max_new_tokens + (0 if drafter is None else drafter.gamma + 1)
  caches = init_layer_caches(cache_config, cfg.num_layers, B, max_len, cfg.num_kv_heads,
                             cfg.head_dim, cfg.compute_dtype)
  logits_BV, caches, inter = _prefill(model, params, tokens_BP, prompt_lengths_B, caches)
  key, sub = jax.random.split(key)
  first_B = sample(logits_BV, sub, sampler)
  dstate = None
  if drafter is not None:
    layers = tuple(drafter.target_layers)
    dstate = drafter.init(
        drafter_params, model, params, tokens_BP=tokens_BP,
        lengths_B=prompt_lengths_B.astype(jnp.int32),
        hidden_BPC=gather_hidden(inter, layers) if layers else None, max_len=max_len,
        cache_config=cache_config)
  s = decode_loop(model, params, caches, first_B, prompt_lengths_B, key,
                  max_new_tokens=max_new_tokens, sampler=sampler, eos_ids=eos_ids, pad_id=pad_id,
                  unroll=unroll, drafter=drafter, drafter_params=drafter_params,
                  drafter_state=dstate)
  return s.out_BN, s.n_gen_B, jnp.max(s.calls_B), s.calls_B, s.accepted_B


_generate_jit = jax.jit(generate_program, static_argnames=(
    "model", "sampler", "cache_config", "max_new_tokens", "eos_ids", "pad_id", "unroll",
    "drafter"))


def pack_prompts(prompts, prompt_lengths=None, *, bucket: int,
                 pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts into `([B, bucket] int32 tokens, [B] int32 lengths)` with `pad_id`.

  `prompts` is a list of token-id sequences, or a 2-D int array whose rows are right-padded
  prompts with true lengths `prompt_lengths` (default: the full width).
  """
  if isinstance(prompts, (np.ndarray, jax.Array)):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise ValueError(f"prompts: a 2-D [batch, len] array was expected, got shape {arr.shape}")
    lengths = (np.full((arr.shape[0],), arr.shape[1]) if prompt_lengths is None
               else np.asarray(prompt_lengths))
    if lengths.shape != (arr.shape[0],) or np.any(lengths < 1) or np.any(lengths > arr.shape[1]):
      raise ValueError(f"prompt_lengths must be [batch] ints in [1, {arr.shape[1]}], got "
                       f"{lengths!r}")
    rows = [arr[i, :lengths[i]] for i in range(arr.shape[0])]
  else:
    if prompt_lengths is not None:
      raise ValueError("prompt_lengths is only for a 2-D prompts array; a list of prompts "
                       "carries its own lengths")
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    lengths = np.array([len(r) for r in rows])
    if len(rows) == 0 or np.any(lengths < 1):
      raise ValueError("prompts: need at least one prompt, each with >= 1 token")
  tokens = np.full((len(rows), bucket), pad_id, np.int32)
  for i, r in enumerate(rows):
    if not np.issubdtype(r.dtype, np.integer):
      raise TypeError(f"prompts: token ids must be integers, got dtype {r.dtype}")
    tokens[i, :len(r)] = r
  return tokens, lengths.astype(np.int32)


def generate(model, params, prompts, *, max_new_tokens: int, sampler: Sampler = GREEDY,
             cache=DenseCache, key=None, eos_id=None, prompt_lengths=None, pad_id: int = 0,
             bucket: int | None = None, unroll: int = 1, drafter: Optional[Drafter] = None,
             drafter_params=None) -> GenerateOutput:
  """Generates up to `max_new_tokens` tokens per prompt in one jitted program.

  Args:
    model: an `effjax.models.Transformer` (anything with its `apply(..., caches=)`, `cfg`,
      sown `hidden_<i>` and `logits` method).
    params: the variables dict for `model.apply` (`{"params": ...}`, unboxed).
    prompts: a list of token-id sequences (ragged), or a right-padded 2-D int array with
      `prompt_lengths`.
    max_new_tokens: tokens to produce per row (static; >= 1).
    sampler: `effjax.decode.sampling.Sampler` (default greedy); with a drafter it is applied to
      both the target's and the drafter's distributions (lossless for any sampler).
    cache: a KV-cache class (`effjax.kv.DenseCache`, ...) or an `effjax.kv.CacheConfig`.
    key: PRNG key, required unless the sampler is greedy.
    eos_id: an int or a sequence of ints that stop a row, or None.
    prompt_lengths: true lengths for a 2-D `prompts` array.
    pad_id: the token id written after a row stopped (and in the prompt padding).
    bucket: override the padded prompt length (default: `prompt_bucket`).
    unroll: loop iterations per `while` iteration (see `decode_loop`); outputs do not depend
      on it.
    drafter: None (plain decoding) or a `Drafter` for speculative decoding, e.g.
      `effjax.decode.speculative_generate.DraftModel(draft_lm, gamma)` or
      `effjax.decode.dflash.DFlash(drafter_module, dflash_config)`.
    drafter_params: the drafter's variables (required with a drafter).

  Returns:
    `GenerateOutput(tokens [B, max_new_tokens], lengths [B], steps, target_calls [B],
    accepted [B], mean_accept_length, prompt_bucket)`.
  """
  if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not isinstance(sampler, Sampler):
    raise TypeError(f"sampler must be an effjax.decode.sampling.Sampler, got {sampler!r}")
  cache_config = as_cache_config(cache)
  if key is None:
    if not sampler.is_greedy:
      raise ValueError("key: a PRNG key is required for a non-greedy sampler")
    key = jax.random.key(0)
  if eos_id is None:
    eos_ids = ()
  elif isinstance(eos_id, (int, np.integer)):
    eos_ids = (int(eos_id),)
  else:
    eos_ids = tuple(int(e) for e in eos_id)
  max_seq = model.cfg.max_seq_len
  if drafter is not None:
    if not isinstance(drafter, Drafter):
      raise TypeError(f"drafter must be None or an effjax.decode.generate.Drafter, got "
                      f"{drafter!r}")
    if drafter_params is None:
      raise ValueError("drafter_params: required with a drafter")
    drafter.check(model)
    max_seq = min(max_seq, drafter.max_seq_len() or max_seq) - drafter.gamma - 1
  if isinstance(prompts, (np.ndarray, jax.Array)):
    longest = int(np.max(prompt_lengths)) if prompt_lengths is not None else prompts.shape[1]
  else:
    longest = max(len(p) for p in prompts)
  if bucket is None:
    bucket = prompt_bucket(longest, max_seq, max_new_tokens)
  elif bucket < longest or bucket + max_new_tokens > max_seq:
    raise ValueError(f"bucket: must be >= the longest prompt ({longest}) and bucket + "
                     f"max_new_tokens <= {max_seq} (model.max_seq_len, minus gamma + 1 with a "
                     f"drafter), got {bucket}")
  tokens_BP, lengths_B = pack_prompts(prompts, prompt_lengths, bucket=bucket, pad_id=pad_id)
  out_BN, n_B, steps, calls_B, acc_B = _generate_jit(
      params, jnp.asarray(tokens_BP), jnp.asarray(lengths_B), key, model=model, sampler=sampler,
      cache_config=cache_config, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
      unroll=unroll, drafter=drafter, drafter_params=drafter_params)
  produced = jnp.sum(n_B - 1).astype(jnp.float32)
  tau = produced / jnp.maximum(jnp.sum(calls_B), 1).astype(jnp.float32)
  return GenerateOutput(tokens=out_BN, lengths=n_B, steps=steps, target_calls=calls_B,
                        accepted=acc_B, mean_accept_length=tau, prompt_bucket=bucket)
