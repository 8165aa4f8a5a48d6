"""Selection: which candidates stay in the sparse cache at the end of a chunk, and the update.

At the end of every complete chunk n the candidates are `E = G + (chunk n-1)`. A selection
policy marks at most `L` of them to keep; every other valid candidate is absorbed into the linear
state (`update_sparse_cache`):

  H <- H + sum_{i absorbed} phi_k(k_i) v_i^T,      s <- s + sum_{i absorbed} phi_k(k_i).

If `|E| <= L` every candidate is kept and nothing is absorbed, which the same top-L selection
gives for free. A caller that has already computed the scores (the fused Pallas chunk step
computes the self-recall errors while H is in fast memory) passes them as `scores=`; policies
that rank by something else ignore them.

A policy maps the candidates ([..., Hkv, N] with N = L + C, in position order, empty slots at
position -1) and the linear state *before* the update to a keep mask [..., Hkv, N]. The
fixed-budget policies keep `min(L, |E|)` pairs; the adaptive ones keep fewer when the extra
pairs would add little.

  "sre"       the L largest self-recall errors, ties to the older position:
              e_i = || v_i - phi(k_i)^T H / (phi(k_i)^T s + eps) ||;
  "recency"   the L newest positions;
  "energy"    per head, with energies eps_i = e_i^2 sorted in decreasing order, the smallest
              prefix whose sum reaches tau * sum(eps), its length clipped to [min_cache, L];
              pairs with eps_i < floor * mean_{j in E} ||v_j||^2 are dropped from it (the
              `min_cache` largest are kept regardless). Scored at every chunk end, full or not.
              With tau = 1 and floor = 0 this is "sre" whenever |E| > L;
  "energy_global"  one budget of `cache_budget` slots shared by the kv heads of a layer (each
              still capped at L): energies normalised by their head's total, the largest
              normalised energies over all heads kept (water-filling), the floor as above;
  "attention" the L pairs that received the most softmax mass while in the window and the cache
              (accumulated over queries and the group's query heads, H2O-style);
  "random"    L candidates chosen by a seeded hash of (position, kv head): deterministic and
              independent of how the sequence was split into calls;
  "sre_below" the L best by the key (votes from the layer below, e_i), lexicographically: a
              candidate's votes are how many times its position occurs in `prior` (the
              positions the sparse cache of the layer below holds after its update at the same
              chunk end, all of its kv heads: a pair both heads below keep has two votes); more
              votes first, then decreasing self-recall error, ties to the older position.
              Without a prior (the first layer) it is "sre". A layer whose keys cannot tell a
              surprising pair from the filler (an induction head's keys carry little more than
              the previous token) inherits the decision of a layer whose keys can.

The head axis is the second-to-last axis of `positions` (only "energy_global", "random" and
"sre_below" look at it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lola_jax.core.config import LoLAConfig
from pallas_kernels.equations import self_recall_error


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Candidates:
  """Pairs competing for the sparse cache, in position order (empty slots have position -1).

  Attributes:
    k: [..., N, dk]   v: [..., N, dv]   phi_k: [..., N, D]   positions: [..., N] int32.
    mass: [..., N] accumulated softmax mass ("attention" policy), or [..., 0] when not tracked.
  """

  k: jax.Array
  v: jax.Array
  phi_k: jax.Array
  positions: jax.Array
  mass: jax.Array | None = None

  @property
  def valid(self) -> jax.Array:
    return self.positions >= 0


def candidate_errors(config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None):
  """[..., N] self-recall errors of the candidates against (H, s), gradient-stopped.

  `scores`, when given, are these errors already computed elsewhere (the fused Pallas chunk
  step); otherwise `pallas_kernels.equations.self_recall_error` computes them here.
  """
  if scores is None:
    scores = self_recall_error(
      cand.phi_k, cand.v, linear_h, linear_s[..., None, :], config.eps, reduce_by_dot=True
    )
    scores = scores[..., 0]
  # A pair (or state) holding NaN/Inf cannot be recalled at all: the largest error, so the
  # ranking stays defined (`lax.top_k` would rank NaN below empty slots).
  return jax.lax.stop_gradient(jnp.where(jnp.isfinite(scores), scores, jnp.inf))


def _top_l(scores: jax.Array, valid: jax.Array, cache_size: int) -> jax.Array:
  """Keep mask of the `cache_size` valid candidates with the largest scores.

  On equal scores the older pair (lower index: candidates are in position order) is kept. When
  fewer slots are dropped than kept (N - L < L, the usual L + C candidates with C < L), the
  complement is found instead: the N - L smallest of the order (score, then newer first), a
  `lax.top_k` of k = N - L on the negated scores read newest first (top_k breaks ties towards the
  lower index, which is then the newer pair); the kept set is what is left. Both give the same
  mask; the second sorts less on XLA CPU, where top_k costs grow with k.
  """
  if cache_size == 0:
    return jnp.zeros(valid.shape, bool)
  n = scores.shape[-1]
  if cache_size >= n:
    return valid
  floating = jnp.issubdtype(scores.dtype, jnp.floating)
  if n - cache_size < cache_size:
    if floating:  # NaN ranks below empty slots (as in top_k), empty slots below any score
      key = jnp.where(valid, -scores, jnp.finfo(scores.dtype).max)
      key = jnp.where(jnp.isnan(scores), jnp.inf, key)
    else:  # valid integer scores (positions, 31-bit hashes) are >= 0: -score cannot overflow
      key = jnp.where(valid, -scores, jnp.iinfo(scores.dtype).max)
    _, idx = jax.lax.top_k(jnp.flip(key, axis=-1), n - cache_size)
    dropped = jnp.put_along_axis(
      jnp.zeros(valid.shape, bool), n - 1 - idx, True, axis=-1, inplace=False
    )
    return valid & ~dropped
  if floating:
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
  err = candidate_errors(config, cand, linear_h, linear_s, scores)
  return _top_l(err, cand.valid, config.cache_size)


def select_recency(
  config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None
) -> jax.Array:
  """Keep the `cache_size` newest candidates (precomputed `scores` are ignored)."""
  del linear_h, linear_s, scores
  return _top_l(cand.positions, cand.valid, config.cache_size)


def _energies(config, cand, linear_h, linear_s, scores):
  """eps_i = sre_i^2 for valid candidates, 0 elsewhere; gradient-stopped."""
  err = candidate_errors(config, cand, linear_h, linear_s, scores)
  return jnp.where(cand.valid, err * err, 0.0)


def _floor_threshold(config, cand, dtype):
  """energy_floor * mean_{valid j} ||v_j||^2, per head: [..., 1]."""
  v = jax.lax.stop_gradient(cand.v).astype(dtype)
  sq = jnp.where(cand.valid, jnp.sum(v * v, axis=-1), 0.0)
  count = jnp.maximum(jnp.sum(cand.valid, axis=-1, keepdims=True), 1)
  return config.energy_floor * jnp.sum(sq, axis=-1, keepdims=True) / count


def _descending_order(eps, valid):
  """Candidate indices by decreasing energy; ties keep position order; invalid ones last."""
  return jnp.argsort(-jnp.where(valid, eps, -1.0), axis=-1, stable=True)


def _scatter(ranked_mask, order):
  """Maps a mask over ranks back to candidate slots."""
  out = jnp.zeros(ranked_mask.shape, bool)
  return jnp.put_along_axis(out, order, ranked_mask, axis=-1, inplace=False)


def select_energy(config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None):
  """Keep the smallest set of candidates holding `energy_tau` of the squared error (per head)."""
  lam = config.cache_size
  if lam == 0:
    return jnp.zeros(cand.valid.shape, bool)
  eps = _energies(config, cand, linear_h, linear_s, scores)
  order = _descending_order(eps, cand.valid)
  sorted_eps = jnp.take_along_axis(eps, order, axis=-1)
  num_valid = jnp.sum(cand.valid, axis=-1, keepdims=True)
  if config.energy_tau >= 1.0:
    prefix = num_valid
  else:
    csum = jnp.cumsum(sorted_eps, axis=-1)
    target = config.energy_tau * csum[..., -1:]
    prefix = jnp.sum(csum < target, axis=-1, keepdims=True) + 1
    prefix = jnp.where(csum[..., -1:] > 0, prefix, 0)
  count = jnp.clip(prefix, min(config.min_cache, lam), lam)
  rank = jnp.arange(eps.shape[-1])
  above_floor = sorted_eps >= _floor_threshold(config, cand, eps.dtype)
  keep_ranked = (rank < count) & (above_floor | (rank < config.min_cache))
  return _scatter(keep_ranked, order) & cand.valid


def select_energy_global(config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None):
  """One slot budget for all kv heads: the largest head-normalised energies win."""
  lam = config.cache_size
  budget = config.cache_budget
  if lam == 0 or budget == 0:
    return jnp.zeros(cand.valid.shape, bool)
  eps = _energies(config, cand, linear_h, linear_s, scores)
  total = jnp.sum(eps, axis=-1, keepdims=True)
  normalised = eps / jnp.where(total > 0, total, 1.0)
  order = _descending_order(eps, cand.valid)
  rank = jnp.arange(eps.shape[-1])
  within_cap = _scatter(jnp.broadcast_to(rank < lam, order.shape), order)  # each head's L best
  eligible = cand.valid & within_cap & (eps >= _floor_threshold(config, cand, eps.dtype))
  eligible &= eps > 0
  heads, n = eps.shape[-2], eps.shape[-1]
  flat_score = jnp.where(eligible, normalised, -jnp.inf).reshape(eps.shape[:-2] + (heads * n,))
  _, idx = jax.lax.top_k(flat_score, min(budget, heads * n))
  chosen = jnp.put_along_axis(jnp.zeros(flat_score.shape, bool), idx, True, axis=-1, inplace=False)
  return chosen.reshape(eps.shape) & eligible


def select_attention(config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None):
  """Keep the `cache_size` candidates with the most accumulated softmax mass."""
  del linear_h, linear_s, scores
  if cand.mass is None or cand.mass.shape[-1] != cand.positions.shape[-1]:
    raise ValueError("policy 'attention' needs candidates with accumulated mass")
  return _top_l(jax.lax.stop_gradient(cand.mass), cand.valid, config.cache_size)


def random_scores(positions: jax.Array, seed: int) -> jax.Array:
  """A seeded 31-bit hash of (position, kv head) as int32 [..., Hkv, N] (lowbias32 mixing)."""
  head = jax.lax.broadcasted_iota(jnp.uint32, positions.shape, positions.ndim - 2)
  x = positions.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
  x = x ^ (head * jnp.uint32(0x85EBCA77) + jnp.uint32(seed & 0xFFFFFFFF) * jnp.uint32(0xC2B2AE3D))
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  return (x >> 1).astype(jnp.int32)


def select_random(config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None):
  """Keep `cache_size` candidates chosen by a seeded hash (the ablation's floor)."""
  del linear_h, linear_s, scores
  return _top_l(random_scores(cand.positions, config.seed), cand.valid, config.cache_size)


def select_sre_below(
  config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None, prior=None
) -> jax.Array:
  """Keep the `cache_size` best by (votes from the layer below, self-recall error, older first).

  Args:
    prior: int [B, P] positions the layer below holds (-1 = empty slot), or None. Candidates are
      [B, Hkv, N]; the prior is shared by the kv heads.
  """
  lam = config.cache_size
  if lam == 0:
    return jnp.zeros(cand.valid.shape, bool)
  err = candidate_errors(config, cand, linear_h, linear_s, scores)
  if prior is None:
    votes = jnp.zeros(cand.valid.shape, jnp.int32)
  else:
    prior = jnp.where(prior >= 0, prior, -2)  # an empty prior slot never matches an empty candidate
    hits = cand.positions[..., :, None] == prior[:, None, None, :]
    votes = jnp.sum(hits, axis=-1, dtype=jnp.int32)
  # Sort keys, last one primary: valid first, then more votes from below, then larger error;
  # stable, so equal keys keep position order (older first).
  order = jnp.lexsort((-err, -votes, (~cand.valid).astype(jnp.int32)), axis=-1)
  rank = jnp.arange(err.shape[-1])
  return _scatter(jnp.broadcast_to(rank < lam, order.shape), order) & cand.valid


# policy(config, cand, linear_h, linear_s, scores=None) -> keep mask [..., N].
SelectionPolicy = Callable[..., jax.Array]

POLICIES: dict[str, SelectionPolicy] = {
  "sre": select_sre,
  "recency": select_recency,
  "energy": select_energy,
  "energy_global": select_energy_global,
  "attention": select_attention,
  "random": select_random,
  "sre_below": select_sre_below,
}

# Policies that rank by the self-recall error (the fused kernel's scores are useful to them).
SRE_POLICIES = ("sre", "energy", "energy_global", "sre_below")


# Policies that keep min(L, |E|) pairs: at most N - L of the N candidates are dropped.
FIXED_BUDGET_POLICIES = ("sre", "recency", "attention", "random", "sre_below")


def absorb(linear_h, linear_s, cand: Candidates, mask: jax.Array):
  """Adds the masked candidates to the linear state (float32 accumulation).

  Returns:
    (H + sum_{mask} phi_k v^T, s + sum_{mask} phi_k), float32.
  """
  acc = linear_h.dtype
  # Masked by selection, not by multiplication: a kept pair's NaN value must not enter H (0 x NaN).
  phi = jnp.where(mask[..., None], cand.phi_k.astype(acc), 0.0)
  v = jnp.where(mask[..., None], cand.v.astype(acc), 0.0)
  linear_h = linear_h + jnp.einsum("...nd,...ne->...de", phi, v)
  linear_s = linear_s + jnp.sum(phi, axis=-2)
  return linear_h, linear_s


def compaction_indices(mask: jax.Array, size: int):
  """The indices of the True entries of `mask` in increasing order, without a sort.

  Candidates are in position order, so the j-th True entry is the one whose inclusive running
  count is j + 1: each True entry i is scattered to slot cumsum(mask)_i - 1 (a cumulative-sum
  scatter over N entries instead of an argsort).

  Args:
    mask: [..., N] bool.  size: slots of the result (entries past it are dropped).

  Returns:
    (idx [..., size] int32, ok [..., size] bool): idx[j] is the j-th True entry where ok[j]
    (0 elsewhere).
  """
  n = mask.shape[-1]
  rank = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
  slot = jnp.where(mask & (rank < size), rank, size)  # dropped entries go to a spare slot
  iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), mask.shape)
  idx = jnp.zeros(mask.shape[:-1] + (size + 1,), jnp.int32)
  idx = jnp.put_along_axis(idx, slot, iota, axis=-1, inplace=False)[..., :size]
  ok = jnp.arange(size) < jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.int32)
  return jnp.where(ok, idx, 0), ok


