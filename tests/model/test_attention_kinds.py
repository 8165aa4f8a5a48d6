"""The attention-kind registry: each kind's traits and declared state axes match the decode state
it actually builds (what memory accounting, generation, training and sharding rely on)."""

import jax
import pytest
from flax import nnx

from lola_jax import LoLAConfig, LoLAState
from lola_jax.model import (
  ATTENTION_KINDS,
  KVCache,
  LinearState,
  LoLALM,
  ModelConfig,
  state_logical_axes,
)

HKV = 2


def tiny(attention) -> ModelConfig:
  return ModelConfig(
    vocab_size=61,
    num_layers=1,
    d_model=32,
    num_heads=4,
    num_kv_heads=HKV,
    head_dim=8,
    mlp_dim=64,
    feature_dim=8,
    attention=attention,
    lola=LoLAConfig(chunk_size=4, cache_size=3),
  )


@pytest.mark.parametrize("name", sorted(ATTENTION_KINDS))
def test_kind_traits_match_the_state_it_builds(name):
  config = tiny(name)
  model = LoLALM(config, rngs=nnx.Rngs(0))
  kind = config.kind
  assert kind is ATTENTION_KINDS[name] and type(model.blocks[0].attn) is kind
  (state,) = model.init_states(3, max_len=16)
  expected = {"softmax": KVCache, "linear": LinearState, "hybrid": LoLAState, "lola": LoLAState}
  assert type(state) is expected[name]
  assert kind.full_kv_cache == (name == "softmax")
  assert kind.windowed == (name in ("hybrid", "lola"))
  assert kind.uses_feature_maps == (name != "softmax")
  assert config.lola_config.cache_size == (0 if name == "hybrid" else 3)
  # Declared axes: one name per dimension, batch first, "kv_heads" exactly on a dimension of Hkv.
  (axes,) = state_logical_axes(config, (state,))
  leaves = jax.tree.leaves(state)
  names = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(names) == len(leaves)
  for x, n in zip(leaves, names, strict=True):
    assert len(n) == x.ndim and n[0] == "batch" and x.shape[0] == 3, (n, x.shape)
    if x.ndim >= 3:  # every [B, ..., Hkv, ...] array: its head dimension is sharded as kv_heads
      assert n.count("kv_heads") == 1 and x.shape[n.index("kv_heads")] == HKV, (n, x.shape)
