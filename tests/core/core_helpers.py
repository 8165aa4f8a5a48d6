"""Shared helpers of the core tests (and of the kernel tests that compare against the core):
random LoLA inputs, time slicing and the error metric."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rel_rms(x, ref) -> float:
  """Relative RMS error ||x - ref||_rms / ||ref||_rms, computed in float64."""
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean((x - ref) ** 2) / max(np.mean(ref**2), 1e-300)))


def make_inputs(
  seed=0,
  batch=2,
  time=37,
  q_heads=4,
  kv_heads=2,
  key_dim=8,
  value_dim=8,
  feature_dim=6,
  dtype=jnp.float32,
  logit_scale=1.0,
):
  """Random (q, k, v, phi_q, phi_k, gate) with positive features (as Hedgehog/elu+1 give)."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, time, q_heads, key_dim)) * logit_scale
  k = rng.normal(size=(batch, time, kv_heads, key_dim))
  v = rng.normal(size=(batch, time, kv_heads, value_dim))
  phi_q = np.exp(0.5 * rng.normal(size=(batch, time, q_heads, feature_dim)))
  phi_k = np.exp(0.5 * rng.normal(size=(batch, time, kv_heads, feature_dim)))
  gate = rng.uniform(0.2, 0.8, size=(q_heads,))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v, phi_q, phi_k, gate))


def time_slice(inputs, start, stop):
  """The tokens [start, stop) of (q, k, v, phi_q, phi_k, gate); gate is per head."""
  *seq, gate = inputs
  return tuple(x[:, start:stop] for x in seq) + (gate,)


def time_step(inputs, t):
  """Token t of (q, k, v, phi_q, phi_k, gate) for lola_decode."""
  *seq, gate = inputs
  return tuple(x[:, t] for x in seq) + (gate,)
