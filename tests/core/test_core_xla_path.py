"""The restructured XLA path of `lola_prefill` (issue 17) against the float64 reference.

Both forms of the chunk-parallel path (local softmax terms of every chunk batched outside the scan,
or computed inside it one chunk at a time: `scan.LOCAL_IN_SCAN`) are checked on T a multiple of
C and not, cache 0, ties in the self-recall error, continued states and padded rows; the
evicted-only absorption and the sort-free compaction against their masked / sorted forms.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import make_inputs, rel_rms, time_slice, time_step

from lola_jax import (
  LoLAConfig,
  cached_positions,
  decode_compiler_options,
  lola_decode,
  lola_prefill,
  lola_reference,
)
from lola_jax.core import compiler, scan, selection
from pallas_kernels.equations import gate_terms

TOL = 1e-5
FORMS = [True, False]  # local terms inside the scan / batched over all chunks


def _prefill(inputs, config, local_in_scan, state=None, lengths=None):
  """lola_prefill through the jitted body with the form forced (inputs valid by construction)."""
  *xs, gate = inputs
  return scan._lola_prefill(
    *xs, gate_terms(gate), config=config, state=state, lengths=lengths,
    local_in_scan=local_in_scan,
  )  # fmt: skip


@pytest.mark.parametrize("local_in_scan", FORMS)
@pytest.mark.parametrize(
  "time, chunk, cache, policy",
  [
    (37, 5, 3, "sre"),  # T not a multiple of C, L < C
    (40, 5, 8, "sre"),  # T a multiple of C (no zero-fill), L > C (complement top-k)
    (40, 4, 0, "sre"),  # cache 0: no scan over the cache
    (37, 5, 0, "recency"),
    (33, 4, 6, "recency"),
    (35, 5, 7, "energy"),  # adaptive policy: every candidate may be evicted
    (36, 4, 5, "random"),
  ],
)
def test_parallel_path_matches_reference(local_in_scan, time, chunk, cache, policy):
  inputs = make_inputs(seed=time + cache, time=time)
  config = LoLAConfig(chunk_size=chunk, cache_size=cache, policy=policy, mix="gated")
  y, state = _prefill(inputs, config, local_in_scan)
  y_ref, pos_ref = lola_reference(*inputs, config=config, return_cache=True)
  assert rel_rms(y, y_ref) <= TOL
  np.testing.assert_array_equal(cached_positions(state), pos_ref)


@pytest.mark.parametrize("local_in_scan", FORMS)
def test_both_forms_and_the_chunk_by_chunk_scan_agree_on_continued_padded_rows(local_in_scan):
  """A continued state with buffered tokens, rows of different lengths, GQA, lolcats: the
  parallel form equals the one-chunk-at-a-time scan ("attention" policy aside, the reference)."""
  inputs = make_inputs(seed=3, batch=2, time=30, q_heads=6, kv_heads=2)
  config = LoLAConfig(chunk_size=4, cache_size=5, mix="lolcats")
  _, state = _prefill(time_slice(inputs, 0, 7), config, local_in_scan)
  lengths = jnp.array([23, 11])
  y, s = _prefill(time_slice(inputs, 7, 30), config, local_in_scan, state, lengths)
  for row, n in enumerate([7 + 23, 7 + 11]):
    alone = tuple(x[row : row + 1, :n] for x in inputs[:5]) + (inputs[5],)
    y_ref, pos_ref = lola_reference(*alone, config=config, return_cache=True)
    assert rel_rms(y[row, : n - 7], y_ref[0, 7:]) <= TOL
    np.testing.assert_array_equal(cached_positions(s)[row], pos_ref[0])
  assert float(jnp.abs(y[1, 11:]).max()) == 0.0
  # The same state as one prefill of each row's tokens.
  y_one, s_one = _prefill(inputs, config, local_in_scan, lengths=jnp.array([30, 18]))
  chex.assert_trees_all_close(s, s_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("local_in_scan", FORMS)
@pytest.mark.parametrize("cache", [3, 9])  # top-k of the kept (L < C) and of the dropped (L > C)
def test_ties_keep_the_older_pair(local_in_scan, cache):
  """Every pair repeats with period 2, so equal errors abound: the older position must stay."""
  q, k, v, phi_q, phi_k, gate = make_inputs(seed=5, batch=1, time=40)
  k, v, phi_k = (jnp.tile(x[:, :2], (1, 20, 1, 1)) for x in (k, v, phi_k))
  inputs = (q, k, v, phi_q, phi_k, gate)
  config = LoLAConfig(chunk_size=5, cache_size=cache)
  y, state = _prefill(inputs, config, local_in_scan)
  y_ref, pos_ref = lola_reference(*inputs, config=config, return_cache=True)
  np.testing.assert_array_equal(cached_positions(state), pos_ref)
  assert rel_rms(y, y_ref) <= TOL


def test_public_prefill_takes_the_parallel_path():
  inputs = make_inputs(seed=8, time=50)
  config = LoLAConfig(chunk_size=8, cache_size=6)
  assert scan._parallel_path(config, jnp.float32)
  assert not scan._parallel_path(LoLAConfig(policy="attention"), jnp.float32)
  y, state = lola_prefill(*inputs, config=config)
  y_ref = lola_reference(*inputs, config=config)
  assert rel_rms(y, y_ref) <= TOL
  assert state.cache_k.shape == (2, 2, 6, 8)


@pytest.mark.parametrize("max_evicted", [2, 5])
def test_absorb_evicted_equals_masked_absorption(max_evicted):
  rng = np.random.default_rng(0)
  n, d, dv = 9, 4, 3
  phi = jnp.asarray(rng.random((2, 3, n, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 3, n, dv)), jnp.float32)
  v = v.at[0, 0, 0].set(jnp.nan)  # a kept pair's NaN must not reach H
  evict = np.zeros((2, 3, n), bool)
  for b in range(2):
    for h in range(3):
      evict[
        b, h, rng.choice(np.arange(1, n), size=rng.integers(0, max_evicted + 1), replace=False)
      ] = True
  evict = jnp.asarray(evict)
  cand = selection.Candidates(k=phi, v=v, phi_k=phi, positions=jnp.zeros((2, 3, n), jnp.int32))
  h0, s0 = jnp.ones((2, 3, d, dv)), jnp.ones((2, 3, d))
  got = selection.absorb_evicted(h0, s0, cand, evict, max_evicted)
  want = selection.absorb(h0, s0, cand, evict)
  assert bool(jnp.isfinite(got[0]).all())
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_compaction_indices_are_the_true_entries_in_order():
  rng = np.random.default_rng(1)
  mask = rng.random((4, 3, 11)) < 0.4
  idx, ok = selection.compaction_indices(jnp.asarray(mask), 5)
  for pos in np.ndindex(mask.shape[:-1]):
    true = np.flatnonzero(mask[pos])[:5]
    np.testing.assert_array_equal(np.asarray(idx[pos])[: len(true)], true)
    assert np.asarray(ok[pos]).sum() == len(true)


@pytest.mark.parametrize("cache", [2, 6])
def test_top_l_keeps_the_largest_with_older_first(cache):
  rng = np.random.default_rng(2)
  scores = jnp.asarray(rng.integers(0, 3, size=(5, 8)).astype(np.float32))  # many ties
  valid = jnp.asarray(rng.random((5, 8)) < 0.8)
  keep = np.asarray(selection._top_l(scores, valid, cache))
  for row in range(5):
    cands = [j for j in range(8) if valid[row, j]]
    ranked = sorted(cands, key=lambda j, row=row: (-float(scores[row, j]), j))[:cache]
    np.testing.assert_array_equal(np.flatnonzero(keep[row]), sorted(ranked))


def test_jit_of_a_padded_parallel_prefill_is_finite_with_nan_padding():
  inputs = make_inputs(seed=9, batch=2, time=20)
  q, k, v, phi_q, phi_k, gate = inputs
  v = v.at[1, 12:].set(jnp.nan)  # padding only
  config = LoLAConfig(chunk_size=4, cache_size=3)
  f = jax.jit(lambda *a: lola_prefill(*a, config=config, lengths=jnp.array([20, 12]))[0])
  y = f(q, k, v, phi_q, phi_k, gate)
  assert bool(jnp.isfinite(y).all())


def _token_by_token(inputs, start, stop, config, state):
  """`lola_decode` once per token t in [start, stop): (y [B, stop - start, Hq, dv], state)."""
  ys = []
  for t in range(start, stop):
    y, state = lola_decode(*time_step(inputs, t), config=config, state=state)
    ys.append(y)
  return jnp.stack(ys, axis=1), state


@pytest.mark.parametrize(
  "cache, policy", [(3, "sre"), (0, "sre"), (8, "recency"), (3, "attention")]
)
def test_decode_loop_equals_step_by_step_decode_and_prefill(cache, policy):
  """`lola_decode_steps` (n tokens in one jitted loop) == n `lola_decode` calls == one prefill:
  outputs and the final state, across several chunk ends (C = 5, 30 decoded tokens)."""
  inputs = make_inputs(seed=cache + 1, time=37)
  config = LoLAConfig(chunk_size=5, cache_size=cache, policy=policy)
  y_full, s_full = lola_prefill(*inputs, config=config)
  _, s0 = lola_prefill(*time_slice(inputs, 0, 7), config=config)
  y_loop, s_loop = scan.lola_decode_steps(*time_slice(inputs, 7, 37), config=config, state=s0)
  y_steps, st = _token_by_token(inputs, 7, 37, config, s0)
  chex.assert_trees_all_close(y_loop, y_steps, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(s_loop, st, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(y_loop, y_full[:, 7:], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_loop, s_full, rtol=1e-5, atol=1e-5)
  assert rel_rms(y_loop, lola_reference(*inputs, config=config)[:, 7:]) <= TOL


def test_decode_loop_validates_its_inputs():
  inputs = make_inputs(seed=2, time=8)
  config = LoLAConfig(chunk_size=4, cache_size=2)
  _, s0 = lola_prefill(*time_slice(inputs, 0, 4), config=config)
  q, k, v, phi_q, phi_k, gate = time_slice(inputs, 4, 8)
  with pytest.raises(ValueError, match="lola_decode_steps"):
    scan.lola_decode_steps(q[:, :, :3], k, v, phi_q, phi_k, gate, config=config, state=s0)


def test_decode_compiler_options_leave_every_output_bit_identical():
  """The decode programs compile with region-based copy insertion on CPU
  (`core.compiler`): it only moves copies, so a decode loop with and without it gives the same
  bits, and the jitted entry points are built with it."""
  options = decode_compiler_options()
  assert options == ({compiler.REGION_ANALYSIS: True} if jax.default_backend() == "cpu" else {})
  assert decode_compiler_options("gpu") == {} and decode_compiler_options("tpu") == {}
  inputs = make_inputs(seed=4, time=24)
  config = LoLAConfig(chunk_size=5, cache_size=3)
  _, s0 = lola_prefill(*time_slice(inputs, 0, 7), config=config)
  *xs, gate = time_slice(inputs, 7, 24)
  gates = gate_terms(gate)

  def loop(s, xs):
    return scan._lola_decode_steps(*xs, gates, config=config, state=s)

  plain = jax.jit(loop).lower(s0, xs).compile()
  tuned = jax.jit(loop, compiler_options=options or None).lower(s0, xs).compile()
  if options:
    assert plain.as_text() != tuned.as_text()  # the option reached XLA
  y_plain, s_plain = plain(s0, xs)
  y_tuned, s_tuned = tuned(s0, xs)
  np.testing.assert_array_equal(np.asarray(y_tuned), np.asarray(y_plain))
  for a, b in zip(jax.tree.leaves(s_tuned), jax.tree.leaves(s_plain), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The entry point itself (built by `decode_jit`) gives the same bits again.
  y_entry, _ = scan.lola_decode_steps(*xs, gate, config=config, state=s0)
  np.testing.assert_array_equal(np.asarray(y_entry), np.asarray(y_plain))


def test_decode_loop_with_rows_at_different_chunk_phases():
  """Rows whose chunks end at different tokens (prompts of 7 and 9 tokens, C = 5): the
  segmented loop of `lola_decode_steps` equals step-by-step `lola_decode` and the reference."""
  inputs = make_inputs(seed=9, time=40, batch=2)
  config = LoLAConfig(chunk_size=5, cache_size=3, policy="sre")
  lengths = jnp.asarray([7, 9])
  _, s0 = lola_prefill(*time_slice(inputs, 0, 9), config=config, lengths=lengths)
  # Row 0 saw 7 tokens, row 1 nine: decode tokens 9..39 of both (row 0 thus skips 7, 8).
  y_loop, s_loop = scan.lola_decode_steps(*time_slice(inputs, 9, 40), config=config, state=s0)
  y_steps, st = _token_by_token(inputs, 9, 40, config, s0)
  chex.assert_trees_all_close(y_loop, y_steps, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(s_loop, st, rtol=1e-6, atol=1e-6)
  # Row 1 is a plain 40-token sequence: the float64 reference.
  ref = lola_reference(*(x[1:] for x in inputs[:5]), inputs[5], config=config)
  assert rel_rms(y_loop[1:], ref[:, 9:]) <= TOL


def test_deferred_chunk_ends_equal_decode():
  """`lola_decode(end_chunk=False)` per token and `lola_end_chunk` for the rows that completed
  (rows at different chunk phases, C = 5, several chunk ends) == plain `lola_decode`: outputs and
  states; and the float64 reference for the row that is a plain sequence."""
  inputs = make_inputs(seed=10, time=31, batch=2)
  config = LoLAConfig(chunk_size=5, cache_size=3)
  _, s0 = lola_prefill(*time_slice(inputs, 0, 8), config=config, lengths=jnp.asarray([6, 8]))
  y_steps, s_steps = _token_by_token(inputs, 8, 31, config, s0)
  ys, st = [], s0
  for t in range(8, 31):
    y, st = lola_decode(*time_step(inputs, t), config=config, state=st, end_chunk=False)
    st = scan.lola_end_chunk(st, st.num_tokens % 5 == 0, config=config)
    ys.append(y)
  chex.assert_trees_all_close(jnp.stack(ys, axis=1), y_steps, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(st, s_steps, rtol=1e-6, atol=1e-6)
  ref = lola_reference(*(x[1:] for x in inputs[:5]), inputs[5], config=config)
  assert rel_rms(jnp.stack(ys, axis=1)[1:], ref[:, 8:]) <= TOL
  # Rows not at a chunk boundary are left alone whatever `complete` says.
  _, mid = lola_decode(*time_step(inputs, 8), config=config, state=s0, end_chunk=False)
  again = scan.lola_end_chunk(mid, jnp.asarray([True, True]), config=config)  # 7 and 9 tokens
  chex.assert_trees_all_equal(again, mid)


def test_end_chunk_validates_its_inputs():
  inputs = make_inputs(seed=11, time=6)
  config = LoLAConfig(chunk_size=5, cache_size=3)
  _, s0 = lola_prefill(*inputs, config=config)
  with pytest.raises(ValueError, match=r"lola_end_chunk: complete must be a bool array .*\[2\]"):
    scan.lola_end_chunk(s0, jnp.asarray([1, 0]), config=config)
  with pytest.raises(ValueError, match=r"lola_end_chunk: complete must be a bool array"):
    scan.lola_end_chunk(s0, jnp.asarray([True]), config=config)
  with pytest.raises(ValueError, match="lola_end_chunk: state was built for cache_size=3"):
    scan.lola_end_chunk(s0, jnp.asarray([True, False]), config=LoLAConfig(chunk_size=5))
  with pytest.raises(ValueError, match="end_chunk must be a bool"):
    lola_decode(*time_step(inputs, 5), config=config, state=s0, end_chunk=0)
