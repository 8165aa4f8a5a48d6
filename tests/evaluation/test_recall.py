"""Tests for the recall harness: exact-match scoring, oracle / constant models, MQAR scoring."""

import re

import numpy as np
import pytest

from lola_jax.data import ByteTokenizer, retrieval_example
from lola_jax.evaluation import (
  accuracy_by_context,
  evaluate_mqar,
  evaluate_retrieval,
  exact_match,
  needle_cache_coverage,
  needle_positions,
  retrieval_cache_coverage,
)

TOK = ByteTokenizer()
NEEDLES = (r"The pass key is (\d+)\.", r"magic numbers for \w+ is: (\d+)\.")


def oracle_generate(prompts, num_new):
  """Reads the needle out of each prompt: a perfect retrieval 'model'."""
  out = np.zeros((len(prompts), num_new), np.int32)
  for i, p in enumerate(prompts):
    text = TOK.decode(p)
    key = next(m.group(1) for pat in NEEDLES if (m := re.search(pat, text)))
    ids = TOK.encode(" " + key)[:num_new]
    out[i, : len(ids)] = ids
  return out


def constant_generate(prompts, num_new):
  return np.full((len(prompts), num_new), ord("7"), np.int32)


def test_exact_match():
  assert exact_match([32, 49, 50, 99], [32, 49, 50])
  assert not exact_match([32, 49], [32, 49, 50])
  assert not exact_match([32, 49, 51], [32, 49, 50])


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_oracle_scores_100_and_constant_0(task):
  kw = {"contexts": [400, 700], "depths": [0.0, 0.5, 1.0], "samples": 2, "batch_size": 4}
  cells = evaluate_retrieval(oracle_generate, task, **kw)
  assert len(cells) == 6 and all(c.accuracy == 1.0 and c.num == 2 for c in cells)
  assert accuracy_by_context(cells) == {400: 1.0, 700: 1.0}
  cells = evaluate_retrieval(constant_generate, task, **kw)
  assert all(c.accuracy == 0.0 for c in cells)


def test_half_right_model_scores_per_depth():
  def shallow_only(prompts, num_new):  # right only when the needle is in the first half
    out = oracle_generate(prompts, num_new)
    for i, p in enumerate(prompts):
      text = TOK.decode(p)
      if text.index("pass key is") > len(text) / 2:
        out[i] = 0
    return out

  cells = evaluate_retrieval(shallow_only, "passkey", [1000], [0.1, 0.9], 3)
  assert [c.accuracy for c in cells] == [1.0, 0.0]


def test_prompts_match_retrieval_example():
  seen = []

  def spy(prompts, num_new):
    seen.extend(np.asarray(prompts))
    return constant_generate(prompts, num_new)

  evaluate_retrieval(spy, "passkey", [500], [0.25], 2, seed=3)
  for i, p in enumerate(seen):
    np.testing.assert_array_equal(p, retrieval_example("passkey", 500, 0.25, 3, i).prompt_ids)


def mqar_oracle(inputs):
  out = np.zeros_like(inputs)
  for b, row in enumerate(inputs):
    table, i = {}, 0
    while i + 1 < len(row) and row[i] < 128 <= row[i + 1] and row[i] not in table:
      table[int(row[i])] = int(row[i + 1])
      i += 2
    out[b] = [table.get(int(t), 0) for t in row]
  return out


def test_mqar_oracle_and_constant():
  acc = evaluate_mqar(mqar_oracle, [4, 16], seq_len=128, samples=10, batch_size=4)
  assert acc == {4: 1.0, 16: 1.0}
  acc = evaluate_mqar(lambda x: np.zeros_like(x), [4, 16], seq_len=128, samples=10)
  assert acc == {4: 0.0, 16: 0.0}


def test_needle_positions_and_cache_coverage():
  ex = retrieval_example("passkey", 600, 0.5, seed=0)
  pos = needle_positions(ex)
  assert TOK.decode(ex.prompt_ids[pos]) == ex.key
  positions = np.stack([pos, pos])  # [B=2, K=5]
  full = np.full((2, 2, 8), -1)  # [B, Hkv, lam]
  full[0, 0, :5] = pos  # row 0, head 0 holds every digit; head 1 nothing
  full[1, :, :2] = pos[:2]  # row 1: two digits in both heads
  cov = needle_cache_coverage([full, np.full((2, 2, 8), -1)], positions)
  assert cov.shape == (2, 2, 2)
  np.testing.assert_allclose(cov[0, 0], [1.0, 0.0])
  np.testing.assert_allclose(cov[1, 0], [0.4, 0.4])
  assert (cov[:, 1] == 0).all()


def test_retrieval_cache_coverage_follows_evaluate_retrieval_order():
  """Two prompt batches of one context (depth-major, as evaluate_retrieval builds them): a cache
  holding each prompt's own secret digits covers it fully, one holding the secret of a prompt at
  the other depth does not."""
  depths, samples = (0.2, 0.8), 2
  secrets = [
    needle_positions(retrieval_example("passkey", 700, d, 0, i)) for d in depths for i in range(2)
  ]
  cached = np.full((4, 1, 6), -1)
  for b, pos in enumerate(secrets):
    cached[b, 0, :5] = pos
  batches = [[cached[:3]], [cached[3:]]]  # one layer; batches of 3 and 1 prompts
  cov = retrieval_cache_coverage(batches, "passkey", 700, depths, samples)
  assert cov.shape == (4, 1, 1)
  np.testing.assert_allclose(cov[:, 0, 0], 1.0)
  swapped = [[cached[[2, 3, 0]]], [cached[1:2]]]  # depths exchanged: the secrets lie elsewhere
  assert (retrieval_cache_coverage(swapped, "passkey", 700, depths, samples) < 1).all()
