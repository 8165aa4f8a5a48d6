"""Tiny run of the model-level cache-policy ablation (slow: compiles a few LoLA models)."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARAMS = os.path.join(ROOT, "experiments", "recall", "params")
CHUNK = 64
KEYS = {
  "policy",
  "energy_tau",
  "cache_size",
  "cache_budget",
  "task",
  "context",
  "accuracy",
  "mean_occupancy",
  "occupancy_per_head",
  "label",
}


@nnx.jit
def _one_prefill(model, tokens):
  logits, states = model.prefill(tokens)
  return logits, states


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


@pytest.mark.slow
def test_cache_policy_ablation_tiny(tmp_path):
  from experiments.ablations import cache_policies as cp
  from experiments.recall import nets
  from lola_jax.core.config import LoLAConfig
  from lola_jax.core.state import cached_positions
  from lola_jax.data import retrieval_example

  config, hybrid = nets.load_hybrid(PARAMS)
  setting = cp.Setting(**cp.QUICK)
  assert setting.context == 256 and setting.segment == CHUNK

  # Segmented prefill == one prefill, and the occupancy of a fixed sre cache of 8 slots after
  # every segment equals min(8, tokens that left the window). The window is the previous
  # complete chunk plus the current one, so after t tokens the pairs older than
  # (t // C - 1) * C have left it (to the cache or the linear state).
  tokens = jnp.asarray(retrieval_example("passkey", 256, 0.5, 0, 0).prompt_ids[None])
  for lola in (
    LoLAConfig(chunk_size=CHUNK, cache_size=8, policy="sre"),
    LoLAConfig(chunk_size=CHUNK, cache_size=64, policy="energy", energy_tau=0.9),
    LoLAConfig(chunk_size=CHUNK, cache_size=64, policy="attention"),
  ):
    model = hybrid.with_lola_config(attention="lola", lola=lola)
    full, full_states = _one_prefill(model, tokens)
    seg, states, occ = cp.segmented_prefill(model, tokens, CHUNK)
    assert seg.shape == full.shape
    assert _rel_rms(seg, full) <= 1e-4, lola.policy
    assert occ.shape == (256 // CHUNK, 1, config.num_layers, config.num_kv_heads)
    assert (occ <= lola.cache_size).all() and (occ >= 0).all()
    for st, full_st in zip(states, full_states, strict=True):
      np.testing.assert_array_equal(cached_positions(st), cached_positions(full_st))
    if lola.policy == "sre":
      for i in range(occ.shape[0]):
        t = (i + 1) * CHUNK
        left = max(0, (t // CHUNK - 1) * CHUNK)
        assert (occ[i] == min(8, left)).all(), (t, occ[i])
      for st in states:
        pos = np.asarray(cached_positions(st))[0]  # [Hkv, 8]
        assert ((pos >= 0) & (pos < 256 - CHUNK)).all()
        assert all(len(set(p)) == len(p) for p in pos.tolist())

  policies = cp.quick_rows(cp.policy_rows(config.num_kv_heads, CHUNK))
  assert {cfg.policy for _, cfg in policies} == {"sre", "energy", "energy_global"}
  rows = cp.run_ablation(hybrid, policies, setting, log=lambda s: None)
  assert len(rows) == len(policies) * (len(setting.tasks) - 1 + len(setting.mqar_pairs))
  for r in rows:
    assert KEYS <= set(r), sorted(KEYS - set(r))
    assert 0.0 <= r["accuracy"] <= 1.0
    assert 0.0 <= r["mean_occupancy"] <= r["cache_size"]
    per_head = np.asarray(r["occupancy_per_head"])
    assert per_head.shape == (config.num_layers, config.num_kv_heads)
    assert (per_head <= r["cache_size"]).all()
    final = np.asarray(r["final_occupancy"])  # [prompts, layers, heads]
    assert (final <= r["cache_size"]).all()
    assert r["context"] == (setting.mqar_seq_len if r["task"] == "mqar" else setting.context)
    if r["policy"] == "energy_global":
      assert r["cache_budget"] == 32 * config.num_kv_heads
      assert (final.sum(-1) <= r["cache_budget"]).all()
    if r["policy"] == "sre" and r["task"] == "passkey":
      # 4 segment ends: 0, 8, 8, 8 slots.
      assert r["occupancy_over_time"] == [0.0, 8.0, 8.0, 8.0]
  json.dumps(rows)
  table = cp.markdown_table(rows)
  assert table.count("\n") == len(policies) + 1 and "| policy |" in table
  pareto = cp.plot_pareto(rows, str(tmp_path / "pareto.png"))
  hist = cp.plot_occupancy_hist(rows, str(tmp_path / "hist.png"))
  assert os.path.getsize(pareto) > 1000 and os.path.getsize(hist) > 1000
