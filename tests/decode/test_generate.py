"""generate: incremental == full forward, ragged batches row for row, EOS, one compile, one while."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig
from effjax.decode.generate import (generate, generate_program, prefill, prompt_bucket,
                                    trace_count)
from effjax.decode.sampling import GREEDY, Sampler
from effjax.kv import CacheConfig, DenseCache, init_layer_caches
from effjax.models.transformer import Transformer
from tests.conftest import rel_err

CFG = ModelConfig(vocab_size=263, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=96, max_seq_len=128)


@pytest.fixture(scope="module")
def model_params():
  model = Transformer(CFG)
  seed = int.from_bytes(np.random.bytes(4), "little")
  print(f"[param seed {seed}]")
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))
  return model, params


def _caches(B, max_len, attend_impl="auto"):
  cache = CacheConfig(DenseCache, options=(("attend_impl", attend_impl),))
  return init_layer_caches(cache, CFG.num_layers, B, max_len, CFG.num_kv_heads, CFG.head_dim,
                           jnp.float32)


@pytest.mark.usefixtures("float32_matmuls")  # 1e-5 bounds: no TF32 on a GPU
@pytest.mark.parametrize("attend_impl", ["auto", "pallas"])
def test_incremental_decoding_equals_full_forward(rng, model_params, attend_impl):
  """Right-padded ragged prefill, then single-token steps and a multi-token chunk with rollback.
  attend_impl="pallas": the one-token steps write K/V inside the decode kernel
  (`DenseCache.update_and_attend`; interpret mode on CPU)."""
  model, params = model_params
  B, total = 2, 31
  seqs = rng.integers(0, CFG.vocab_size, size=(B, total)).astype(np.int32)
  lens = np.array([5, 11])
  P = int(lens.max())
  tokens = np.where(np.arange(P)[None] < lens[:, None], seqs[:, :P], 0).astype(np.int32)
  full = np.asarray(model.apply(params, jnp.asarray(seqs)))  # [B, total, V]
  step_fn = jax.jit(lambda c, t, p: model.apply(params, t, positions_BT=p, caches=c))
  last, caches = jax.jit(functools.partial(prefill, model))(
      params, jnp.asarray(tokens), jnp.asarray(lens), _caches(B, total, attend_impl))
  assert rel_err(last, full[np.arange(B), lens - 1]) < 1e-5
  pos = lens.copy()
  for _ in range(6):  # one token per step, rows at different positions
    logits, caches = step_fn(caches, jnp.asarray(seqs[np.arange(B), pos])[:, None],
                             jnp.asarray(pos)[:, None])
    assert rel_err(logits[:, 0], full[np.arange(B), pos]) < 1e-5
    pos = pos + 1
  # Speculative-style chunk of 4 wrong tokens, roll back, then the true chunk.
  T = 4
  pos_BT = jnp.asarray(pos[:, None] + np.arange(T)[None], jnp.int32)
  junk = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(B, T)), jnp.int32)
  _, caches = step_fn(caches, junk, pos_BT)
  caches = [c.rollback(jnp.asarray(pos)) for c in caches]
  true_chunk = jnp.asarray(seqs[np.arange(B)[:, None], np.asarray(pos_BT)])
  logits, caches = step_fn(caches, true_chunk, pos_BT)
  want = full[np.arange(B)[:, None], np.asarray(pos_BT)]
  assert rel_err(logits, want) < 1e-5


def test_ragged_batch_equals_each_prompt_alone_and_eos(rng, model_params):
  """Row for row equal to generating alone; greedy = argmax of a full forward; per-row EOS."""
  model, params = model_params
  lens = [3, 17, int(rng.integers(4, 16))]
  prompts = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in lens]
  N = 12
  batch = generate(model, params, prompts, max_new_tokens=N)
  assert batch.prompt_bucket == 32 and batch.tokens.shape == (3, N)
  np.testing.assert_array_equal(batch.lengths, [N] * 3)
  assert int(batch.steps) == N - 1
  free = np.asarray(batch.tokens)
  for i, p in enumerate(prompts):
    alone = generate(model, params, [p], max_new_tokens=N, bucket=32)
    np.testing.assert_array_equal(free[i], alone.tokens[0], err_msg=f"row {i}")
    # Teacher-forced full forward over prompt + generated: its argmaxes are the generated tokens.
    logits = model.apply(params, jnp.asarray([p + free[i].tolist()]))
    np.testing.assert_array_equal(np.argmax(logits[0, len(p) - 1:-1], -1), free[i])
  # Per-row stop: the token row 0 emits at step 3 becomes EOS.
  eos, pad = int(free[0, 3]), CFG.vocab_size - 1
  out = generate(model, params, prompts, max_new_tokens=N, eos_id=eos, pad_id=pad)
  for b in range(3):
    hits = np.flatnonzero(free[b] == eos)
    n = int(hits[0]) + 1 if hits.size else N
    assert int(out.lengths[b]) == n
    np.testing.assert_array_equal(out.tokens[b, :n], free[b, :n])
    assert (np.asarray(out.tokens[b, n:]) == pad).all()
  assert int(out.steps) == int(np.max(out.lengths)) - 1
  # Several decode steps per while iteration change nothing in the outputs.
  unrolled = generate(model, params, prompts, max_new_tokens=N, eos_id=eos, pad_id=pad, unroll=3)
  np.testing.assert_array_equal(unrolled.tokens, out.tokens)
  np.testing.assert_array_equal(unrolled.lengths, out.lengths)


def test_compiles_once_per_bucket(rng, model_params):
  model, params = model_params
  sampler = Sampler(temperature=0.8, top_k=20)
  key = jax.random.key(int(rng.integers(1 << 30)))
  before = trace_count()
  a = generate(model, params, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=7, sampler=sampler,
               key=key)
  b = generate(model, params, [rng.integers(0, 200, size=11).tolist(), [9]], max_new_tokens=7,
               sampler=sampler, key=jax.random.split(key)[0])
  assert trace_count() - before == 1, "same (batch, bucket, max_new_tokens) must not retrace"
  assert a.prompt_bucket == b.prompt_bucket == 16
  assert ((np.asarray(b.tokens) >= 0) & (np.asarray(b.tokens) < CFG.vocab_size)).all()
  # Same key, same prompts: same samples (a pure function of the key).
  a2 = generate(model, params, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=7, sampler=sampler,
                key=key)
  np.testing.assert_array_equal(a.tokens, a2.tokens)
  assert trace_count() - before == 1


def _count_primitives(jaxpr, names, acc):
  """Primitive counts of a program, nested jaxprs included, except kernel bodies (a Pallas
  kernel's own loops run on the device inside one launch; on a GPU the decode step has some)."""
  for eqn in jaxpr.eqns:
    acc[eqn.primitive.name] = acc.get(eqn.primitive.name, 0) + 1
    if eqn.primitive.name == "pallas_call":
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _count_primitives(sub, names, acc)
  return acc


def test_decode_loop_is_one_while_without_callbacks(model_params):
  model, params = model_params
  fn = functools.partial(generate_program, model=model, sampler=Sampler(temperature=1.0, top_p=0.9),
                         cache_config=CacheConfig(DenseCache), max_new_tokens=5, eos_ids=(7,),
                         pad_id=0)
  jaxpr = jax.make_jaxpr(fn)(params, jnp.zeros((2, 16), jnp.int32), jnp.array([3, 16]),
                             jax.random.key(0))
  counts = _count_primitives(jaxpr.jaxpr, None, {})
  assert counts.get("while", 0) == 1, counts.get("while")
  callbacks = {k: v for k, v in counts.items() if "callback" in k or k in ("outfeed", "infeed")}
  assert not callbacks, callbacks


def test_argument_errors(model_params):
  model, params = model_params
  with pytest.raises(ValueError, match="key"):
    generate(model, params, [[1, 2]], max_new_tokens=3, sampler=Sampler(temperature=1.0))
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(model, params, [[1] * 100], max_new_tokens=40)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, params, [[1]], max_new_tokens=0)
  with pytest.raises(TypeError, match="cache"):
    generate(model, params, [[1]], max_new_tokens=2, cache="dense")
  assert prompt_bucket(17, 128, 10) == 32
  assert prompt_bucket(100, 128, 10) == 118
  assert GREEDY.is_greedy
