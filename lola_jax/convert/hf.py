"""Load Hugging Face Llama checkpoints (and LoLCATs attention weights) as `LoLALM` parameters.

    config, params = load_hf_llama("path/to/Llama-3.2-1B", attention="lola",
                                   chunk_size=64, cache_size=64)
    logits = lola_jax.model.logits(config, params, tokens)     # [B, T, V] float32

Reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) with `safetensors`' NumPy API; torch is never imported.

Name and layout mapping (HF `nn.Linear.weight` is [out, in]; ours are einsum kernels [in, ...]):

  model.embed_tokens.weight               [V, E]      -> embed.embedding           [V, E]
  layers.i.self_attn.q_proj.weight        [Hq*d, E]   -> blocks.i.attn.q_proj      [E, Hq, d]
  layers.i.self_attn.k_proj / v_proj      [Hkv*d, E]  -> blocks.i.attn.k/v_proj    [E, Hkv, d]
  layers.i.self_attn.o_proj.weight        [E, Hq*d]   -> blocks.i.attn.o_proj      [Hq, d, E]
  layers.i.mlp.gate_proj / up_proj        [M, E]      -> blocks.i.mlp.gate / up    [E, M]
  layers.i.mlp.down_proj.weight           [E, M]      -> blocks.i.mlp.down         [M, E]
  layers.i.input_layernorm.weight         [E]  w      -> blocks.i.attn_norm.scale  w - 1
  layers.i.post_attention_layernorm       [E]  w      -> blocks.i.mlp_norm.scale   w - 1
  model.norm.weight                       [E]  w      -> final_norm.scale          w - 1
  lm_head.weight                          [V, E]      -> lm_head.kernel [E, V]  (absent if tied)

Our RMSNorm multiplies by (1 + scale), hence `w - 1`. Hugging Face stores q/k in the
rotate-half layout that `layers.apply_rope` uses, so no head permutation is needed (the
permutation only applies to Meta's original consolidated checkpoints, which are not read here).
Llama embeddings are not scaled by sqrt(E): the config sets `scale_embeddings=False`.

LoLCATs extras (`lolcats_path`: a .safetensors file or a directory of them, e.g. converted from
LoLCATs' attention-transfer checkpoint): for every layer i, tensors whose names end in

  layers.i.self_attn.feature_map_q.mlp.layer   [Hq, d, F] -> blocks.i.attn.phi_q.w
  layers.i.self_attn.feature_map_k.mlp.layer   [Hq, d, F] -> blocks.i.attn.phi_k.w
  layers.i.self_attn.window_factors            [1, Hq, 1, 1] -> blocks.i.attn.gate.logit [Hq]

LoLCATs maps keys after repeating the kv heads (one feature map per query head), so with a
LoLCATs checkpoint the model runs with num_kv_heads = num_heads and k/v projections repeated
(kv head j serves query heads j*G .. j*G+G-1, as `repeat_kv`). Its mix is "lolcats"
(sigmoid(window_factors) weights the softmax branch only). Without `lolcats_path` the feature
maps get a fresh Hedgehog initialisation and the gates `gate_init`, ready for distillation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lola_jax.core.config import LoLAConfig
from lola_jax.model import ModelConfig, abstract_model, layers
from lola_jax.model.feature_maps import FeatureMap

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)

_LOLA_FIELDS = {f.name for f in dataclasses.fields(LoLAConfig)}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


# ------------------------------------------------------------------------------------------------
# Reading safetensors without torch.


class _Tensors:
  """Lazy name -> np.ndarray over one or several .safetensors files (memory-mapped)."""

  def __init__(self, files: Iterable[str]):
    from safetensors import safe_open

    self._where: dict[str, str] = {}
    self._handles = {}
    for f in files:
      h = safe_open(f, framework="np")
      self._handles[f] = h
      for name in h.keys():
        self._where[name] = f

  def names(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str) -> np.ndarray:
    f = self._where[name]
    h = self._handles[f]
    if h.get_slice(name).get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
      return _read_raw(f, name)  # NumPy has no bfloat16: read the bytes with ml_dtypes.
    return h.get_tensor(name)


_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_raw(filename: str, name: str) -> np.ndarray:
  """One tensor of a safetensors file by its header: u64 header size, JSON header, data."""
  import ml_dtypes

  with open(filename, "rb") as fh:
    n = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(n))
    info = header[name]
    start, end = info["data_offsets"]
    fh.seek(8 + n + start)
    buf = fh.read(end - start)
  dtype = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[info["dtype"]]))
  return np.frombuffer(buf, dtype).reshape(info["shape"])


def _safetensors_files(path: str) -> list[str]:
  """The checkpoint's .safetensors files: a file, the index's shards, or all in a directory."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint path {path!r} is neither a file nor a directory")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as fh:
      shards = sorted(set(json.load(fh)["weight_map"].values()))
    files = [os.path.join(path, s) for s in shards]
    for f in files:
      if not os.path.exists(f):
        raise ValueError(f"shard {f!r} listed in {index!r} does not exist")
    return files
  files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"no *.safetensors files in {path!r} (torch .bin checkpoints: convert first)")
  return files


