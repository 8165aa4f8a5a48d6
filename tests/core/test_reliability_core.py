"""The core never returns a silently wrong result (issue 16, items 7-10).

eps = 0 keeps the selection well defined (an empty state recalls nothing); a NaN/Inf value reaches
exactly the outputs the float64 reference says it reaches (never earlier tokens, never a row's
real tokens from its padding), on the XLA scan, the Pallas chunk kernel and the hybrid kernel;
the gated mix computed from the gate logit has finite gradients for saturated gates; lengths
under an outer jit are clamped; a state of another dtype, or none, is refused by name.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import make_inputs, rel_rms, time_step

from lola_jax import LoLAConfig, lola_decode, lola_prefill, lola_reference
from pallas_kernels import hybrid_attention, linear_attention, lola_chunk_step

IMPLS = ["xla", pytest.param("pallas", marks=pytest.mark.slow)]  # pallas: interpret mode, slow


def _causal_softmax(q, k, v):
  """Exact causal softmax attention in float64 NumPy (GQA), [B, T, Hq, dv]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  kh, vh = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, kh) / np.sqrt(q.shape[-1])
  t = q.shape[1]
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhe->bqhe", p / p.sum(-1, keepdims=True), vh)


# --- item 7: eps = 0 ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_eps_zero_with_a_cache_that_holds_everything_is_causal_softmax(impl):
  inputs = make_inputs(seed=1, time=16)
  config = LoLAConfig(chunk_size=4, cache_size=16, eps=0.0, implementation=impl)
  y, _ = lola_prefill(*inputs, config=config)
  assert rel_rms(y, _causal_softmax(*inputs[:3])) <= 1e-5
  assert rel_rms(lola_reference(*inputs, config=config), _causal_softmax(*inputs[:3])) <= 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_eps_zero_matches_the_reference_when_pairs_compete(impl):
  inputs = make_inputs(seed=2, time=29)
  config = LoLAConfig(chunk_size=4, cache_size=3, eps=0.0, implementation=impl)
  y, _ = lola_prefill(*inputs, config=config)
  y_ref = lola_reference(*inputs, config=config)
  assert np.isfinite(y_ref).all() and rel_rms(y, y_ref) <= 1e-5


def test_negative_eps_is_refused_by_the_kernel_too():
  with pytest.raises(ValueError, match="eps"):
    LoLAConfig(eps=-1e-6)
  b, hkv, g, c, lam, d = 1, 1, 1, 2, 1, 4
  zeros = lambda *s: jnp.zeros(s, jnp.float32)
  with pytest.raises(ValueError, match=r"eps must be a float >= 0, got -1e-06"):
    lola_chunk_step(
      zeros(b, hkv, g, c, d), zeros(b, hkv, g, c, d), zeros(b, hkv, lam + 2 * c, d),
      zeros(b, hkv, lam + 2 * c, d), jnp.ones((b, hkv, lam + 2 * c), bool),
      zeros(b, hkv, lam + c, d), zeros(b, hkv, d, d), zeros(b, hkv, d), jnp.full((hkv, g), 0.5),
      cache_size=lam, eps=-1e-6,
    )  # fmt: skip


# --- item 8: non-finite values reach only the outputs that see them ---------------------------


def _poisoned(seed, time, where, bad=np.nan):
  """make_inputs with v[b, t, h, d] = bad at each (b, t, h, d) of `where`."""
  q, k, v, phi_q, phi_k, gate = make_inputs(seed=seed, time=time)
  v = np.array(v)
  for idx in where:
    v[idx] = bad
  return q, k, jnp.asarray(v), phi_q, phi_k, gate


