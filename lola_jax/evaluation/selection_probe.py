"""Replaying LoLA's cache selection with other memories (the `layer_budgets` ablation).

The sparse-cache update rule of LOLA_SPEC.md (at every chunk end, score the pairs leaving the
window and the cached ones against the memory of everything absorbed so far, keep the `cache`
worst-recalled, absorb the rest) written once more in float64 NumPy for one kv head, with the
recall pluggable: the linear state (`linear_recall`, which makes it the spec's self-recall error
exactly; a test checks it against the core), or exact kernel regression (`kernel_recall`, an
unbounded feature map). Used to ask whether a layer's keys could tell a needle from filler at
all, whatever the feature map.
"""

from __future__ import annotations

import numpy as np


def parse_layer_caches(
  text: str, num_layers: int, all_size: int, name: str = "--budgets"
) -> tuple[int, ...]:
  """'16:all' -> (16, all_size): one sparse-cache size per layer ('all' = `all_size`).

  ValueError names `name` (the flag), what was received and what was expected.
  """
  parts = text.split(":")
  if len(parts) != num_layers:
    raise ValueError(f"{name}: {text!r} names {len(parts)} layers, the model has {num_layers}")
  try:
    sizes = tuple(all_size if p == "all" else int(p) for p in parts)
  except ValueError:
    raise ValueError(f"{name}: {text!r} must be ints >= 0 or 'all' separated by ':'") from None
  if min(sizes) < 0:
    raise ValueError(f"{name}: {text!r} must be ints >= 0 or 'all' separated by ':'")
  return sizes


def secret_occurrences(example) -> np.ndarray:
  """int [n_copies, K]: token positions of every copy of the secret inside the needle."""
  needle = example.prompt[example.needle_start : example.needle_end]
  starts, at = [], needle.find(example.key)
  while at >= 0:
    starts.append(example.needle_start + at)
    at = needle.find(example.key, at + 1)
  return np.array([np.arange(s, s + len(example.key)) for s in starts])


def copy_pairs_held(cached: np.ndarray, occurrences: np.ndarray) -> float:
  """Share of digits 2..K whose position is cached in at least one copy of the secret."""
  held = np.isin(occurrences[:, 1:], cached).any(0)
  return float(held.mean())


def replay_selection(keys, values, recall, *, prompt_len, chunk, cache) -> np.ndarray:
  """The spec's cache update rule with a pluggable memory, for one kv head (float64).

  Args:
    keys: [T, ...] whatever `recall` reads as keys.  values: [T, dv].
    recall: (query_keys [N, ...], absorbed_idx int [M]) -> recalled values [N, dv]; M may be 0.
    prompt_len, chunk, cache: T, C and lam of LOLA_SPEC.md (only complete chunks update).

  Returns:
    int [<= cache]: the cached positions after the last complete chunk's update.
  """
  absorbed, kept = np.zeros(0, int), []
  for n in range(1, prompt_len // chunk):
    cand = np.array(kept + list(range((n - 1) * chunk, n * chunk)))
    if len(cand) <= cache:
      kept = cand.tolist()
      continue
    err = np.linalg.norm(values[cand] - recall(keys[cand], absorbed), axis=-1)
    order = np.argsort(-err, kind="stable")  # ties: the older position stays
    keep = np.sort(cand[order[:cache]])
    absorbed = np.concatenate([absorbed, np.setdiff1d(cand, keep)])
    kept = keep.tolist()
  return np.array(kept, int)


def linear_recall(phi, values, eps=1e-6):
  """The linear state's recall phi^T H / (phi^T s + eps) over the absorbed pairs."""

  def recall(phi_q, idx):
    h = phi[idx].T @ values[idx]
    s = phi[idx].sum(0)
    return (phi_q @ h) / (phi_q @ s + eps)[:, None]

  return recall


def kernel_recall(keys, values, beta):
  """Exact kernel regression sum_i softmax_i(beta <k, k_i>) v_i on unit keys."""
  unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)

  def recall(query_unit, idx):
    if len(idx) == 0:
      return np.zeros((len(query_unit), values.shape[-1]))
    logits = beta * query_unit @ unit[idx].T
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ values[idx]

  return unit, recall
