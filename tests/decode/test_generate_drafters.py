"""`generate(drafter=...)`: one loop for plain, draft-model and DFlash decoding. Greedy speculative
output equals plain greedy output token for token (ragged batch), statistics are consistent, the
drafter objects are static (one compile per bucket) and the program has one `while`."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig
from effjax.decode import DFlash, DraftModel, generate
from effjax.decode.generate import generate_program, trace_count
from effjax.decode.sampling import GREEDY
from effjax.kv import CacheConfig, DenseCache
from effjax.models import dflash as DM
from effjax.models.transformer import Transformer

V = 29
T_CFG = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    mlp_dim=48, max_seq_len=64)
D_CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=24, max_seq_len=64)


@pytest.fixture(scope="module")
def setup():
  seed = int.from_bytes(np.random.bytes(4), "little")
  print(f"[param seed {seed}]")
  target, draft = Transformer(T_CFG), Transformer(D_CFG)
  init = lambda m, k: nn.unbox(m.init(k, jnp.zeros((1, 4), jnp.int32)))
  # Weights ×3: a random model's greedy output is otherwise a constant repeat.
  tp = jax.tree_util.tree_map(lambda l: l * 3.0 if l.ndim >= 2 else l,
                              init(target, jax.random.key(seed)))
  dp = init(draft, jax.random.key(seed + 1))
  dcfg = DM.DFlashConfig(block_size=4, num_layers=1, target_layers=(0, 1), mask_id=V - 1)
  module = DM.DFlashDrafter(DM.drafter_model_config(T_CFG, dcfg), len(dcfg.target_layers))
  fp = {"params": DM.init_drafter_params(module, jax.random.key(seed + 2), tp["params"],
                                         init_from_target=True, target_num_layers=2)}
  drafters = {"draft-model": (DraftModel(draft, 3), dp), "dflash": (DFlash(module, dcfg), fp)}
  return target, tp, drafters


def test_drafters_equal_plain_greedy(rng, setup):
  target, tp, drafters = setup
  prompts = [rng.integers(0, V - 1, size=int(n)).tolist() for n in rng.integers(1, 14, size=3)]
  N = 15
  plain = generate(target, tp, prompts, max_new_tokens=N, bucket=16)
  ref = np.asarray(plain.tokens)
  assert len(set(ref.ravel().tolist())) >= 4, "degenerate greedy output: the test lacks power"
  np.testing.assert_array_equal(np.asarray(plain.target_calls), [N - 1] * 3)
  np.testing.assert_array_equal(np.asarray(plain.accepted), [0] * 3)
  assert float(plain.mean_accept_length) == 1.0
  for name, (drafter, dparams) in drafters.items():
    out = generate(target, tp, prompts, max_new_tokens=N, bucket=16, drafter=drafter,
                   drafter_params=dparams)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref, err_msg=name)
    np.testing.assert_array_equal(np.asarray(out.lengths), [N] * 3, err_msg=name)
    calls, acc = np.asarray(out.target_calls), np.asarray(out.accepted)
    assert np.all(calls + acc == N - 1), name
    assert int(out.steps) == calls.max()
    np.testing.assert_allclose(float(out.mean_accept_length), 3 * (N - 1) / calls.sum(),
                               rtol=1e-6)
    # A fresh but equal drafter object and new prompts of the same bucket: no new compile.
    before = trace_count()
    again = type(drafter)(*[getattr(drafter, f.name) for f in
                            drafter.__dataclass_fields__.values()])
    generate(target, tp, [p[::-1] for p in prompts], max_new_tokens=N, bucket=16, drafter=again,
             drafter_params=dparams)
    assert trace_count() == before, name
    # One `while` for the whole program (prefill + loop).
    fn = functools.partial(generate_program, model=target, sampler=GREEDY,
                           cache_config=CacheConfig(DenseCache), max_new_tokens=5, eos_ids=(3,),
                           pad_id=0, drafter=drafter)
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a[:4], drafter_params=a[4]))(
        tp, jnp.zeros((2, 16), jnp.int32), jnp.array([3, 16]), jax.random.key(0), dparams)
    whiles = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    assert len(whiles) == 1, name


def test_drafter_argument_errors(setup):
  target, tp, drafters = setup
  drafter, _ = drafters["draft-model"]
  with pytest.raises(ValueError, match="drafter_params"):
    generate(target, tp, [[1, 2]], max_new_tokens=3, drafter=drafter)
  with pytest.raises(TypeError, match="drafter"):
    generate(target, tp, [[1, 2]], max_new_tokens=3, drafter="dflash", drafter_params={})
  with pytest.raises(ValueError, match="gamma"):
    DraftModel(drafter.model, 0)
