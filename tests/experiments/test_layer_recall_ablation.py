"""Smoke test of the layer-level policy ablation script (slow: compiles every policy)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_module


@pytest.mark.slow
def test_layer_recall_ablation_runs(tmp_path):
  out = tmp_path / "layer_recall.json"
  proc = run_module(
    "experiments.ablations.layer_recall",
    "--contexts=256",
    "--trials=1",
    "--needles=2",
    f"--out={out}",
  )
  rows = json.loads(out.read_text())
  by_policy = {r["policy"]: r for r in rows}
  assert by_policy["hybrid (cache 0)"]["needles_cached"] == 0.0
  assert by_policy["sre 16"]["mean_cache_occupancy"] <= 16
  assert by_policy["energy_global budget 32 (max 64/head)"]["mean_cache_occupancy"] <= 16
  assert "| policy |" in proc.stdout
