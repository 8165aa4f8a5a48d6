"""Real English text that ships with the installed packages: docstrings, split by source file.

A pretrained LLM is linearised (attention transfer) and its perplexity measured on text it can
read; this machine has no dataset download, so the text comes from what is installed:

  source          what                                         licence
  python-stdlib   docstrings of the standard library's modules   PSF-2.0 (Python Software
                  (tests, idlelib and site-packages excluded)     Foundation License)
  numpy           docstrings of NumPy's modules                   BSD-3-Clause

Every module, class and function docstring of at least `MIN_CHARS` characters is one document,
cleaned with `inspect.cleandoc`. Documents are split by source file: a file whose path (relative
to its package root) hashes (crc32) to 0 mod `HELD_OUT_MODULUS` belongs to the held-out split,
every other file to the training split, so no file contributes to both.

`text_task(tokenizer, seq_len=, seed=, split=)` is a `Task` (same interface as the byte tasks):
row b of step s is a window of `seq_len + 1` tokens at a position drawn from its own generator
seeded by (seed, s, b) in the tokenised stream of the split's documents (separated by the
tokenizer's end-of-text token); inputs are the first `seq_len` tokens, targets the next ones,
every weight 1. `held_out_windows(tokenizer, seq_len, count)` gives the fixed, non-overlapping
evaluation windows of the held-out stream used for perplexity.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
import zlib
from collections.abc import Sequence

import numpy as np

from lola_jax.data.tasks import Task

MIN_CHARS = 200
HELD_OUT_MODULUS = 10
SPLITS = ("train", "held_out")
SOURCES = {"python-stdlib": "PSF-2.0", "numpy": "BSD-3-Clause"}
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "testing"}


def _source_root(source: str) -> str:
  if source == "python-stdlib":
    return sysconfig.get_paths()["stdlib"]
  if source == "numpy":
    return os.path.dirname(np.__file__)
  raise ValueError(f"source must be one of {sorted(SOURCES)}, got {source!r}")


def _file_docstrings(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
  except (SyntaxError, UnicodeDecodeError, ValueError):
    return []
  docs = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc and len(doc) >= MIN_CHARS:
        docs.append(doc)
  return docs


@functools.cache
def documents(split: str, sources: tuple[str, ...] = tuple(SOURCES)) -> tuple[str, ...]:
  """The docstrings of `sources` in `split` ("train" | "held_out"), in a fixed order."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  docs: list[str] = []
  for source in sources:
    root = _source_root(source)
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
      for name in sorted(filenames):
        if not name.endswith(".py"):
          continue
        path = os.path.join(dirpath, name)
        rel = f"{source}/{os.path.relpath(path, root)}"
        held_out = zlib.crc32(rel.encode()) % HELD_OUT_MODULUS == 0
        if held_out == (split == "held_out"):
          docs.extend(_file_docstrings(path))
  if not docs:
    raise ValueError(f"no documents found for split {split!r} in sources {sources}")
  return tuple(docs)


def _eos_id(tokenizer) -> int:
  for token in ("<|endoftext|>", "</s>", "<eos>"):
    idx = tokenizer.token_to_id(token)
    if idx is not None:
      return int(idx)
  raise ValueError("tokenizer has no end-of-text token (<|endoftext|>, </s> or <eos>)")


def token_stream(tokenizer, split: str, sources: Sequence[str] = tuple(SOURCES)) -> np.ndarray:
  """int32 [N]: the split's documents tokenised and joined, each followed by end-of-text."""
  docs = documents(split, tuple(sources))
  eos = _eos_id(tokenizer)
  encoded = tokenizer.encode_batch(list(docs), add_special_tokens=False)
  pieces = []
  for enc in encoded:
    pieces.append(np.asarray(enc.ids, np.int32))
    pieces.append(np.asarray([eos], np.int32))
  return np.concatenate(pieces)


def text_task(
  tokenizer, *, seq_len: int, seed: int = 0, split: str = "train", stream: np.ndarray | None = None
) -> Task:
  """Next-token prediction on random windows of the split's token stream (see module doc)."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
  tokens = token_stream(tokenizer, split) if stream is None else np.asarray(stream, np.int32)
  if tokens.ndim != 1 or tokens.shape[0] < seq_len + 2:
    raise ValueError(
      f"the {split!r} token stream has {tokens.shape} tokens, fewer than seq_len + 2 = "
      f"{seq_len + 2}"
    )

  def row(rng: np.random.Generator):
    start = int(rng.integers(0, tokens.shape[0] - seq_len - 1))
    window = tokens[start : start + seq_len + 1]
    return window[:-1], window[1:], np.ones(seq_len, np.float32)

  return Task(
    name="text",
    seq_len=int(seq_len),
    seed=int(seed),
    vocab_size=int(tokenizer.get_vocab_size()),
    options={"split": split, "tokens": int(tokens.shape[0])},
    row_fn=row,
  )


def held_out_windows(tokenizer, seq_len: int, count: int) -> np.ndarray:
  """int32 [count, seq_len + 1]: consecutive non-overlapping windows from the held-out stream."""
  if seq_len < 1 or count < 1:
    raise ValueError(f"seq_len and count must be >= 1, got {seq_len} and {count}")
  tokens = token_stream(tokenizer, "held_out")
  need = count * (seq_len + 1)
  if tokens.shape[0] < need:
    raise ValueError(
      f"the held-out stream has {tokens.shape[0]} tokens, fewer than count * (seq_len + 1) = {need}"
    )
  return tokens[:need].reshape(count, seq_len + 1)
