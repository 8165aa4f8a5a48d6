"""A slow, obviously-correct float64 NumPy implementation of LoLA attention (tests only).

It follows the semantics token by token with explicit Python lists of positions, independent of
the chunked JAX code: every query sees the sparse cache, the previous complete chunk and its own
chunk up to itself with exact softmax, plus the linear state as it stood at its chunk's start.
Every selection policy of `lola_jax.core.selection` is written out again here, as plain loops.
"""

from __future__ import annotations

import numpy as np

from lola_jax.core import validation
from lola_jax.core.config import LoLAConfig


def _self_recall_error(phi_k, v, linear_h, linear_s, eps):
  """||v - phi_k^T H / (phi_k^T s + eps)||; a zero denominator recalls nothing (error ||v||)."""
  den = phi_k @ linear_s + eps
  recalled = phi_k @ linear_h / den if den != 0 else np.zeros_like(v)
  err = float(np.linalg.norm(v - recalled))
  return err if np.isfinite(err) else np.inf  # NaN/Inf: cannot be recalled (ranks first)


def _random_score(position: int, head: int, seed: int) -> int:
  """The seeded lowbias32 hash of `lola_jax.core.selection.random_scores`, in Python integers."""
  m = 0xFFFFFFFF
  x = (position * 0x9E3779B1) & m
  x ^= (head * 0x85EBCA77 + (seed & m) * 0xC2B2AE3D) & m
  x ^= x >> 16
  x = (x * 0x7FEB352D) & m
  x ^= x >> 15
  x = (x * 0x846CA68B) & m
  x ^= x >> 16
  return x >> 1


def _energy_keep(config, candidates, energy, v_sq):
  """The "energy" choice for one head: a prefix of the candidates by decreasing energy."""
  lam = config.cache_size
  ranked = sorted(candidates, key=lambda j: (-energy[j], j))
  total = sum(energy[j] for j in ranked)
  if config.energy_tau >= 1.0:
    prefix = len(ranked)
  elif total <= 0:
    prefix = 0
  else:
    acc, prefix = 0.0, len(ranked)
    for n, j in enumerate(ranked):
      acc += energy[j]
      if acc >= config.energy_tau * total:
        prefix = n + 1
        break
  count = min(max(prefix, min(config.min_cache, lam)), lam)
  if not candidates:
    return []
  floor = config.energy_floor * np.mean([v_sq[j] for j in candidates])
  return [j for n, j in enumerate(ranked[:count]) if energy[j] >= floor or n < config.min_cache]


def _select(config, candidates_by_head, errors_by_head, v_sq_by_head, mass, heads, below=()):
  """Kept positions per head. candidates: list of positions; errors/v_sq/mass: dicts by position;
  below: the positions the layer below holds, once per kv head holding them ("sre_below")."""
  lam, policy = config.cache_size, config.policy
  keep = {}
  if policy in ("sre", "recency", "random", "attention", "sre_below"):
    for h in heads:
      cands = candidates_by_head[h]
      if len(cands) <= lam:
        keep[h] = list(cands)
        continue
      if policy == "sre":
        ranked = sorted(cands, key=lambda j, h=h: (-errors_by_head[h][j], j))
      elif policy == "sre_below":
        ranked = sorted(cands, key=lambda j, h=h: (-below.count(j), -errors_by_head[h][j], j))
      elif policy == "recency":
        ranked = sorted(cands, key=lambda j: -j)
      elif policy == "attention":
        ranked = sorted(cands, key=lambda j, h=h: (-mass[h][j], j))
      else:
        ranked = sorted(cands, key=lambda j, h=h: (-_random_score(j, h, config.seed), j))
      keep[h] = ranked[:lam]
  elif policy == "energy":
    for h in heads:
      energy = {j: e**2 for j, e in errors_by_head[h].items()}
      keep[h] = _energy_keep(config, candidates_by_head[h], energy, v_sq_by_head[h])
  elif policy == "energy_global":
    pool = []
    for h in heads:
      cands = candidates_by_head[h]
      energy = {j: e**2 for j, e in errors_by_head[h].items()}
      total = sum(energy.values())
      floor = config.energy_floor * np.mean([v_sq_by_head[h][j] for j in cands]) if cands else 0
      best = sorted(cands, key=lambda j, energy=energy: (-energy[j], j))[:lam]
      n_cands = len(cands)
      for j in best:
        if energy[j] > 0 and energy[j] >= floor:
          # Ties across heads: lower head first, then older position (flattened index order).
          slot = cands.index(j)
          pool.append((-energy[j] / total, h * (lam + n_cands + 1) + slot, h, j))
    pool.sort()
    keep = {h: [] for h in heads}
    for _, _, h, j in pool[: config.cache_budget]:
      keep[h].append(j)
  else:
    raise ValueError(f"lola_reference: unknown policy {policy!r}")
  return keep


