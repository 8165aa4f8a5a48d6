"""The layer-by-layer scorer equals the whole-model forward (`model.logits` over the full
sequence, one program): last-token logits, candidate log-likelihoods, perplexity."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from lola_jax import model as model_lib
from lola_jax.core.config import LoLAConfig
from lola_jax.data.subword_retrieval import Prompt
from lola_jax.evaluation import lm_scoring, memory

_BASE = model_lib.ModelConfig(
  vocab_size=40,
  num_layers=3,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  feature_dim=8,
  max_seq_len=256,
  gate_init=1.0,
  lola=LoLAConfig(chunk_size=8, cache_size=4),
)
_KINDS = [
  pytest.param("softmax", "sre", marks=pytest.mark.slow),
  pytest.param("hybrid", "sre", marks=pytest.mark.slow),
  pytest.param("lola", "sre", marks=pytest.mark.slow),
  pytest.param("lola", "sre_below", marks=pytest.mark.slow),  # the layer-wise runner
]


def _model(attention, policy):
  config = _BASE.replace(attention=attention, lola=dataclasses.replace(_BASE.lola, policy=policy))
  return config, model_lib.init_params(config, jax.random.key(0))


def _logp(config, params, tokens):
  logits = np.asarray(model_lib.logits(config, params, tokens[None]), np.float64)[0]
  return (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - (logits.max(-1, keepdims=True))
  )


@pytest.mark.parametrize(("attention", "policy"), _KINDS)
def test_prefill_and_candidates_equal_the_full_forward(attention, policy):
  config, params = _model(attention, policy)
  model = model_lib.bind(config, params)
  rng = np.random.default_rng(1)
  prompt = rng.integers(0, 40, 37).astype(np.int32)  # not a multiple of the segment
  cands = rng.integers(0, 40, (3, 4)).astype(np.int32)
  last, states = lm_scoring.segmented_prefill(model, prompt[None], segment=16, max_len=64)
  ref_last = np.asarray(model_lib.logits(config, params, prompt[None]))[0, -1]
  rel = np.sqrt(np.mean((np.asarray(last[0]) - ref_last) ** 2) / np.mean(ref_last**2))
  assert rel < 1e-5
  got = lm_scoring.candidate_logprobs(model, states, last, cands)
  for j in range(3):
    full = np.concatenate([prompt, cands[j]])
    lp = _logp(config, params, full)
    ref = sum(lp[len(prompt) - 1 + i, cands[j, i]] for i in range(4))
    np.testing.assert_allclose(got[j], ref, rtol=1e-4, atol=1e-4)


def test_perplexity_equals_the_full_forward_and_score_prompt_ranks_the_likeliest():
  config, params = _model("lola", "sre")
  model = model_lib.bind(config, params)
  windows = np.random.default_rng(2).integers(0, 40, (2, 33)).astype(np.int32)
  nll = [-_logp(config, params, w[:-1])[np.arange(32), w[1:]].mean() for w in windows]
  ppl = lm_scoring.perplexity(model, windows, segment=16)
  np.testing.assert_allclose(ppl, np.exp(np.mean(nll)), rtol=1e-4)
  with pytest.raises(ValueError, match="segment"):
    lm_scoring.perplexity(model, windows, segment=12)

  class Tok:
    def decode(self, ids):
      return " ".join(str(i) for i in ids)

  prompt_ids = np.random.default_rng(3).integers(0, 40, 24).astype(np.int32)
  cands = np.asarray([[5, 6], [7, 8], [9, 10]], np.int32)
  score = lm_scoring.score_prompt(
    model, Tok(), Prompt("passkey", prompt_ids, "56", 0.5, 0, 1, cands), segment=16, max_new=3
  )
  lp = [
    sum(_logp(config, params, np.concatenate([prompt_ids, c]))[23 + i, c[i]] for i in range(2))
    for c in cands
  ]
  assert score.forced == (int(np.argmax(lp)) == 0)
  np.testing.assert_allclose(score.margin, lp[0] - max(lp[1:]), rtol=1e-4, atol=1e-4)


def test_decode_step_equals_the_full_forward():
  """The single-call program `decode_latency` times gives the full forward's next-token logits."""
  config, params = _model("lola", "sre")
  model = model_lib.bind(config, params)
  prompt = np.random.default_rng(4).integers(0, 40, 32).astype(np.int32)
  last, states = lm_scoring.segmented_prefill(model, prompt[None], segment=16, max_len=64)
  token = np.asarray(np.argmax(last, axis=-1), np.int32)
  logits, _ = lm_scoring._decode_step(config, params, token, states)
  ref = np.asarray(model_lib.logits(config, params, np.append(prompt, token)[None]))[0, -1]
  rel = np.sqrt(np.mean((np.asarray(logits[0]) - ref) ** 2) / np.mean(ref**2))
  assert rel < 1e-5


@pytest.mark.slow
def test_decode_latency_reports_both_timings_and_the_state_bytes():
  config, params = _model("lola", "sre")
  r = lm_scoring.decode_latency(model_lib.bind(config, params), 32, steps=2, segment=16)
  assert r["ms_per_token"] > 0 and r["single_call_ms"] > 0 and r["prefill_s"] > 0
  assert r["state_bytes"] == memory.model_state_bytes(config, 32)
  with pytest.raises(ValueError, match=r"tokens must be int \[context=32\], got shape \(31,\)"):
    lm_scoring.decode_latency(model_lib.bind(config, params), 32, tokens=np.zeros(31, np.int32))
