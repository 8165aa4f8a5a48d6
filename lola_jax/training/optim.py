"""Optimizer: AdamW with linear warmup + cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, end_factor: float):
  """Linear 0 -> peak over `warmup_steps`, cosine peak -> peak*end_factor until `total_steps`."""
  warmup_steps = max(0, min(warmup_steps, total_steps))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=warmup_steps,
    decay_steps=max(total_steps, warmup_steps + 1),
    end_value=peak_lr * end_factor,
  )


def make_schedule(optim, total_steps: int, stages: tuple[tuple[int, float, int], ...] = ()):
  """The learning-rate schedule.

  Args:
    optim: config with lr, warmup_steps, end_lr_factor.
    total_steps: steps of the (first) stage.
    stages: extra (steps, peak_lr, warmup_steps) stages after the first (e.g. the finetune after
      distillation), each with its own warmup + cosine.
  """
  schedules = [warmup_cosine(optim.lr, optim.warmup_steps, total_steps, optim.end_lr_factor)]
  boundaries, at = [], total_steps
  for steps, lr, warmup in stages:
    boundaries.append(at)
    schedules.append(warmup_cosine(lr, warmup, steps, optim.end_lr_factor))
    at += steps
  if not boundaries:
    return schedules[0]
  return optax.join_schedules(schedules, boundaries)


def make_optimizer(optim, schedule, trainable=None) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW (weight decay only on matrices: ndim >= 2).

  `trainable`: None, or a tree of bools like the parameters marking the leaves that any stage of
  the run trains; the optimizer then keeps state (Adam moments) for those leaves only
  (`optax.masked`) and the clipping norm is over them: attention transfer on a pretrained model
  trains a few MB of feature maps and must not carry moments for every frozen weight.
  """
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
    optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
    optax.adamw(
      schedule,
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=decay_mask,
    ),
  )
  if trainable is None or all(jax.tree.leaves(trainable)):
    return tx
  return optax.masked(tx, trainable)
