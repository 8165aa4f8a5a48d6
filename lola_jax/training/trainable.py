"""Which parameters a training stage updates: a tree of bools over the parameter pytree."""

from __future__ import annotations

import jax

STAGES = ("all", "feature_maps")


def trainable_mask(config, params, which: str = "all") -> dict:
  """Pure dict of bools (the structure of `params`): which parameters a stage trains.

  which: "all" (everything the attention kind uses: a kind without the linear branch, e.g.
  softmax, freezes the feature maps and gates), "feature_maps" (only feature maps and gates:
  attention-transfer distillation). `config` is the model's `ModelConfig`.
  """
  if which not in STAGES:
    raise ValueError(f"which must be 'all' or 'feature_maps', got {which!r}")

  def leaf(path, _):
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    # The attention's mixing gate is attn/gate; the SwiGLU MLP's mlp/gate is an ordinary weight.
    is_fm = any(k in ("phi_q", "phi_k") for k in keys) or any(
      a == "attn" and b == "gate" for a, b in zip(keys, keys[1:], strict=False)
    )
    if which == "feature_maps":
      return is_fm
    return not (is_fm and not config.kind.uses_feature_maps)

  return jax.tree_util.tree_map_with_path(leaf, params)
