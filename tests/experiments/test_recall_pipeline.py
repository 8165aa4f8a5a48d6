"""End-to-end smoke test of the recall pipeline at toy size (`make test-slow`, a few minutes)."""

import json

import pytest
from cli_helpers import run_module

KEYS = {
  "method",
  "window",
  "cache_size",
  "policy",
  "context",
  "task",
  "accuracy",
  "state_bytes",
  "full_kv_bytes",
}


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
  workdir = tmp_path / "tiny"
  proc = run_module(
    "experiments.recall.pipeline", "--preset=tiny", f"--workdir={workdir}", timeout=1200
  )
  assert "Pass-key exact-match accuracy" in proc.stdout
  rows = json.load(open(workdir / "results.json"))
  assert rows and all(KEYS <= set(r) for r in rows)
  assert {r["method"] for r in rows} == {"teacher", "hybrid", "hybrid_wide", "lola"}
  assert {r["task"] for r in rows} == {"passkey", "niah", "mqar"}
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
  for r in rows:
    if r["method"] == "teacher":
      assert r["state_bytes"] == r["full_kv_bytes"]
    else:
      assert r["state_bytes"] > 0
  lola = [r for r in rows if r["method"] == "lola" and r["task"] == "passkey"]
  assert {(r["cache_size"], r["policy"]) for r in lola} >= {
    (16, "sre"),
    (64, "sre"),
    (64, "recency"),
  }
  cells = json.load(open(workdir / "cells.json"))
  assert cells and {"depth", "context", "accuracy", "label"} <= set(cells[0])
  for name in (
    "accuracy_vs_context.png",
    "accuracy_vs_bytes.png",
    "heatmap_passkey.png",
    "mqar_vs_pairs.png",
  ):
    assert (workdir / "figures" / name).stat().st_size > 1000
  assert "passkey" in (workdir / "report.md").read_text()
