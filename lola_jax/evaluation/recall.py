"""Recall evaluation: greedy decoding, exact-match scoring, per (depth, context) cells, MQAR.

A model enters through two callables, so an oracle or a constant "model" can be scored too:

  generate(prompts int32 [B, T], num_new: int) -> int32 [B, num_new]  greedy continuation
  predict(inputs int32 [B, T]) -> int32 [B, T]  argmax next tokens

`model_generate(model)` / `model_predict(model)` build them from a `lola_jax.model.LoLALM`:
greedy decoding through `lola_jax.generate` (its one decode loop) and argmax through
`LoLALM.prefill` (the state-carrying inference path, i.e. the sparse cache is exercised).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lola_jax import generate as gen
from lola_jax.core.state import cached_positions
from lola_jax.data import get_task, retrieval_example

Generate = Callable[[np.ndarray, int], np.ndarray]
Predict = Callable[[np.ndarray], np.ndarray]


def exact_match(generated, answer) -> bool:
  """True when the first len(answer) generated tokens equal the answer tokens."""
  generated, answer = np.asarray(generated).reshape(-1), np.asarray(answer).reshape(-1)
  return len(generated) >= len(answer) and bool(np.array_equal(generated[: len(answer)], answer))


@dataclasses.dataclass(frozen=True)
class Cell:
  """Accuracy of one (task, context, depth) cell over `num` prompts."""

  task: str
  context: int
  depth: float
  correct: int
  num: int

  @property
  def accuracy(self) -> float:
    return self.correct / self.num if self.num else 0.0


class Progress:
  """Progress lines on stderr: `[label] i/n (elapsed, eta)` at most every `every` seconds."""

  def __init__(self, label: str, total: int, every: float = 5.0, stream=None):
    self.label, self.total, self.every = label, total, every
    self.stream = stream or sys.stderr
    self.start = self.last = time.time()
    self.done = 0

  def update(self, n: int = 1, note: str = ""):
    self.done += n
    now = time.time()
    if now - self.last >= self.every or self.done >= self.total:
      self.last = now
      el = now - self.start
      eta = el / self.done * (self.total - self.done) if self.done else float("nan")
      print(
        f"[{self.label}] {self.done}/{self.total} {note} ({el:.0f}s elapsed, eta {eta:.0f}s)",
        file=self.stream,
        flush=True,
      )


def retrieval_examples(task, context, depths, samples, seed=0, **task_options) -> list:
  """The prompts `evaluate_retrieval` scores at one context, in its order (depth-major)."""
  return [
    retrieval_example(task, context, d, seed, i, **task_options)
    for d in depths
    for i in range(samples)
  ]


def evaluate_retrieval(
  generate: Generate,
  task: str,
  contexts: Sequence[int],
  depths: Sequence[float],
  samples: int,
  *,
  seed: int = 0,
  batch_size: int = 8,
  label: str = "",
  **task_options,
) -> list[Cell]:
  """Greedy exact-match accuracy of `generate` on `task` ("passkey" | "niah") per cell.

  For each context length, `len(depths) * samples` prompts (all exactly `context` tokens, so they
  batch without padding) are decoded for len(answer) tokens and scored by exact match.
  """
  cells = []
  progress = Progress(f"{label or 'eval'} {task}", len(contexts) * len(depths) * samples)
  for context in contexts:
    examples = retrieval_examples(task, context, depths, samples, seed, **task_options)
    num_new = max(len(e.answer_ids) for e in examples)
    hits = []
    for s in range(0, len(examples), batch_size):
      chunk = examples[s : s + batch_size]
      out = np.asarray(generate(np.stack([e.prompt_ids for e in chunk]), num_new))
      hits += [exact_match(o, e.answer_ids) for o, e in zip(out, chunk, strict=True)]
      progress.update(len(chunk), f"context {context}")
    for j, d in enumerate(depths):
      h = hits[j * samples : (j + 1) * samples]
      cells.append(Cell(task, int(context), float(d), int(sum(h)), len(h)))
  return cells


def accuracy_by_context(cells: Sequence[Cell]) -> dict[int, float]:
  """Mean accuracy per context length (pooled over depths)."""
  out = {}
  for c in sorted({c.context for c in cells}):
    sel = [x for x in cells if x.context == c]
    out[c] = sum(x.correct for x in sel) / max(1, sum(x.num for x in sel))
  return out


def evaluate_mqar(
  predict: Predict,
  num_pairs: Sequence[int],
  seq_len: int,
  samples: int,
  *,
  seed: int = 0,
  batch_size: int = 16,
  label: str = "",
) -> dict[int, float]:
  """Teacher-forced MQAR accuracy (argmax at every query position) per number of pairs."""
  out = {}
  progress = Progress(f"{label or 'eval'} mqar", len(num_pairs) * samples)
  for n in num_pairs:
    task = get_task("mqar", seq_len=seq_len, seed=seed + 1000, num_pairs=int(n))
    correct = total = 0
    for step, s in enumerate(range(0, samples, batch_size)):
      b = task.batch(step, min(batch_size, samples - s))
      pred = np.asarray(predict(b["inputs"]))
      mask = b["weights"] > 0
      correct += int((pred[mask] == b["targets"][mask]).sum())
      total += int(mask.sum())
      progress.update(b["inputs"].shape[0], f"pairs {n}")
    out[int(n)] = correct / total
  return out


def model_generate(model, on_prefill: Callable | None = None) -> Generate:
  """Greedy generation through `lola_jax.generate`'s `prefill` and `decode` (the state-carrying
  inference path, so the sparse cache is exercised; one compilation per shape).

  `on_prefill(states)`, if given, sees the per-layer states right after each prompt batch (e.g. to
  read which positions the sparse cache holds).
  """
  config, params = model.config, nnx.state(model)

  def generate(prompts, num_new):
    prompts = jnp.asarray(prompts, jnp.int32)
    logits, states = gen.prefill(config, params, prompts, max_len=prompts.shape[1] + num_new)
    if on_prefill is not None:
      on_prefill(states)
    return gen.decode(config, params, states, logits, max_new_tokens=num_new).tokens

  return generate


def model_predict(model) -> Predict:
  """Argmax next tokens through `model.prefill` (the state-carrying path)."""

  @nnx.jit
  def predict(m, tokens):
    logits, _ = m.prefill(tokens, max_len=tokens.shape[1])
    return jnp.argmax(logits, -1).astype(jnp.int32)

  return lambda inputs: np.asarray(predict(model, jnp.asarray(inputs, jnp.int32)))


def needle_positions(example) -> np.ndarray:
  """int [len(key)]: token positions of the secret's digits inside the needle of `example`."""
  needle = example.prompt[example.needle_start : example.needle_end]
  start = example.needle_start + needle.index(example.key)
  return np.arange(start, start + len(example.key))


