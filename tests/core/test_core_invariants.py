"""Invariants of the chunked scan: splitting, padding, independence, dtypes, long sequences."""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import make_inputs, rel_rms, time_slice, time_step

from lola_jax import LoLAConfig, init_state, lola_decode, lola_prefill, lola_reference

CONFIG = LoLAConfig(chunk_size=5, cache_size=3)


def _run_schedule(inputs, config, schedule):
  """Feeds the sequence as prefill blocks (int = length) and decode steps ("d")."""
  t, ys, state = 0, [], None
  for item in schedule:
    if item == "d":
      if state is None:
        b, hkv, dk, dv, d = (
          inputs[1].shape[0],
          inputs[1].shape[2],
          inputs[1].shape[3],
          inputs[2].shape[3],
          inputs[4].shape[3],
        )
        state = init_state(
          config, batch=b, num_kv_heads=hkv, key_dim=dk, value_dim=dv, feature_dim=d
        )
      y, state = lola_decode(*time_step(inputs, t), config=config, state=state)
      ys.append(y[:, None])
      t += 1
    else:
      y, state = lola_prefill(*time_slice(inputs, t, t + item), config=config, state=state)
      ys.append(y)
      t += item
  return jnp.concatenate(ys, axis=1), state


@pytest.mark.parametrize(
  "schedule",
  [
    [37],  # one prefill, T not a multiple of C
    [3] + ["d"] * 34,  # T < C prefill, then decode across many chunk ends
    ["d"] * 37,  # decode from an empty state
    [1, 1, 1, 10, 24],  # T = 1 prefills
    [7, "d", "d", "d", 13, "d", 13],  # mixed, mid-chunk boundaries
    [5, 10, 20, 2],  # chunk-aligned pieces
  ],
)
def test_any_split_equals_one_prefill(schedule):
  inputs = make_inputs(seed=1)
  y_full, s_full = lola_prefill(*inputs, config=CONFIG)
  y, s = _run_schedule(inputs, CONFIG, schedule)
  chex.assert_trees_all_close(y, y_full, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s, s_full, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the fixed schedules above cover the same cases in the default suite
@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(
  cuts=st.lists(st.integers(1, 12), min_size=1, max_size=5), decode_first=st.booleans()
)
def test_random_splits_equal_one_prefill(cuts, decode_first):
  schedule = (["d", "d"] if decode_first else []) + cuts
  total = (2 if decode_first else 0) + sum(cuts)
  inputs = make_inputs(seed=total, time=total)
  config = LoLAConfig(chunk_size=4, cache_size=2)
  y_full, s_full = lola_prefill(*inputs, config=config)
  y, s = _run_schedule(inputs, config, schedule)
  chex.assert_trees_all_close(y, y_full, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s, s_full, rtol=1e-5, atol=1e-5)


def test_rows_and_kv_heads_are_independent():
  inputs = make_inputs(seed=2)
  y, _ = lola_prefill(*inputs, config=CONFIG)
  q, k, v, phi_q, phi_k, gate = inputs
  # Perturb row 0 and kv head 0 (which serves query heads 0 and 1).
  k2 = k.at[0].add(1.0).at[:, :, 0].add(0.5)
  v2 = v.at[0].mul(-2.0).at[:, :, 0].add(3.0)
  y2, _ = lola_prefill(q, k2, v2, phi_q, phi_k, gate, config=CONFIG)
  np.testing.assert_array_equal(y2[1, :, 2:], y[1, :, 2:])  # other row, other kv head's group
  assert not np.allclose(y2[0], y[0]) and not np.allclose(y2[1, :, :2], y[1, :, :2])


def test_padded_row_equals_row_alone():
  inputs = make_inputs(seed=4, batch=3, time=29)
  lengths = jnp.array([29, 11, 0])
  y, state = lola_prefill(*inputs, config=CONFIG, lengths=lengths)
  for row, n in enumerate([29, 11]):
    alone = tuple(x[row : row + 1, :n] for x in inputs[:5]) + (inputs[5],)
    y_row, s_row = lola_prefill(*alone, config=CONFIG)
    chex.assert_trees_all_close(y[row : row + 1, :n], y_row, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a, r=row: a[r : r + 1], state), s_row)
  assert float(jnp.abs(y[1, 11:]).max()) == 0.0 and float(jnp.abs(y[2]).max()) == 0.0
  assert state.num_tokens.tolist() == [29, 11, 0]


