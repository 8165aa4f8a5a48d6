"""The LoLA state: sliding window, sparse cache and linear state of one attention layer.

Shape legend (used throughout the package):
  B   batch rows              Hq   query heads        Hkv  key/value heads
  T   tokens                  C    chunk size         L    sparse-cache capacity (lambda)
  dk  key width               dv   value width        D    feature-map width
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lola_jax.core.config import LoLAConfig


def _size(leaf: str, axis: int, letter: str) -> property:
  """A read-only size of the state: axis `axis` of the leaf `leaf`."""
  return property(
    lambda self: getattr(self, leaf).shape[axis], doc=f"{letter} ({leaf} axis {axis})"
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoLAState:
  """Every past key/value pair of one layer lives in exactly one of three memories.

  Invalid (empty) slots always hold zeros and position -1, so two states that hold the same
  pairs compare equal leaf by leaf.

  Attributes:
    cache_k: [B, Hkv, L, dk] sparse cache keys, slots sorted by position, empty slots last.
    cache_v: [B, Hkv, L, dv] sparse cache values.
    cache_phi_k: [B, Hkv, L, D] feature-mapped cached keys (kept so scoring needs no re-mapping).
    cache_positions: [B, Hkv, L] int32 token positions, -1 for an empty slot.
    window_k: [B, Hkv, C, dk] the previous complete chunk (the sliding window's old half).
    window_v: [B, Hkv, C, dv]
    window_phi_k: [B, Hkv, C, D], or [B, Hkv, 0, D] when the config's window_features is
      "recomputed" (recomputed from window_k when needed; likewise chunk_phi_k).
    chunk_k: [B, Hkv, C, dk] tokens of the current, incomplete chunk (slot j = position nC + j).
    chunk_v: [B, Hkv, C, dv]
    chunk_phi_k: [B, Hkv, C, D]
    linear_h: [B, Hkv, D, dv] float32, H = sum over absorbed pairs of phi(k) v^T.
    linear_s: [B, Hkv, D] float32, s = sum over absorbed pairs of phi(k).
    num_tokens: [B] int32 tokens seen so far by each row.
    cache_mass, window_mass, chunk_mass: [B, Hkv, L], [B, Hkv, C], [B, Hkv, C] float32 softmax
      mass each pair has received so far (summed over the group's query heads and queries);
      only the "attention" policy uses it, every other policy stores empty [B, Hkv, 0] arrays.
  """

  cache_k: jax.Array
  cache_v: jax.Array
  cache_phi_k: jax.Array
  cache_positions: jax.Array
  window_k: jax.Array
  window_v: jax.Array
  window_phi_k: jax.Array
  chunk_k: jax.Array
  chunk_v: jax.Array
  chunk_phi_k: jax.Array
  linear_h: jax.Array
  linear_s: jax.Array
  num_tokens: jax.Array
  cache_mass: jax.Array
  window_mass: jax.Array
  chunk_mass: jax.Array

  # Sizes (static ints, read off the shapes; letters as in the module legend).
  batch = _size("num_tokens", -1, "B")
  num_kv_heads = _size("linear_h", -3, "Hkv")
  cache_size = _size("cache_k", -2, "L")
  chunk_size = _size("window_k", -2, "C")
  key_dim = _size("cache_k", -1, "dk")
  value_dim = _size("cache_v", -1, "dv")
  feature_dim = _size("linear_s", -1, "D")

  @property
  def stores_window_features(self) -> bool:
    """Whether the window and chunk buffers keep their phi_k (`LoLAConfig.window_features`)."""
    return self.window_phi_k.shape[-2] > 0

  @property
  def tracks_attention_mass(self) -> bool:
    """Whether the state carries per-pair attention mass (the "attention" policy)."""
    return self.window_mass.shape[-1] > 0

  # Masks derived from the positions / token counts.
  @property
  def cache_valid(self) -> jax.Array:
    """[B, Hkv, L] bool: which sparse-cache slots hold a pair."""
    return self.cache_positions >= 0

  @property
  def window_positions(self) -> jax.Array:
    """[B, C] int32 positions of the window slots, -1 before the first chunk completes."""
    c = self.chunk_size
    start = (self.num_tokens // c - 1) * c
    pos = start[..., None] + jnp.arange(c, dtype=jnp.int32)
    return jnp.where(start[..., None] >= 0, pos, -1)

  @property
  def chunk_positions(self) -> jax.Array:
    """[B, C] int32 positions of the current-chunk slots, -1 for slots not yet written."""
    c = self.chunk_size
    start = (self.num_tokens // c) * c
    pos = start[..., None] + jnp.arange(c, dtype=jnp.int32)
    return jnp.where(pos < self.num_tokens[..., None], pos, -1)

  def nbytes(self) -> int:
    """Bytes held by the state (all leaves, GQA-aware: one copy per kv head)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


def accumulation_dtype(dtype) -> jnp.dtype:
  """The dtype of linear states and accumulators: float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def init_state(
  config: LoLAConfig,
  *,
  batch: int,
  num_kv_heads: int,
  key_dim: int,
  value_dim: int,
  feature_dim: int,
  dtype=jnp.float32,
) -> LoLAState:
  """An empty state: no tokens seen, every slot empty, H = 0 and s = 0.

  `dtype` is the storage dtype of the cached keys/values/features; the linear state is float32
  (float64 when `dtype` is float64).
  """
  for name, val in (
    ("batch", batch),
    ("num_kv_heads", num_kv_heads),
    ("key_dim", key_dim),
    ("value_dim", value_dim),
    ("feature_dim", feature_dim),
  ):
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
      raise ValueError(f"init_state: {name} must be an int >= 1, got {val!r}")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(f"init_state: dtype must be a floating dtype, got {jnp.dtype(dtype)}")
  lam, c = config.cache_size, config.chunk_size
  b, h = batch, num_kv_heads
  acc = accumulation_dtype(dtype)
  mass = config.policy == "attention"
  features = c if config.window_features == "stored" else 0

  def zeros(*shape, dt=dtype):
    return jnp.zeros(shape, dt)

  return LoLAState(
    cache_k=zeros(b, h, lam, key_dim),
    cache_v=zeros(b, h, lam, value_dim),
    cache_phi_k=zeros(b, h, lam, feature_dim),
    cache_positions=jnp.full((b, h, lam), -1, jnp.int32),
    window_k=zeros(b, h, c, key_dim),
    window_v=zeros(b, h, c, value_dim),
    window_phi_k=zeros(b, h, features, feature_dim),
    chunk_k=zeros(b, h, c, key_dim),
    chunk_v=zeros(b, h, c, value_dim),
    chunk_phi_k=zeros(b, h, features, feature_dim),
    linear_h=zeros(b, h, feature_dim, value_dim, dt=acc),
    linear_s=zeros(b, h, feature_dim, dt=acc),
    num_tokens=jnp.zeros((b,), jnp.int32),
    cache_mass=zeros(b, h, lam if mass else 0, dt=acc),
    window_mass=zeros(b, h, c if mass else 0, dt=acc),
    chunk_mass=zeros(b, h, c if mass else 0, dt=acc),
  )


def cached_positions(state: LoLAState) -> jax.Array:
  """int32 [B, Hkv, L]: positions of the pairs in the sparse cache, -1 for empty slots."""
  if not isinstance(state, LoLAState):
    raise ValueError(f"cached_positions: state must be a LoLAState, got {type(state).__name__}")
  return state.cache_positions
