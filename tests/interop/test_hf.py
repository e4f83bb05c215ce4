"""Hugging Face import: tiny random Llama/Mistral/Qwen2/Qwen3 models built with `transformers`
(CPU torch, from a config, never downloaded) must give the same float32 logits and the same greedy
tokens through effjax.interop.hf + effjax.decode.generate."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decode.generate import generate
from effjax.interop import hf
from effjax.models.transformer import Transformer
from tests.conftest import rel_err

torch = pytest.importorskip("torch", reason="needs the `hf` extra (torch CPU) to build reference "
                            "models")
transformers = pytest.importorskip("transformers", reason="needs the `hf` extra (transformers)")
pytest.importorskip("safetensors", reason="needs the `hf` extra (safetensors)")

VOCAB = 211
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}

CASES = {
    # name: (config class, model class, extra config, save kwargs)
    "llama_llama3_untied_sharded": ("LlamaConfig", "LlamaForCausalLM",
                                    dict(rope_scaling=LLAMA3, tie_word_embeddings=False,
                                         rope_theta=5000.0),
                                    dict(max_shard_size="60KB")),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None), {}),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False), {}),
    "qwen3_qknorm_headdim": ("Qwen3Config", "Qwen3ForCausalLM",
                             dict(head_dim=24, tie_word_embeddings=True), {}),
}


def _build(name, rng, tmp_path):
  cfg_cls, model_cls, extra, save_kw = CASES[name]
  config = getattr(transformers, cfg_cls)(**BASE, **extra)
  torch.manual_seed(int(rng.integers(1 << 31)))
  model = getattr(transformers, model_cls)(config).float().eval()
  with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb every tensor
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path), **save_kw)
  return model


def _hf_greedy(model, prompt, n):
  seq = list(prompt)
  with torch.no_grad():
    for _ in range(n):
      seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
  return seq[len(prompt):]


@pytest.mark.usefixtures("float32_matmuls")  # the 1e-4 bound is float32 parity (no TF32 on a GPU)
@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_greedy_match_transformers(name, rng, tmp_path):
  model = _build(name, rng, tmp_path)
  if "sharded" in name:
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
  cfg, params = hf.load(str(tmp_path))
  assert cfg.tie_embeddings == ("head" not in params["params"])
  ids = rng.integers(0, VOCAB, size=(2, int(rng.integers(20, 40))))
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  out = np.asarray(Transformer(cfg).apply(params, jnp.asarray(ids)))
  assert rel_err(out, ref) < 1e-4
  # Greedy, 32 tokens, as a ragged batch of two prompts; each row vs transformers alone.
  prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in (5, int(rng.integers(7, 14)))]
  got = generate(Transformer(cfg), params, prompts, max_new_tokens=32)
  for i, p in enumerate(prompts):
    np.testing.assert_array_equal(np.asarray(got.tokens[i]), _hf_greedy(model, p, 32),
                                  err_msg=f"{name} row {i}")


def test_bfloat16_load_and_unmapped_tensor(rng, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model = _build("llama_tied", rng, tmp_path)
  cfg, params = hf.load(str(tmp_path), dtype="bfloat16")
  leaves = jax.tree_util.tree_leaves(params)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  ids = rng.integers(0, VOCAB, size=(1, 17))
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  out = np.asarray(Transformer(cfg).apply(params, jnp.asarray(ids)))
  assert rel_err(out, ref) < 5e-2  # bf16 weights and activations
  save_file({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)},
            str(tmp_path / "extra.safetensors"))
  with pytest.raises(hf.HFImportError, match="o_proj.bias"):
    hf.load(str(tmp_path))


def _cfg(**kw):
  d = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
           max_position_embeddings=512)
  d.update(kw)
  return d


def test_config_mapping_and_errors(tmp_path):
  # transformers 4.x style fields.
  c = hf.config_from_hf(_cfg(rope_theta=500000.0, rope_scaling={"type": "llama3", **{
      k: v for k, v in LLAMA3.items() if k != "rope_type"}}))
  assert c.rope_theta == 500000.0 and c.rope_scaling == "llama3" and c.rope_original_max_len == 32
  # Mistral with a sliding window shorter than the max length: exact within the window.
  c = hf.config_from_hf(_cfg(model_type="mistral", sliding_window=128))
  assert c.max_seq_len == 128
  c = hf.config_from_hf(_cfg(model_type="qwen3", head_dim=40))
  assert c.head_dim == 40 and c.qk_norm and not c.attention_bias
  assert hf.config_from_hf(_cfg(model_type="qwen2")).attention_bias
  bad = [(_cfg(model_type="gpt2"), "model_type"),
         (_cfg(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "yarn"),
         (_cfg(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
         (_cfg(hidden_act="gelu"), "hidden_act"),
         (_cfg(attention_bias=True), "attention_bias"),
         (_cfg(mlp_bias=True), "mlp_bias"),
         (_cfg(model_type="qwen2", use_sliding_window=True), "use_sliding_window")]
  for d, word in bad:
    with pytest.raises(hf.HFImportError, match=word):
      hf.config_from_hf(d)
  with pytest.raises(hf.HFImportError, match="config.json"):
    hf.load(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(_cfg()))
  with pytest.raises(hf.HFImportError, match="safetensors"):
    hf.load(str(tmp_path))
