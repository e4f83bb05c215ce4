"""Split-K Pallas GEMV (pallas_kernels/gemv.py) vs its float32 reference, and its use by the model."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from effjax.config import ModelConfig
from effjax.layers.linear import matvec_layout, project
from effjax.models.transformer import Transformer
from pallas_kernels.gemv import MAX_M, gemv, gemv_reference
from tests.conftest import rel_err

INTERPRET = jax.default_backend() != "gpu"


@pytest.mark.parametrize("m,layout,mode,split", [(1, "kn", None, 4), (3, "kn", "dot", 2),
                                                  (5, "kn", "fma", 1), (1, "nk", None, 2),
                                                  (7, "nk", "dot", 4), (MAX_M, "nk", "fma", 1)])
def test_matches_reference(rng, m, layout, mode, split):
  k = 32 * split * int(rng.integers(1, 4))
  n = 32 * int(rng.integers(1, 5))
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((k, n) if layout == "kn" else (n, k)), jnp.bfloat16)
  y = gemv(x, w, w_layout=layout, mode=mode, block_n=32, block_k=32, split_k=split,
           out_dtype=jnp.float32, interpret=INTERPRET)
  assert y.shape == (m, n) and y.dtype == jnp.float32
  # bf16 inputs, float32 accumulation: only summation order differs from the float32 reference
  assert rel_err(y, gemv_reference(x, w, w_layout=layout)) < 1e-5


def test_default_blocks_and_bf16_out(rng):
  x = jnp.asarray(rng.standard_normal((2, 512)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((512, 384)), jnp.bfloat16)
  y = gemv(x, w, interpret=INTERPRET)
  assert y.dtype == jnp.bfloat16
  assert rel_err(y, gemv_reference(x, w)) < 1e-2


def test_errors_name_the_argument(rng):
  x = jnp.ones((2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="w_layout"):
    gemv(x, jnp.ones((64, 32), jnp.bfloat16), w_layout="kk")
  with pytest.raises(ValueError, match="disagree on K"):
    gemv(x, jnp.ones((48, 32), jnp.bfloat16))
  with pytest.raises(ValueError, match="M"):
    gemv(jnp.ones((MAX_M + 1, 64), jnp.bfloat16), jnp.ones((64, 32), jnp.bfloat16))
  with pytest.raises(ValueError, match="tile"):
    gemv(x, jnp.ones((64, 48), jnp.bfloat16), block_n=32)
  with pytest.raises(ValueError, match="mode"):
    gemv(x, jnp.ones((64, 32), jnp.bfloat16), mode="wmma")


def test_project_rejects_unknown_impl():
  with pytest.raises(ValueError, match="matvec_impl"):
    project("BD,DF->BF", jnp.ones((1, 8)), jnp.ones((8, 4)), matvec_impl="cublas")


def test_matvec_layout():
  assert matvec_layout("BTD,DNH->BTNH") == ("kn", 1)
  assert matvec_layout("BTNH,NHD->BTD") == ("kn", 2)
  assert matvec_layout("BTD,VD->BTV") == ("nk", 1)
  assert matvec_layout("BTD,DV->BTV") == ("kn", 1)
  assert matvec_layout("BTNH,HND->BTD") is None   # contracted axes in another order
  assert matvec_layout("BTD,DNH->BNTH") is None   # output axes moved


@pytest.mark.parametrize("eqn,xs,ws", [("BTD,DNH->BTNH", (2, 1, 64), (64, 4, 16)),
                                       ("BTNH,NHD->BTD", (1, 3, 4, 16), (4, 16, 96)),
                                       ("BTD,VD->BTV", (3, 1, 64), (160, 64))])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_project_equals_einsum(rng, eqn, xs, ws, impl):
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  w = jnp.asarray(rng.standard_normal(ws), jnp.float32)
  ref = jnp.einsum(eqn, x, w, precision=jax.lax.Precision.HIGHEST)
  with jax.default_matmul_precision("float32"):
    out = project(eqn, x, w, matvec_impl=impl)
  assert out.shape == ref.shape
  assert rel_err(out, ref) < 1e-5


def test_model_decode_logits_same_with_pallas_matvec(rng):
  cfg = ModelConfig(vocab_size=320, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=128, max_seq_len=32)
  tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 1)), jnp.int32)
  params = Transformer(cfg).init(jax.random.key(int(rng.integers(1 << 30))), tok)
  with jax.default_matmul_precision("float32"):  # XLA on GPU would use TF32 otherwise
    ref = Transformer(cfg).apply(params, tok)
    out = Transformer(dataclasses.replace(cfg, matvec_impl="pallas")).apply(params, tok)
  assert rel_err(out, ref) < 1e-5
  # the Pallas path is really taken (rows = 3 <= MAX_M): the program holds pallas_calls
  jaxpr = str(jax.make_jaxpr(Transformer(dataclasses.replace(cfg, matvec_impl="pallas")).apply)(
      params, tok))
  assert "gemv_kn" in jaxpr and "gemv_nk" in jaxpr


def test_hybrid_routes_by_weight_size(rng, monkeypatch):
  """matvec_impl="hybrid": the Pallas GEMV for weights up to HYBRID_MAX_WEIGHT_BYTES, XLA above;
  both give the einsum result."""
  from effjax.layers import linear
  x = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32)
  w_small = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)    # 8 KiB
  w_big = jnp.asarray(rng.standard_normal((64, 4, 32)), jnp.float32)   # 32 KiB
  monkeypatch.setattr(linear, "HYBRID_MAX_WEIGHT_BYTES", 16 << 10)
  for w, eqn, pallas in ((w_small, "BTD,DF->BTF", True), (w_big, "BTD,DNH->BTNH", False)):
    jaxpr = str(jax.make_jaxpr(lambda x, w: project(eqn, x, w, matvec_impl="hybrid"))(x, w))
    assert ("gemv_kn" in jaxpr) == pallas, eqn
    with jax.default_matmul_precision("float32"):
      out = project(eqn, x, w, matvec_impl="hybrid")
    ref = jnp.einsum(eqn, x, w, precision=jax.lax.Precision.HIGHEST)
    assert rel_err(out, ref) < 1e-5


def test_auto_routes_only_multi_axis_contractions_on_gpu(rng, monkeypatch):
  """matvec_impl="auto": on a GPU the Pallas GEMV for small weights contracted over more than one
  axis (the attention output projection), XLA for one-axis contractions, big weights and off-GPU."""
  from effjax.layers import linear
  x_o = jnp.asarray(rng.standard_normal((1, 1, 4, 16)), jnp.float32)
  w_o = jnp.asarray(rng.standard_normal((4, 16, 64)), jnp.float32)
  x_q = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32)
  w_q = jnp.asarray(rng.standard_normal((64, 4, 16)), jnp.float32)
  cases = (("BTNH,NHD->BTD", x_o, w_o), ("BTD,DNH->BTNH", x_q, w_q))

  def routes(eqn, x, w):
    return "gemv_kn" in str(jax.make_jaxpr(
        lambda x, w: project(eqn, x, w, matvec_impl="auto"))(x, w))

  on_gpu = jax.default_backend() == "gpu"
  assert [routes(*c) for c in cases] == [on_gpu, False]
  for eqn, x, w in cases:  # runs (XLA off-GPU) and equals the einsum
    with jax.default_matmul_precision("float32"):
      out = project(eqn, x, w, matvec_impl="auto")
    assert rel_err(out, jnp.einsum(eqn, x, w, precision=jax.lax.Precision.HIGHEST)) < 1e-5
  monkeypatch.setattr(linear.jax, "default_backend", lambda: "gpu")
  assert [routes(*c) for c in cases] == [True, False]
  monkeypatch.setattr(linear, "HYBRID_MAX_WEIGHT_BYTES", 1 << 10)
  assert [routes(*c) for c in cases] == [False, False]
