"""Recomputed window features: a state that keeps keys and values of its window, not phi_k(k).

With `LoLAConfig(window_features="recomputed")` the window and current-chunk buffers of a
`LoLAState` hold k and v only (their phi_k leaves are empty, [B, Hkv, 0, D]). The only reader of
the window's feature-mapped keys is the end of a chunk, where the window's pairs compete for the
sparse cache and the losers are absorbed:

    sre(k, v) = || v - phi_k(k)^T H / (phi_k(k)^T s + eps) ||,   H += phi_k(k) v^T, s += phi_k(k)

so phi_k of the C window keys is recomputed there, from the stored keys, by the map that
produced the inputs' phi_k: a `key_feature_map`. The sparse cache keeps its phi_k (its pairs are
scored at every chunk end). Outputs equal the stored variant's up to the rounding of recomputing
phi_k (one feature map of C keys per chunk end instead of 2C D stored values per kv head).

A `key_feature_map` is a `jax.tree_util.Partial` (its parameters are pytree leaves, so it
crosses `jax.jit` without retracing) mapping keys [B, N, Hkv, dk] to phi_k [B, N, Hkv, D], the
layout of `lola_prefill`'s k and phi_k; `lola_jax.model.FeatureMap.partial()` builds one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lola_jax.core.config import LoLAConfig
from lola_jax.core.state import LoLAState


def check_key_feature_map(
  fn: str, key_feature_map, config: LoLAConfig, *, required: bool = True
) -> None:
  """`key_feature_map` is read (a `jax.tree_util.Partial`) only when the config's
  window_features is "recomputed", and needed then unless `required=False` (a prefill from a
  fresh state has no window to recompute)."""
  if config.window_features == "stored":
    if key_feature_map is not None:
      raise ValueError(
        f"{fn}: key_feature_map is only read with window_features='recomputed', but the config "
        "has window_features='stored' (the state keeps phi_k); got a key_feature_map"
      )
    return
  if key_feature_map is None and not required:
    return
  if not isinstance(key_feature_map, jax.tree_util.Partial):
    raise ValueError(
      f"{fn}: window_features='recomputed' needs key_feature_map, a jax.tree_util.Partial "
      "mapping keys [B, N, Hkv, dk] to phi_k [B, N, Hkv, D] (e.g. FeatureMap.partial()), got "
      f"{type(key_feature_map).__name__}"
    )


def key_features(key_feature_map, k: jax.Array, valid: jax.Array, feature_dim: int) -> jax.Array:
  """phi_k of stored keys, zero in empty slots (the state's convention).

  Args:
    key_feature_map: keys [B, N, Hkv, dk] -> phi_k [B, N, Hkv, D].
    k: [B, Hkv, N, dk] keys in the state's layout.
    valid: bool, broadcastable to [B, Hkv, N]: which slots hold a pair.
    feature_dim: D, the width the state's features have.

  Returns:
    [B, Hkv, N, D] in k's dtype (the dtype a stored phi_k has).
  """
  phi = jnp.swapaxes(key_feature_map(jnp.swapaxes(k, 1, 2)), 1, 2)
  expected = (*k.shape[:3], feature_dim)
  if phi.shape != expected:
    raise ValueError(
      f"key_feature_map must map keys [B, N, Hkv, dk] to [B, N, Hkv, D={feature_dim}]; for keys "
      "of shape "
      f"{tuple(jnp.swapaxes(k, 1, 2).shape)} it returned {tuple(jnp.swapaxes(phi, 1, 2).shape)}"
    )
  return jnp.where(valid[..., None], phi, jnp.zeros((), phi.dtype)).astype(k.dtype)


def with_window_features(state: LoLAState, key_feature_map) -> LoLAState:
  """The state with phi_k of its window (when it has one) and of the current chunk's tokens
  recomputed: the layout of window_features="stored", for the prefill scan."""
  has_window = (state.window_positions >= 0)[:, None, :]  # [B, 1, C]
  in_chunk = (state.chunk_positions >= 0)[:, None, :]
  return dataclasses.replace(
    state,
    window_phi_k=key_features(key_feature_map, state.window_k, has_window, state.feature_dim),
    chunk_phi_k=key_features(key_feature_map, state.chunk_k, in_chunk, state.feature_dim),
  )


def without_window_features(state: LoLAState) -> LoLAState:
  """The state with empty window and chunk phi_k leaves ([B, Hkv, 0, D])."""
  empty = state.window_phi_k[..., :0, :]
  return dataclasses.replace(state, window_phi_k=empty, chunk_phi_k=empty)
