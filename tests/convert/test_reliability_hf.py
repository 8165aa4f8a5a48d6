"""Malformed Hugging Face checkpoints fail with a ValueError naming the file and the field or
tensor (issue 16, item 12): config.json that is not JSON, llama3 rope parameters or
num_attention_heads missing, integer or non-finite weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hf_helpers import LLAMA3_ROPE, save_tiny_llama
from safetensors.numpy import load_file, save_file

from lola_jax.convert import load_hf_llama

NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny")
  save_tiny_llama(path, "mha_tied")
  return str(path)


def _copy(src, dst, *, config=None, tensor=None):
  """A copy of the single-file checkpoint `src` with config.json updated by `config` (a dict, or
  raw text) and `tensor` = (name, function of the array) applied."""
  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if tensor is not None:
    name, fn = tensor
    tensors[name] = fn(tensors[name])
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as fh:
    cfg = json.load(fh)
  with open(os.path.join(dst, "config.json"), "w") as fh:
    if isinstance(config, str):
      fh.write(config)
    else:
      json.dump({**cfg, **(config or {})}, fh)
  return str(dst)


def test_config_json_that_is_not_json(checkpoint, tmp_path):
  path = _copy(checkpoint, tmp_path, config='{"model_type": "llama", "hidden_size": 64,,}')
  with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*line 1"):
    load_hf_llama(path)
  path = _copy(checkpoint, tmp_path / "list", config="[1, 2]")
  with pytest.raises(ValueError, match=r"config\.json must hold a JSON object, got list"):
    load_hf_llama(path)


@pytest.mark.parametrize(
  "field", ["low_freq_factor", "high_freq_factor", "factor", "original_max_position_embeddings"]
)
def test_llama3_rope_without_a_field(checkpoint, tmp_path, field):
  rope = {k: v for k, v in LLAMA3_ROPE.items() if k != field}
  path = _copy(checkpoint, tmp_path, config={"rope_parameters": {**rope, "rope_theta": 1e4}})
  match = rf"config\.json: rope_parameters \(rope_type 'llama3'\) lacks the field '{field}'"
  with pytest.raises(ValueError, match=match):
    load_hf_llama(path)


def test_llama3_rope_scaling_of_older_configs_without_a_field(checkpoint, tmp_path):
  cfg = json.load(open(os.path.join(checkpoint, "config.json")))
  del cfg["rope_parameters"]
  cfg["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}
  path = _copy(checkpoint, tmp_path, config=json.dumps(cfg))
  match = r"config\.json: rope_scaling \(rope_type 'llama3'\) lacks the field 'low_freq_factor'"
  with pytest.raises(ValueError, match=match):
    load_hf_llama(path)


@pytest.mark.parametrize("field", ["num_attention_heads", "hidden_size", "vocab_size"])
def test_missing_required_field(checkpoint, tmp_path, field):
  cfg = json.load(open(os.path.join(checkpoint, "config.json")))
  del cfg[field]
  path = _copy(checkpoint, tmp_path, config=json.dumps(cfg))
  with pytest.raises(ValueError, match=rf"config\.json .*lacks the field '{field}'"):
    load_hf_llama(path)


def test_integer_tensor_is_rejected(checkpoint, tmp_path):
  path = _copy(checkpoint, tmp_path, tensor=(NAME, lambda x: np.round(x * 10).astype(np.int32)))
  with pytest.raises(ValueError, match=rf"tensor '{NAME}' has dtype int32, expected floating"):
    load_hf_llama(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_rejected(checkpoint, tmp_path, bad):
  def poison(x):
    x = x.copy()
    x[3, 5] = bad
    return x

  path = _copy(checkpoint, tmp_path, tensor=(NAME, poison))
  with pytest.raises(ValueError, match=rf"tensor '{NAME}' holds 1 NaN/Inf value"):
    load_hf_llama(path)
