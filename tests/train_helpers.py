"""Shared helpers for the training/sharding tests (no tests here): a tiny deterministic task and
a tiny config. Also imported by the subprocesses those tests start."""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.configs import default


@dataclasses.dataclass(frozen=True)
class CopyTask:
  """Rows are a random prefix followed by its copy: learnable in a few dozen steps.

  Same interface as lola_jax.data tasks: batch(step, batch_size) is deterministic in
  (seed, step) and returns inputs/targets/weights [B, T].
  """

  seq_len: int = 32
  seed: int = 0
  vocab_size: int = 16

  def batch(self, step: int, batch_size: int) -> dict:
    rows = []
    for b in range(batch_size):
      rng = np.random.default_rng([self.seed, step, b])
      half = rng.integers(1, self.vocab_size, (self.seq_len + 1) // 2 + 1)
      rows.append(np.concatenate([half, half])[: self.seq_len + 1])
    x = np.stack(rows).astype(np.int32)
    weights = np.zeros((batch_size, self.seq_len), np.float32)
    weights[:, self.seq_len // 2 :] = 1.0
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": weights}


def tiny_config(**train):
  c = default.get_config()
  c.model.vocab_size = 16
  c.model.num_layers = 1
  c.model.d_model = 32
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 8
  c.model.mlp_dim = 64
  c.model.feature_dim = 8
  c.model.max_seq_len = 64
  c.lola.chunk_size = 8
  c.lola.cache_size = 4
  c.task.seq_len = 32
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.log_every = 5
  c.train.eval_every = 0
  c.train.eval_batches = 0
  c.train.checkpoint_every = 10
  c.train.async_checkpoint = False
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 2
  return with_overrides(c, **train)


def with_overrides(c, **overrides):
  """`c` with `section__field=value` overrides applied (c.section.field = value)."""
  for k, v in overrides.items():
    section, field = k.split("__")
    c[section][field] = v
  return c


def tasks(config):
  return CopyTask(config.task.seq_len, config.seed), CopyTask(config.task.seq_len, config.seed + 1)


def get_config():
  """Tiny config on the real byte-LM task (for the binary in subprocess tests)."""
  c = tiny_config()
  c.model.vocab_size = 256
  c.task.name = "lm"
  return c
