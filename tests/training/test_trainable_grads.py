"""Only the trainable leaves are differentiated: same gradients as differentiating everything
(JAX's autodiff of the full loss) and zeroing the frozen ones, and frozen leaves never move."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lola_jax import model as model_lib
from lola_jax.core.config import LoLAConfig
from lola_jax.training import optim as optim_lib
from lola_jax.training import steps as steps_lib
from lola_jax.training.trainable import trainable_mask

_CONFIG = model_lib.ModelConfig(
  vocab_size=32,
  num_layers=2,
  d_model=32,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
  feature_dim=8,
  attention="hybrid",
  lola=LoLAConfig(chunk_size=8, cache_size=0),
)


def _batch():
  tokens = np.random.default_rng(0).integers(0, 32, (2, 25)).astype(np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": np.ones((2, 24), np.float32),
  }


def _mask(params):
  return trainable_mask(_CONFIG, params, "feature_maps")


@pytest.mark.parametrize(
  ("kind", "accum"), [pytest.param("distill", 1, marks=pytest.mark.slow), ("lm", 2)]
)
def test_masked_gradients_equal_full_autodiff(kind, accum):
  params = model_lib.init_params(_CONFIG, jax.random.key(0))
  batch, mask = _batch(), _mask(params)
  loss, _, grads = steps_lib.loss_and_grads(
    _CONFIG, params, batch, kind=kind, accum=accum, mask=mask
  )
  norm = 2 * _CONFIG.num_layers if kind == "distill" else 48.0

  def full_loss(p):
    return steps_lib.LOSSES[kind](_CONFIG, p, batch)[0] / norm

  ref_loss, ref = jax.value_and_grad(full_loss)(params)
  ref = jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g), mask, ref)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref, rtol=1e-4, atol=1e-7)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_masked_optimizer_keeps_state_only_for_trainable_leaves_and_frozen_leaves_stay():
  params = model_lib.init_params(_CONFIG, jax.random.key(1))
  mask = _mask(params)
  optim = type(
    "O",
    (),
    dict(
      lr=1e-2,
      warmup_steps=0,
      end_lr_factor=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      clip_norm=1.0,
    ),
  )
  tx = optim_lib.make_optimizer(optim, optim_lib.make_schedule(optim, 10), trainable=mask)
  opt_state = tx.init(params)
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size") and x.ndim)
  n_train = sum(
    p.size for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m
  )
  assert n_state == 2 * n_train  # Adam's two moments, nothing for frozen weights
  new, _, metrics = steps_lib.train_step(
    _CONFIG, tx, params, opt_state, _batch(), kind="distill", mask=mask
  )
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
  assert jax.tree.leaves(moved) and all(
    mv == m for mv, m in zip(jax.tree.leaves(moved), jax.tree.leaves(mask), strict=True)
  )
  assert np.isfinite(float(metrics["loss"]))
