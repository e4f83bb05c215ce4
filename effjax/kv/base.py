"""The KV-cache protocol every cache in `effjax.kv` implements.

A KV cache is an immutable pytree (a `flax.struct` dataclass) holding, per batch row, the keys and
values of the positions a sequence has seen so far for ONE attention layer. The attention layer
(`effjax.layers.attention.Attention`) never reads a cache's internals; it only calls

    cache = cache.update(k_BTKH, v_BTKH, positions_BT)   # keys already RoPE'd
    out_BTNH = cache.attend(q_BTNH, positions_BT)        # queries already RoPE'd

so a compressed cache (TurboQuant, KIVI), an evicting cache (TriAttention) or a host-offloaded
cache (AsyncTLS) can score queries against its own representation without materialising
bf16 keys. Caches are interchangeable in `effjax.decode.generate`.

Protocol (shapes: B batch, T new tokens, S cache slots, K kv heads, N query heads, H head dim):

* `Cache.init(batch, max_len, num_kv_heads, head_dim, dtype, **options) -> cache` (classmethod):
  an empty cache for positions `0 .. max_len - 1`, with `lengths == 0` for every row.
* `cache.update(k_BTKH, v_BTKH, positions_BT) -> cache`: stores the keys/values of the `T` new
  tokens of every row at their absolute positions `positions_BT` (int32, `0 <= p < max_len`).
  Rows are independent (ragged batches use different positions per row). After the call,
  `lengths[b] = max(lengths[b], max_t positions_BT[b, t] + 1)`.
  Writing a position that is already stored OVERWRITES it: this is how rejected speculative
  tokens and right-padding garbage disappear (see "Rollback" below).
  Requirement (not checked inside jit): a row's positions are written without gaps, i.e. an
  update for row b only writes positions `<= lengths[b] + T - 1` after any rollback.
* `cache.attend(q_BTNH, positions_BT, *, sm_scale=None) -> out_BTNH`: causal attention **by
  position**: the query of row b at position p sees exactly the stored entries of row b whose
  positions are `<= p` (multi-token `T` for prefill and speculative verification, `T = 1` for
  decode). `sm_scale` defaults to `head_dim ** -0.5`. GQA: query head n reads kv head
  `n // (N // K)`; a cache never repeats K/V across the group. Output dtype = `q`'s dtype.
  `attend` must be called after the `update` that wrote the queries' own positions.
* `cache.rollback(lengths_B) -> cache`: truncates row b to its first `lengths_B[b]` positions
  (`lengths_B <= lengths`, not checked inside jit). It is O(B): caches that index slots by
  position (dense) only reset `lengths`; entries at positions `>= lengths_B[b]` become invisible
  to every later query because those positions are rewritten before any query at or after them
  attends (the gap-free requirement above). Caches whose internal state depends on the length
  (quantisation groups, eviction scores) must restore whatever they need here; a cache that
  cannot roll back a given distance raises at trace time naming the limit.
  Uses: speculative decoding (verify γ tokens, keep the accepted prefix), and generate's
  right-padded prefill (roll back to the true prompt lengths).
* `cache.lengths`: int32 `[B]`, the number of valid positions per row (the next position to
  write). `cache.max_len`: static int, the number of positions the cache can hold.
* `cache.nbytes() -> int`: bytes of device memory the cache's arrays occupy (static; counts
  every array of the pytree, including metadata such as `lengths`).
* Optional fusion: a cache may also define `update_and_attend(k_BTKH, v_BTKH, q_BTNH,
  positions_BT, *, sm_scale=None) -> (cache, out_BTNH)` that must equal `update` followed by
  `attend`; the attention layer calls `update_and_attend(cache, ...)` below, which uses the
  cache's method when it has one. The dense cache uses it to write a decode step's key/value
  inside its attention kernel (one kernel instead of a scatter plus the kernel).

Semantics shared by all caches, so they agree with the dense reference up to compression error:
positions are absolute token positions (the same numbers given to RoPE), and the dense cache
(`effjax.kv.dense.DenseCache`) is the exact reference every other cache is tested against.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class KVCache(Protocol):
  """Structural type of a per-layer KV cache (see the module docstring for the contract)."""

  lengths: jax.Array

  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype,
           **options) -> "KVCache":
    """An empty cache for `batch` rows and positions `0 .. max_len - 1`."""
    ...

  @property
  def max_len(self) -> int:
    """Static number of positions the cache can hold."""
    ...

  def update(self, k_BTKH: jax.Array, v_BTKH: jax.Array, positions_BT: jax.Array) -> "KVCache":
    """Stores new keys/values at absolute positions; returns the new cache."""
    ...

  def attend(self, q_BTNH: jax.Array, positions_BT: jax.Array, *,
             sm_scale: float | None = None) -> jax.Array:
    """Causal-by-position attention of `q_BTNH` over the stored entries."""
    ...

  def rollback(self, lengths_B: jax.Array) -> "KVCache":
    """Truncates each row to its first `lengths_B[b]` positions."""
    ...

  def nbytes(self) -> int:
    """Device bytes held by the cache's arrays."""
    ...


