"""experiments/benchmarks/bench_lola.py (make bench) runs end to end on its --quick grid (slow).

Run as a user runs it (a subprocess: the binary defines absl flags that other binaries' tests
define too). No timing is asserted (the machine is shared): the rows exist, are finite and
positive, and the report prints every row.
"""

import json
import math
import subprocess
import sys

import pytest
from cli_helpers import ROOT, run_module


def _bench(*args):
  return run_module("experiments.benchmarks.bench_lola", "--quick", *args, timeout=900).stdout


def _positive(rows):
  return all(math.isfinite(v) and v > 0 for r in rows for v in r.values() if isinstance(v, float))


@pytest.mark.slow
def test_bench_rows_and_report(tmp_path):
  out = tmp_path / "bench.json"
  text = _bench(f"--out={out}")
  res = json.loads(out.read_text())
  assert [(r["T"], r["cache"]) for r in res["prefill"]] == [(1024, 0), (1024, 64)]
  assert [(r["position"], r["cache"]) for r in res["decode"]] == [(1024, 64)]
  assert _positive(res["prefill"]) and _positive(res["decode"]) and res["matmul_gflop_per_s"] > 0
  assert text.count("\n| 1024 |") == 3  # two prefill rows, one decode row


@pytest.mark.slow
def test_profile_writes_prefill_and_decode_parts(tmp_path):
  out = tmp_path / "bench.json"
  _bench("--profile", "--repeats=1", f"--out={out}")
  prof = json.loads((tmp_path / "bench_profile.json").read_text())
  assert set(prof["prefill"]) == {"T=1024 cache=0", "T=1024 cache=64"}
  parts = prof["decode"]["position=1024 cache=64"]
  assert all(math.isfinite(v) and v >= 0 for v in parts.values())
  step = parts["in-chunk step (attention over cache + window + chunk, read-out, write)"]
  end = parts["chunk-end update per token (/ C)"]
  assert parts["generation-loop token (in-chunk + update / C)"] == pytest.approx(step + end)


# XLA's own FLOP count of one chunk's step of the matmul floor (a while body is counted once)
# and the FLOP model's, printed by a child process: the binary defines absl flags that other
# binaries' modules define too, so it is never imported into the test process.
_FLOOR_FLOPS = """
import json
from experiments.benchmarks import bench_lola as b
out = {}
for cache in (0, 64):
  run, args = b.matmul_floor(b.CHUNK, cache)
  cost = run.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  extra = 2 * b.KV_HEADS * b.FEATURES * (b.HEAD_DIM + 1) if cache else 0
  out[cache] = [cost["flops"], b.prefill_flops(b.CHUNK, cache), extra]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_matmul_floor_does_the_counted_flops():
  # Beyond the matmuls the step only adds the absorbed pairs into the state and sums the scores
  # (2 x 8 x 128 x 65 FLOPs at cache 64).
  proc = subprocess.run(
    [sys.executable, "-c", _FLOOR_FLOPS], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  counts = json.loads(proc.stdout.strip().splitlines()[-1])
  for cache, (xla, model, extra) in counts.items():
    assert xla == model + extra, (cache, xla, model, extra)
  assert counts["64"][2] > 0 and counts["0"][2] == 0
