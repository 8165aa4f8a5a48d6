"""Multi-query associative recall (MQAR), the Zoology recipe (Arora et al. 2023).

A sequence of length T over a vocabulary V starts with N key/value pairs `k1 v1 k2 v2 ...` (keys
drawn without replacement from [1, V/2), values from [V/2, V)). The remaining T - 2N slots hold each
key once more, as a query, at even offsets drawn without replacement from a power law
p(gap = i) ~ a * i^(a - 1) (a = 0.01: early gaps favoured); the other slots hold random tokens. The
target at a query position is its key's value (the model must emit it as the next token); all other
targets carry weight 0. Constraints: T even, V > T, 4N <= T.
"""

from __future__ import annotations

import numpy as np


def validate_mqar(seq_len: int, vocab_size: int, num_pairs: int) -> None:
  """Raises ValueError naming the argument when the Zoology constraints do not hold."""
  if seq_len % 2:
    raise ValueError(f"seq_len must be even for mqar, got {seq_len}")
  if vocab_size <= seq_len:
    raise ValueError(
      f"vocab_size must be > seq_len for mqar, got vocab_size={vocab_size}, seq_len={seq_len}"
    )
  if num_pairs < 1 or 4 * num_pairs > seq_len:
    raise ValueError(f"num_pairs must be in [1, seq_len/4 = {seq_len // 4}], got {num_pairs}")
  if num_pairs > vocab_size // 2 - 1:
    raise ValueError(
      f"num_pairs must be <= vocab_size/2 - 1 = {vocab_size // 2 - 1}, got {num_pairs}"
    )


def mqar_row(
  rng,
  seq_len: int,
  vocab_size: int,
  num_pairs: int,
  power_a: float = 0.01,
  random_non_queries: bool = True,
):
  """One MQAR sequence.

  Returns:
    inputs int32 [T], targets int32 [T], weights float32 [T] (1 at the N query positions).
  """
  validate_mqar(seq_len, vocab_size, num_pairs)
  half = vocab_size // 2
  keys = rng.choice(np.arange(1, half), size=num_pairs, replace=False)
  values = rng.choice(np.arange(half, vocab_size), size=num_pairs, replace=False)
  context = 2 * num_pairs
  space = (seq_len - context) // 2
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  gaps = rng.choice(space, size=num_pairs, replace=False, p=p / p.sum())

  seq = np.zeros(seq_len + 1, dtype=np.int64)
  seq[0:context:2] = keys
  seq[1:context:2] = values
  query_pos = context + 2 * gaps
  seq[query_pos] = keys
  inputs = seq[:-1].copy()
  if random_non_queries:
    filler = np.ones(seq_len, dtype=bool)
    filler[:context] = False
    filler[query_pos] = False
    inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
  targets = np.concatenate([inputs[1:], [0]])
  targets[query_pos] = values
  weights = np.zeros(seq_len, dtype=np.float32)
  weights[query_pos] = 1.0
  return inputs.astype(np.int32), targets.astype(np.int32), weights
