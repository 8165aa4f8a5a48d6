"""experiments/benchmarks/bench_lola.py (make bench) runs end to end on a small grid (slow).

No timing is asserted (the machine is shared): the rows exist, are finite and positive, the FLOP
model counts what it says, and the report prints every row.
"""

import math

import pytest

from experiments.benchmarks import bench_lola


def test_prefill_flops_grow_with_the_cache():
  # cache 0 has no cache logits and no scoring; every added cached pair adds work per chunk.
  assert bench_lola.prefill_flops(1024, 0) < bench_lola.prefill_flops(1024, 64)
  assert bench_lola.prefill_flops(2048, 64) == pytest.approx(2 * bench_lola.prefill_flops(1024, 64))


@pytest.mark.slow
def test_bench_rows_and_report():
  res = dict(machine="test", jax="x", baseline="", matmul_gflop_per_s=bench_lola.matmul_gflops(256))
  res["prefill"] = bench_lola.bench_prefill(256, [0, 64], repeats=1)
  res["decode"] = [bench_lola.bench_decode(128, 64, steps=8, repeats=1)]
  for r in res["prefill"] + res["decode"]:
    assert all(math.isfinite(v) and v > 0 for k, v in r.items() if isinstance(v, float)), r
  assert [(r["T"], r["cache"]) for r in res["prefill"]] == [(256, 0), (256, 64)]
  text = bench_lola.report(res)
  assert text.count("\n| 256 |") == 2 and "\n| 128 | 64 |" in text


@pytest.mark.slow
def test_decode_profile_parts():
  parts = bench_lola.profile_decode(128, 64, repeats=1)
  assert all(math.isfinite(v) and v >= 0 for v in parts.values())
  step = parts["in-chunk step (attention over cache + window + chunk, read-out, write)"]
  end = parts["chunk-end update per token (/ C)"]
  assert parts["generation-loop token (in-chunk + update / C)"] == pytest.approx(step + end)