def lola_reference(
  q,
  k,
  v,
  phi_q,
  phi_k,
  gate=None,
  *,
  gate_logit=None,
  config: LoLAConfig,
  return_cache=False,
  prior_positions=None,
):
  """LoLA attention of whole sequences, one token at a time, in float64.

  Args: as `lola_prefill` (q [B,T,Hq,dk], k [B,T,Hkv,dk], v [B,T,Hkv,dv], phi_q [B,T,Hq,D],
    phi_k [B,T,Hkv,D], gate [Hq] or gate_logit [Hq]) without state or lengths; from logits,
    g = 1 / (1 + e^-x) and 1 - g = 1 / (1 + e^x) in float64.
    return_cache: also return the final sparse cache positions.
    prior_positions: policy "sre_below": int [B, P] positions held by the layer below, the same
      at every chunk end (-1 entries are ignored).

  Returns:
    y: float64 np.ndarray [B, T, Hq, dv]; with return_cache, also int32 [B, Hkv, L] cached
    positions in increasing order, -1 for empty slots (last).
  """
  given = validation.check_gate_args("lola_reference", gate, gate_logit)
  validation.check_attention_inputs("lola_reference", q, k, v, phi_q, phi_k, *given, has_time=True)
  validation.check_prior_positions("lola_reference", prior_positions, config.policy, q.shape[0])
  if prior_positions is not None:
    prior_positions = np.asarray(prior_positions)
  q, k, v, phi_q, phi_k = (np.asarray(x, np.float64) for x in (q, k, v, phi_q, phi_k))
  if gate_logit is None:
    gate = np.asarray(gate, np.float64)
    one_minus_gate = 1.0 - gate
  else:
    x = np.asarray(gate_logit, np.float64)
    with np.errstate(over="ignore"):
      gate, one_minus_gate = 1.0 / (1.0 + np.exp(-x)), 1.0 / (1.0 + np.exp(x))
  b_size, t_size, hq, dk = q.shape
  hkv, dv, feat = k.shape[2], v.shape[3], phi_k.shape[3]
  group = hq // hkv
  c, lam = config.chunk_size, config.cache_size
  scale = config.scale(dk)
  y = np.zeros((b_size, t_size, hq, dv))
  cache_out = np.full((b_size, hkv, lam), -1, np.int32)
  heads = range(hkv)

  for b in range(b_size):
    cache = {h: [] for h in heads}  # positions in each head's sparse cache
    linear_h = {h: np.zeros((feat, dv)) for h in heads}
    linear_s = {h: np.zeros(feat) for h in heads}
    mass = {h: {} for h in heads}  # softmax mass received by each pair ("attention" policy)
    for t in range(t_size):
      n = t // c
      for h in heads:
        softmax_set = cache[h] + list(range(max(0, (n - 1) * c), t + 1))
        vals = v[b, softmax_set, h]
        for i in range(h * group, (h + 1) * group):
          logits = np.array([scale * q[b, t, i] @ k[b, j, h] for j in softmax_set])
          probs = np.exp(logits - logits.max())
          for j, p in zip(softmax_set, probs / probs.sum(), strict=True):
            mass[h][j] = mass[h].get(j, 0.0) + p
          g, g1 = gate[i], one_minus_gate[i]
          lin_num = phi_q[b, t, i] @ linear_h[h]
          lin_den = phi_q[b, t, i] @ linear_s[h]
          if config.mix == "gated":
            w = np.exp(logits)
            num = g * w @ vals + g1 * lin_num
            den = g * w.sum() + g1 * lin_den
          else:
            w = np.exp(logits - logits.max())
            num = g * w @ vals + lin_num
            den = g * w.sum() + lin_den
          y[b, t, i] = num / (den if den != 0 else 1.0)  # 0/0 (g = 0, nothing absorbed) -> 0
      if (t + 1) % c:
        continue
      # Chunk n is complete: chunk n-1 leaves the window and competes with the cache.
      leaving = list(range((n - 1) * c, n * c)) if n >= 1 else []
      candidates = {h: cache[h] + leaving for h in heads}
      errors = {
        h: {
          j: _self_recall_error(phi_k[b, j, h], v[b, j, h], linear_h[h], linear_s[h], config.eps)
          for j in candidates[h]
        }
        for h in heads
      }
      v_sq = {h: {j: float(v[b, j, h] @ v[b, j, h]) for j in candidates[h]} for h in heads}
      below = [] if prior_positions is None else [int(j) for j in prior_positions[b] if j >= 0]
      keep = _select(config, candidates, errors, v_sq, mass, heads, below)
      for h in heads:
        kept = set(keep[h])
        for j in candidates[h]:
          if j not in kept:
            linear_h[h] += np.outer(phi_k[b, j, h], v[b, j, h])
            linear_s[h] += phi_k[b, j, h]
        cache[h] = sorted(kept)
    for h in heads:
      cache_out[b, h, : len(cache[h])] = cache[h]
  if return_cache:
    return y, cache_out
  return y
