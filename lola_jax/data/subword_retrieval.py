"""Pass-key and needle-in-prose prompts for a subword (BPE) tokenizer, with distractor answers.

The recipes and their sentences are those of `retrieval` (../shared/TASKS.md); what changes is
the unit: a prompt here has exactly `context_len` tokens of a `tokenizers.Tokenizer`, built from
separately tokenised pieces

    instruction  haystack[:p]  needle  haystack[p:]  question           -> answer " K"

Every piece after the first starts with a space (or a newline), where a byte-level BPE
pre-tokeniser splits anyway, so the ids are those of the joined text up to the haystack's cut.
The pass-key haystack is the repeated filler, cut to length at the end; the needle goes in at the
filler-sentence boundary nearest `depth * len(haystack)`. The needle-in-prose haystack is a
random stretch of the stdlib pydoc topics (natural English; not part of the linearisation's
training text), and the needle goes in at the sentence start nearest to the depth.

Scoring needs more than the greedy answer: a small model often answers "the pass key ..."
although it ranks the true key far above any other. `Prompt.candidates` holds the true answer
first and `num_distractors` other keys of the same form; a teacher-forced score counts a prompt
as retrieved when the true answer's log-likelihood is the highest of all candidates.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from lola_jax.data.retrieval import (
  NIAH_INSTRUCTION,
  NIAH_NEEDLE,
  NIAH_QUESTION,
  PASSKEY_FILLER,
  PASSKEY_INSTRUCTION,
  PASSKEY_NEEDLE,
  PASSKEY_QUESTION,
)

TASKS = ("passkey", "niah")
_CONSONANTS = "bcdfghjklmnprstvwxz"
_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt of a subword model and its scoring candidates.

  Attributes:
    task: "passkey" or "niah".
    prompt_ids: int32 [T] (T = context_len).
    key: the secret digits.
    depth: requested needle depth in [0, 1].
    needle_start, needle_end: token span [start, end) of the needle.
    candidates: int32 [K, A]: the true answer's ids (row 0) and distractors'; all rows have the
      same length A (keys of equal digit count).
  """

  task: str
  prompt_ids: np.ndarray
  key: str
  depth: float
  needle_start: int
  needle_end: int
  candidates: np.ndarray

  @property
  def answer_ids(self) -> np.ndarray:
    return self.candidates[0]


def _ids(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def _candidates(tokenizer, key: str, rng, digits: int, count: int) -> np.ndarray:
  """[1 + count, A]: " key" then distinct random keys of the same digit count."""
  keys = [key]
  while len(keys) < count + 1:
    other = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    if other not in keys:
      keys.append(other)
  rows = [_ids(tokenizer, " " + k) for k in keys]
  if len({r.shape[0] for r in rows}) != 1:
    raise ValueError(f"answers of {digits}-digit keys tokenise to different lengths")
  return np.stack(rows)


def _assemble(task, head, haystack, cut, needle, question, key, depth, candidates):
  prompt = np.concatenate([head, haystack[:cut], needle, haystack[cut:], question])
  start = head.shape[0] + cut
  return Prompt(
    task=task,
    prompt_ids=prompt.astype(np.int32),
    key=key,
    depth=float(depth),
    needle_start=int(start),
    needle_end=int(start + needle.shape[0]),
    candidates=candidates,
  )


def _haystack_budget(context_len: int, *pieces: np.ndarray) -> int:
  fixed = sum(p.shape[0] for p in pieces)
  if context_len < fixed:
    raise ValueError(
      f"context_len must be >= {fixed} tokens (instruction + needle + question), got {context_len}"
    )
  return context_len - fixed


def _check_depth(depth: float) -> None:
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must lie in [0, 1], got {depth}")


def passkey_prompt(tokenizer, rng, context_len: int, depth: float, num_distractors: int = 9):
  """The pass-key prompt of exactly `context_len` tokens, needle at `depth` (see module doc)."""
  _check_depth(depth)
  key = str(int(rng.integers(10000, 100000)))
  head = _ids(tokenizer, PASSKEY_INSTRUCTION.strip())
  needle = _ids(tokenizer, " " + PASSKEY_NEEDLE.format(key=key).strip())
  question = _ids(tokenizer, PASSKEY_QUESTION)
  unit = _ids(tokenizer, " " + PASSKEY_FILLER.strip())
  n = _haystack_budget(context_len, head, needle, question)
  haystack = np.tile(unit, n // unit.shape[0] + 1)[:n]
  bounds = np.append(np.arange(0, n, unit.shape[0]), n)
  cut = int(bounds[np.argmin(np.abs(bounds - depth * n))])
  candidates = _candidates(tokenizer, key, rng, 5, num_distractors)
  return _assemble("passkey", head, haystack, cut, needle, question, key, depth, candidates)


@functools.cache
def _prose() -> str:
  from pydoc_data.topics import topics  # stdlib data, imported on first use (large)

  return re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics))).strip()


@functools.cache
def _prose_ids(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N], sentence_start [N] bool: token i begins a sentence) of the pydoc prose."""
  enc = tokenizer.encode(" " + _prose(), add_special_tokens=False)
  text = " " + _prose()
  starts = {m.end() - 1 for m in re.finditer(r"[.!?] [A-Z]", text)}
  offsets = np.asarray([o[0] for o in enc.offsets])
  # A token that begins with the space before a sentence's first letter starts that sentence.
  sentence = np.asarray([o in starts or o + 1 in starts for o in offsets])
  return np.asarray(enc.ids, np.int32), sentence


def niah_prompt(tokenizer, rng, context_len: int, depth: float, num_distractors: int = 9):
  """A single needle in natural English of exactly `context_len` tokens (see module doc)."""
  _check_depth(depth)
  ids, sentence = _prose_ids(tokenizer)
  text = _prose().lower()
  for _ in range(100):
    key = "".join(
      rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS))
      for _ in range(int(rng.integers(3, 5)))
    )
    value = str(int(rng.integers(1_000_000, 10_000_000)))
    if key not in text and value not in text:
      break
  else:
    raise RuntimeError("could not draw a key and value absent from the haystack")
  head = _ids(tokenizer, NIAH_INSTRUCTION.strip())
  needle = _ids(tokenizer, " " + NIAH_NEEDLE.format(key=key, value=value).strip())
  question = _ids(tokenizer, NIAH_QUESTION.format(key=key))
  n = _haystack_budget(context_len, head, needle, question)
  if n > ids.shape[0]:
    raise ValueError(
      f"context_len {context_len} needs {n} haystack tokens, the prose has {len(ids)}"
    )
  start = int(rng.integers(0, ids.shape[0] - n + 1))
  haystack = ids[start : start + n]
  bounds = np.flatnonzero(sentence[start : start + n])
  bounds = np.concatenate([[0], bounds, [n]])
  cut = int(bounds[np.argmin(np.abs(bounds - depth * n))])
  candidates = _candidates(tokenizer, value, rng, 7, num_distractors)
  return _assemble("niah", head, haystack, cut, needle, question, value, depth, candidates)


def prompt(tokenizer, task: str, context_len: int, depth: float, seed: int, index: int = 0):
  """The `index`-th prompt of a (task, context, depth) cell; deterministic in its arguments."""
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  rng = np.random.default_rng([seed, 104729, context_len, int(round(depth * 1e6)), index])
  builder = passkey_prompt if task == "passkey" else niah_prompt
  return builder(tokenizer, rng, context_len, depth)
