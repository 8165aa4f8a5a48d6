"""trainable_mask: which parameters each training stage updates."""

import jax

from lola_jax.core.config import LoLAConfig
from lola_jax.model import ModelConfig, init_params
from lola_jax.training.trainable import trainable_mask


def tiny(**kw) -> ModelConfig:
  base = dict(
    vocab_size=61,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    feature_dim=8,
    lola=LoLAConfig(chunk_size=4, cache_size=3),
  )
  return ModelConfig(**dict(base, **kw))


def _mask_names(mask):
  return {
    "/".join(str(getattr(k, "key", k)) for k in path)
    for path, on in jax.tree_util.tree_flatten_with_path(mask)[0]
    if on
  }


def test_trainable_masks():
  cfg = tiny(attention="softmax")
  params = init_params(cfg, jax.random.key(0))
  every = _mask_names(jax.tree.map(lambda _: True, params))
  linear_branch = {n for n in every if "/attn/phi_" in n or "/attn/gate/" in n}
  assert linear_branch and any("/mlp/gate/" in n for n in every)
  # Attention transfer trains exactly the feature maps and the attention's mixing gates: the
  # SwiGLU MLP's gate projection is an ordinary weight (an earlier mask froze it in softmax
  # training and trained it during distillation).
  assert _mask_names(trainable_mask(cfg, params, "feature_maps")) == linear_branch
  assert _mask_names(trainable_mask(cfg, params, "all")) == every - linear_branch
  hybrid = tiny(attention="hybrid")
  assert _mask_names(trainable_mask(hybrid, params, "all")) == every
