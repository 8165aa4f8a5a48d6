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

import jax
import jax.numpy as jnp

from lola_jax.config import LoLAConfig
from lola_jax.policies import POLICIES, Candidates, self_recall_error

__all__ = ["Candidates", "absorb", "self_recall_error", "update_sparse_cache"]


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


def update_sparse_cache(
  config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None, prior=None
):
  """One end-of-chunk update: select, absorb the rest, compact the kept pairs.

  Args:
    config: the layer's LoLAConfig (cache_size L, policy, eps).
    cand: N = L + C candidates (old cache, then the chunk leaving the window).
    linear_h: [..., D, dv] float32.  linear_s: [..., D] float32.
    scores: optional [..., N] float32 self-recall errors of `cand` against (linear_h, linear_s),
      already computed by the caller; handed to the policy (the "sre" policy then skips its own
      scoring, "recency" ignores them).
    prior: int [B, P] positions the layer below holds (policy "sre_below" only), or None.

  Returns:
    (cache, linear_h, linear_s): `cache` a Candidates of L slots sorted by position with empty
    slots (zeros, position -1) last; the updated linear state.
  """
  policy = POLICIES[config.policy]
  extra = {} if scores is None else {"scores": scores}
  if config.policy == "sre_below":
    extra["prior"] = prior
  keep = policy(config, cand, linear_h, linear_s, **extra)
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
    mass=None
    if cand.mass is None
    else jnp.where(kept, jnp.take_along_axis(cand.mass, order, axis=-1), 0.0),
  )
  return cache, linear_h, linear_s
