"""Exact content checksums and finiteness of a state pytree, both computed on device.

Checksum of one array leaf x (any dtype): view its bytes as 32-bit words w_i (16- and 8-bit
elements widened to one word each, 64-bit ones split in two; i = flat word index) and sum

  h_s(x) = sum_i fmix32(w_i XOR fmix32(i + c_s))   (mod 2^32),   s = 0, 1,

where fmix32 is MurmurHash3's finaliser, a bijection of uint32, and c_0, c_1 two constants.
Each term is a bijection of its word, so a change of any one word (a flipped bit, a value off by
one ulp, a NaN payload) changes both sums with certainty, and random damage to several words goes
unnoticed with probability 2^-64. Integer addition is exact and associative, so the checksum does
not depend on how the array is sharded or in which order XLA reduces it: a state saved from 8
devices and restored on 1 checks against the same numbers. The reduction runs where the arrays
live (one pass over the state, two small vectors back to the host), as does the finiteness test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lola_jax import sharding as sharding_lib

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bytes as uint32 words (one per element, two per 64-bit element)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  unsigned = {2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_summary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """([2] uint32 checksum, scalar bool all-finite) of one array."""
  w = _words(x).reshape(-1)
  i = jnp.arange(w.shape[0], dtype=jnp.uint32)
  sums = [jnp.sum(_fmix32(w ^ _fmix32(i + jnp.uint32(c))), dtype=jnp.uint32) for c in _SEEDS]
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jnp.stack(sums), finite


@jax.jit
def _summaries(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  out = [_leaf_summary(x) for x in leaves]
  return jnp.stack([c for c, _ in out]), jnp.stack([f for _, f in out])


def path_name(path) -> str:
  """'params/blocks/0/attn/q_proj/kernel': a pytree path as a '/'-joined name."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def summarize(tree) -> tuple[dict[str, list[int]], list[str]]:
  """({leaf name: [h_0, h_1]}, names of leaves holding NaN or Inf) of a pytree of arrays.

  One jitted pass on the devices that hold the arrays; only 2 words and 1 flag per leaf travel.
  """
  named = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not named:
    return {}, []
  names = [path_name(p) for p, _ in named]
  sums, finite = _summaries([jnp.asarray(x) for _, x in named])
  sums, finite = sharding_lib.to_host(sums), sharding_lib.to_host(finite)
  checksums = {n: [int(v) for v in s] for n, s in zip(names, np.asarray(sums), strict=True)}
  return checksums, [n for n, ok in zip(names, np.asarray(finite), strict=True) if not ok]


def checksum_mismatches(saved: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
  """Names of the leaves of `now` whose checksum differs from (or is missing in) `saved`."""
  return [n for n, c in now.items() if [int(v) for v in saved.get(n, [])] != c]
