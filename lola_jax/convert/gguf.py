"""Load Llama-architecture GGUF files (llama.cpp's format) as `LoLALM` parameters.

    config, params = load_gguf_llama("SmolLM2-135M-Instruct.Q4_1.gguf")
    logits = lola_jax.model.logits(config, params, tokens)     # [B, T, V] float32

Reads the file with the `gguf` package (`gguf.GGUFReader`, memory-mapped) and dequantises one
tensor at a time with `gguf.quants.dequantize` to float32 (every type `gguf.quants` implements:
F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...); torch is never imported.

The GGUF tensors are renamed to Hugging Face's and go through the same mapping as
`hf.load_hf_llama` (`hf.llama_params`):

  token_embd.weight            -> model.embed_tokens.weight             -> embed.embedding
  blk.i.attn_q / attn_k        -> layers.i.self_attn.q_proj / k_proj     (rows un-permuted, below)
  blk.i.attn_v / attn_output   -> layers.i.self_attn.v_proj / o_proj
  blk.i.ffn_gate / up / down   -> layers.i.mlp.gate_proj / up_proj / down_proj
  blk.i.attn_norm / ffn_norm   -> layers.i.input_layernorm / post_attention_layernorm
  output_norm.weight           -> model.norm.weight
  output.weight                -> lm_head.weight  (absent: tied embeddings)

A GGUF tensor of dims (ne0, ne1) is stored row-major as [ne1, ne0] = HF's [out, in], so no
transpose is needed at this stage.

llama.cpp's converter permutes the rows of q_proj and k_proj for its interleaved ("GPT-J") rope:
per head, row 2j + s of the GGUF tensor holds HF row s * d/2 + j (j < d/2, s in {0, 1}), i.e.
`w.reshape(H, 2, d/2, E).swapaxes(1, 2)`. `unpermute_rope_rows` undoes it (with H = the query
heads for q and the kv heads for k) so the weights are in the rotate-half layout that
`layers.apply_rope` uses.

Settings come from the `llama.*` metadata: block_count, embedding_length, feed_forward_length,
attention.head_count(_kv), attention.key_length / value_length (head_dim), rope.freq_base,
rope.dimension_count (must equal head_dim), rope.scaling.type / factor /
original_context_length ("none" or "linear"), attention.layer_norm_rms_epsilon, context_length,
vocab_size. A `rope_freqs.weight` tensor (Llama 3.1's frequency factors) is matched against the
"llama3" scaling rule (factor = its largest entry, low/high frequency factors 1 / 4) and refused
when it does not fit. Anything else (another architecture, experts, per-layer head counts, a
tensor the mapping does not consume, a type `gguf.quants` cannot dequantise) is a ValueError
naming it.

Feature maps and gates (`feature_maps=`): a flat mapping of the linear branch's parameters by
name, exactly the parameters of `LoLALM` under `blocks.<i>.attn.phi_q`, `phi_k` and `gate`
(`feature_map_shapes(config)`):

  "blocks.<i>.attn.phi_q.w"     [Hq, d, F]    Hedgehog query map of layer i
  "blocks.<i>.attn.phi_k.w"     [Hkv, d, F]   Hedgehog key map (one per kv head)
  "blocks.<i>.attn.gate.logit"  [Hq]          mixing-gate logits

(`lola_jax.pretrained.load_feature_maps` reads such a mapping from safetensors). Every layer's
entries must be present with these shapes; F sets `feature_dim` unless it is overridden.
Without `feature_maps` the maps get a fresh Hedgehog initialisation and the gates `gate_init`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, quants

from lola_jax.convert.hf import check_structure, feature_map_params, hf_model_config, llama_params
from lola_jax.model import ModelConfig, abstract_model, layers

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# Hugging Face tensor name (after "model.layers.<i>." for per-layer ones) -> GGUF name.
_LAYER_NAMES = {
  "self_attn.q_proj.weight": "attn_q.weight",
  "self_attn.k_proj.weight": "attn_k.weight",
  "self_attn.v_proj.weight": "attn_v.weight",
  "self_attn.o_proj.weight": "attn_output.weight",
  "mlp.gate_proj.weight": "ffn_gate.weight",
  "mlp.up_proj.weight": "ffn_up.weight",
  "mlp.down_proj.weight": "ffn_down.weight",
  "input_layernorm.weight": "attn_norm.weight",
  "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL_NAMES = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
}
_FEATURE_MAP_KEYS = ("phi_q", "phi_k", "gate")


# ------------------------------------------------------------------------------------------------
# Reading.


def open_gguf(path: str | os.PathLike | GGUFReader) -> GGUFReader:
  """A `GGUFReader` of `path` (a reader is passed through, so callers can share one: parsing
  the metadata of a 49K-token vocabulary takes seconds)."""
  if isinstance(path, GGUFReader):
    return path
  if not os.path.isfile(path):
    raise ValueError(f"GGUF path {os.fspath(path)!r} is not a file")
  try:
    return GGUFReader(path)
  except (ValueError, OSError) as err:
    raise ValueError(f"cannot read {os.fspath(path)!r} as GGUF: {err}") from err


_MISSING = object()


def gguf_metadata(reader: GGUFReader, key: str, default=_MISSING):
  """One metadata value as Python (int, float, bool, str or a list of them).

  Raises ValueError naming `key` when it is absent and no `default` is given.
  """
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise ValueError(f"GGUF metadata {key!r} is missing")
    return default
  return field.contents()


def _scalar(reader: GGUFReader, key: str, kind: type, default=_MISSING):
  """A scalar metadata value of `kind` (int or float); arrays (per-layer values) are refused."""
  field = reader.fields.get(key)
  if field is not None and field.types and field.types[0] == GGUFValueType.ARRAY:
    raise ValueError(f"GGUF metadata {key!r} is an array (per-layer values are not supported)")
  value = gguf_metadata(reader, key, default)
  return value if value is None else kind(value)


def dequantize_tensor(tensor) -> np.ndarray:
  """A `gguf.ReaderTensor` as float32 [ne_{n-1}, ..., ne0] (HF's [out, in] for matrices).

  Raises ValueError naming the tensor and its type when `gguf.quants` cannot dequantise it.
  """
  qtype = GGMLQuantizationType(tensor.tensor_type)
  try:
    x = quants.dequantize(np.asarray(tensor.data), qtype)
  except NotImplementedError as err:
    raise ValueError(
      f"GGUF tensor {tensor.name!r} has quantisation type {qtype.name}, which gguf.quants "
      f"cannot dequantise ({err})"
    ) from err
  shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest first.
  return np.asarray(x, np.float32).reshape(shape)


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's rope row permutation of a q/k projection [H*d, E] -> [H*d, E].

  GGUF row h*d + 2j + s holds HF row h*d + s*d/2 + j (j < d/2, s in {0, 1}); the result is in
  HF's rotate-half order.
  """
  rows, cols = w.shape
  if rows % (2 * num_heads):
    raise ValueError(f"q/k projection with {rows} rows cannot hold {num_heads} heads of even dim")
  return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# ------------------------------------------------------------------------------------------------
# Config.


def _llama3_scaling(
  factors: np.ndarray, head_dim: int, theta: float, original_context: int | None
) -> layers.RopeScaling:
  """The "llama3" RopeScaling whose frequencies match a `rope_freqs.weight` tensor [d/2].

  llama.cpp divides each rotary frequency f_i by factors[i]; Llama 3.1 / 3.2 use factor =
  max(factors), low_freq_factor 1, high_freq_factor 4 and an original context of 8192.
  """
  scaling = layers.RopeScaling(
    "llama3",
    factor=float(np.max(factors)),
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=int(original_context or 8192),
  )
  plain = np.asarray(layers.rope_frequencies(head_dim, theta))
  ours = plain / np.asarray(layers.rope_frequencies(head_dim, theta, scaling))
  if factors.shape != ours.shape or not np.allclose(factors, ours, rtol=1e-3):
    raise ValueError(
      "GGUF tensor 'rope_freqs.weight' (rope frequency factors) does not follow the llama3 "
      f"scaling rule (tried {scaling}); this rope scaling is not supported"
    )
  return scaling


def gguf_hf_config(reader: GGUFReader) -> dict:
  """The file's `llama.*` metadata as a Hugging Face Llama config dict (for `hf_model_config`).

  Raises ValueError naming the architecture, metadata key or tensor that is not supported.
  """
  arch = gguf_metadata(reader, "general.architecture")
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise ValueError(
      f"GGUF general.architecture={arch!r} is not supported (supported: "
      f"{SUPPORTED_GGUF_ARCHITECTURES})"
    )
  tensors = {t.name: t for t in reader.tensors}
  if _scalar(reader, "llama.expert_count", int, 0):
    raise ValueError("GGUF metadata 'llama.expert_count' > 0: mixture-of-experts is not supported")
  num_heads = _scalar(reader, "llama.attention.head_count", int)
  num_kv_heads = _scalar(reader, "llama.attention.head_count_kv", int, num_heads)
  d_model = _scalar(reader, "llama.embedding_length", int)
  head_dim = _scalar(reader, "llama.attention.key_length", int, d_model // num_heads)
  value_dim = _scalar(reader, "llama.attention.value_length", int, head_dim)
  if value_dim != head_dim:
    raise ValueError(
      f"GGUF metadata 'llama.attention.value_length'={value_dim} differs from key_length="
      f"{head_dim}: not supported"
    )
  rope_dim = _scalar(reader, "llama.rope.dimension_count", int, head_dim)
  if rope_dim != head_dim:
    raise ValueError(
      f"GGUF metadata 'llama.rope.dimension_count'={rope_dim} differs from head_dim={head_dim}: "
      "partial rotary in llama.cpp's layout is not supported"
    )
  theta = _scalar(reader, "llama.rope.freq_base", float, 10_000.0)
  original = _scalar(reader, "llama.rope.scaling.original_context_length", int, None)
  kind = gguf_metadata(reader, "llama.rope.scaling.type", "none")
  if kind == "linear":
    factor = _scalar(reader, "llama.rope.scaling.factor", float)
    rope_scaling = {"rope_type": "linear", "factor": factor}
  elif kind == "none":
    rope_scaling = None
  else:
    raise ValueError(
      f"GGUF metadata 'llama.rope.scaling.type'={kind!r} is not supported (none, linear)"
    )
  if "rope_freqs.weight" in tensors:
    if rope_scaling is not None:
      raise ValueError("GGUF has both 'rope_freqs.weight' and linear rope scaling: not supported")
    s = _llama3_scaling(dequantize_tensor(tensors["rope_freqs.weight"]), head_dim, theta, original)
    rope_scaling = {
      "rope_type": "llama3",
      "factor": s.factor,
      "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position_embeddings,
    }
  if "token_embd.weight" not in tensors:
    raise ValueError("missing tensor 'token_embd.weight' in the GGUF")
  vocab = int(tensors["token_embd.weight"].shape[-1])
  return {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": _scalar(reader, "llama.vocab_size", int, vocab),
    "num_hidden_layers": _scalar(reader, "llama.block_count", int),
    "hidden_size": d_model,
    "num_attention_heads": num_heads,
    "num_key_value_heads": num_kv_heads,
    "head_dim": head_dim,
    "intermediate_size": _scalar(reader, "llama.feed_forward_length", int),
    "tie_word_embeddings": "output.weight" not in tensors,
    "max_position_embeddings": _scalar(reader, "llama.context_length", int, 2048),
    "rope_theta": theta,
    "rope_scaling": rope_scaling,
    "rms_norm_eps": _scalar(reader, "llama.attention.layer_norm_rms_epsilon", float),
  }


# ------------------------------------------------------------------------------------------------
# Weights.


def _gguf_name(hf_name: str) -> str:
  if hf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<i>.<rest>
  return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def _gguf_take(reader: GGUFReader, hf: dict, used: set[str]):
  """`take(hf_name, shape)` for `hf.llama_params`: dequantised, q/k rows un-permuted."""
  tensors = {t.name: t for t in reader.tensors}

  def take(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
    name = _gguf_name(hf_name)
    if name not in tensors:
      raise ValueError(f"missing tensor {name!r} in the GGUF")
    x = dequantize_tensor(tensors[name])
    if tuple(x.shape) != tuple(shape):
      raise ValueError(f"GGUF tensor {name!r} has shape {tuple(x.shape)}, expected {shape}")
    if name.endswith("attn_q.weight"):
      x = unpermute_rope_rows(x, hf["num_attention_heads"])
    elif name.endswith("attn_k.weight"):
      x = unpermute_rope_rows(x, hf["num_key_value_heads"])
    used.add(name)
    return x

  return take


def feature_map_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{"blocks.<i>.attn.<phi_q|phi_k|gate>.<leaf>": shape} of `LoLALM(config)`'s feature maps and
  gates (from the cached `model.abstract_model`, no parameters allocated)."""
  blocks = nnx.to_pure_dict(abstract_model(config)[1])["blocks"]
  out = {}
  for i, block in blocks.items():
    for module in _FEATURE_MAP_KEYS:
      for path, leaf in jax.tree_util.tree_flatten_with_path(block["attn"][module])[0]:
        keys = ".".join(str(getattr(p, "key", p)) for p in path)
        out[f"blocks.{i}.attn.{module}.{keys}"] = tuple(leaf.shape)
  return out


def apply_feature_maps(config: ModelConfig, params: dict, feature_maps: Mapping) -> dict:
  """`params` with its feature maps and gates replaced by the flat `feature_maps` mapping.

  Args:
    config: the model config (layers, heads, feature_dim).
    params: pure-dict parameters with `blocks[i]["attn"]["phi_q" | "phi_k" | "gate"]`.
    feature_maps: {"blocks.<i>.attn.phi_q.w": [Hq, d, F], "blocks.<i>.attn.phi_k.w": [Hkv, d, F],
      "blocks.<i>.attn.gate.logit": [Hq]} for every layer i (the module docstring).

  Raises:
    ValueError naming missing, unexpected or mis-shaped entries.

  Returns:
    a new pure dict (the input is not modified).
  """
  want = feature_map_shapes(config)
  missing = sorted(set(want) - set(feature_maps))
  extra = sorted(set(feature_maps) - set(want))
  if missing or extra:
    raise ValueError(
      f"feature_maps: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
      f"{extra[:6]}{' ...' if len(extra) > 6 else ''} (expected names like "
      f"'blocks.0.attn.phi_q.w', 'blocks.0.attn.phi_k.w', 'blocks.0.attn.gate.logit' for "
      f"{config.num_layers} layers)"
    )
  for name, shape in want.items():
    got = tuple(np.shape(feature_maps[name]))
    if got != shape:
      raise ValueError(f"feature_maps[{name!r}] has shape {got}, expected {shape}")
  blocks = {i: {**block, "attn": dict(block["attn"])} for i, block in params["blocks"].items()}
  for name in want:
    _, i, _, module, leaf = name.split(".")
    attn = blocks[int(i)]["attn"]
    attn[module] = {**attn.get(module, {}), leaf: jnp.asarray(feature_maps[name], jnp.float32)}
  return {**params, "blocks": blocks}


def load_gguf_llama(
  path: str | os.PathLike | GGUFReader,
  attention: str = "softmax",
  chunk_size: int = 64,
  cache_size: int = 64,
  *,
  feature_maps: Mapping | None = None,
  key: jax.Array | None = None,
  **overrides,
) -> tuple[ModelConfig, dict]:
  """A Llama GGUF as (ModelConfig, float32 params) for `model.logits`.

  Args:
    path: the .gguf file (or an open `gguf.GGUFReader`, to share it with `gguf_tokenizer`).
    attention: "softmax" | "linear" | "hybrid" | "lola".
    chunk_size, cache_size: LoLA window chunk C and sparse-cache capacity (hybrid uses 0).
    feature_maps: optional flat {name: array} of the linearised feature maps and gates (the
      module docstring); None = fresh Hedgehog maps and `gate_init` gates.
    key: PRNG key of the fresh feature maps (default `jax.random.key(0)`).
    **overrides: ModelConfig or LoLAConfig fields (e.g. feature_dim, mix, dtype, max_seq_len).

  Raises:
    ValueError naming the unsupported architecture, metadata, quantisation type or tensor, or the
    missing / mis-shaped one.
  """
  reader = open_gguf(path)
  hf = gguf_hf_config(reader)
  if feature_maps is not None:
    phi = feature_maps.get("blocks.0.attn.phi_q.w")
    if phi is not None and np.ndim(phi) == 3:
      overrides.setdefault("feature_dim", int(np.shape(phi)[-1]))
  config = hf_model_config(hf, attention, chunk_size, cache_size, **overrides)
  used: set[str] = set()
  params = llama_params(_gguf_take(reader, hf, used), config)
  unused = sorted({t.name for t in reader.tensors} - used - {"rope_freqs.weight"})
  if unused:
    raise ValueError(
      f"GGUF tensor(s) {unused[:8]} are not part of a Llama model this loader maps (biases, "
      "experts and other extras are not supported)"
    )
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  if feature_maps is None:
    fresh = feature_map_params(config, None, jax.random.key(0) if key is None else key)
    for i, entry in fresh.items():
      params["blocks"][i]["attn"].update(entry)
  else:
    params = apply_feature_maps(config, params, feature_maps)
  check_structure(config, params)
  return config, params
