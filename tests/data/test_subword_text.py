"""Docstring text splits and subword retrieval prompts (a byte-level BPE without merges stands in
for SmolLM2's tokenizer: one byte per token, so positions can be checked against the text)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lola_jax.data import subword_retrieval, text


@pytest.fixture(scope="module")
def tok():
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
  vocab["<|endoftext|>"] = len(vocab)
  t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.add_special_tokens(["<|endoftext|>"])
  return t


def test_docstring_splits_are_disjoint_and_nonempty():
  train, held = (
    text.documents("train", ("python-stdlib",)),
    text.documents("held_out", ("python-stdlib",)),
  )
  assert len(train) > 10 * len(held) > 0
  shared = set(train) & set(held)  # split by file: only docstrings copied between files repeat
  assert len(shared) < 0.02 * len(held)
  assert all(len(d) >= text.MIN_CHARS for d in held)
  with pytest.raises(ValueError, match="split"):
    text.documents("test")


def test_text_task_windows_are_consecutive_stream_tokens(tok):
  stream = np.arange(5000, dtype=np.int32) % 200
  task = text.text_task(tok, seq_len=64, seed=3, stream=stream)
  b = task.batch(7, 2)
  assert b["inputs"].shape == (2, 64)
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  np.testing.assert_array_equal(task.batch(7, 2)["inputs"], b["inputs"])  # deterministic
  with pytest.raises(ValueError, match="seq_len"):
    text.text_task(tok, seq_len=0, stream=stream)


@pytest.mark.parametrize("task", ["passkey", "niah"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompts_have_exact_length_needle_at_depth_and_true_key_first(tok, task, depth):
  p = subword_retrieval.prompt(tok, task, 700, depth, seed=0, index=1)
  assert p.prompt_ids.shape == (700,)
  needle = tok.decode(p.prompt_ids[p.needle_start : p.needle_end].tolist())
  assert p.key in needle
  instruction = (
    subword_retrieval.PASSKEY_INSTRUCTION
    if task == "passkey"
    else (subword_retrieval.NIAH_INSTRUCTION)
  )
  head = len(tok.encode(instruction.strip()).ids)
  tail = tok.decode(p.prompt_ids[p.needle_end :].tolist())
  question = len(tail[tail.rindex("\nWhat is the") :].encode())  # one token per byte
  n = 700 - head - (p.needle_end - p.needle_start) - question
  assert abs((p.needle_start - head) - depth * n) <= 100  # the nearest sentence boundary
  assert tok.decode(p.candidates[0].tolist()) == " " + p.key
  keys = {tok.decode(c.tolist()) for c in p.candidates}
  assert len(keys) == p.candidates.shape[0] == 10
  assert tok.decode(p.prompt_ids.tolist()).rstrip().endswith("is")
  again = subword_retrieval.prompt(tok, task, 700, depth, seed=0, index=1)
  np.testing.assert_array_equal(again.prompt_ids, p.prompt_ids)


def test_prompt_errors_name_the_argument(tok):
  with pytest.raises(ValueError, match="depth"):
    subword_retrieval.prompt(tok, "passkey", 700, 1.5, seed=0)
  with pytest.raises(ValueError, match="context_len"):
    subword_retrieval.prompt(tok, "passkey", 20, 0.5, seed=0)
  with pytest.raises(ValueError, match="task"):
    subword_retrieval.prompt(tok, "mqar", 700, 0.5, seed=0)
