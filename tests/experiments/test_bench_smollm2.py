"""experiments/benchmarks/bench_smollm2.py runs end to end on the real SmolLM2 (slow).

As a user runs it (a subprocess: the binary defines absl flags). No timing is asserted: the rows
exist and are finite and positive, the llama.cpp row is skipped with a message when
llama-cpp-python is absent (it is optional), and a second run keeps the first run's rows.
"""

import importlib.util
import json
import math

import pytest
from cli_helpers import run_module


def _bench(*args):
  return run_module("experiments.benchmarks.bench_smollm2", *args, timeout=900).stdout


@pytest.mark.slow
def test_bench_smollm2_rows_and_merge(tmp_path):
  out = tmp_path / "bench.json"
  common = ("--contexts=512", "--steps=2", "--matvec=false", f"--out={out}")
  text = _bench("--rows=lola64,llama.cpp", *common)
  res = json.loads(out.read_text())
  rows = {r["row"]: r for r in res["results"]}
  lola = rows["lola64"]
  assert lola["context"] == 512 and lola["state_bytes"] > 0
  for key in ("prefill_tokens_per_s", "decode_ms_per_token", "decode_single_call_ms"):
    assert math.isfinite(lola[key]) and lola[key] > 0
  has_llama = importlib.util.find_spec("llama_cpp") is not None
  assert ("llama.cpp" in rows) == has_llama
  assert ("llama-cpp-python is not installed" in text) == (not has_llama)
  assert "| lola64 | 512 |" in text

  _bench("--rows=", *common)  # measures nothing: the file keeps its rows
  assert json.loads(out.read_text())["results"] == res["results"]
