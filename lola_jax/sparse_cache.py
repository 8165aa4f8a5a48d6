"""The sparse cache update: score the pairs leaving the window, keep some, absorb the rest.

At the end of every complete chunk n the candidates are `E = G + (chunk n-1)`. A selection
policy marks at most `L` of them to keep; every other valid candidate is absorbed into the linear
state:

  H <- H + sum_{i absorbed} phi_k(k_i) v_i^T,      s <- s + sum_{i absorbed} phi_k(k_i).

The default policy ("sre") ranks candidates by their self-recall error against the linear state
*before* the update,

  sre(k, v) = || v - phi_k(k)^T H / (phi_k(k)^T s + eps) ||_2,

and keeps the L largest (ties: the older position stays). If `|E| <= L` every candidate is kept
and nothing is absorbed, which the same top-L selection gives for free. "recency" keeps the L
newest positions. A policy is a function of the candidates and the state returning a keep mask,
so policies with adaptive budgets (fewer than L kept) fit the same boundary. A caller that has
already computed the scores (the fused Pallas chunk step computes the self-recall errors while H
is in fast memory) passes them as `scores=`; policies that rank by something else ignore them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lola_jax.config import LoLAConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Candidates:
  """Pairs competing for the sparse cache, in position order (empty slots have position -1).

  Attributes:
    k: [..., N, dk]   v: [..., N, dv]   phi_k: [..., N, D]   positions: [..., N] int32.
  """

  k: jax.Array
  v: jax.Array
  phi_k: jax.Array
  positions: jax.Array

  @property
  def valid(self) -> jax.Array:
    return self.positions >= 0


def self_recall_error(phi_k, v, linear_h, linear_s, eps: float) -> jax.Array:
  """|| v - phi_k^T H / (phi_k^T s + eps) ||_2 for every candidate.

  Args:
    phi_k: [..., N, D] feature-mapped keys.  v: [..., N, dv] values.
    linear_h: [..., D, dv] float32.  linear_s: [..., D] float32.

  Returns:
    [..., N] float32 self-recall errors.
  """
  phi_k = phi_k.astype(linear_h.dtype)
  recalled = jnp.einsum("...nd,...de->...ne", phi_k, linear_h)
  denom = jnp.einsum("...nd,...d->...n", phi_k, linear_s) + eps
  residual = v.astype(linear_h.dtype) - recalled / denom[..., None]
  return jnp.sqrt(jnp.sum(residual * residual, axis=-1))


def _top_l(scores: jax.Array, valid: jax.Array, cache_size: int) -> jax.Array:
  """Keep mask of the `cache_size` valid candidates with the largest scores.

  `lax.top_k` breaks ties towards the lower index, and candidates are in position order, so on
  equal scores the older pair is kept.
  """
  if cache_size == 0:
    return jnp.zeros(valid.shape, bool)
  n = scores.shape[-1]
  if jnp.issubdtype(scores.dtype, jnp.floating):
    masked = jnp.where(valid, scores, -jnp.inf)
  else:
    masked = jnp.where(valid, scores, jnp.iinfo(scores.dtype).min)
  _, idx = jax.lax.top_k(masked, min(cache_size, n))
  keep = jnp.zeros(valid.shape, bool)
  keep = jnp.put_along_axis(keep, idx, True, axis=-1, inplace=False)
  return keep & valid


def select_sre(config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None) -> jax.Array:
  """Keep the `cache_size` candidates the linear state recalls worst.

  `scores` ([..., N] float32), when given, are these candidates' self-recall errors against
  (linear_h, linear_s), computed elsewhere (the fused Pallas chunk step); otherwise computed here.
  """
  if scores is None:
    err = self_recall_error(cand.phi_k, cand.v, linear_h, linear_s, config.eps)
  else:
    err = scores
  return _top_l(jax.lax.stop_gradient(err), cand.valid, config.cache_size)


def select_recency(
  config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None
) -> jax.Array:
  """Keep the `cache_size` newest candidates (precomputed `scores` are ignored)."""
  del linear_h, linear_s, scores
  return _top_l(cand.positions, cand.valid, config.cache_size)


# policy(config, cand, linear_h, linear_s) -> keep mask [..., N]; a policy that can use
# precomputed self-recall errors also accepts `scores=` (only passed when a caller has them).
SelectionPolicy = Callable[..., jax.Array]

POLICIES: dict[str, SelectionPolicy] = {
  "sre": select_sre,
  "recency": select_recency,
}


def absorb(linear_h, linear_s, cand: Candidates, mask: jax.Array):
  """Adds the masked candidates to the linear state (float32 accumulation).

  Returns:
    (H + sum_{mask} phi_k v^T, s + sum_{mask} phi_k), float32.
  """
  acc = linear_h.dtype
  w = mask.astype(acc)[..., None]
  phi = cand.phi_k.astype(acc) * w
  linear_h = linear_h + jnp.einsum("...nd,...ne->...de", phi, cand.v.astype(acc))
  linear_s = linear_s + jnp.sum(phi, axis=-2)
  return linear_h, linear_s


def update_sparse_cache(config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None):
  """One end-of-chunk update: select, absorb the rest, compact the kept pairs.

  Args:
    config: the layer's LoLAConfig (cache_size L, policy, eps).
    cand: N = L + C candidates (old cache, then the chunk leaving the window).
    linear_h: [..., D, dv] float32.  linear_s: [..., D] float32.
    scores: optional [..., N] float32 self-recall errors of `cand` against (linear_h, linear_s),
      already computed by the caller; handed to the policy (the "sre" policy then skips its own
      scoring, "recency" ignores them).

  Returns:
    (cache, linear_h, linear_s): `cache` a Candidates of L slots sorted by position with empty
    slots (zeros, position -1) last; the updated linear state.
  """
  policy = POLICIES[config.policy]
  if scores is None:
    keep = policy(config, cand, linear_h, linear_s)
  else:
    keep = policy(config, cand, linear_h, linear_s, scores=scores)
  linear_h, linear_s = absorb(linear_h, linear_s, cand, cand.valid & ~keep)
  lam = config.cache_size
  # Kept pairs first, in position order; everything else after.
  order_key = jnp.where(keep, cand.positions, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(order_key, axis=-1)[..., :lam]
  kept = jnp.take_along_axis(keep, order, axis=-1)

  def gather(x):
    x = jnp.take_along_axis(x, order[..., None], axis=-2)
    return jnp.where(kept[..., None], x, jnp.zeros((), x.dtype))

  cache = Candidates(
    k=gather(cand.k),
    v=gather(cand.v),
    phi_k=gather(cand.phi_k),
    positions=jnp.where(kept, jnp.take_along_axis(cand.positions, order, axis=-1), -1),
  )
  return cache, linear_h, linear_s
