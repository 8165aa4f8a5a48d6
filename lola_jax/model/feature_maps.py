"""Feature maps phi for the linear-attention branch, and the per-head gate.

Legend: B batch, T time, H heads (query or key/value), d head_dim, F learned feature width,
D = output feature width of phi (2F for Hedgehog, d for elu+1 and identity).

Pure functions hold the math; `FeatureMap` and `Gate` only hold parameters and call them.

- Hedgehog (Zhang et al. 2024, used by LoLCATs and LoLA): phi(x) = [softmax(x W), softmax(-x W)]
  with a learned W [d, F] per head (separate for queries and keys), softmax over the F features.
  Every feature is positive and each half sums to one, so phi(q)^T phi(k) > 0.
- elu+1 (Katharopoulos et al. 2020): phi(x) = elu(x) + 1 > 0, no parameters.
- identity: phi(x) = x (no positivity; normalised linear attention may divide by ~0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FEATURE_MAPS = ("hedgehog", "elu", "identity")


def hedgehog(x: jax.Array, w: jax.Array) -> jax.Array:
  """Hedgehog feature map [softmax(xW), softmax(-xW)] per head.

  Args:
    x: [..., H, d] queries or keys.
    w: [H, d, F] learned projection, one per head.

  Returns:
    [..., H, 2F] float32 features, each half a probability vector.
  """
  z = jnp.einsum("...hd,hdf->...hf", x.astype(jnp.float32), w.astype(jnp.float32))
  return jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)


def hedgehog_of(w: jax.Array, x: jax.Array) -> jax.Array:
  """`hedgehog(x, w)` with the parameters first, for `jax.tree_util.Partial(hedgehog_of, w)`."""
  return hedgehog(x, w)


def elu_plus_one(x: jax.Array) -> jax.Array:
  """phi(x) = elu(x) + 1, elementwise; [..., H, d] -> [..., H, d] float32."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def identity(x: jax.Array) -> jax.Array:
  """phi(x) = x; [..., H, d] -> [..., H, d] float32."""
  return x.astype(jnp.float32)


def feature_width(kind: str, head_dim: int, feature_dim: int) -> int:
  """D, the width of phi(x) for a feature map `kind`."""
  if kind == "hedgehog":
    return 2 * feature_dim
  if kind in ("elu", "identity"):
    return head_dim
  raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


def _hedgehog_init(key: jax.Array, num_heads: int, head_dim: int, feature_dim: int) -> jax.Array:
  """Identity when F == d (LoLCATs' initialisation), else a small random projection."""
  if feature_dim == head_dim:
    return jnp.broadcast_to(jnp.eye(head_dim, dtype=jnp.float32), (num_heads, head_dim, head_dim))
  std = head_dim**-0.5
  return std * jax.random.normal(key, (num_heads, head_dim, feature_dim), jnp.float32)


class FeatureMap(nnx.Module):
  """phi for one side (queries or keys) of one attention layer."""

  def __init__(
    self,
    kind: str,
    num_heads: int,
    head_dim: int,
    feature_dim: int,
    *,
    heads_axis: str,
    rngs: nnx.Rngs,
  ):
    if kind not in FEATURE_MAPS:
      raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")
    self.kind = kind
    if kind == "hedgehog":
      self.w = nnx.Param(
        _hedgehog_init(rngs.params(), num_heads, head_dim, feature_dim),
        logical_axes=(heads_axis, "head_dim", "feature"),
      )

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., H, d] -> [..., H, D] float32."""
    if self.kind == "hedgehog":
      return hedgehog(x, self.w[...])
    if self.kind == "elu":
      return elu_plus_one(x)
    return identity(x)

  def partial(self) -> jax.tree_util.Partial:
    """This map as a `jax.tree_util.Partial` ([..., H, d] -> [..., H, D], the parameters its
    leaves): what the core takes as `key_feature_map` to recompute window features."""
    if self.kind == "hedgehog":
      return jax.tree_util.Partial(hedgehog_of, self.w[...])
    return jax.tree_util.Partial(elu_plus_one if self.kind == "elu" else identity)


class Gate(nnx.Module):
  """Per-query-head gate g = sigmoid(param) in (0, 1) between softmax and linear memories.

  The attention hands the core the logits (`logits()`): the core mixes in log space from them,
  so a saturated gate (|logit| >= 17 rounds g to 0 or 1 in float32) keeps finite gradients.
  """

  def __init__(self, num_heads: int, init: float = 0.0):
    self.logit = nnx.Param(jnp.full((num_heads,), init, jnp.float32), logical_axes=("heads",))

  def __call__(self) -> jax.Array:
    """g [H] float32."""
    return jax.nn.sigmoid(self.logit[...])

  def logits(self) -> jax.Array:
    """x [H] float32, g = sigmoid(x)."""
    return self.logit[...]
