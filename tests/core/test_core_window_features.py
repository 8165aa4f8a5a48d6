"""A state without window features (`LoLAConfig(window_features="recomputed")`): phi_k of the
window is recomputed from its keys at each chunk end. Outputs must equal the reference and the
state must hold the same pairs as the stored variant, in fewer bytes."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import make_inputs, rel_rms, time_slice, time_step

from lola_jax import LoLAConfig, init_state, lola_decode, lola_prefill, lola_reference
from lola_jax.core.scan import lola_decode_steps
from lola_jax.evaluation.memory import lola_state_bytes

STORED = LoLAConfig(chunk_size=5, cache_size=3)
FEATURES = 6


def _exp_map(w, k):
  """A positive feature map with parameters: phi(k) = exp(k W / 2), [B, N, Hkv, dk] -> D."""
  return jnp.exp(0.5 * jnp.einsum("bnhd,hdf->bnhf", k.astype(jnp.float32), w))


def _inputs(seed=0, dtype=jnp.float32, time=37):
  """make_inputs with phi_k = key_map(k): the window's features can then be recomputed."""
  q, k, v, phi_q, _, gate = make_inputs(seed=seed, time=time, feature_dim=FEATURES, dtype=dtype)
  w = jnp.asarray(np.random.default_rng(seed + 100).normal(size=(2, 8, FEATURES)) / 3, jnp.float32)
  key_map = jax.tree_util.Partial(_exp_map, w)
  return (q, k, v, phi_q, key_map(k).astype(dtype), gate), key_map


def _run(inputs, config, key_map, schedule):
  """Prefill blocks (int), single decode steps ("d") and decode loops (("steps", n))."""
  b, hkv, dk = inputs[1].shape[0], inputs[1].shape[2], inputs[1].shape[3]
  state = init_state(
    config,
    batch=b,
    num_kv_heads=hkv,
    key_dim=dk,
    value_dim=inputs[2].shape[3],
    feature_dim=FEATURES,
    dtype=inputs[1].dtype,
  )
  t, ys = 0, []
  for item in schedule:
    if item == "d":
      y, state = lola_decode(
        *time_step(inputs, t), config=config, state=state, key_feature_map=key_map
      )
      ys, t = ys + [y[:, None]], t + 1
    elif isinstance(item, tuple):
      n = item[1]
      y, state = lola_decode_steps(
        *time_slice(inputs, t, t + n), config=config, state=state, key_feature_map=key_map
      )
      ys, t = ys + [y], t + n
    else:
      y, state = lola_prefill(
        *time_slice(inputs, t, t + item), config=config, state=state, key_feature_map=key_map
      )
      ys, t = ys + [y], t + item
  return jnp.concatenate(ys, axis=1), state


MIXED = [7, "d", "d", ("steps", 12), 13, "d", 3]  # mid-chunk boundaries, a decode loop


@pytest.mark.parametrize(
  "policy, schedule",
  [
    ("sre", [37]),
    ("sre", [3] + ["d"] * 34),  # decode across many chunk ends
    ("sre", MIXED),
    ("attention", MIXED),  # the decode path over the concatenated keys
  ],
)
def test_recomputed_window_features_equal_the_reference_and_the_stored_state(policy, schedule):
  inputs, key_map = _inputs(seed=3)
  stored = dataclasses.replace(STORED, policy=policy)
  lean = dataclasses.replace(stored, window_features="recomputed")
  ref = lola_reference(*inputs, config=stored)
  y, state = _run(inputs, lean, key_map, schedule)
  assert rel_rms(y, ref) <= 1e-5
  _, full = lola_prefill(*inputs, config=stored)
  assert state.window_phi_k.shape == (2, 2, 0, FEATURES) == state.chunk_phi_k.shape
  assert not state.stores_window_features and full.stores_window_features
  for f in dataclasses.fields(full):
    if f.name not in ("window_phi_k", "chunk_phi_k"):
      chex.assert_trees_all_close(getattr(state, f.name), getattr(full, f.name), atol=1e-6)


