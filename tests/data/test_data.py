"""Tests for lola_jax.data: tokenizer, task determinism, recipe constraints."""

import numpy as np
import pytest

from lola_jax.data import (
  ByteTokenizer,
  corpus,
  get_task,
  mqar_row,
  retrieval,
  retrieval_example,
  validate_mqar,
)

TOK = ByteTokenizer()


def test_tokenizer_round_trip():
  text = "The pass key is 12345. é"
  ids = TOK.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert TOK.decode(ids) == text
  assert TOK.decode([255, 65]).endswith("A")  # invalid UTF-8 never raises
  with pytest.raises(ValueError, match="ids"):
    TOK.decode([256])


@pytest.mark.parametrize(
  "name,seq_len,opts",
  [
    ("lm", 256, {}),
    ("passkey", 512, {}),
    ("niah", 512, {}),
    ("mqar", 128, {"num_pairs": 8}),
    ("copy", 128, {}),
    ("mix", 512, {}),
  ],
)
def test_batches_deterministic_and_typed(name, seq_len, opts):
  a = get_task(name, seq_len=seq_len, seed=3, **opts)
  b = get_task(name, seq_len=seq_len, seed=3, **opts)
  x, y = a.batch(5, 4), b.batch(5, 4)
  for k in ("inputs", "targets", "weights"):
    np.testing.assert_array_equal(x[k], y[k])
    assert x[k].shape == (4, seq_len)
  assert x["inputs"].dtype == np.int32 and x["targets"].dtype == np.int32
  assert x["weights"].dtype == np.float32
  assert x["inputs"].min() >= 0 and x["inputs"].max() < a.vocab_size
  assert (x["weights"].sum(1) > 0).all()
  # rows do not depend on the batch size; other steps and seeds differ
  np.testing.assert_array_equal(a.batch(5, 2)["inputs"], x["inputs"][:2])
  assert not np.array_equal(a.batch(6, 4)["inputs"], x["inputs"])
  other = get_task(name, seq_len=seq_len, seed=4, **opts)
  assert not np.array_equal(other.batch(5, 4)["inputs"], x["inputs"])


def test_lm_targets_are_shifted_inputs():
  b = get_task("lm", seq_len=64, seed=0).batch(0, 3)
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert TOK.decode(b["inputs"][0]).isascii()


@pytest.mark.parametrize("name", ["passkey", "niah"])
def test_prompt_rows_weight_the_answer(name):
  b = get_task(name, seq_len=512, seed=1).batch(0, 6)
  for inputs, targets, w in zip(b["inputs"], b["targets"], b["weights"], strict=True):
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    answer = TOK.decode(targets[w > 0])
    assert answer.startswith(" ") and answer[1:].isdigit()
    assert len(answer) == (6 if name == "passkey" else 8)
    start = int(np.argmax(w > 0))
    prompt = TOK.decode(inputs[: start + 1])
    assert prompt.endswith(" is")
    assert answer[1:] in prompt  # the needle precedes the question