def test_rows_with_different_lengths_decode_together():
  inputs = make_inputs(seed=6, batch=2, time=30)
  lengths = jnp.array([7, 13])
  _, state = lola_prefill(*time_slice(inputs, 0, 13), config=CONFIG, lengths=lengths)
  # Row 0 continues at position 7, row 1 at position 13; feed each row its own next tokens.
  outs = []
  for i in range(12):
    step = tuple(jnp.stack([x[0, 7 + i], x[1, 13 + i]]) for x in inputs[:5]) + (inputs[5],)
    y, state = lola_decode(*step, config=CONFIG, state=state)
    outs.append(y)
  for row, start in enumerate([7, 13]):
    alone = tuple(x[row : row + 1, : start + 12] for x in inputs[:5]) + (inputs[5],)
    y_ref = lola_reference(*alone, config=CONFIG)
    got = jnp.stack([o[row] for o in outs])
    assert rel_rms(got, y_ref[0, start:]) <= 1e-5


@pytest.mark.parametrize("mix", ["gated", "lolcats"])
def test_bfloat16_close_to_float32(mix):
  """bf16 inputs (state still f32): documented tolerance 3e-2 relative RMS against f32."""
  config = LoLAConfig(chunk_size=8, cache_size=4, mix=mix, policy="recency")
  inputs = make_inputs(seed=7, time=64)
  y32, s32 = lola_prefill(*inputs, config=config)
  y16, s16 = lola_prefill(*(x.astype(jnp.bfloat16) for x in inputs), config=config)
  assert y16.dtype == jnp.bfloat16
  assert s16.linear_h.dtype == jnp.float32 and s16.cache_k.dtype == jnp.bfloat16
  assert rel_rms(y16, y32) <= 3e-2
  assert rel_rms(s16.linear_h, s32.linear_h) <= 3e-2


def test_state_size_is_constant_in_t():
  config = LoLAConfig(chunk_size=16, cache_size=8)
  nbytes = []
  for t in (16, 100, 1000):
    _, state = lola_prefill(*make_inputs(seed=t, batch=1, time=t), config=config)
    nbytes.append(state.nbytes())
  assert nbytes[0] == nbytes[1] == nbytes[2]


@pytest.mark.slow
def test_64k_tokens_stay_finite():
  config = LoLAConfig(chunk_size=64, cache_size=16)
  inputs = make_inputs(
    seed=8, batch=1, time=65536, q_heads=2, kv_heads=1, key_dim=8, value_dim=8, feature_dim=8
  )
  y, state = lola_prefill(*inputs, config=config)
  assert bool(jnp.isfinite(y).all())
  assert bool(jnp.isfinite(state.linear_h).all()) and bool(jnp.isfinite(state.linear_s).all())
  _, small = lola_prefill(*time_slice(inputs, 0, 1024), config=config)
  assert state.nbytes() == small.nbytes()
  # Decoding past 64K stays finite too.
  y1, _ = lola_decode(
    *time_step(
      make_inputs(
        seed=9, batch=1, time=1, q_heads=2, kv_heads=1, key_dim=8, value_dim=8, feature_dim=8
      ),
      0,
    ),
    config=config,
    state=state,
  )
  assert bool(jnp.isfinite(y1).all())


@pytest.mark.slow  # op-by-op execution of the scan is slow
def test_eager_mode_matches_jit():
  """The same code path without jit (lax.scan/cond run eagerly) gives the jitted result."""
  inputs = make_inputs(seed=10, batch=1, time=7)
  config = LoLAConfig(chunk_size=3, cache_size=1)
  y_jit, s_jit = lola_prefill(*inputs, config=config)
  with jax.disable_jit():
    y_eager, s_eager = lola_prefill(*inputs, config=config)
    y_dec, _ = lola_decode(*time_step(inputs, 0), config=config, state=s_eager)
  chex.assert_trees_all_close(y_eager, y_jit, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_eager, s_jit, rtol=1e-5, atol=1e-6)
  assert bool(jnp.isfinite(y_dec).all())


class DecodeVariantsTest(chex.TestCase):
  """lola_decode under chex's jit / no-jit variants (outer transformation)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_decode_step(self):
    inputs = make_inputs(seed=12, batch=2, time=9)
    _, state = lola_prefill(*time_slice(inputs, 0, 8), config=CONFIG)
    step = self.variant(lambda *a, state: lola_decode(*a, config=CONFIG, state=state))
    y, new_state = step(*time_step(inputs, 8), state=state)
    y_ref = lola_reference(*inputs, config=CONFIG)[:, 8]
    assert rel_rms(y, y_ref) <= 1e-5
    chex.assert_trees_all_equal(new_state.num_tokens, jnp.array([9, 9], jnp.int32))
