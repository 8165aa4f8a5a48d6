"""A model whose gates saturate still trains (issue 16, item 9): with gate logits of +-20, -90 or
200 (g rounds to 0 or 1 in float32; `--config.model.gate_init=20` used to stop training at step
2) the LM loss and every parameter gradient are finite, on the lola and hybrid kinds, XLA and
Pallas; the attention hands the core the gate logits."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from lola_jax import LoLAConfig
from lola_jax import model as model_lib
from lola_jax.model import ModelConfig


def _config(attention, gate_init, impl):
  return ModelConfig(
    vocab_size=32,
    num_layers=1,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    feature_dim=8,
    attention=attention,
    gate_init=gate_init,
    lola=LoLAConfig(chunk_size=8, cache_size=8, implementation=impl),
  )


@pytest.mark.parametrize(
  "attention, gate_init, impl",
  [("lola", 20.0, "xla"), ("lola", -90.0, "pallas"), ("hybrid", 200.0, "xla"),
   ("hybrid", -90.0, "pallas")],
)  # fmt: skip
def test_saturated_gates_give_finite_loss_and_gradients(attention, gate_init, impl):
  config = _config(attention, gate_init, impl)
  params = model_lib.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, 32)

  def loss(p):
    logits = model_lib.logits(config, p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  bad = [
    jax.tree_util.keystr(path)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
    if not np.isfinite(np.asarray(g)).all()
  ]
  assert not bad, bad
  (gate,) = [
    g
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
    if "'attn'" in jax.tree_util.keystr(path) and "'gate'" in jax.tree_util.keystr(path)
  ]
  assert np.all(np.abs(np.asarray(gate)) < 1.0)  # saturated: a vanishing, not exploding, step