def update_and_attend(cache, k_BTKH, v_BTKH, q_BTNH, positions_BT, *, sm_scale=None):
  """`cache.update(k, v, positions)` then `.attend(q, positions)`: returns (cache, out_BTNH).

  Uses the cache's own fused `update_and_attend` when it defines one (see the module docstring).
  """
  fused = getattr(cache, "update_and_attend", None)
  if fused is not None:
    return fused(k_BTKH, v_BTKH, q_BTNH, positions_BT, sm_scale=sm_scale)
  cache = cache.update(k_BTKH, v_BTKH, positions_BT)
  return cache, cache.attend(q_BTNH, positions_BT, sm_scale=sm_scale)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """A hashable recipe for building one cache per layer (what `generate(cache=...)` takes).

  Attributes:
    cls: a class implementing `KVCache` (e.g. `effjax.kv.DenseCache`).
    dtype: storage dtype name (`"bfloat16"`, `"float32"`, ...) or None for the model's compute
      dtype.
    options: extra keyword options for `cls.init`, as a tuple of `(name, value)` pairs so the
      config stays hashable (one compiled `generate` per distinct config).
  """
  cls: Any
  dtype: str | None = None
  options: tuple = ()

  def __post_init__(self):
    for name in ("init", "update", "attend", "rollback", "nbytes"):
      if not callable(getattr(self.cls, name, None)):
        raise TypeError(f"CacheConfig.cls: {self.cls!r} does not implement the KV-cache protocol "
                        f"(missing method {name!r}; see effjax.kv.base)")
    if not isinstance(self.options, tuple) or any(
        not (isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str))
        for o in self.options):
      raise TypeError(f"CacheConfig.options must be a tuple of (name, value) pairs, got "
                      f"{self.options!r}")

  def make(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, default_dtype):
    """Builds one empty cache (`cls.init(...)` with this config's dtype and options)."""
    dtype = default_dtype if self.dtype is None else self.dtype
    return self.cls.init(batch, max_len, num_kv_heads, head_dim, dtype, **dict(self.options))


def as_cache_config(cache) -> CacheConfig:
  """Accepts a `CacheConfig` or a cache class and returns a `CacheConfig`.

  Raises:
    TypeError: naming the argument when `cache` is neither.
  """
  if isinstance(cache, CacheConfig):
    return cache
  if isinstance(cache, type):
    return CacheConfig(cache)
  raise TypeError(f"cache: expected a KV-cache class (e.g. effjax.kv.DenseCache) or a "
                  f"effjax.kv.CacheConfig, got {cache!r}")


def init_layer_caches(cache, num_layers: int, batch: int, max_len: int, num_kv_heads: int,
                      head_dim: int, default_dtype) -> list:
  """`num_layers` empty caches built from `cache` (a class or `CacheConfig`)."""
  cfg = as_cache_config(cache)
  return [cfg.make(batch, max_len, num_kv_heads, head_dim, default_dtype)
          for _ in range(num_layers)]


def check_new_kv(cache_name: str, name: str, x_BTKH, positions_BT, *, batch: int, kv_heads: int,
                 head_dim: int):
  """Shape check for `update`'s new keys/values: `[batch, T, kv_heads, head_dim]` + `[batch, T]`.

  Raises:
    ValueError: naming the cache, the argument and the expected shape.
  """
  B, K, H = batch, kv_heads, head_dim
  if x_BTKH.ndim != 4 or x_BTKH.shape[0] != B or x_BTKH.shape[2:] != (K, H):
    raise ValueError(f"{cache_name}.update: {name} must be [batch={B}, T, kv_heads={K}, "
                     f"head_dim={H}], got {x_BTKH.shape}")
  if positions_BT.shape != x_BTKH.shape[:2]:
    raise ValueError(f"{cache_name}.update: positions_BT must be {x_BTKH.shape[:2]}, got "
                     f"{positions_BT.shape}")


def check_attend_args(cache_name: str, q_BTNH, positions_BT, *, batch: int, kv_heads: int,
                      head_dim: int) -> tuple[int, int]:
  """Shape check for `attend`'s query and positions; returns (T, num_heads).

  Raises:
    ValueError: naming the cache, the argument and the expected shape.
  """
  B, K, H = batch, kv_heads, head_dim
  if q_BTNH.ndim != 4 or q_BTNH.shape[0] != B or q_BTNH.shape[3] != H:
    raise ValueError(f"{cache_name}.attend: q_BTNH must be [batch={B}, T, heads, head_dim={H}], "
                     f"got {q_BTNH.shape}")
  _, T, N, _ = q_BTNH.shape
  if N % K:
    raise ValueError(f"{cache_name}.attend: query heads ({N}) must be a multiple of kv heads "
                     f"({K})")
  if positions_BT.shape != (B, T):
    raise ValueError(f"{cache_name}.attend: positions_BT must be {(B, T)}, got "
                     f"{positions_BT.shape}")
  return T, N