# ------------------------------------------------------------------------------------------------
# Config.


def read_hf_config(path: str) -> dict:
  """The checkpoint's config.json as a dict (ValueError naming the file if it is not a JSON
  object)."""
  f = os.path.join(path, "config.json")
  if not os.path.exists(f):
    raise ValueError(f"no config.json in {path!r}")
  with open(f) as fh:
    try:
      hf = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{f}: config.json is not valid JSON ({e})") from e
  if not isinstance(hf, dict):
    raise ValueError(f"{f}: config.json must hold a JSON object, got {type(hf).__name__}")
  return hf


def _required(entries: dict, field: str, where: str = "config.json"):
  """entries[field], or a ValueError naming the file (section) and the missing field."""
  if field not in entries or entries[field] is None:
    raise ValueError(f"{where} lacks the field {field!r} (required for a Llama checkpoint)")
  return entries[field]


def _rope(hf: dict) -> tuple[float, layers.RopeScaling | None]:
  """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  if hf.get("rope_scaling"):
    params = {**hf["rope_scaling"], **params}
  kind = params.get("rope_type", params.get("type", "default"))
  section = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  where = f"config.json: {section} (rope_type {kind!r})"
  if kind == "default":
    return float(theta), None
  if kind == "linear":
    return float(theta), layers.RopeScaling(
      "linear", factor=float(_required(params, "factor", where))
    )
  if kind == "llama3":
    return float(theta), layers.RopeScaling(
      "llama3",
      factor=float(_required(params, "factor", where)),
      low_freq_factor=float(_required(params, "low_freq_factor", where)),
      high_freq_factor=float(_required(params, "high_freq_factor", where)),
      original_max_position_embeddings=int(
        _required(params, "original_max_position_embeddings", where)
      ),
    )
  raise ValueError(
    f"config.json rope_type {kind!r} is not supported (supported: default, linear, llama3)"
  )


def hf_model_config(
  hf: dict,
  attention: str = "softmax",
  chunk_size: int = 64,
  cache_size: int = 64,
  **overrides,
) -> ModelConfig:
  """`ModelConfig` of a Hugging Face Llama config dict; overrides may name ModelConfig or
  LoLAConfig fields (e.g. `feature_dim=64`, `mix="lolcats"`, `dtype="bfloat16"`)."""
  archs = hf.get("architectures") or []
  if hf.get("model_type") not in SUPPORTED_MODEL_TYPES or (
    archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)
  ):
    raise ValueError(
      f"unsupported architecture: model_type={hf.get('model_type')!r}, architectures={archs}; "
      f"supported: model_type in {SUPPORTED_MODEL_TYPES}, {SUPPORTED_ARCHITECTURES}"
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r} is not supported (silu only)")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"config.json {flag}=true is not supported (no biases in LoLALM)")
  num_heads = _required(hf, "num_attention_heads")
  head_dim = hf.get("head_dim") or _required(hf, "hidden_size") // num_heads
  theta, scaling = _rope(hf)
  lola_kw = {k: overrides.pop(k) for k in list(overrides) if k in _LOLA_FIELDS}
  unknown = set(overrides) - _MODEL_FIELDS
  if unknown:
    raise ValueError(f"unknown override(s) {sorted(unknown)}: not ModelConfig/LoLAConfig fields")
  fields = dict(
    vocab_size=_required(hf, "vocab_size"),
    num_layers=_required(hf, "num_hidden_layers"),
    d_model=_required(hf, "hidden_size"),
    num_heads=num_heads,
    num_kv_heads=hf.get("num_key_value_heads") or num_heads,
    head_dim=head_dim,
    mlp_dim=_required(hf, "intermediate_size"),
    attention=attention,
    feature_map="hedgehog",
    feature_dim=head_dim,
    lola=LoLAConfig(chunk_size=chunk_size, cache_size=cache_size, **lola_kw),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    max_seq_len=hf.get("max_position_embeddings", 2048),
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    scale_embeddings=False,
  )
  fields.update(overrides)
  return ModelConfig(**fields)


# ------------------------------------------------------------------------------------------------
# Weights.


def check_weight(name: str, x: np.ndarray) -> np.ndarray:
  """`x` as float32; ValueError naming the tensor if it is not floating point or holds NaN/Inf
  (a weight file that would otherwise load and give NaN logits)."""
  if not jnp.issubdtype(x.dtype, jnp.floating):  # (jnp knows ml_dtypes' bfloat16 and float8)
    raise ValueError(f"tensor {name!r} has dtype {x.dtype.name}, expected floating point")
  y = np.asarray(x, np.float32)
  bad = int(y.size - np.count_nonzero(np.isfinite(y)))
  if bad:
    raise ValueError(f"tensor {name!r} holds {bad} NaN/Inf value(s) of {y.size}")
  return y


def _take(tensors: _Tensors, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """`tensors[name]` as float32, checked to have `shape`, a float dtype and finite values."""
  if name not in tensors:
    raise ValueError(f"missing tensor {name!r} in the checkpoint")
  x = tensors.get(name)
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(shape)}")
  return check_weight(name, x)


def llama_params(
  take: Callable[[str, tuple[int, ...]], np.ndarray], c: ModelConfig, kv_repeat: int = 1
) -> dict:
  """Pure-dict parameters of every non-LoLA weight (feature maps and gates left out).

  Args:
    take: `take(hf_name, shape)` -> float32 array of that shape, the Hugging Face tensor named
      `hf_name` (e.g. "model.layers.0.self_attn.q_proj.weight", [out, in] layout, q/k rows in
      the rotate-half order); it raises ValueError when the tensor is missing or mis-shaped.
      Other formats (GGUF) translate names and layouts inside `take`.
    c: the model config (shapes, tied embeddings).
    kv_repeat: stored kv heads are repeated this many times (LoLCATs checkpoints), else 1.
  """
  e, hq, d, m, v = c.d_model, c.num_heads, c.head_dim, c.mlp_dim, c.vocab_size
  hkv = c.num_kv_heads // kv_repeat  # heads stored in the checkpoint
  prefix = "model."
  blocks = {}
  for i in range(c.num_layers):
    p = f"{prefix}layers.{i}."

    def lin(name, out_dim, in_dim, p=p):
      return take(p + name + ".weight", (out_dim, in_dim)).T  # [in, out]

    k = lin("self_attn.k_proj", hkv * d, e).reshape(e, hkv, d)
    vv = lin("self_attn.v_proj", hkv * d, e).reshape(e, hkv, d)
    if kv_repeat > 1:
      k, vv = np.repeat(k, kv_repeat, axis=1), np.repeat(vv, kv_repeat, axis=1)
    blocks[i] = {
      "attn": {
        "q_proj": {"kernel": lin("self_attn.q_proj", hq * d, e).reshape(e, hq, d)},
        "k_proj": {"kernel": k},
        "v_proj": {"kernel": vv},
        "o_proj": {"kernel": lin("self_attn.o_proj", e, hq * d).reshape(hq, d, e)},
      },
      "attn_norm": {"scale": take(p + "input_layernorm.weight", (e,)) - 1.0},
      "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight", (e,)) - 1.0},
      "mlp": {
        "gate": {"kernel": lin("mlp.gate_proj", m, e)},
        "up": {"kernel": lin("mlp.up_proj", m, e)},
        "down": {"kernel": lin("mlp.down_proj", e, m)},
      },
    }
  params = {
    "embed": {"embedding": take(prefix + "embed_tokens.weight", (v, e))},
    "blocks": blocks,
    "final_norm": {"scale": take(prefix + "norm.weight", (e,)) - 1.0},
  }
  if not c.tie_embeddings:
    params["lm_head"] = {"kernel": take("lm_head.weight", (v, e)).T}
  return params


_LOLCATS_RE = re.compile(
  r"layers\.(\d+)\.self_attn\.(feature_map_q\.mlp\.layer|feature_map_k\.mlp\.layer|"
  r"window_factors|feature_map_q\.mlp\.bias|feature_map_k\.mlp\.bias)$"
)


def read_lolcats(path: str) -> dict[int, dict[str, np.ndarray]]:
  """LoLCATs attention tensors by layer: {i: {"feature_map_q": [Hq,d,F], "feature_map_k": ...,
  "window_factors": [1,Hq,1,1]}} from a .safetensors file or directory (any name prefix)."""
  tensors = _Tensors(_safetensors_files(path))
  out: dict[int, dict[str, np.ndarray]] = {}
  for name in tensors.names():
    mt = _LOLCATS_RE.search(name)
    if not mt:
      continue
    what = mt.group(2)
    if what.endswith(".bias"):
      raise ValueError(f"tensor {name!r}: feature-map biases are not supported")
    key = what.split(".")[0]
    out.setdefault(int(mt.group(1)), {})[key] = check_weight(name, tensors.get(name))
  if not out:
    raise ValueError(
      f"no LoLCATs tensors (layers.<i>.self_attn.feature_map_q.mlp.layer, ...) in {path!r}"
    )
  return out


def feature_map_params(c: ModelConfig, lolcats, key: jax.Array) -> dict:
  """{layer: {"phi_q": {"w"}, "phi_k": {"w"}, "gate": {"logit"}}} from LoLCATs (`read_lolcats`)
  or, with `lolcats=None`, fresh: Hedgehog maps drawn from `key`, gate logits `c.gate_init`."""
  d, hq, hkv, f = c.head_dim, c.num_heads, c.num_kv_heads, c.feature_dim
  out = {}
  for i in range(c.num_layers):
    if lolcats is None:
      kq, kk = jax.random.split(jax.random.fold_in(key, i))
      out[i] = {
        "phi_q": {
          "w": FeatureMap("hedgehog", hq, d, f, heads_axis="heads", rngs=nnx.Rngs(kq)).w[...]
        },
        "phi_k": {
          "w": FeatureMap("hedgehog", hkv, d, f, heads_axis="kv_heads", rngs=nnx.Rngs(kk)).w[...]
        },
        "gate": {"logit": jnp.full((hq,), c.gate_init, jnp.float32)},
      }
      continue
    layer = lolcats.get(i, {})
    entry = {}
    for ours, theirs in (("phi_q", "feature_map_q"), ("phi_k", "feature_map_k")):
      name = f"layers.{i}.self_attn.{theirs}.mlp.layer"
      if theirs not in layer:
        raise ValueError(f"missing tensor {name!r} in the LoLCATs checkpoint")
      if layer[theirs].shape != (hq, d, f):
        raise ValueError(f"tensor {name!r} has shape {layer[theirs].shape}, expected {(hq, d, f)}")
      entry[ours] = {"w": layer[theirs]}
    name = f"layers.{i}.self_attn.window_factors"
    if "window_factors" not in layer:
      raise ValueError(f"missing tensor {name!r} in the LoLCATs checkpoint")
    wf = layer["window_factors"]
    if wf.size != hq:
      raise ValueError(f"tensor {name!r} has shape {wf.shape}, expected (1, {hq}, 1, 1)")
    entry["gate"] = {"logit": wf.reshape(hq)}
    out[i] = entry
  return out


def load_hf_llama(
  path: str,
  attention: str = "softmax",
  chunk_size: int = 64,
  cache_size: int = 64,
  *,
  lolcats_path: str | None = None,
  key: jax.Array | None = None,
  **overrides,
) -> tuple[ModelConfig, dict]:
  """A Hugging Face Llama checkpoint as (ModelConfig, float32 params) for `model.logits`.

  Args:
    path: directory with config.json and *.safetensors (sharded index included).
    attention: "softmax" | "linear" | "hybrid" | "lola".
    chunk_size, cache_size: LoLA window chunk C and sparse-cache capacity (hybrid uses 0).
    lolcats_path: optional LoLCATs attention weights (see the module docstring).
    key: PRNG key of the fresh Hedgehog feature maps (default `jax.random.key(0)`).
    **overrides: ModelConfig or LoLAConfig fields (e.g. feature_dim, mix, dtype, max_seq_len).

  Raises:
    ValueError naming the config entry or tensor that is unsupported, missing or mis-shaped.
  """
  hf = read_hf_config(path)
  lolcats = read_lolcats(lolcats_path) if lolcats_path is not None else None
  kv_repeat = 1
  if lolcats is not None:
    first = lolcats[min(lolcats)]
    if "feature_map_q" in first:
      overrides.setdefault("feature_dim", int(first["feature_map_q"].shape[-1]))
    overrides.setdefault("mix", "lolcats")
    hq = _required(hf, "num_attention_heads")
    hkv = hf.get("num_key_value_heads") or hq
    kv_repeat = hq // hkv
    overrides["num_kv_heads"] = hq
  config = hf_model_config(hf, attention, chunk_size, cache_size, **overrides)
  tensors = _Tensors(_safetensors_files(path))
  params = llama_params(lambda name, shape: _take(tensors, name, shape), config, kv_repeat)
  fm = feature_map_params(config, lolcats, jax.random.key(0) if key is None else key)
  for i, entry in fm.items():
    params["blocks"][i]["attn"].update(entry)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  check_structure(config, params)
  return config, params


def check_structure(config: ModelConfig, params: dict) -> None:
  """Every parameter of `LoLALM(config)` present with its shape (catches mapping bugs).

  The shapes come from `model.abstract_model(config)`, cached per config: `model.logits` reuses
  it, so checking costs no extra trace.
  """
  want = nnx.to_pure_dict(abstract_model(config)[1])
  flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, leaf in flat_w.items():
    name = jax.tree_util.keystr(path)
    if path not in flat_p:
      raise ValueError(f"converted parameters lack {name}")
    if tuple(flat_p[path].shape) != tuple(leaf.shape):
      raise ValueError(f"converted {name} has shape {flat_p[path].shape}, expected {leaf.shape}")
  extra = set(flat_p) - set(flat_w)
  if extra:
    raise ValueError(f"converted parameters have unexpected {sorted(map(str, extra))}")
