"""Gradients: finite, and equal to finite differences on a tiny float64 problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from core_helpers import make_inputs
from jax.test_util import check_grads

from lola_jax import LoLAConfig, lola_decode, lola_prefill


@pytest.mark.parametrize("mix", ["gated", "lolcats"])
def test_gradients_match_finite_differences(mix):
  config = LoLAConfig(chunk_size=3, cache_size=2, mix=mix)
  with jax.enable_x64(True):
    inputs = make_inputs(
      seed=0,
      batch=1,
      time=10,
      q_heads=2,
      kv_heads=1,
      key_dim=3,
      value_dim=2,
      feature_dim=3,
      dtype=jnp.float64,
    )

    def loss(q, k, v, phi_q, phi_k, gate):
      y, state = lola_prefill(q, k, v, phi_q, phi_k, gate, config=config)
      return jnp.sum(jnp.sin(y)) + jnp.sum(state.linear_h)

    check_grads(loss, inputs, order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


def test_gradients_finite_with_padding_and_decode():
  config = LoLAConfig(chunk_size=4, cache_size=2)
  inputs = make_inputs(seed=1, batch=2, time=11)

  def loss(q, k, v, phi_q, phi_k, gate):
    y, state = lola_prefill(q, k, v, phi_q, phi_k, gate, config=config, lengths=jnp.array([11, 0]))
    y1, _ = lola_decode(
      q[:, 0], k[:, 0], v[:, 0], phi_q[:, 0], phi_k[:, 0], gate, config=config, state=state
    )
    return jnp.sum(y**2) + jnp.sum(y1)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(*inputs)
  for g in grads:
    assert bool(jnp.isfinite(g).all())
  assert float(jnp.abs(grads[5]).sum()) > 0  # the gate gets a gradient