def test_a_fresh_prefill_needs_no_key_map_and_its_state_continues():
  inputs, key_map = _inputs(seed=4)
  lean = dataclasses.replace(STORED, window_features="recomputed")
  y1, state = lola_prefill(*time_slice(inputs, 0, 12), config=lean)
  assert not state.stores_window_features
  y2, state = lola_prefill(*time_slice(inputs, 12, 37), config=lean, state=state,
                           key_feature_map=key_map)  # fmt: skip
  ref = lola_reference(*inputs, config=STORED)
  assert rel_rms(jnp.concatenate([y1, y2], axis=1), ref) <= 1e-5


def test_the_state_is_smaller_by_the_window_features_and_memory_counts_it():
  lean = dataclasses.replace(STORED, window_features="recomputed")
  shape = dict(batch=1, num_kv_heads=2, key_dim=8, value_dim=8, feature_dim=FEATURES)
  stored_bytes = init_state(STORED, **shape).nbytes()
  lean_bytes = init_state(lean, **shape).nbytes()
  assert stored_bytes - lean_bytes == 2 * 2 * STORED.chunk_size * FEATURES * 4
  counted = lola_state_bytes(
    num_layers=1,
    num_kv_heads=2,
    key_dim=8,
    value_dim=8,
    feature_dim=FEATURES,
    chunk_size=5,
    cache_size=3,
    window_features=False,
  )
  assert lean_bytes == counted


def test_bfloat16_recomputed_stays_close_to_float32():
  inputs, key_map = _inputs(seed=5)
  lean = dataclasses.replace(STORED, window_features="recomputed")
  y32, _ = _run(inputs, lean, key_map, [9, "d", "d", 26])
  bf = tuple(x.astype(jnp.bfloat16) for x in inputs[:-1]) + (inputs[-1],)
  bf = bf[:4] + (key_map(bf[1]).astype(jnp.bfloat16),) + bf[5:]
  y16, state = _run(bf, lean, key_map, [9, "d", "d", 26])
  assert state.window_k.dtype == jnp.bfloat16
  assert rel_rms(y16.astype(jnp.float32), y32) <= 2e-2


def test_bad_key_feature_maps_raise():
  inputs, key_map = _inputs(seed=6)
  lean = dataclasses.replace(STORED, window_features="recomputed")
  _, state = lola_prefill(*time_slice(inputs, 0, 12), config=lean)
  step = time_step(inputs, 12)
  with pytest.raises(ValueError, match="key_feature_map"):
    lola_decode(*step, config=lean, state=state)
  with pytest.raises(ValueError, match="key_feature_map"):
    lola_prefill(*time_slice(inputs, 12, 20), config=lean, state=state)
  with pytest.raises(ValueError, match="key_feature_map.*Partial"):
    lola_decode(*step, config=lean, state=state, key_feature_map=lambda k: k)
  _, full = lola_prefill(*time_slice(inputs, 0, 12), config=STORED)
  with pytest.raises(ValueError, match="window_features='stored'"):
    lola_decode(*step, config=STORED, state=full, key_feature_map=key_map)
  with pytest.raises(ValueError, match="stores_window_features"):
    lola_decode(*step, config=lean, state=full, key_feature_map=key_map)
  wrong = jax.tree_util.Partial(lambda k: k[..., :1, :])  # drops kv heads
  with pytest.raises(ValueError, match=r"key_feature_map must map keys \[B, N, Hkv, dk\]"):
    lola_prefill(*time_slice(inputs, 12, 20), config=lean, state=state, key_feature_map=wrong)
  narrow = jax.tree_util.Partial(lambda k: key_map(k)[..., :2])  # D = 2, the state has 6
  with pytest.raises(ValueError, match="D=6"):
    lola_prefill(*time_slice(inputs, 12, 20), config=lean, state=state, key_feature_map=narrow)
  with pytest.raises(ValueError, match="window_features must be one of"):
    LoLAConfig(window_features="dropped")
