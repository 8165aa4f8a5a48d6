"""The LoLA language model: a Llama-style decoder whose attention kind is a config choice.

  config        ModelConfig (sizes, attention kind, feature map, LoLA settings), validated
  attention     one module class per attention kind, chosen through ATTENTION_KINDS
  lm            LoLALM (training forward, prefill, decode) and the functional API over a
                parameter pytree: init_params, bind, logits, logical_axes, state_logical_axes
  layers        norms, rotary positions, MLP, softmax attention and the decode caches
  feature_maps  the linear branch's phi (Hedgehog, elu+1, identity) and the per-head gate

Attention kinds (`ModelConfig.attention`, `ModelConfig.kind` is the class):
  softmax  exact causal attention (decode state: a `KVCache` of `max_seq_len` slots);
  linear   normalised linear attention over every past token (decode state: `LinearState`);
  hybrid   LoLCATs: sliding window + linear attention, i.e. LoLA with cache_size 0 (`LoLAState`);
  lola     sliding window + sparse cache + linear attention (`LoLAState`), `ModelConfig.lola`.

Every kind owns the same parameters (feature maps and gates exist even when `softmax` ignores
them), so one set of weights can be evaluated under any kind: `LoLALM.with_lola_config`.
"""

from lola_jax.model.attention import ATTENTION_KINDS, Attention
from lola_jax.model.config import DTYPES, ModelConfig
from lola_jax.model.layers import KVCache, LinearState, RopeScaling
from lola_jax.model.lm import (
  Block,
  LoLALM,
  abstract_model,
  bind,
  init_params,
  logical_axes,
  logits,
  state_logical_axes,
)

__all__ = [
  "ATTENTION_KINDS",
  "DTYPES",
  "Attention",
  "Block",
  "KVCache",
  "LinearState",
  "LoLALM",
  "ModelConfig",
  "RopeScaling",
  "abstract_model",
  "bind",
  "init_params",
  "logical_axes",
  "logits",
  "state_logical_axes",
]
