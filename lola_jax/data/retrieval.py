"""Needle-in-a-haystack prompts: pass-key retrieval and single needle in natural text.

Both build a prompt of exactly `context_len` byte tokens:

    [instruction] haystack[:p] needle haystack[p:] "\n" question        -> answer

with the needle inserted at the sentence boundary of the haystack nearest to `depth * len(haystack)`
(`depth` in [0, 1]; 0 = right after the instruction, 1 = right before the question). The answer
starts with a space (" 12345") and is scored by exact match of the greedily generated tokens.

Recipes (../shared/TASKS.md):
  pass-key (Mohtashami and Jaggi): repetitive filler, "The pass key is K. Remember it. K is the pass
    key.", K a random 5-digit number.
  niah (RULER S-NIAH-2): natural English haystack from the stdlib `pydoc_data` topics, needle
    "One of the special magic numbers for {key} is: {value}." with a made-up word as the key and a
    7-digit value, both checked to be absent from the haystack.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lola_jax.data import corpus
from lola_jax.data.tokenizer import ByteTokenizer

PASSKEY_INSTRUCTION = (
  "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
  "I will quiz you about the important information there. "
)
PASSKEY_FILLER = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

NIAH_INSTRUCTION = (
  "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
  "I will quiz you about the numbers afterwards. "
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}. "
NIAH_QUESTION = (
  "\nWhat is the special magic number for {key} mentioned in the provided text? "
  "The special magic number for {key} mentioned in the provided text is"
)
_CONSONANTS = "bcdfghjklmnprstvwxz"
_VOWELS = "aeiou"

_TOKENIZER = ByteTokenizer()


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
  """One evaluation prompt and its expected answer.

  Attributes:
    task: "passkey" or "niah".
    prompt: the prompt text; `prompt_ids` its tokens, int32 [context_len].
    answer: the expected continuation (" 12345"); `answer_ids` its tokens, int32 [A].
    key: the secret (the pass key digits, or the niah value digits).
    depth: requested needle depth in [0, 1].
    needle_start, needle_end: token span [start, end) of the needle inside the prompt.
  """

  task: str
  prompt: str
  prompt_ids: np.ndarray
  answer: str
  answer_ids: np.ndarray
  key: str
  depth: float
  needle_start: int
  needle_end: int

  @property
  def context_len(self) -> int:
    return int(self.prompt_ids.shape[0])


def _sentence_boundary(haystack: str, target: int, max_shift: int = 64) -> int:
  """The index in `haystack` nearest to `target` that starts a sentence (or 0 / len).

  Falls back to the nearest word start when no sentence starts within `max_shift` characters
  (code-heavy stretches of natural text).
  """

  def nearest(pattern):
    bounds = [0, len(haystack)]
    bounds += [i + len(pattern) for i in range(len(haystack)) if haystack.startswith(pattern, i)]
    bounds = np.asarray(sorted(set(bounds)))
    return int(bounds[np.argmin(np.abs(bounds - target))])

  best = nearest(". ")
  return best if abs(best - target) <= max_shift else nearest(" ")


def _assemble(task, instruction, haystack, needle, question, answer, key, depth):
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must lie in [0, 1], got {depth}")
  p = _sentence_boundary(haystack, int(round(depth * len(haystack))))
  head = instruction + haystack[:p]
  prompt = head + needle + haystack[p:] + question
  return RetrievalExample(
    task=task,
    prompt=prompt,
    prompt_ids=_TOKENIZER.encode(prompt),
    answer=answer,
    answer_ids=_TOKENIZER.encode(answer),
    key=key,
    depth=float(depth),
    needle_start=len(head),
    needle_end=len(head) + len(needle),
  )


def _haystack_len(context_len: int, *parts: str) -> int:
  fixed = sum(len(p) for p in parts)
  if context_len < fixed:
    raise ValueError(
      f"context_len must be >= {fixed} (instruction + needle + question), got {context_len}"
    )
  return context_len - fixed


def passkey_min_context(instruction: bool = True) -> int:
  """The shortest pass-key prompt (empty filler)."""
  needle = PASSKEY_NEEDLE.format(key="00000")
  return len(PASSKEY_INSTRUCTION if instruction else "") + len(needle) + len(PASSKEY_QUESTION)


def passkey_example(rng, context_len: int, depth: float, instruction: bool = True):
  """A pass-key prompt of exactly `context_len` tokens with the needle at `depth`.

  Args:
    rng: a `numpy.random.Generator` (draws the 5-digit key).
    context_len: prompt length in byte tokens (>= `passkey_min_context(instruction)`).
    depth: needle depth in [0, 1].
    instruction: whether to start with the instruction sentence.
  """
  key = str(int(rng.integers(10000, 100000)))
  needle = PASSKEY_NEEDLE.format(key=key)
  head = PASSKEY_INSTRUCTION if instruction else ""
  n = _haystack_len(context_len, head, needle, PASSKEY_QUESTION)
  haystack = (PASSKEY_FILLER * (n // len(PASSKEY_FILLER) + 1))[:n]
  return _assemble("passkey", head, haystack, needle, PASSKEY_QUESTION, " " + key, key, depth)


def _made_up_word(rng) -> str:
  n = int(rng.integers(3, 5))
  return "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(n))


def niah_min_context() -> int:
  """The shortest niah prompt (empty haystack, longest key)."""
  key, value = "x" * 8, "0" * 7
  parts = (
    NIAH_INSTRUCTION,
    NIAH_NEEDLE.format(key=key, value=value),
    NIAH_QUESTION.format(key=key),
  )
  return sum(len(p) for p in parts)


def niah_example(rng, context_len: int, depth: float, split: str = "eval"):
  """A single-needle prompt in natural English of exactly `context_len` tokens.

  The haystack is a random window of the pydoc corpus (`split`); the key (a made-up word) and the
  7-digit value are redrawn until neither occurs in the haystack.
  """
  key = _made_up_word(rng)
  value = str(int(rng.integers(1_000_000, 10_000_000)))
  needle = NIAH_NEEDLE.format(key=key, value=value)
  question = NIAH_QUESTION.format(key=key)
  n = _haystack_len(context_len, NIAH_INSTRUCTION, needle, question)
  haystack = corpus.text_window(rng, n, split)
  for _ in range(100):
    if key not in haystack.lower() and value not in haystack:
      break
    key = _made_up_word(rng) if key in haystack.lower() else key
    value = str(int(rng.integers(1_000_000, 10_000_000))) if value in haystack else value
    needle = NIAH_NEEDLE.format(key=key, value=value)
    question = NIAH_QUESTION.format(key=key)
    n = _haystack_len(context_len, NIAH_INSTRUCTION, needle, question)
    haystack = haystack[:n] if len(haystack) >= n else corpus.text_window(rng, n, split)
  else:
    raise RuntimeError("could not draw a key/value absent from the haystack")
  return _assemble("niah", NIAH_INSTRUCTION, haystack, needle, question, " " + value, value, depth)


def retrieval_example(
  task: str, context_len: int, depth: float, seed: int, index: int = 0, **options
):
  """The `index`-th evaluation prompt of `task` ("passkey" | "niah") for one (depth, context) cell.

  Deterministic in (task, context_len, depth, seed, index).
  """
  rng = np.random.default_rng([seed, 7919, context_len, int(round(depth * 1e6)), index])
  if task == "passkey":
    return passkey_example(rng, context_len, depth, **options)
  if task == "niah":
    return niah_example(rng, context_len, depth, **options)
  raise ValueError(f"task must be 'passkey' or 'niah', got {task!r}")
