"""The layer_budgets ablation script end to end at toy size (slow).

The script's module is not imported here: its flags share names with the other ablation binaries,
which the same test process may import; it runs in a subprocess.
"""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_module


@pytest.mark.slow
def test_layer_budgets_script_runs(tmp_path):
  out = tmp_path / "layer_budgets.json"
  proc = run_module(
    "experiments.ablations.layer_budgets",
    "--contexts=512",
    "--depths=0.5",
    "--samples=1",
    "--budgets=0:0,all:all",
    "--probe_context=512",
    "--probe_prompts=1",
    "--betas=20",
    f"--out={out}",
  )
  result = json.loads(out.read_text())
  by_budget = {r["budget"]: r for r in result["budgets"]}
  assert by_budget["0:0"]["secret_in_cache_per_layer"] == [0.0, 0.0]
  assert by_budget["all:all"]["secret_in_cache_per_layer"] == [1.0, 1.0]
  assert by_budget["0:0"]["state_bytes"] < by_budget["all:all"]["state_bytes"]
  assert {r["memory"] for r in result["probe"]} == {
    "phi_k (spec sre)",
    "kernel(key)",
    "kernel(residual)",
  }
  assert "| layer caches |" in proc.stdout
