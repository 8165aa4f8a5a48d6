"""A slow, obviously-correct float64 NumPy implementation of LoLA attention (tests only).

It follows the semantics token by token with explicit Python sets of positions, independent of
the chunked JAX code: every query sees the sparse cache, the previous complete chunk and its own
chunk up to itself with exact softmax, plus the linear state as it stood at its chunk's start.
"""

from __future__ import annotations

import numpy as np

from lola_jax import validation
from lola_jax.config import LoLAConfig


def _self_recall_error(phi_k, v, linear_h, linear_s, eps):
  recalled = phi_k @ linear_h / (phi_k @ linear_s + eps)
  return float(np.linalg.norm(v - recalled))


def lola_reference(q, k, v, phi_q, phi_k, gate, *, config: LoLAConfig, return_cache=False):
  """LoLA attention of whole sequences, one token at a time, in float64.

  Args: as `lola_prefill` (q [B,T,Hq,dk], k [B,T,Hkv,dk], v [B,T,Hkv,dv], phi_q [B,T,Hq,D],
    phi_k [B,T,Hkv,D], gate [Hq]) without state or lengths.
    return_cache: also return the final sparse cache positions.

  Returns:
    y: float64 np.ndarray [B, T, Hq, dv]; with return_cache, also int32 [B, Hkv, L] cached
    positions in increasing order, -1 for empty slots (last).
  """
  validation.check_attention_inputs("lola_reference", q, k, v, phi_q, phi_k, gate, has_time=True)
  q, k, v, phi_q, phi_k, gate = (np.asarray(x, np.float64) for x in (q, k, v, phi_q, phi_k, gate))
  b_size, t_size, hq, dk = q.shape
  hkv, dv, feat = k.shape[2], v.shape[3], phi_k.shape[3]
  group = hq // hkv
  c, lam = config.chunk_size, config.cache_size
  scale = config.scale(dk)
  y = np.zeros((b_size, t_size, hq, dv))
  cache_out = np.full((b_size, hkv, lam), -1, np.int32)

  for b in range(b_size):
    for h in range(hkv):
      cache: list[int] = []  # positions in the sparse cache
      linear_h = np.zeros((feat, dv))
      linear_s = np.zeros(feat)
      for t in range(t_size):
        n = t // c
        softmax_set = cache + list(range(max(0, (n - 1) * c), t + 1))
        for i in range(h * group, (h + 1) * group):
          logits = np.array([scale * q[b, t, i] @ k[b, j, h] for j in softmax_set])
          g = gate[i]
          lin_num = phi_q[b, t, i] @ linear_h
          lin_den = phi_q[b, t, i] @ linear_s
          vals = v[b, softmax_set, h]
          if config.mix == "gated":
            w = np.exp(logits)
            num = g * w @ vals + (1 - g) * lin_num
            den = g * w.sum() + (1 - g) * lin_den
          else:
            w = np.exp(logits - logits.max())
            num = g * w @ vals + lin_num
            den = g * w.sum() + lin_den
          y[b, t, i] = num / den
        if (t + 1) % c == 0:  # chunk n is complete: chunk n-1 leaves the window.
          leaving = list(range((n - 1) * c, n * c)) if n >= 1 else []
          candidates = cache + leaving
          if len(candidates) <= lam:
            cache = candidates
            continue
          if config.policy == "sre":
            errors = {
              j: _self_recall_error(phi_k[b, j, h], v[b, j, h], linear_h, linear_s, config.eps)
              for j in candidates
            }
            ranked = sorted(candidates, key=lambda j: (-errors[j], j))
          elif config.policy == "recency":
            ranked = sorted(candidates, key=lambda j: -j)
          else:
            raise ValueError(f"lola_reference: unknown policy {config.policy!r}")
          keep = set(ranked[:lam])
          for j in candidates:
            if j not in keep:
              linear_h += np.outer(phi_k[b, j, h], v[b, j, h])
              linear_s += phi_k[b, j, h]
          cache = sorted(keep)
      cache_out[b, h, : len(cache)] = cache
  if return_cache:
    return y, cache_out
  return y
