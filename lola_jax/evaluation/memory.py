"""State-size accounting in bytes: what a model must keep in memory to continue a sequence.

Everything is counted per layer and per key/value head (GQA-aware: a kv head is stored once, not
once per query head), for one sequence (batch row):

  full KV cache (softmax):   T * (dk + dv) * kv_bytes
  LoLA / hybrid (LoLAState):
    window      2C * (dk + dv + D) * kv_bytes     previous chunk + current-chunk buffer, with the
                                                   feature-mapped keys (no D with
                                                   LoLAConfig.window_features="recomputed")
    sparse cache lam * (dk + dv + D) * kv_bytes    keys, values, cached phi(k)
                + lam * 4                          int32 positions
    linear state (D * dv + D) * 4                  H and s, always float32
  plus 4 bytes per layer for the token count.

Capacities are counted (a state's arrays have fixed size), so the LoLA numbers do not depend on T;
the full KV cache grows with T. `LoLAState.nbytes()` of an allocated state equals
`lola_state_bytes` (the tests check it), so nothing is left out.
"""

from __future__ import annotations

import functools

import numpy as np


def _itemsize(dtype) -> int:
  return int(np.dtype(dtype).itemsize) if not isinstance(dtype, int) else dtype


def full_kv_bytes(
  context: int,
  *,
  num_layers: int,
  num_kv_heads: int,
  key_dim: int,
  value_dim: int,
  kv_dtype="float32",
) -> int:
  """Bytes of an exact KV cache holding `context` tokens (one row, all layers)."""
  per_head = context * (key_dim + value_dim) * _itemsize(kv_dtype)
  return num_layers * num_kv_heads * per_head


def lola_state_bytes(
  *,
  num_layers: int,
  num_kv_heads: int,
  key_dim: int,
  value_dim: int,
  feature_dim: int,
  chunk_size: int,
  cache_size: int,
  kv_dtype="float32",
  window_features: bool = True,
) -> int:
  """Bytes of a LoLA state (one row, all layers); `cache_size=0` is the LoLCATs hybrid.

  `window_features=False` counts a state without the window's feature-mapped keys
  (`LoLAConfig(window_features="recomputed")`, which recomputes them when a chunk leaves).
  """
  kv = _itemsize(kv_dtype)
  width = key_dim + value_dim
  window = 2 * chunk_size * (width + (feature_dim if window_features else 0)) * kv
  cache = cache_size * (width + feature_dim) * kv + cache_size * 4
  linear = (feature_dim * value_dim + feature_dim) * 4
  return num_layers * (num_kv_heads * (window + cache + linear) + 4)


def equal_memory_chunk(
  *,
  chunk_size: int,
  cache_size: int,
  key_dim: int,
  value_dim: int,
  feature_dim: int,
  kv_dtype="float32",
  window_features: bool = True,
) -> int:
  """The chunk (window) size C' whose cache-0 state is the closest to, but not above, LoLA's.

  The window holds 2C' tokens, so C' ~ C + lam/2 (slightly less: the cache also stores positions);
  in a state without the window's feature-mapped keys (`window_features=False`) a window token
  costs less than a cached pair, so C' ~ C + lam (2d + D) / (2 (2d))."""
  one_head = functools.partial(
    lola_state_bytes,
    num_layers=1,
    num_kv_heads=1,
    key_dim=key_dim,
    value_dim=value_dim,
    feature_dim=feature_dim,
    kv_dtype=kv_dtype,
    window_features=window_features,
  )
  target = one_head(chunk_size=chunk_size, cache_size=cache_size)
  wide = chunk_size
  while one_head(chunk_size=wide + 1, cache_size=0) <= target:
    wide += 1
  return wide


def model_state_bytes(config, context: int) -> int:
  """Decode-state bytes of a `lola_jax.model.ModelConfig` after `context` tokens (one row).

  By what the attention kind's state holds (`config.kind`): a full KV cache (softmax) counts
  `context` tokens; a windowed state (hybrid / lola) counts its capacities, layer by layer when
  `layer_cache_sizes` is set; otherwise (linear) the linear state only.
  """
  shape = {"num_kv_heads": config.num_kv_heads, "key_dim": config.head_dim}
  if config.kind.full_kv_cache:
    return full_kv_bytes(
      context,
      num_layers=config.num_layers,
      value_dim=config.head_dim,
      kv_dtype=config.dtype,
      **shape,
    )
  d = config.phi_dim
  if not config.kind.windowed:
    return config.num_layers * config.num_kv_heads * (d * config.head_dim + d) * 4
  layers = [config.layer_config(i).lola_config for i in range(config.num_layers)]
  return sum(
    lola_state_bytes(
      num_layers=1,
      value_dim=config.head_dim,
      feature_dim=d,
      chunk_size=lola.chunk_size,
      cache_size=lola.cache_size,
      kv_dtype=config.dtype,
      window_features=lola.window_features == "stored",
      **shape,
    )
    for lola in layers
  )
