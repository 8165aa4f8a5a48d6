"""A pretrained GGUF model as the starting point of a run (`config.pretrained.gguf`).

Linearising a pretrained LLM (attention transfer) trains only its feature maps and gates; its
weights, architecture and tokenizer come from the GGUF file:

  config.pretrained.gguf   "" (none), a path to a .gguf, or an alias of `lola_jax.pretrained`
                           ("smollm2-135m");
  config.pretrained.feature_maps
                           "" (fresh Hedgehog maps and gates), a `save_feature_maps` file, or
                           "committed" (the maps `lola_jax.pretrained` ships for the alias): a
                           warm start, e.g. to re-fit maps trained with one window to another;
  config.model.*           overrides of the attention settings only (attention, feature_map,
                           feature_dim, gate_init, dtype, max_seq_len, ...);
  config.lola.*            the LoLA settings, as for any run;
  config.task.name="text"  next-token windows of the docstring text (`lola_jax.data.text`)
                           tokenised with the GGUF's tokenizer (train split; evaluation on the
                           held-out split).

In distill mode the pretrained softmax model is the teacher: no teacher workdir is needed.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from lola_jax import pretrained
from lola_jax.convert import gguf
from lola_jax.convert.gguf_tokenizer import gguf_tokenizer
from lola_jax.convert.hf import hf_model_config
from lola_jax.core.config import LoLAConfig
from lola_jax.data import text
from lola_jax.model import ModelConfig

ALIASES = {"smollm2-135m": pretrained.smollm2_gguf_path}


def _setting(config, key: str) -> str:
  """`config.pretrained.<key>`, "" when the config has no such section or entry."""
  section = config.get("pretrained")
  return section.get(key, "") if section is not None else ""


def gguf_path(config) -> str | None:
  """The GGUF file named by `config.pretrained.gguf` (alias resolved), or None."""
  name = _setting(config, "gguf")
  if not name:
    return None
  if name in ALIASES:
    return ALIASES[name]()
  if not os.path.isfile(name):
    raise ValueError(
      f"pretrained.gguf must be a .gguf file or one of {sorted(ALIASES)}, got {name!r}"
    )
  return name


def model_config(config, path: str) -> ModelConfig:
  """The GGUF's architecture with `config.model` / `config.lola` as overrides."""
  lola_fields = {f.name for f in dataclasses.fields(LoLAConfig)}
  overrides = dict(config.model.items())
  overrides.pop("vocab_size", None)
  attention = overrides.pop("attention", "softmax")
  lola = {k: v for k, v in config.lola.items() if k in lola_fields}
  chunk = lola.pop("chunk_size", 64)
  cache = lola.pop("cache_size", 64)
  try:
    hf = gguf.gguf_hf_config(gguf.open_gguf(path))
    return hf_model_config(hf, attention, chunk, cache, **overrides, **lola)
  except ValueError as e:
    raise ValueError(f"config.model / config.lola with pretrained.gguf={path!r}: {e}") from e


COMMITTED_FEATURE_MAPS = {"smollm2-135m": pretrained.SMOLLM2_FEATURE_MAPS}


def feature_maps_path(config) -> str | None:
  """The warm-start file named by `config.pretrained.feature_maps`, or None (fresh maps)."""
  name = _setting(config, "feature_maps")
  if not name:
    return None
  if name == "committed":
    alias = _setting(config, "gguf")
    if alias not in COMMITTED_FEATURE_MAPS:
      raise ValueError(
        f"pretrained.feature_maps='committed' needs pretrained.gguf to be one of "
        f"{sorted(COMMITTED_FEATURE_MAPS)}, got {alias!r}"
      )
    return COMMITTED_FEATURE_MAPS[alias]
  if not os.path.isfile(name):
    raise ValueError(
      f"pretrained.feature_maps must be '', 'committed' or a safetensors file written by "
      f"lola_jax.pretrained.save_feature_maps, got {name!r}"
    )
  return name


def initial_params(
  model_cfg: ModelConfig, path: str, seed: int, feature_maps: str | None = None
) -> dict:
  """The GGUF's weights (float32) with the feature maps and gates of the file `feature_maps`
  (a `save_feature_maps` file), or freshly initialised ones when it is None."""
  overrides = {
    f.name: getattr(model_cfg, f.name)
    for f in dataclasses.fields(ModelConfig)
    if f.name in ("feature_map", "feature_dim", "gate_init", "dtype", "max_seq_len", "lola")
  }
  lola = overrides.pop("lola")
  lola_kw = {f.name: getattr(lola, f.name) for f in dataclasses.fields(LoLAConfig)}
  chunk, cache = lola_kw.pop("chunk_size"), lola_kw.pop("cache_size")
  cfg, params = gguf.load_gguf_llama(
    path,
    model_cfg.attention,
    chunk,
    cache,
    feature_maps=None if feature_maps is None else pretrained.load_feature_maps(feature_maps),
    key=jax.random.key(seed),
    **overrides,
    **lola_kw,
  )
  if cfg != model_cfg:
    raise ValueError(f"the GGUF's config {cfg} differs from the run's {model_cfg}")
  return params


def text_tasks(config, path: str):
  """(train task, held-out task) of docstring text tokenised with the GGUF's tokenizer."""
  tokenizer = gguf_tokenizer(path)
  seq_len = config.task.seq_len
  return (
    text.text_task(tokenizer, seq_len=seq_len, seed=config.seed, split="train"),
    text.text_task(tokenizer, seq_len=seq_len, seed=config.seed + 10_007, split="held_out"),
  )
