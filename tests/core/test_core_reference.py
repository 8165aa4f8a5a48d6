"""lola_prefill against the float64 NumPy oracle and against independent closed forms."""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import make_inputs, rel_rms

from lola_jax import LoLAConfig, cached_positions, lola_prefill, lola_reference

TOL = 1e-5  # relative RMS error, float32 inputs


@pytest.mark.parametrize("mix", ["gated", "lolcats"])
@pytest.mark.parametrize("policy", ["sre", "recency"])
@pytest.mark.parametrize("cache_size", [0, 3, 8])
def test_prefill_matches_reference(mix, policy, cache_size):
  inputs = make_inputs(seed=cache_size)
  config = LoLAConfig(chunk_size=5, cache_size=cache_size, mix=mix, policy=policy)
  y, state = lola_prefill(*inputs, config=config)
  y_ref, pos_ref = lola_reference(*inputs, config=config, return_cache=True)
  chex.assert_shape(y, (2, 37, 4, 8))
  assert y.dtype == jnp.float32
  assert rel_rms(y, y_ref) <= TOL
  np.testing.assert_array_equal(cached_positions(state), pos_ref)


def test_cached_positions_change_over_time():
  """The SRE cache really is selective: it keeps neither just the newest nor just the oldest."""
  inputs = make_inputs(seed=3, time=60)
  sre = LoLAConfig(chunk_size=5, cache_size=6, policy="sre")
  rec = LoLAConfig(chunk_size=5, cache_size=6, policy="recency")
  _, s_sre = lola_prefill(*inputs, config=sre)
  _, s_rec = lola_prefill(*inputs, config=rec)
  _, p_sre = lola_reference(*inputs, config=sre, return_cache=True)
  np.testing.assert_array_equal(cached_positions(s_sre), p_sre)
  # 60 tokens, chunk 5: the window is chunk 11 (55..59); recency keeps the 6 newest positions
  # that left it, 49..54.
  np.testing.assert_array_equal(cached_positions(s_rec)[0, 0], np.arange(49, 55))
  assert not np.array_equal(cached_positions(s_sre), cached_positions(s_rec))


def _np_hybrid(q, k, v, phi_q, phi_k, gate, chunk):
  """LoLCATs hybrid written directly: terraced window softmax + linear attention over the rest."""
  q, k, v, phi_q, phi_k, gate = (np.asarray(x, np.float64) for x in (q, k, v, phi_q, phi_k, gate))
  b, t, hq, dk = q.shape
  group = hq // k.shape[2]
  kh = np.repeat(k, group, axis=2)
  vh = np.repeat(v, group, axis=2)
  ph = np.repeat(phi_k, group, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, kh) / np.sqrt(dk)
  pos = np.arange(t)
  window_start = np.maximum(pos // chunk - 1, 0) * chunk
  in_window = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= window_start[:, None])
  linear = pos[None, :] < window_start[:, None]
  w = np.where(in_window, np.exp(logits), 0.0)
  lin = np.einsum("bqhf,bkhf->bhqk", phi_q, ph) * linear
  g = gate[None, :, None, None]
  num = np.einsum("bhqk,bkhe->bqhe", g * w + (1 - g) * lin, vh)
  den = np.einsum("bhqk->bqh", g * w + (1 - g) * lin)
  return num / den[..., None]


def _np_causal_softmax(q, k, v):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  kh, vh = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, kh) / np.sqrt(q.shape[-1])
  t = q.shape[1]
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhe->bqhe", p, vh)


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_cache_zero_is_lolcats_hybrid(chunk):
  inputs = make_inputs(seed=chunk, time=50)
  y, _ = lola_prefill(*inputs, config=LoLAConfig(chunk_size=chunk, cache_size=0))
  assert rel_rms(y, _np_hybrid(*inputs, chunk)) <= TOL


@pytest.mark.parametrize("mix", ["gated", "lolcats"])
@pytest.mark.parametrize("policy", ["sre", "recency"])
def test_cache_at_least_t_is_causal_softmax(mix, policy):
  inputs = make_inputs(seed=11, time=41)
  config = LoLAConfig(chunk_size=4, cache_size=41, mix=mix, policy=policy)
  y, state = lola_prefill(*inputs, config=config)
  assert rel_rms(y, _np_causal_softmax(*inputs[:3])) <= TOL
  assert float(jnp.abs(state.linear_h).max()) == 0.0  # nothing was ever absorbed


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(
  time=st.integers(1, 40),
  chunk=st.integers(1, 9),
  cache=st.integers(0, 12),
  kv_heads=st.sampled_from([1, 2]),
  group=st.sampled_from([1, 3]),
  mix=st.sampled_from(["gated", "lolcats"]),
  policy=st.sampled_from(["sre", "recency"]),
)
def test_random_configurations_match_reference(time, chunk, cache, kv_heads, group, mix, policy):
  inputs = make_inputs(
    seed=time * 7 + chunk,
    batch=1,
    time=time,
    q_heads=kv_heads * group,
    kv_heads=kv_heads,
    key_dim=4,
    value_dim=3,
    feature_dim=5,
  )
  config = LoLAConfig(chunk_size=chunk, cache_size=cache, mix=mix, policy=policy)
  y, state = lola_prefill(*inputs, config=config)
  y_ref, pos_ref = lola_reference(*inputs, config=config, return_cache=True)
  assert rel_rms(y, y_ref) <= TOL
  np.testing.assert_array_equal(cached_positions(state), pos_ref)


@pytest.mark.parametrize("mix", ["gated", "lolcats"])
def test_large_logits_stay_finite_and_accurate(mix):
  """Logits of a few hundred: a naive e^l overflows float32 at ~88; log-space mixing does not."""
  inputs = make_inputs(seed=5, time=30, logit_scale=80.0)  # |logits| up to several hundred
  config = LoLAConfig(chunk_size=4, cache_size=3, mix=mix)
  q, k = inputs[0], inputs[1]
  group = q.shape[2] // k.shape[2]
  max_logit = float(jnp.abs(jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, group, 2))).max())
  assert max_logit / np.sqrt(8) > 300  # the scaled logits really reach a few hundred
  y, _ = lola_prefill(*inputs, config=config)
  assert bool(jnp.isfinite(y).all())
  y_ref = lola_reference(*inputs, config=config)
  assert rel_rms(y, y_ref) <= 1e-4


def test_vmap_over_leading_axis():
  inputs = [make_inputs(seed=s, batch=1, time=13) for s in range(3)]
  stacked = [jnp.stack(xs) for xs in zip(*inputs, strict=True)]
  config = LoLAConfig(chunk_size=4, cache_size=2)
  f = jax.vmap(lambda *a: lola_prefill(*a, config=config)[0])
  y = f(*stacked)
  for i, inp in enumerate(inputs):
    chex.assert_trees_all_close(y[i], lola_prefill(*inp, config=config)[0], rtol=1e-6, atol=1e-6)