def absorb_evicted(linear_h, linear_s, cand: Candidates, evict: jax.Array, max_evicted: int):
  """`absorb` of the evicted candidates only: at most `max_evicted` of them (C for the
  fixed-budget policies, whatever the cache size) are gathered by index and added with one
  [D, E] x [E, dv] matmul per head, instead of contracting all N candidates under a 0/1 mask.
  Empty gathered slots are zeroed by selection (a kept pair's NaN never enters H).
  """
  if max_evicted >= evict.shape[-1]:
    return absorb(linear_h, linear_s, cand, evict)
  acc = linear_h.dtype
  idx, ok = compaction_indices(evict, max_evicted)

  def rows(x):
    x = jnp.take_along_axis(x, idx[..., None], axis=-2).astype(acc)
    return jnp.where(ok[..., None], x, jnp.zeros((), acc))

  phi, v = rows(cand.phi_k), rows(cand.v)
  linear_h = linear_h + jnp.einsum("...nd,...ne->...de", phi, v)
  linear_s = linear_s + jnp.sum(phi, axis=-2)
  return linear_h, linear_s


def update_sparse_cache(
  config: LoLAConfig, cand: Candidates, linear_h, linear_s, scores=None, prior=None
):
  """One end-of-chunk update: select, absorb the rest, compact the kept pairs.

  Args:
    config: the layer's LoLAConfig (cache_size L, policy, eps).
    cand: N = L + C candidates (old cache, then the chunk leaving the window), in position order.
    linear_h: [..., D, dv] float32.  linear_s: [..., D] float32.
    scores: optional [..., N] float32 self-recall errors of `cand` against (linear_h, linear_s),
      already computed by the caller; handed to the policy (the "sre" policy then skips its own
      scoring, "recency" ignores them).
    prior: int [B, P] positions the layer below holds (policy "sre_below" only), or None.

  Returns:
    (cache, linear_h, linear_s): `cache` a Candidates of L slots sorted by position with empty
    slots (zeros, position -1) last; the updated linear state.

  The evicted pairs (valid, not kept) are absorbed by index (`absorb_evicted`), and the kept
  ones are compacted in position order by a cumulative-sum scatter (`compaction_indices`): the
  candidates are already in position order, so no sort is needed.
  """
  policy = POLICIES[config.policy]
  extra = {} if scores is None else {"scores": scores}
  if config.policy == "sre_below":
    extra["prior"] = prior
  keep = policy(config, cand, linear_h, linear_s, **extra) & cand.valid
  lam, n = config.cache_size, cand.positions.shape[-1]
  max_evicted = n - lam if config.policy in FIXED_BUDGET_POLICIES else n
  linear_h, linear_s = absorb_evicted(
    linear_h, linear_s, cand, cand.valid & ~keep, max(max_evicted, 0)
  )
  order, kept = compaction_indices(keep, lam)

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
