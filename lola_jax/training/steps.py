"""Pure train / eval steps and their jitted, explicitly sharded versions.

Legend: B global batch, A gradient-accumulation steps, b = B / A micro-batch, T time, V vocab.

A step consumes one global batch {'inputs', 'targets', 'weights'} ([B, T] each). With A > 1
the batch is split into A micro-batches whose gradients are summed inside the step (lax.scan),
normalised by the whole batch's weight so that the result equals one step on the full batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lola_jax import model as model_lib
from lola_jax import sharding as sharding_lib


def weighted_ce_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_bt w[b,t] * CE(logits[b,t], targets[b,t]) in float32 (logits [B,T,V])."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(ce * weights)


def lm_loss_sum(config, params, batch):
  """(sum of weighted CE, aux) for one (micro-)batch."""
  logits = model_lib.logits(config, params, batch["inputs"])
  return weighted_ce_sum(logits, batch["targets"], batch["weights"]), {}


def distill_loss_sum(config, params, batch):
  """Attention transfer: sum over layers of the MSE to softmax attention, times the rows."""
  _, mses = model_lib.bind(config, params).distill(batch["inputs"])
  rows = batch["inputs"].shape[0]
  return jnp.sum(mses) * rows, {"layer_mse": mses * rows}


LOSSES = {"lm": lm_loss_sum, "distill": distill_loss_sum}


def _split(batch, accum: int):
  return jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)


def _trainable_closure(fn, params, mask):
  """(fn over the trainable leaves only, those leaves, a function rebuilding full gradients).

  Differentiating a function of the trainable leaves (the frozen ones closed over as constants)
  gives the same gradients as differentiating everything and masking, without the backward
  passes into frozen weights: in attention transfer the residual stream follows the teacher, so
  the only backward is through each layer's feature maps and gate.
  """
  leaves, treedef = jax.tree.flatten(params)
  flags = treedef.flatten_up_to(mask)
  index = [i for i, m in enumerate(flags) if m]

  def merge(train_leaves):
    full = list(leaves)
    for i, leaf in zip(index, train_leaves, strict=True):
      full[i] = leaf
    return treedef.unflatten(full)

  def grads_of(train_grads):
    full = [jnp.zeros_like(x) for x in leaves]
    for i, g in zip(index, train_grads, strict=True):
      full[i] = g
    return treedef.unflatten(full)

  return (
    (lambda train_leaves, mb: fn(merge(train_leaves), mb)),
    [leaves[i] for i in index],
    grads_of,
  )


def loss_and_grads(config, params, batch, *, kind: str, accum: int, mask=None):
  """Normalised loss and gradients of one global batch (accumulated over `accum` splits).

  `mask` (a tree of bools like `params`, or None for all): only the leaves marked True are
  differentiated; the gradients of the others are zero.
  """
  loss_sum_fn = LOSSES[kind]
  if kind == "lm":
    norm = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
  else:
    norm = jnp.float32(batch["inputs"].shape[0] * config.num_layers)

  def micro(p, mb):
    total, aux = loss_sum_fn(config, p, mb)
    return total / norm, aux

  if mask is None:
    mask = jax.tree.map(lambda _: True, params)
  fn, train_leaves, grads_of = _trainable_closure(micro, params, mask)
  grad_fn = jax.value_and_grad(fn, has_aux=True)
  if accum == 1:
    (loss, aux), grads = grad_fn(train_leaves, batch)
    return loss, aux, grads_of(grads)

  def body(carry, mb):
    loss_acc, grads_acc = carry
    (loss, aux), grads = grad_fn(train_leaves, mb)
    return (loss_acc + loss, jax.tree.map(jnp.add, grads_acc, grads)), aux

  zeros = jax.tree.map(jnp.zeros_like, train_leaves)
  (loss, grads), auxs = jax.lax.scan(body, (jnp.float32(0.0), zeros), _split(batch, accum))
  aux = jax.tree.map(lambda a: jnp.sum(a, axis=0), auxs)
  return loss, aux, grads_of(grads)


def train_step(config, tx, params, opt_state, batch, *, kind="lm", accum=1, mask=None):
  """One optimizer step. Returns (params, opt_state, metrics). `mask`: trainable leaves."""
  loss, aux, grads = loss_and_grads(config, params, batch, kind=kind, accum=accum, mask=mask)
  updates, opt_state = tx.update(grads, opt_state, params)
  if mask is None:
    params = optax.apply_updates(params, updates)
  else:  # frozen leaves are passed through untouched (weight decay must not move them)
    params = jax.tree.map(
      lambda m, p, u: optax.apply_updates(p, u) if m else p, mask, params, updates
    )
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  if "layer_mse" in aux:
    metrics["layer_mse"] = aux["layer_mse"] / batch["inputs"].shape[0]
  return params, opt_state, metrics


def eval_step(config, params, batch, *, kind="lm"):
  """{'loss': normalised loss, 'accuracy': weighted next-token accuracy} of one batch."""
  if kind == "distill":
    _, mses = model_lib.bind(config, params).distill(batch["inputs"])
    return {"loss": jnp.mean(mses)}
  logits = model_lib.logits(config, params, batch["inputs"])
  w = batch["weights"]
  norm = jnp.maximum(jnp.sum(w), 1.0)
  loss = weighted_ce_sum(logits, batch["targets"], w) / norm
  acc = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w) / norm
  return {"loss": loss, "accuracy": acc}


def jit_train_step(
  config, tx, mesh, param_sh, opt_sh, *, kind="lm", accum=1, mask=None
) -> Callable:
  """`train_step` under `jax.jit` with explicit in/out shardings (pjit); donates the state.

  The step is traced with `mesh` in use (`jax.sharding.use_abstract_mesh`), so the model's
  attention kernels run inside `jax.shard_map` over its batch and head axes
  (`lola_jax.model.attention.kernel_call`): Pallas kernels cannot be partitioned by XLA.
  """
  batch_sh = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)

  def step(params, opt_state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the kernels' shard_map reads it
      return train_step(config, tx, params, opt_state, batch, kind=kind, accum=accum, mask=mask)

  return jax.jit(
    step,
    in_shardings=(param_sh, opt_sh, batch_sh),
    out_shardings=(param_sh, opt_sh, rep),
    donate_argnums=(0, 1),
  )


def jit_eval_step(config, mesh, param_sh, *, kind="lm") -> Callable:
  """`eval_step` under `jax.jit` with explicit shardings (the mesh in use while tracing)."""

  def step(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return eval_step(config, params, batch, kind=kind)

  return jax.jit(
    step,
    in_shardings=(param_sh, sharding_lib.batch_sharding(mesh)),
    out_shardings=sharding_lib.replicated(mesh),
  )
