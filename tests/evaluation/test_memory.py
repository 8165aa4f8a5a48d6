"""Tests for state-size accounting: formulas equal the bytes actually allocated."""

import jax.numpy as jnp
import pytest
from flax import nnx

from lola_jax import LoLAConfig, init_state
from lola_jax.evaluation import (
  equal_memory_chunk,
  full_kv_bytes,
  lola_state_bytes,
  model_state_bytes,
)


@pytest.mark.parametrize(
  "chunk,cache,dtype", [(64, 0, jnp.float32), (16, 64, jnp.bfloat16), (8, 256, jnp.float32)]
)
def test_lola_formula_equals_allocated_state(chunk, cache, dtype):
  cfg = LoLAConfig(chunk_size=chunk, cache_size=cache)
  state = init_state(
    cfg, batch=1, num_kv_heads=2, key_dim=16, value_dim=24, feature_dim=32, dtype=dtype
  )
  expect = lola_state_bytes(
    num_layers=1,
    num_kv_heads=2,
    key_dim=16,
    value_dim=24,
    feature_dim=32,
    chunk_size=chunk,
    cache_size=cache,
    kv_dtype=dtype,
  )
  assert state.nbytes() == expect


def test_full_kv_is_gqa_aware_and_linear_in_context():
  a = full_kv_bytes(1024, num_layers=2, num_kv_heads=2, key_dim=32, value_dim=32)
  assert a == 2 * 2 * 1024 * 64 * 4
  assert full_kv_bytes(4096, num_layers=2, num_kv_heads=2, key_dim=32, value_dim=32) == 4 * a
  assert (
    full_kv_bytes(1024, num_layers=2, num_kv_heads=2, key_dim=32, value_dim=32, kv_dtype="bfloat16")
    == a // 2
  )


def test_equal_memory_chunk():
  kw = {"key_dim": 32, "value_dim": 32, "feature_dim": 64}
  wide = equal_memory_chunk(chunk_size=64, cache_size=64, **kw)
  lola = lola_state_bytes(num_layers=1, num_kv_heads=1, chunk_size=64, cache_size=64, **kw)
  at = lambda c: lola_state_bytes(num_layers=1, num_kv_heads=1, chunk_size=c, cache_size=0, **kw)
  assert at(wide) <= lola < at(wide + 1)
  assert wide == 96  # C + lam / 2: the window holds 2C tokens
  assert equal_memory_chunk(chunk_size=64, cache_size=0, **kw) == 64
  # Without the window's phi_k a window token costs 2d, a cached pair 2d + D (and a position):
  # C' ~ C + lam (2d + D) / (2 * 2d) = 64 + 64 * 128 / 128, a little less for the positions.
  lean = equal_memory_chunk(chunk_size=64, cache_size=64, window_features=False, **kw)
  at_lean = lambda c: lola_state_bytes(
    num_layers=1, num_kv_heads=1, chunk_size=c, cache_size=0, window_features=False, **kw
  )
  target = lola_state_bytes(
    num_layers=1, num_kv_heads=1, chunk_size=64, cache_size=64, window_features=False, **kw
  )
  assert at_lean(lean) <= target < at_lean(lean + 1) and lean == 128


def test_model_state_bytes_matches_model_states():
  from lola_jax.model import LoLALM, ModelConfig

  base = ModelConfig(
    num_layers=2,
    d_model=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=64,
    feature_dim=8,
    lola=LoLAConfig(chunk_size=16, cache_size=8),
  )
  model = LoLALM(base, rngs=nnx.Rngs(0))
  for attention, per_layer in (("hybrid", None), ("lola", None), ("lola", (4, 40))):
    m = model.with_lola_config(attention=attention, layer_cache_sizes=per_layer)
    states = m.init_states(1)
    assert sum(s.nbytes() for s in states) == model_state_bytes(m.config, 1000)
  soft = model.with_lola_config(attention="softmax")
  states = soft.init_states(1, max_len=300)
  kv = sum(s.k.nbytes + s.v.nbytes for s in states)
  assert kv == model_state_bytes(soft.config, 300)