def needle_cache_coverage(cached: Sequence[np.ndarray], positions: np.ndarray) -> np.ndarray:
  """Share of the needle's secret tokens held in the sparse cache, per layer and kv head.

  Args:
    cached: per layer int [B, Hkv, lam] cached positions (-1 = empty), e.g. `cached_positions`.
    positions: int [B, K] the secret's token positions per row.
  Returns:
    float [B, L, Hkv] in [0, 1].
  """
  out = []
  for pos in cached:
    pos = np.asarray(pos)
    hit = (pos[:, :, :, None] == positions[:, None, None, :]).any(2)  # [B, Hkv, K]
    out.append(hit.mean(-1))
  return np.stack(out, 1)


def retrieval_cache_coverage(
  recorded, task, context, depths, samples, seed=0, **task_options
) -> np.ndarray:
  """`needle_cache_coverage` [B, L, Hkv] of the prompts `evaluate_retrieval` scored at one context.

  Args:
    recorded: per prompt batch, in order, the per-layer cached positions [b, Hkv, lam] after the
      prompt (what `model_generate(on_prefill=...)` sees, through `cached_positions`).
    task, context, depths, samples, seed, task_options: as given to `evaluate_retrieval`.
  """
  examples = retrieval_examples(task, context, depths, samples, seed, **task_options)
  positions = np.stack([needle_positions(e) for e in examples])
  cached = [np.concatenate(layer) for layer in zip(*recorded, strict=True)]
  return needle_cache_coverage(cached, positions)


def model_cache_coverage(model, examples, batch_size: int = 8) -> float:
  """Mean share of the secret's tokens in the sparse cache after the prompt (LoLA models)."""

  @nnx.jit
  def prefill(m, tokens):
    _, states = m.prefill(tokens)
    return [cached_positions(s) for s in states]

  shares = []
  for s in range(0, len(examples), batch_size):
    chunk = examples[s : s + batch_size]
    cached = prefill(model, jnp.asarray(np.stack([e.prompt_ids for e in chunk])))
    positions = np.stack([needle_positions(e) for e in chunk])
    shares.append(needle_cache_coverage([np.asarray(c) for c in cached], positions))
  return float(np.concatenate(shares).mean())
