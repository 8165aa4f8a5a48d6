"""The selection policies (fixed and adaptive budgets) against the float64 reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import make_inputs, rel_rms, time_slice, time_step

from lola_jax import LoLAConfig, cached_positions, lola_decode, lola_prefill, lola_reference
from lola_jax.core.selection import Candidates, update_sparse_cache

POLICY_CONFIGS = {
  "energy": dict(policy="energy", energy_tau=0.8, energy_floor=1e-3),
  "energy_min": dict(policy="energy", energy_tau=0.5, min_cache=2, energy_floor=0.5),
  "energy_global": dict(policy="energy_global", cache_budget=7),
  "random": dict(policy="random", seed=3),
  "attention": dict(policy="attention"),
}


@pytest.mark.parametrize("name", sorted(POLICY_CONFIGS))
def test_policy_matches_reference(name):
  inputs = make_inputs(seed=21, time=40, q_heads=4, kv_heads=2)
  config = LoLAConfig(chunk_size=4, cache_size=6, **POLICY_CONFIGS[name])
  y, state = lola_prefill(*inputs, config=config)
  y_ref, pos_ref = lola_reference(*inputs, config=config, return_cache=True)
  assert rel_rms(y, y_ref) <= 1e-5
  np.testing.assert_array_equal(cached_positions(state), pos_ref)


def test_energy_tau_one_floor_zero_is_sre():
  inputs = make_inputs(seed=22, time=45)
  energy = LoLAConfig(chunk_size=5, cache_size=3, policy="energy", energy_tau=1.0, energy_floor=0)
  sre = LoLAConfig(chunk_size=5, cache_size=3, policy="sre")
  y_e, s_e = lola_prefill(*inputs, config=energy)
  y_s, s_s = lola_prefill(*inputs, config=sre)
  np.testing.assert_array_equal(cached_positions(s_e), cached_positions(s_s))
  chex.assert_trees_all_close(y_e, y_s, rtol=1e-6, atol=1e-6)


def _random_candidates(seed, heads=3, n=24, d=8, feat=6):
  rng = np.random.default_rng(seed)
  shape = (1, heads, n)
  pos = np.broadcast_to(np.arange(n), shape).astype(np.int32).copy()
  pos[:, :, :3] = -1  # a few empty cache slots
  cand = Candidates(
    k=jnp.asarray(rng.normal(size=shape + (d,)), jnp.float32),
    v=jnp.asarray(rng.normal(size=shape + (d,)), jnp.float32),
    phi_k=jnp.asarray(np.exp(rng.normal(size=shape + (feat,))), jnp.float32),
    positions=jnp.asarray(pos),
  )
  h = jnp.asarray(rng.normal(size=(1, heads, feat, d)) * 3, jnp.float32)
  s = jnp.asarray(np.exp(rng.normal(size=(1, heads, feat))) * 5, jnp.float32)
  return cand, h, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_count_grows_with_tau(seed):
  cand, h, s = _random_candidates(seed)
  counts = []
  for tau in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
    config = LoLAConfig(
      chunk_size=8, cache_size=16, policy="energy", energy_tau=tau, energy_floor=0.0
    )
    cache, _, _ = update_sparse_cache(config, cand, h, s)
    counts.append(np.asarray(cache.positions >= 0).sum(-1))
  counts = np.stack(counts)  # [taus, 1, heads]
  assert (np.diff(counts, axis=0) >= 0).all(), counts[:, 0]
  assert counts[0].max() < counts[-1].min()  # the knob really moves the count


def test_repetitive_sequence_keeps_far_fewer_pairs():
  """Pairs the linear state already recalls (a repeated motif) are not worth cache slots."""
  t, vocab, d = 96, 8, 8
  rng = np.random.default_rng(0)
  table_k, table_v = rng.normal(size=(vocab, d)), rng.normal(size=(vocab, d))
  ids = np.arange(t) % vocab  # a motif of 8 tokens, repeated
  one_hot = np.eye(vocab)[ids]  # orthogonal features: repeated pairs are recalled exactly

  def seq(k, v, phi):
    q = rng.normal(size=(1, t, 1, d))
    return tuple(
      jnp.asarray(x, jnp.float32)
      for x in (
        q,
        k[None, :, None],
        v[None, :, None],
        phi[None, :, None],
        phi[None, :, None],
        [0.5],
      )
    )

  repetitive = seq(table_k[ids], table_v[ids], one_hot)
  random_ids = rng.integers(0, vocab, size=t)
  noisy = seq(rng.normal(size=(t, d)), rng.normal(size=(t, d)), np.eye(vocab)[random_ids])
  config = LoLAConfig(chunk_size=8, cache_size=32, policy="energy", energy_tau=0.9)
  _, s_rep = lola_prefill(*repetitive, config=config)
  _, s_rand = lola_prefill(*noisy, config=config)
  kept_rep = int((cached_positions(s_rep) >= 0).sum())
  kept_rand = int((cached_positions(s_rand) >= 0).sum())
  assert kept_rep <= 0.25 * kept_rand and kept_rand >= 8, (kept_rep, kept_rand)


@pytest.mark.parametrize(
  "budget", [3, pytest.param(0, marks=pytest.mark.slow), pytest.param(10, marks=pytest.mark.slow)]
)
def test_global_budget_never_exceeded(budget):
  inputs = make_inputs(seed=23, batch=2, time=40, q_heads=4, kv_heads=4)
  config = LoLAConfig(chunk_size=4, cache_size=5, policy="energy_global", cache_budget=budget)
  state = None
  for start in range(0, 40, 6):
    _, state = lola_prefill(
      *time_slice(inputs, start, min(start + 6, 40)), config=config, state=state
    )
    per_row = np.asarray(cached_positions(state) >= 0).sum(axis=(1, 2))
    assert (per_row <= budget).all(), per_row
    assert (np.asarray(cached_positions(state) >= 0).sum(-1) <= 5).all()
  if budget:
    assert per_row.max() > 0


@pytest.mark.parametrize(
  "policy_kwargs",
  list(POLICY_CONFIGS.values()),  # sre / recency: tests/test_core_invariants.py
  ids=lambda kw: kw["policy"] + ("_min" if "min_cache" in kw else ""),
)
def test_prefill_decode_equivalence_every_policy(policy_kwargs):
  inputs = make_inputs(seed=24, time=23)
  config = LoLAConfig(chunk_size=4, cache_size=3, **policy_kwargs)
  y_full, s_full = lola_prefill(*inputs, config=config)
  y1, state = lola_prefill(*time_slice(inputs, 0, 9), config=config)
  y2, state = lola_prefill(*time_slice(inputs, 9, 14), config=config, state=state)
  ys = [y1, y2]
  for t in range(14, 23):
    y, state = lola_decode(*time_step(inputs, t), config=config, state=state)
    ys.append(y[:, None])
  chex.assert_trees_all_close(jnp.concatenate(ys, 1), y_full, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state, s_full, rtol=1e-5, atol=1e-5)


def test_random_policy_is_seeded():
  inputs = make_inputs(seed=25, time=40)
  a = lola_prefill(*inputs, config=LoLAConfig(chunk_size=4, cache_size=4, policy="random"))[1]
  b = lola_prefill(*inputs, config=LoLAConfig(chunk_size=4, cache_size=4, policy="random"))[1]
  c = lola_prefill(*inputs, config=LoLAConfig(chunk_size=4, cache_size=4, policy="random", seed=1))[
    1
  ]
  np.testing.assert_array_equal(cached_positions(a), cached_positions(b))
  assert not np.array_equal(cached_positions(a), cached_positions(c))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(energy_tau=0.0), "energy_tau must lie in"),
    (dict(energy_tau=1.5), "energy_tau must lie in"),
    (dict(min_cache=9), r"min_cache must be an int in \[0, cache_size=4\]"),
    (dict(energy_floor=-1.0), "energy_floor"),
    (dict(policy="energy_global"), "cache_budget is required"),
    (dict(cache_budget=-2), "cache_budget must be None or an int"),
  ],
)
def test_policy_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoLAConfig(chunk_size=4, cache_size=4, **kwargs)


def test_jit_of_policies_under_grad():
  """Selection is discrete: gradients through every policy stay finite."""
  inputs = make_inputs(seed=26, batch=1, time=17)
  for kw in (POLICY_CONFIGS["energy_global"], POLICY_CONFIGS["attention"]):
    config = LoLAConfig(chunk_size=4, cache_size=3, **kw)
    g = jax.grad(lambda q, cfg=config: jnp.sum(lola_prefill(q, *inputs[1:], config=cfg)[0]))(
      inputs[0]
    )
    assert bool(jnp.isfinite(g).all())


# "sre_below": a prior of positions (the layer below's cache) is ranked first.
PRIOR = np.array([[3, 17, 30, -1, 9], [-1, -1, 22, 5, 26]], np.int32)
# Positions held by two kv heads below (listed twice) outrank those held by one.
PRIOR_VOTES = np.array([[9, 17, 30, 17, 3], [22, 5, 26, 26, -1]], np.int32)


@pytest.mark.parametrize(
  "cache_size, prior",
  [(6, PRIOR), (2, PRIOR), (1, PRIOR_VOTES), (6, PRIOR[:, :0]), (6, None)],
)
def test_sre_below_matches_reference(cache_size, prior):
  inputs = make_inputs(seed=31, time=40, q_heads=4, kv_heads=2)
  config = LoLAConfig(chunk_size=4, cache_size=cache_size, policy="sre_below")
  prior_j = None if prior is None else jnp.asarray(prior)
  y, state = lola_prefill(*inputs, config=config, prior_positions=prior_j)
  y_ref, pos_ref = lola_reference(*inputs, config=config, return_cache=True, prior_positions=prior)
  assert rel_rms(y, y_ref) <= 1e-5
  np.testing.assert_array_equal(cached_positions(state), pos_ref)
  if prior is None or prior.shape[1] == 0:  # no prior: exactly "sre"
    _, sre = lola_reference(*inputs, config=LoLAConfig(4, cache_size), return_cache=True)
    np.testing.assert_array_equal(pos_ref, sre)
  elif cache_size == 1:  # the twice-held position wins over the once-held ones
    np.testing.assert_array_equal(
      np.asarray(cached_positions(state))[:, :, 0], [[17, 17], [26, 26]]
    )
  elif cache_size >= 6:  # every prior position that left the window is held (the spec's order)
    held = np.asarray(cached_positions(state))
    for b in range(2):
      for p in prior[b][(prior[b] >= 0) & (prior[b] < 32)]:
        assert (held[b] == p).any(-1).all(), (b, p)


def test_sre_below_prefill_decode_equivalence_with_a_fixed_prior():
  inputs = make_inputs(seed=32, time=23)
  config = LoLAConfig(chunk_size=4, cache_size=3, policy="sre_below")
  prior = jnp.asarray(PRIOR[:, :3] % 20)
  y_full, s_full = lola_prefill(*inputs, config=config, prior_positions=prior)
  y1, state = lola_prefill(*time_slice(inputs, 0, 9), config=config, prior_positions=prior)
  ys = [y1]
  for t in range(9, 23):
    y, state = lola_decode(*time_step(inputs, t), config=config, state=state, prior_positions=prior)
    ys.append(y[:, None])
  chex.assert_trees_all_close(jnp.concatenate(ys, 1), y_full, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state, s_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "policy, prior, match",
  [
    ("sre", np.zeros((2, 3), np.int32), "only read by policy 'sre_below'"),
    ("sre_below", np.zeros((3, 3), np.int32), r"shape \[B=2, P\]"),
    ("sre_below", np.zeros((2,), np.int32), r"shape \[B=2, P\]"),
    ("sre_below", np.zeros((2, 3), np.float32), "integer"),
  ],
)
def test_prior_positions_validation(policy, prior, match):
  inputs = make_inputs(seed=33, time=9)
  config = LoLAConfig(chunk_size=4, cache_size=3, policy=policy)
  with pytest.raises(ValueError, match="prior_positions.*" + match):
    lola_prefill(*inputs, config=config, prior_positions=jnp.asarray(prior))
  with pytest.raises(ValueError, match="prior_positions"):
    lola_decode(
      *time_step(inputs, 0),
      config=config,
      state=lola_prefill(*inputs, config=LoLAConfig(4, 3, policy=policy))[1],
      prior_positions=jnp.asarray(prior),
    )
