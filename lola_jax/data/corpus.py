"""English text shipped with Python: the stdlib `pydoc_data` topics, normalised to ASCII.

The corpus is the topics in sorted-key order, joined, with every run of whitespace collapsed to one
space and non-ASCII characters replaced by "?", so that one character is exactly one byte token.
The last `EVAL_FRACTION` of it is held out (`split="eval"`) for haystacks and validation.
"""

from __future__ import annotations

import functools
import re

EVAL_FRACTION = 0.1
SPLITS = ("train", "eval", "all")


@functools.cache
def _full_text() -> str:
  from pydoc_data.topics import topics

  text = " ".join(topics[key] for key in sorted(topics))
  text = re.sub(r"\s+", " ", text).strip()
  return text.encode("ascii", errors="replace").decode("ascii")


@functools.cache
def corpus_text(split: str = "all") -> str:
  """The normalised ASCII corpus (about 400K characters) or its train / eval part."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  text = _full_text()
  cut = int(len(text) * (1.0 - EVAL_FRACTION))
  return {"all": text, "train": text[:cut], "eval": text[cut:]}[split]


def text_window(rng, length: int, split: str = "all") -> str:
  """A random contiguous piece of the corpus of exactly `length` characters (wrapping around)."""
  if length < 0:
    raise ValueError(f"length must be >= 0, got {length}")
  text = corpus_text(split)
  start = int(rng.integers(0, len(text)))
  reps = (start + length) // len(text) + 1
  return (text * (reps + 1))[start : start + length]