def _assert_same_outputs(y, y_ref):
  """Non-finite exactly where the float64 reference is, equal (rel. 1e-5) elsewhere."""
  y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
  np.testing.assert_array_equal(np.isfinite(y), np.isfinite(y_ref))
  ok = np.isfinite(y_ref)
  assert rel_rms(y[ok], y_ref[ok]) <= 1e-5


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cache_size", [0, 3])
def test_a_non_finite_value_does_not_leak_to_earlier_tokens(impl, cache_size, bad):
  # Row 0: v at t=1 (inside chunk 0, so t=0's query sees it masked); row 1: t=9, one component.
  inputs = _poisoned(3, 14, [(0, 1, 0, slice(None)), (1, 9, 1, 2)], bad)
  config = LoLAConfig(chunk_size=4, cache_size=cache_size, implementation=impl)
  y, _ = lola_prefill(*inputs, config=config)
  y_ref = lola_reference(*inputs, config=config)
  assert np.isfinite(y_ref[0, 0]).all() and np.isfinite(y_ref[1, :9]).all()
  _assert_same_outputs(y, y_ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_padding_does_not_reach_the_real_tokens(impl):
  inputs = _poisoned(4, 13, [(1, 7, 0, slice(None)), (1, 12, 1, 0)])
  config = LoLAConfig(chunk_size=4, cache_size=3, implementation=impl)
  lengths = jnp.asarray([13, 7])
  y, state = lola_prefill(*inputs, config=config, lengths=lengths)
  alone = tuple(x[1:, :7] for x in inputs[:5]) + (inputs[5],)
  y_alone, state_alone = lola_prefill(*alone, config=config)
  np.testing.assert_array_equal(np.asarray(y[1, 7:]), 0.0)
  np.testing.assert_allclose(y[1, :7], y_alone[0], rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(state_alone), strict=True):
    np.testing.assert_allclose(np.asarray(got)[1:], want, rtol=1e-6, atol=1e-6)


def _linear_np(phi_q, phi_k, v, eps=1e-6):
  """Causal linear attention per token in float64: y_t = phi_q^T H_t / (phi_q^T s_t + eps)."""
  phi_q, phi_k, v = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v))
  g = phi_q.shape[2] // phi_k.shape[2]
  pk, vv = np.repeat(phi_k, g, axis=2), np.repeat(v, g, axis=2)
  b, t, hq, d = phi_q.shape
  h, s = np.zeros((b, hq, d, v.shape[-1])), np.zeros((b, hq, d))
  y = np.zeros((b, t, hq, v.shape[-1]))
  for i in range(t):
    h = h + np.einsum("bhd,bhe->bhde", pk[:, i], vv[:, i])
    s = s + pk[:, i]
    num = np.einsum("bhd,bhde->bhe", phi_q[:, i], h)
    y[:, i] = num / (np.einsum("bhd,bhd->bh", phi_q[:, i], s) + eps)[..., None]
  return y, h


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_linear_kernel_is_as_causal_as_the_reference(impl):
  _, _, v, phi_q, phi_k, _ = _poisoned(15, 11, [(0, 1, 0, slice(None)), (1, 6, 1, 1)])
  y, (h, _) = linear_attention(phi_q, phi_k, v, chunk_size=4, implementation=impl)
  y_ref, h_ref = _linear_np(phi_q, phi_k, v)
  _assert_same_outputs(y, y_ref)
  np.testing.assert_array_equal(np.isfinite(np.asarray(h)), np.isfinite(h_ref[:, ::2]))


@pytest.mark.parametrize("impl", IMPLS)
def test_hybrid_kernel_is_as_causal_as_the_reference(impl):
  inputs = _poisoned(5, 11, [(0, 1, 0, slice(None)), (1, 6, 1, 1)])
  y = hybrid_attention(*inputs, chunk_size=4, implementation=impl)
  y_ref = lola_reference(*inputs, config=LoLAConfig(chunk_size=4, cache_size=0))
  _assert_same_outputs(y, y_ref)


def test_decode_after_a_poisoned_prefill_matches_the_reference():
  inputs = _poisoned(6, 12, [(0, 5, 0, 1)])
  config = LoLAConfig(chunk_size=4, cache_size=2)
  _, state = lola_prefill(*(x[:, :10] for x in inputs[:5]), inputs[5], config=config)
  ys = []
  for t in (10, 11):
    y, state = lola_decode(*time_step(inputs, t), config=config, state=state)
    ys.append(y)
  _assert_same_outputs(jnp.stack(ys, 1), lola_reference(*inputs, config=config)[:, 10:])


# --- item 9: the gate from its logit, in log space ---------------------------------------------

# Logits whose gate rounds to 1 or 0 in float32. The lolcats mix is linear in g (not in log
# space), so there -80 stands for -90: g = sigmoid(-90) is below float32's normal range, where
# it may be flushed to 0 (the mix then equals g = 0, while the float64 reference keeps 8e-40).
SATURATED = {
  "gated": np.asarray([20.0, -90.0, 200.0, -1e4], np.float32),
  "lolcats": np.asarray([20.0, -80.0, 200.0, -1e4], np.float32),
}