@pytest.mark.parametrize("task", ["passkey", "niah"])
@pytest.mark.parametrize("context_len", [400, 1024, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_retrieval_example_layout(task, context_len, depth):
  ex = retrieval_example(task, context_len, depth, seed=0, index=2)
  again = retrieval_example(task, context_len, depth, seed=0, index=2)
  assert ex.prompt == again.prompt and ex.answer == again.answer
  assert ex.context_len == context_len == len(ex.prompt)
  np.testing.assert_array_equal(ex.prompt_ids, TOK.encode(ex.prompt))
  np.testing.assert_array_equal(ex.answer_ids, TOK.encode(ex.answer))
  assert ex.answer == " " + ex.key
  needle = ex.prompt[ex.needle_start : ex.needle_end]
  assert ex.key in needle
  # the secret occurs in the needle only (and in nothing else of the prompt)
  outside = ex.prompt[: ex.needle_start] + "|" + ex.prompt[ex.needle_end :]
  assert ex.key not in outside
  # the needle sits near the requested depth of the haystack
  head = len(retrieval.PASSKEY_INSTRUCTION if task == "passkey" else retrieval.NIAH_INSTRUCTION)
  question = ex.prompt.rindex("\n")
  hay = question - head - (ex.needle_end - ex.needle_start)
  assert abs((ex.needle_start - head) - depth * hay) <= 70
  assert ex.prompt.endswith(" is")


def test_niah_key_and_value_absent_from_haystack():
  for i in range(20):
    ex = retrieval_example("niah", 1500, 0.5, seed=1, index=i)
    haystack = ex.prompt[: ex.needle_start] + ex.prompt[ex.needle_end :]
    key = ex.prompt[ex.needle_start :].split(" is:")[0].split()[-1]
    assert key.lower() not in haystack.split("\nWhat")[0].lower()
    assert ex.key not in haystack


def test_examples_differ_across_index_and_depth():
  a = retrieval_example("passkey", 1024, 0.5, seed=0, index=0)
  b = retrieval_example("passkey", 1024, 0.5, seed=0, index=1)
  c = retrieval_example("passkey", 1024, 0.1, seed=0, index=0)
  assert a.key != b.key or a.prompt != b.prompt
  assert a.needle_start != c.needle_start


def test_task_retrieval_example_helper():
  task = get_task("passkey", seq_len=512, seed=2, instruction=False)
  ex = task.retrieval_example(800, 0.25)
  assert ex.context_len == 800
  assert not ex.prompt.startswith("There is an important")
  with pytest.raises(ValueError, match="retrieval_example"):
    get_task("lm", seq_len=64).retrieval_example(800, 0.2)


@pytest.mark.parametrize("seq_len,num_pairs", [(64, 4), (128, 8), (254, 16), (128, 32)])
def test_mqar_recipe(seq_len, num_pairs):
  rng = np.random.default_rng(0)
  for _ in range(20):
    inputs, targets, weights = mqar_row(rng, seq_len, 256, num_pairs)
    context = 2 * num_pairs
    keys, values = inputs[0:context:2], inputs[1:context:2]
    assert len(set(keys.tolist())) == num_pairs and len(set(values.tolist())) == num_pairs
    assert keys.min() >= 1 and keys.max() < 128
    assert values.min() >= 128 and values.max() < 256
    q = np.flatnonzero(weights)
    assert len(q) == num_pairs and (q >= context).all() and ((q - context) % 2 == 0).all()
    lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
    for t in q:
      assert targets[t] == lookup[int(inputs[t])]
    assert sorted(inputs[q].tolist()) == sorted(keys.tolist())


def test_mqar_power_law_favours_early_gaps():
  rng = np.random.default_rng(0)
  first, second = 0, 0
  for _ in range(200):
    _, _, w = mqar_row(rng, 254, 256, 4)
    q = np.flatnonzero(w) - 8
    first += int((q < 123).sum())
    second += int((q >= 123).sum())
  assert first > second


def test_mqar_constraints():
  with pytest.raises(ValueError, match="even"):
    validate_mqar(63, 256, 4)
  with pytest.raises(ValueError, match="vocab_size"):
    validate_mqar(256, 256, 4)
  with pytest.raises(ValueError, match="num_pairs"):
    validate_mqar(64, 256, 17)
  with pytest.raises(ValueError, match="num_pairs"):
    get_task("mqar", seq_len=64, num_pairs=(8, 20))
  with pytest.raises(ValueError, match="vocab_size"):
    get_task("mqar", seq_len=300, num_pairs=8)


def test_mqar_segment_padding():
  b = get_task("mqar", seq_len=512, seed=0, num_pairs=8, segment_len=254).batch(0, 2)
  assert b["inputs"].shape == (2, 512)
  assert (b["weights"][:, 254:] == 0).all() and (b["weights"].sum(1) == 8).all()


def test_copy_rows_weight_exactly_the_repeats():
  """Each weighted target is the token one segment back (the copy), read off the text itself."""
  b = get_task("copy", seq_len=256, seed=1, segment_len=(3, 9)).batch(0, 4)
  for inputs, targets, weights in zip(b["inputs"], b["targets"], b["weights"], strict=True):
    text = TOK.decode(np.append(inputs, targets[-1]))
    expected = np.zeros(len(inputs), np.float32)
    start = 0
    for segment in text.split(" ")[1:]:
      start += 1  # the space
      head, sep, tail = segment.partition("|")
      if sep:  # positions of '|' and of each repeated token but the last predict a copy
        for j in range(len(head)):
          pos = start + len(head) + j
          if pos < len(inputs):
            expected[pos] = 1.0
            assert targets[pos] == ord(head[j])
      start += len(segment)
    np.testing.assert_array_equal(weights, expected)
    assert set(text) <= set("0123456789abcdefghijklmnopqrstuvwxyz| ")


def test_mix_draws_every_task():
  b = get_task("mix", seq_len=512, seed=0).batch(0, 64)
  sums = b["weights"].sum(1)
  lm_rows = np.isclose(sums, 512 * 0.02)
  assert lm_rows.any() and (~lm_rows).any()
  only = get_task("mix", seq_len=512, seed=0, weights={"passkey": 1.0}).batch(0, 8)
  assert (only["weights"].sum(1) == 6).all()


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"name": "nope", "seq_len": 64}, "name"),
    ({"name": "lm", "seq_len": 0}, "seq_len"),
    ({"name": "lm", "seq_len": 64, "seed": -1}, "seed"),
    ({"name": "lm", "seq_len": 64, "bogus": 1}, "bogus"),
    ({"name": "lm", "seq_len": 64, "split": "test"}, "split"),
    ({"name": "passkey", "seq_len": 100}, "seq_len"),
    ({"name": "passkey", "seq_len": 512, "context_weight": 2.0}, "context_weight"),
    ({"name": "mix", "seq_len": 512, "weights": {"foo": 1.0}}, "weights"),
    ({"name": "mqar", "seq_len": 64, "num_pairs": "x"}, "num_pairs"),
    ({"name": "copy", "seq_len": 64, "segment_len": (4, 40)}, "segment_len"),
    ({"name": "copy", "seq_len": 64, "segment_len": (0, 8)}, "segment_len"),
    ({"name": "copy", "seq_len": 64, "segment_len": "x"}, "segment_len"),
  ],
)
def test_bad_arguments_raise(kwargs, match):
  name = kwargs.pop("name")
  with pytest.raises(ValueError, match=match):
    get_task(name, **kwargs)


def test_batch_arguments():
  task = get_task("lm", seq_len=32)
  with pytest.raises(ValueError, match="step"):
    task.batch(-1, 2)
  with pytest.raises(ValueError, match="batch_size"):
    task.batch(0, 0)
  with pytest.raises(ValueError, match="depth"):
    retrieval_example("passkey", 1024, 1.5, seed=0)
  with pytest.raises(ValueError, match="context_len"):
    retrieval_example("passkey", 100, 0.5, seed=0)


def test_corpus_is_ascii_and_split():
  assert corpus.corpus_text("all").isascii()
  assert len(corpus.corpus_text("train")) > 8 * len(corpus.corpus_text("eval"))
