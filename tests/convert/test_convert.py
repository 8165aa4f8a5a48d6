"""load_hf_llama against transformers' own forward pass on tiny random Llama checkpoints."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_helpers import VARIANTS, hf_logits, save_tiny_llama

from lola_jax import model
from lola_jax.convert import load_hf_llama
from lola_jax.model import layers

TOKENS = np.random.RandomState(0).randint(0, 97, (2, 40))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: (path, hf_model)}; the GQA one is sharded (index + several files)."""
  out = {}
  for variant in VARIANTS:
    path = tmp_path_factory.mktemp(variant)
    shard = "40KB" if variant == "gqa" else None
    out[variant] = (str(path), save_tiny_llama(path, variant, max_shard_size=shard))
  return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_softmax_logits_match_transformers(checkpoints, variant):
  path, hf = checkpoints[variant]
  config, params = load_hf_llama(path)
  assert config.attention == "softmax" and not config.scale_embeddings
  assert config.tie_embeddings == VARIANTS[variant]["tie_word_embeddings"]
  assert config.num_kv_heads == VARIANTS[variant]["num_key_value_heads"]
  if "rope_scaling" in VARIANTS[variant]:
    assert config.rope_scaling == layers.RopeScaling(
      "llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=16
    )
  ours = np.asarray(model.logits(config, params, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(ours, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["mha_tied", "gqa_llama3_rope"])
def test_lola_with_cache_at_least_t_matches_transformers(checkpoints, variant):
  path, hf = checkpoints[variant]
  config, params = load_hf_llama(path, attention="lola", chunk_size=8, cache_size=40)
  ours = np.asarray(model.logits(config, params, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(ours, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_sharded_index_is_read(checkpoints):
  path, _ = checkpoints["gqa"]
  with open(os.path.join(path, "model.safetensors.index.json")) as fh:
    assert len(set(json.load(fh)["weight_map"].values())) > 1


def test_overrides_and_fresh_feature_maps(checkpoints):
  path, _ = checkpoints["gqa"]
  config, params = load_hf_llama(
    path, attention="hybrid", chunk_size=16, feature_dim=8, mix="lolcats", gate_init=-2.0
  )
  assert (
    config.feature_dim == 8 and config.lola.mix == "lolcats" and config.lola_config.cache_size == 0
  )
  attn = params["blocks"][0]["attn"]
  assert attn["phi_q"]["w"].shape == (4, 16, 8) and attn["phi_k"]["w"].shape == (2, 16, 8)
  np.testing.assert_allclose(attn["gate"]["logit"], -2.0)
  assert np.isfinite(np.asarray(model.logits(config, params, jnp.asarray(TOKENS)))).all()


def _save_lolcats(path, num_layers=2, hq=4, d=16, f=8, skip=None, bad_shape=None):
  from safetensors.numpy import save_file

  rng = np.random.RandomState(1)
  tensors = {}
  for i in range(num_layers):
    p = f"base_model.model.model.layers.{i}.self_attn."
    tensors[p + "feature_map_q.mlp.layer"] = rng.randn(hq, d, f).astype(np.float32)
    tensors[p + "feature_map_k.mlp.layer"] = rng.randn(hq, d, f).astype(np.float32)
    tensors[p + "window_factors"] = rng.randn(1, hq, 1, 1).astype(np.float32)
  if bad_shape:
    tensors[bad_shape] = np.zeros((3, 3), np.float32)
  for name in list(tensors):
    if skip and name.endswith(skip):
      del tensors[name]
  save_file(tensors, str(path))
  return tensors


def test_lolcats_weights_load_with_repeated_kv_heads(checkpoints, tmp_path):
  path, hf = checkpoints["gqa"]
  saved = _save_lolcats(tmp_path / "lolcats.safetensors")
  config, params = load_hf_llama(
    path, attention="hybrid", chunk_size=8, lolcats_path=str(tmp_path / "lolcats.safetensors")
  )
  assert config.num_kv_heads == config.num_heads == 4
  assert config.feature_dim == 8 and config.lola.mix == "lolcats"
  attn = params["blocks"][1]["attn"]
  p = "base_model.model.model.layers.1.self_attn."
  np.testing.assert_array_equal(attn["phi_k"]["w"], saved[p + "feature_map_k.mlp.layer"])
  np.testing.assert_array_equal(attn["gate"]["logit"], saved[p + "window_factors"].reshape(4))
  # Repeating kv heads is exact: softmax mode of the same weights still equals transformers.
  soft = config.replace(attention="softmax")
  ours = np.asarray(model.logits(soft, params, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(ours, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)
  assert np.isfinite(np.asarray(model.logits(config, params, jnp.asarray(TOKENS)))).all()


def _copy_without(src, dst, drop=None, reshape=None):
  """Rewrite a single-file checkpoint dropping / re-shaping one tensor."""
  from safetensors.numpy import load_file, save_file

  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if drop:
    del tensors[drop]
  if reshape:
    tensors[reshape] = tensors[reshape][:-1]
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as fh:
    cfg = json.load(fh)
  with open(os.path.join(dst, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  return cfg


def test_errors_name_the_tensor(checkpoints, tmp_path):
  src, _ = checkpoints["mha_tied"]
  name = "model.layers.1.mlp.up_proj.weight"
  _copy_without(src, tmp_path / "a", drop=name)
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    load_hf_llama(str(tmp_path / "a"))
  _copy_without(src, tmp_path / "b", reshape=name)
  with pytest.raises(
    ValueError, match=r"up_proj\.weight' has shape \(127, 64\), expected \(128, 64\)"
  ):
    load_hf_llama(str(tmp_path / "b"))
  _save_lolcats(tmp_path / "l.safetensors", skip="layers.1.self_attn.window_factors")
  with pytest.raises(ValueError, match=r"missing tensor 'layers\.1\.self_attn\.window_factors'"):
    load_hf_llama(src, lolcats_path=str(tmp_path / "l.safetensors"))


@pytest.mark.parametrize(
  "change, match",
  [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    (
      {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
      "rope_type 'yarn'",
    ),
  ],
)
def test_unsupported_config_raises(checkpoints, tmp_path, change, match):
  src, _ = checkpoints["mha_tied"]
  cfg = _copy_without(src, tmp_path)
  cfg.update(change)
  with open(tmp_path / "config.json", "w") as fh:
    json.dump(cfg, fh)
  with pytest.raises(ValueError, match=match):
    load_hf_llama(str(tmp_path))


def test_unknown_override_raises(checkpoints):
  with pytest.raises(ValueError, match="unknown override"):
    load_hf_llama(checkpoints["gqa"][0], chunk=3)


def test_bfloat16_checkpoint_loads_without_torch_dtype_support(tmp_path, checkpoints):
  import ml_dtypes
  import torch
  from safetensors.numpy import load_file
  from safetensors.torch import save_file

  src, _ = checkpoints["mha_tied"]
  cfg = _copy_without(src, tmp_path)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  save_file(
    {k: torch.tensor(v).to(torch.bfloat16) for k, v in tensors.items()},
    str(tmp_path / "model.safetensors"),
  )
  del cfg
  config, params = load_hf_llama(str(tmp_path))
  want = tensors["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(params["embed"]["embedding"], want)
  assert params["embed"]["embedding"].dtype == jnp.float32
  assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.float32, params))
