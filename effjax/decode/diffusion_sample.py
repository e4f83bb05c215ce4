"""Block-diffusion (BD3-LM) generation with a per-block KV cache and Fast-dLLM commits, one program.

Papers:
  * BD3-LM: Arriola et al., "Block Diffusion: Interpolating Between Autoregressive and Diffusion
    Language Models", arXiv 2503.09573 (§3.1 / Alg. 2: blocks are generated left to right; each
    block is denoised by the diffusion model conditioned on the keys/values of the finished blocks,
    which are computed once, from the clean tokens, and cached).
  * Fast-dLLM: Wu et al., "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV
    Cache and Parallel Decoding", arXiv 2505.22618 (§3.3: confidence-aware parallel decoding; every
    still-masked position whose confidence exceeds the threshold is committed, and the most
    confident one if none does, so each step commits >= 1 token).

Program (all inside one `jax.jit`; `lax.while_loop` over blocks, and inside it the
`lax.while_loop` of `effjax.models.diffusion.denoise_block` over denoising steps):

    prefill   the prompt's complete blocks go through the model once (block-causal attention),
              writing their keys/values to the caches;
    per block b (while loop): x_b = prompt tokens of the block if any, MASK elsewhere;
              denoise (while loop): logits of the L block tokens at positions bL..bL+L−1, which
                attend to the cached finished blocks and to the whole block (bidirectional inside
                the block); Fast-dLLM commit; until no MASK is left (<= L steps);
              commit the block: one more forward pass of the clean block writes its keys/values
                into the caches (the only cache write of the block that is kept).

The cached attention goes through the `effjax.kv` protocol unchanged: `BlockCausalCache` wraps any
protocol cache and only changes `attend` so that a query at position p sees the stored positions
whose block index is <= p // L (it calls the inner cache's causal-by-position `attend` at the last
position of p's block; RoPE has already been applied by the layer with the true positions). The
denoising passes write the noisy block's keys/values into a copy of the caches that is dropped
after the step, so the carried caches hold only finished clean blocks. This is exactly the
`block_causal_mask` used on the clean stream ([x_0] half) of the BD3-LM training layout, so cached
decoding computes the same logits as the uncached model (tested).

Choices:
  * Prompt: `prompt_BP` is a shared-length prompt (all rows length P; no ragged prompts here).
    P need not be a multiple of L: the block that contains the prompt's end is denoised with its
    prompt tokens fixed (the sampler never rewrites a non-MASK token).
  * `total_len` (prompt + generated) must be a multiple of L; the caches hold `total_len` slots.
  * `allowed_vocab`: proposals are restricted to ids < allowed_vocab (e.g. 256 = bytes), besides
    SUBS (MASK is never proposed).
  * Not done: fusing the commit pass of block b with the first denoising pass of block b+1 (one
    2L-token forward; saves one pass per block), Fast-dLLM's DualCache (caching the suffix), and
    early stopping at EOS.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from effjax.data.tokenizer import MASK_ID
from effjax.kv.base import as_cache_config
from effjax.kv.dense import DenseCache
from effjax.models import diffusion as D


@flax.struct.dataclass
class BlockCausalCache:
  """A KV cache whose `attend` is block-causal: position p sees stored positions < (p // L + 1)·L.

  Wraps any `effjax.kv` cache (`inner`); `update`, `rollback`, `lengths`, `max_len`, `nbytes` are
  the inner cache's. See the module docstring.
  """
  inner: object
  block_size: int = flax.struct.field(pytree_node=False)

  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16,
           *, block_size: int, inner=DenseCache, inner_options: tuple = ()):
    """An empty block-causal cache over an `inner` cache built with `inner_options`."""
    if not isinstance(block_size, int) or block_size < 1:
      raise ValueError(f"BlockCausalCache.init: block_size must be a positive int, got "
                       f"{block_size!r}")
    inner_cache = inner.init(batch, max_len, num_kv_heads, head_dim, dtype, **dict(inner_options))
    return cls(inner=inner_cache, block_size=block_size)

  @property
  def lengths(self):
    return self.inner.lengths

  @property
  def max_len(self) -> int:
    return self.inner.max_len

  def update(self, k_BTKH, v_BTKH, positions_BT) -> "BlockCausalCache":
    """Stores keys/values at their positions (the inner cache's update)."""
    return self.replace(inner=self.inner.update(k_BTKH, v_BTKH, positions_BT))

  def attend(self, q_BTNH, positions_BT, *, sm_scale=None):
    """Attention of `q` over stored positions in blocks <= the query's block."""
    pos_BT = positions_BT.astype(jnp.int32)
    L = self.block_size
    last_BT = (pos_BT // L) * L + (L - 1)
    return self.inner.attend(q_BTNH, last_BT, sm_scale=sm_scale)

  def rollback(self, lengths_B) -> "BlockCausalCache":
    """The inner cache's rollback."""
    return self.replace(inner=self.inner.rollback(lengths_B))

  def nbytes(self) -> int:
    """Bytes of the inner cache."""
    return self.inner.nbytes()


class DiffusionSampleOutput(NamedTuple):
  """What `block_diffusion_generate` returns.

  Attributes:
    tokens: int32 `[B, total_len]`, the prompt followed by the generated tokens (no MASK left).
    steps: int32 `[B, num_gen_blocks]`, denoising steps (model calls in which the row still had a
      MASK) for every generated block, `num_gen_blocks = total_len // L − P // L`; each is in
      `[1, number of MASKs the block started with]`.
    calls: int32 scalar, denoising forward passes run (the loop runs max over rows per block).
  """
  tokens: jax.Array
  steps: jax.Array
  calls: jax.Array


def init_block_caches(model, batch: int, total_len: int, block_size: int, cache=DenseCache):
  """One `BlockCausalCache` per layer over `cache` (a protocol class or `CacheConfig`)."""
  cfg = model.cfg
  cc = as_cache_config(cache)
  dtype = cfg.compute_dtype if cc.dtype is None else cc.dtype
  return [BlockCausalCache.init(batch, total_len, cfg.num_kv_heads, cfg.head_dim, dtype,
                                block_size=block_size, inner=cc.cls, inner_options=cc.options)
          for _ in range(cfg.num_layers)]


def block_logits_cached(model, params, caches, xb_BL, start):
  """Logits `[B, L, V]` of the block `xb_BL` at positions start..start+L−1 over the cached context.

  The caches are not modified (the block's keys/values go to a copy that is dropped).
  """
  B, L = xb_BL.shape
  pos_BL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
  logits_BLV, _ = model.apply(params, xb_BL, positions_BT=pos_BL, caches=caches)
  return logits_BLV


def _restrict(logits_BLV, allowed_vocab):
  if allowed_vocab is None:
    return logits_BLV
  V = logits_BLV.shape[-1]
  keep_V = jnp.arange(V) < allowed_vocab
  return jnp.where(keep_V, logits_BLV, -jnp.inf)


def generate_program(params, prompt_BP, key, threshold, *, model, total_len: int,
                     block_size: int, temperature: float, mask_id: int, cache,
                     allowed_vocab: Optional[int]):
  """The traceable body of `block_diffusion_generate` (see there)."""
  B, P = prompt_BP.shape
  L = block_size
  nb = total_len // L
  first = P // L  # complete prompt blocks, prefilled
  caches = init_block_caches(model, B, total_len, L, cache)
  x_BT = jnp.full((B, total_len), mask_id, jnp.int32)
  x_BT = jax.lax.dynamic_update_slice(x_BT, prompt_BP.astype(jnp.int32), (0, 0))
  if first > 0:
    n = first * L
    pos_Bn = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
    _, caches = model.apply(params, x_BT[:, :n], positions_BT=pos_Bn, caches=caches)
  steps_BG = jnp.zeros((B, nb - first), jnp.int32)

  def cond(carry):
    b = carry[0]
    return b < nb

  def body(carry):
    b, x, caches, steps, calls, k = carry
    start = b * L
    if k is None:
      sub = None
    else:
      k, sub = jax.random.split(k)

    def logits_fn(xb_BL):
      return _restrict(block_logits_cached(model, params, caches, xb_BL, start), allowed_vocab)

    xb_BL = jax.lax.dynamic_slice_in_dim(x, start, L, axis=1)
    xb_BL, s_B = D.denoise_block(logits_fn, xb_BL, mask_id, threshold, key=sub,
                                 temperature=temperature)
    pos_BL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    _, caches = model.apply(params, xb_BL, positions_BT=pos_BL, caches=caches)
    x = jax.lax.dynamic_update_slice(x, xb_BL, (0, start))
    steps = jax.lax.dynamic_update_slice(steps, s_B[:, None], (0, b - first))
    calls = calls + jnp.max(s_B)  # the denoising loop ran max-over-rows iterations
    return b + 1, x, caches, steps, calls, k

  init = (jnp.int32(first), x_BT, caches, steps_BG, jnp.int32(0), key)
  _, x_BT, _, steps_BG, calls, _ = jax.lax.while_loop(cond, body, init)
  return DiffusionSampleOutput(tokens=x_BT, steps=steps_BG, calls=calls)


_generate_jit = jax.jit(generate_program, static_argnames=(
    "model", "total_len", "block_size", "temperature", "mask_id", "cache",
    "allowed_vocab"))


def block_diffusion_generate(model, params, prompt_BP, *, total_len: int, block_size: int,
                             threshold: float = 0.9, key: Optional[jax.Array] = None,
                             temperature: float = 1.0, mask_id: int = MASK_ID,
                             cache=DenseCache,
                             allowed_vocab: Optional[int] = None) -> DiffusionSampleOutput:
  """Generates `total_len − P` tokens after `prompt_BP` with BD3-LM + Fast-dLLM (module docstring).

  Args:
    model: an `effjax.models.Transformer` trained as a block-diffusion LM (`data.task="bd3lm"`, or
      "mdlm" with `block_size = total_len`).
    params: its variables (`{"params": ...}`) or the raw params tree.
    prompt_BP: int `[B, P]` prompt (every row has length P; P may be 0).
    total_len: prompt + generated length; a multiple of `block_size`, <= `model.cfg.max_seq_len`.
    block_size: L.
    threshold: Fast-dLLM confidence threshold (commit iff confidence > threshold; at least one
      token per step); a traced scalar (changing it does not recompile).
    key: None for greedy proposals (argmax), else proposals are sampled at `temperature`.
    temperature: > 0; used only with a key.
    mask_id: the MASK id (259 for the byte tokenizer).
    cache: the inner KV-cache class or `effjax.kv.CacheConfig` (dense by default).
    allowed_vocab: optional; proposals restricted to ids < allowed_vocab.

  Returns:
    `DiffusionSampleOutput(tokens, steps, calls)`.

  Raises:
    ValueError: naming the argument for inconsistent lengths.
  """
  if prompt_BP.ndim != 2:
    raise ValueError(f"block_diffusion_generate: prompt_BP must be [batch, P], got shape "
                     f"{prompt_BP.shape}")
  P = prompt_BP.shape[1]
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_diffusion_generate: block_size must be a positive int, got "
                     f"{block_size!r}")
  if total_len % block_size or not P < total_len <= model.cfg.max_seq_len:
    raise ValueError(f"block_diffusion_generate: total_len={total_len} must be a multiple of "
                     f"block_size={block_size}, > the prompt length {P} and <= "
                     f"model.max_seq_len={model.cfg.max_seq_len}")
  if key is not None and not temperature > 0:
    raise ValueError(f"block_diffusion_generate: temperature must be > 0, got {temperature}")
  if allowed_vocab is not None and not 0 < allowed_vocab <= model.cfg.vocab_size:
    raise ValueError(f"block_diffusion_generate: allowed_vocab must be in [1, vocab_size], got "
                     f"{allowed_vocab}")
  if not (isinstance(params, dict) and "params" in params):
    params = {"params": params}
  return _generate_jit(params, prompt_BP, key, jnp.asarray(threshold, jnp.float32), model=model,
                       total_len=int(total_len), block_size=int(block_size),
                       temperature=float(temperature), mask_id=int(mask_id),
                       cache=as_cache_config(cache), allowed_vocab=allowed_vocab)


__all__ = ["BlockCausalCache", "DiffusionSampleOutput", "block_diffusion_generate",
           "block_logits_cached", "generate_program", "init_block_caches"]
