"""Bad input fails loudly: every ValueError names the argument and the expected shape."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest
from core_helpers import make_inputs, time_step

from lola_jax import LoLAConfig, cached_positions, init_state, lola_decode, lola_prefill

CONFIG = LoLAConfig(chunk_size=4, cache_size=2)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(chunk_size=2.0), "chunk_size must be an int"),
    (dict(cache_size=-1), "cache_size must be >= 0"),
    (dict(mix="softmax"), "mix must be one of"),
    (dict(policy="lru"), "policy must be one of"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
    (dict(eps=-1e-3), "eps"),
    (dict(implementation="cuda"), "implementation must be one of"),
  ],
)
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoLAConfig(**kwargs)


def test_config_is_frozen_and_hashable():
  a, b = LoLAConfig(chunk_size=8), LoLAConfig(chunk_size=8)
  assert hash(a) == hash(b) and a == b
  assert len({a, b, LoLAConfig(chunk_size=16)}) == 2
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.chunk_size = 4  # type: ignore[misc]


def _replace(inputs, index, value):
  out = list(inputs)
  out[index] = value
  return tuple(out)


@pytest.mark.parametrize(
  "index, shape, match",
  [
    (0, (2, 9, 4), r"q must have shape \[B,T,Hq,dk\], got \[2,9,4\]"),
    (1, (2, 9, 2, 8, 1), r"k must have shape \[B,T,Hkv,dk\], got \[2,9,2,8,1\]"),
    (1, (2, 8, 2, 8), r"k has shape \[2,8,2,8\], expected \[B,T,Hkv,dk\] with T=9"),
    (2, (3, 9, 2, 8), r"v has shape \[3,9,2,8\], expected \[B,T,Hkv,dv\] with B=2"),
    (3, (2, 9, 4, 5), r"phi_k has shape \[2,9,2,6\], expected \[B,T,Hkv,D\] with D=5 as in phi_q"),
    (4, (2, 9, 3, 6), r"phi_k has shape \[2,9,3,6\], expected \[B,T,Hkv,D\] with Hkv=2"),
    (5, (2,), r"gate must have shape \[Hq\]=\[4\], got \[2\]"),
    (5, (1, 4), r"gate must have shape \[Hq\]=\[4\], got \[1,4\]"),
  ],
)
def test_prefill_shape_errors(index, shape, match):
  inputs = make_inputs(time=9)
  bad = _replace(inputs, index, jnp.zeros(shape, jnp.float32))
  with pytest.raises(ValueError, match=match):
    lola_prefill(*bad, config=CONFIG)


def test_heads_must_divide():
  inputs = make_inputs(time=5, q_heads=3, kv_heads=2)
  with pytest.raises(ValueError, match=r"multiple of the number of key/value heads"):
    lola_prefill(*inputs, config=CONFIG)


def test_integer_inputs_rejected():
  inputs = make_inputs(time=5)
  bad = _replace(inputs, 2, jnp.zeros((2, 5, 2, 8), jnp.int32))
  with pytest.raises(ValueError, match=r"v must be a floating-point array, got int32"):
    lola_prefill(*bad, config=CONFIG)


def test_state_for_another_config_rejected():
  inputs = make_inputs(time=9)
  _, state = lola_prefill(*inputs, config=CONFIG)
  with pytest.raises(ValueError, match=r"state was built for cache_size=2 .* cache_size=5"):
    lola_prefill(*inputs, config=LoLAConfig(chunk_size=4, cache_size=5), state=state)
  with pytest.raises(ValueError, match=r"state was built for chunk_size=4 .* chunk_size=8"):
    lola_decode(*time_step(inputs, 0), config=LoLAConfig(chunk_size=8, cache_size=2), state=state)
  other = init_state(CONFIG, batch=2, num_kv_heads=2, key_dim=8, value_dim=8, feature_dim=7)
  with pytest.raises(ValueError, match=r"feature_dim=7 .* feature_dim=6"):
    lola_decode(*time_step(inputs, 0), config=CONFIG, state=other)
  with pytest.raises(ValueError, match=r"state must be a LoLAState"):
    lola_prefill(*inputs, config=CONFIG, state={"h": 1})


def test_lengths_validation():
  inputs = make_inputs(time=9)
  with pytest.raises(ValueError, match=r"lengths must have shape \[B\]=\[2\], got \[3\]"):
    lola_prefill(*inputs, config=CONFIG, lengths=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"lengths must be an integer array"):
    lola_prefill(*inputs, config=CONFIG, lengths=jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=9\]"):
    lola_prefill(*inputs, config=CONFIG, lengths=jnp.array([1, 10]))


def test_decode_rank_errors():
  inputs = make_inputs(time=9)
  _, state = lola_prefill(*inputs, config=CONFIG)
  with pytest.raises(ValueError, match=r"q must have shape \[B,Hq,dk\]"):
    lola_decode(*inputs, config=CONFIG, state=state)


def test_init_state_validation():
  with pytest.raises(ValueError, match=r"num_kv_heads must be an int >= 1, got 0"):
    init_state(CONFIG, batch=1, num_kv_heads=0, key_dim=4, value_dim=4, feature_dim=4)
  with pytest.raises(ValueError, match=r"dtype must be a floating dtype"):
    init_state(
      CONFIG, batch=1, num_kv_heads=1, key_dim=4, value_dim=4, feature_dim=4, dtype=jnp.int32
    )
  with pytest.raises(ValueError, match=r"state must be a LoLAState"):
    cached_positions(None)


def test_gate_values_must_lie_in_unit_interval():
  inputs = make_inputs(time=5)
  bad = _replace(inputs, 5, jnp.array([0.5, 1.5, 0.2, -0.3]))
  with pytest.raises(ValueError, match=r"gate values must lie in \[0, 1\]"):
    lola_prefill(*bad, config=CONFIG)