@pytest.mark.parametrize("mix", ["gated", "lolcats"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gate_logit_matches_the_reference_and_has_finite_gradients_when_saturated(impl, mix):
  q, k, v, phi_q, phi_k, _ = make_inputs(seed=10, time=13)
  config = LoLAConfig(chunk_size=4, cache_size=3, mix=mix, implementation=impl)
  for logit in (jnp.asarray([1.5, -0.5, 3.0, -2.0]), jnp.asarray(SATURATED[mix])):
    y, _ = lola_prefill(q, k, v, phi_q, phi_k, gate_logit=logit, config=config)
    y_ref = lola_reference(q, k, v, phi_q, phi_k, gate_logit=logit, config=config)
    assert rel_rms(y, y_ref) <= 1e-5
    loss = lambda *a: jnp.sum(lola_prefill(*a[:5], gate_logit=a[5], config=config)[0] ** 2)
    grads = jax.grad(loss, argnums=range(6))(q, k, v, phi_q, phi_k, logit)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    h = lambda *a: jnp.sum(
      hybrid_attention(*a[:5], gate_logit=a[5], chunk_size=4, mix=mix, implementation=impl) ** 2
    )
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.grad(h, argnums=range(6))(
      q, k, v, phi_q, phi_k, logit
    ))  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_gate_logit_gradient_matches_finite_differences_of_the_reference(impl):
  q, k, v, phi_q, phi_k, _ = make_inputs(seed=11, time=10)
  config = LoLAConfig(chunk_size=4, cache_size=2, implementation=impl)
  logit = np.asarray([1.5, -0.5, 3.0, -2.0], np.float32)
  loss = lambda x: jnp.sum(lola_prefill(q, k, v, phi_q, phi_k, gate_logit=x, config=config)[0])
  grad = np.asarray(jax.grad(loss)(jnp.asarray(logit)), np.float64)
  ref = lambda x: float(np.sum(lola_reference(q, k, v, phi_q, phi_k, gate_logit=x, config=config)))
  h = 1e-4
  fd = [
    (ref(logit.astype(np.float64) + h * e) - ref(logit.astype(np.float64) - h * e)) / (2 * h)
    for e in np.eye(4)
  ]
  np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=2e-4)


def test_probability_gates_of_exactly_0_and_1_keep_finite_gradients_for_the_other_inputs():
  """With `gate` given as a probability, only d/dgate at exactly 0 or 1 is undefined (log g =
  -inf); every other input's gradient is finite (the model passes logits: previous tests)."""
  q, k, v, phi_q, phi_k, _ = make_inputs(seed=13, time=9)
  gate = jnp.asarray([0.0, 1.0, 0.5, 1.0])
  config = LoLAConfig(chunk_size=4, cache_size=2)
  loss = lambda *a: jnp.sum(lola_prefill(*a, gate, config=config)[0] ** 2)
  for g in jax.grad(loss, argnums=range(5))(q, k, v, phi_q, phi_k):
    assert np.isfinite(np.asarray(g)).all()
  y = lola_prefill(q, k, v, phi_q, phi_k, gate, config=config)[0]
  assert rel_rms(y, lola_reference(q, k, v, phi_q, phi_k, gate, config=config)) <= 1e-5


def test_exactly_one_of_gate_and_gate_logit():
  inputs = make_inputs(seed=14, time=5)
  config = LoLAConfig(chunk_size=4)
  with pytest.raises(ValueError, match="give exactly one of gate .* and gate_logit .*both"):
    lola_prefill(*inputs, gate_logit=inputs[5], config=config)
  with pytest.raises(ValueError, match="neither"):
    lola_prefill(*inputs[:5], config=config)
  with pytest.raises(ValueError, match=r"gate_logit must have shape \[Hq\]=\[4\]"):
    lola_prefill(*inputs[:5], gate_logit=jnp.zeros(3), config=config)


# --- item 10: lengths under jit, the state's dtype, state=None ----------------------------------


def test_lengths_outside_0_t_under_jit_are_clamped():
  inputs = make_inputs(seed=7, time=16)
  config = LoLAConfig(chunk_size=4, cache_size=2)
  jitted = jax.jit(functools.partial(lola_prefill, config=config))
  y, state = jitted(*inputs, lengths=jnp.asarray([-3, 40]))
  y_want, state_want = lola_prefill(*inputs, config=config, lengths=jnp.asarray([0, 16]))
  np.testing.assert_array_equal(np.asarray(state.num_tokens), [0, 16])
  np.testing.assert_allclose(y, y_want, rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(state_want), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.int32])
def test_a_state_of_another_dtype_is_refused(dtype):
  inputs = make_inputs(seed=8, time=9)
  config = LoLAConfig(chunk_size=4, cache_size=2)
  _, state = lola_prefill(*inputs, config=config)
  cast = jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, state)
  with pytest.raises(
    ValueError, match=rf"lola_decode: state\.cache_k has dtype {jnp.dtype(dtype)}"
  ):
    lola_decode(*time_step(inputs, 8), config=config, state=cast)
  with pytest.raises(ValueError, match=r"lola_prefill: state\.cache_k has dtype"):
    lola_prefill(*inputs, config=config, state=cast)
  linear16 = dataclasses.replace(state, linear_h=state.linear_h.astype(jnp.float16))
  with pytest.raises(ValueError, match=r"state\.linear_h has dtype float16, expected float32"):
    lola_decode(*time_step(inputs, 8), config=config, state=linear16)


def test_decode_without_a_state_says_so():
  inputs = make_inputs(seed=9, time=2)
  with pytest.raises(ValueError, match=r"lola_decode: state is required .*got None"):
    lola_decode(*time_step(inputs, 0), config=LoLAConfig(chunk_size=4), state=None)
