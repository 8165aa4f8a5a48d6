"""Kernel benchmark: linear attention, the hybrid and the fused LoLA prefill, Pallas vs XLA.

For each suite, T in --seq_lens and head dim in --head_dims (dk = dv = D = head dim), B=--batch,
--heads query heads over --kv_heads kv heads, times the forward and (linear, hybrid) forward +
backward (grad of sum(y)) of:

  xla      the XLA form: linear -> the chunked `lax.scan`
           (`linear_attention(implementation="xla")`), hybrid -> the chunk-parallel XLA form,
           lola -> `lola_prefill(implementation="xla")`
  pallas   the local backend's Pallas kernels (`implementation="pallas"`: Triton on GPU, Mosaic
           on TPU); skipped on CPU, where Pallas only interprets

with the compile time of each jitted function (lower + compile) next to its steady-state time
(median of --iters calls). TFLOP/s use one FLOP count per workload (below) for every method, and
"% peak" divides by the bf16 matmul throughput measured in the same run (a --peak_n cube matmul,
`measure_peak`), so the numbers compare throughput on one machine rather than claim absolute
efficiency.

FLOPs per batch row and query head (chunk C, head dim d, counted on the chunked algorithm):
  linear  forward 4*T*C*d (intra-chunk scores and mix) + 6*T*d^2 (read-out, state update)
  hybrid  forward 8*T*C*d (window of 2C keys: logits and mix) + 4*T*d^2 (read-out, absorption)
  lola    forward per chunk and kv head: 2*G*C*Nk*2d (softmax over Nk = L + 2C keys, G query
          heads) + 2*G*C*d^2 (read-out) + 4*(L + C)*d^2 (self-recall errors, absorption)
and fwd+bwd = 3x the forward.

  python -m experiments.benchmarks.bench_kernels --suites=linear,hybrid,lola \\
      --seq_lens=4096,16384,65536 --head_dims=64,128 --dtype=bfloat16 --out=bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from lola_jax import LoLAConfig, lola_prefill
from pallas_kernels import hybrid_attention, linear_attention

SUITES = ("linear", "hybrid", "lola")


def methods(requested: str = ""):
  """The implementations timed: --methods if given (e.g. "xla,pallas" on CPU runs the kernels
  interpreted: a smoke test, not a timing), else XLA everywhere and Pallas where it compiles
  natively."""
  if requested:
    return requested.split(",")
  return ["xla"] + (["pallas"] if jax.default_backend() in ("gpu", "tpu") else [])


def measure_peak(n: int, dtype, iters: int = 5) -> float:
  """bf16 (dtype) matmul TFLOP/s of an n x n x n product: the device's attainable peak."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, a))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / min(times) / 1e12


def time_fn(fn, args, iters: int):
  """(compile seconds, median seconds per call) of jax.jit(fn) on args."""
  jitted = jax.jit(fn)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # warm up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times)


def inputs(suite, b, t, hq, hkv, d, dtype):
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  feat = lambda k, h: jax.nn.softplus(jax.random.normal(k, (b, t, h, d))).astype(dtype)
  if suite == "linear":
    return (feat(ks[0], hq), feat(ks[1], hkv), jax.random.normal(ks[2], (b, t, hkv, d), dtype))
  q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
  k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
  v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
  return (q, k, v, feat(ks[3], hq), feat(ks[4], hkv), jax.random.normal(ks[5], (hq,)))


def forward(suite, impl, chunk, cache):
  """y = f(*inputs) of one suite and implementation."""
  if suite == "linear":
    return lambda q, k, v: linear_attention(q, k, v, chunk_size=chunk, implementation=impl)[0]
  if suite == "hybrid":
    return lambda q, k, v, pq, pk, x: hybrid_attention(
      q, k, v, pq, pk, gate_logit=x, chunk_size=chunk, implementation=impl
    )
  config = LoLAConfig(chunk_size=chunk, cache_size=cache, implementation=impl)
  return lambda q, k, v, pq, pk, x: lola_prefill(q, k, v, pq, pk, jax.nn.sigmoid(x), config=config)[
    0
  ]


def flops(suite, b, t, hq, hkv, d, chunk, cache):
  c = min(chunk, t)
  if suite == "linear":
    return b * hq * (4 * t * c * d + 6 * t * d * d)
  if suite == "hybrid":
    return b * hq * (8 * t * c * d + 4 * t * d * d)
  group, n = hq // hkv, -(-t // chunk)
  nk, cand = cache + 2 * chunk, cache + chunk
  per_chunk = 2 * group * chunk * nk * 2 * d + 2 * group * chunk * d * d + 4 * cand * d * d
  return b * hkv * n * per_chunk


def run(suites, seq_lens, head_dims, batch, heads, kv_heads, chunk, cache, iters, dtype, peak,
        impls=""):  # fmt: skip
  rows = []
  for suite in suites:
    for d in head_dims:
      for t in seq_lens:
        args = inputs(suite, batch, t, heads, kv_heads, d, dtype)
        f = flops(suite, batch, t, heads, kv_heads, d, chunk, cache)
        for impl in methods(impls):
          fwd = forward(suite, impl, chunk, cache)
          modes = [("fwd", fwd, 1)]
          if suite != "lola":  # the LoLA prefill is inference (selection is discrete)
            loss = lambda *xs, fwd=fwd: jnp.sum(fwd(*xs).astype(jnp.float32))
            grad = jax.grad(loss, argnums=tuple(range(len(args) - (suite == "hybrid"))))
            modes.append(("fwd+bwd", grad, 3))
          for mode, fn, mult in modes:
            try:
              compile_s, sec = time_fn(fn, args, iters)
            except Exception as e:  # a failed compile is a result too: report it, go on
              print(f"{suite} {impl} {mode} T={t} d={d}: {type(e).__name__}: {e}"[:400])
              continue
            tflops = mult * f / sec / 1e12
            rows.append(
              dict(suite=suite, method=impl, mode=mode, T=t, head_dim=d, seconds=sec,
                   compile_seconds=compile_s, tokens_per_s=batch * t / sec, tflops=tflops,
                   peak_fraction=tflops / peak if peak else None)
            )  # fmt: skip
            print(rows[-1], flush=True)
  return rows


def speedups(rows):
  """pallas time / xla time per (suite, mode, T, head dim): < 1 means Pallas is faster."""
  by = {(r["suite"], r["mode"], r["T"], r["head_dim"], r["method"]): r["seconds"] for r in rows}
  out = {}
  for (s, m, t, d, impl), sec in by.items():
    if impl == "pallas" and (s, m, t, d, "xla") in by:
      out[f"{s}/{m}/T={t}/d={d}"] = sec / by[(s, m, t, d, "xla")]
  return out


def table(rows, peak):
  head = "| suite | method | mode | T | head dim | time (ms) | compile (s) | tokens/s | TFLOP/s |"
  lines = [head + " % peak |", "|---" * 10 + "|"]
  for r in rows:
    frac = f"{100 * r['peak_fraction']:.1f}" if r["peak_fraction"] else "-"
    lines.append(
      f"| {r['suite']} | {r['method']} | {r['mode']} | {r['T']} | {r['head_dim']} "
      f"| {r['seconds'] * 1e3:.2f} | {r['compile_seconds']:.1f} | {r['tokens_per_s']:.3g} "
      f"| {r['tflops']:.2f} | {frac} |"
    )
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--suites", default="linear,hybrid,lola")
  p.add_argument("--seq_lens", default="4096,16384,65536")
  p.add_argument("--head_dims", default="64,128")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--cache_size", type=int, default=64, help="lola suite: sparse cache L")
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--peak_n", type=int, default=8192, help="matmul size of the peak measurement")
  p.add_argument("--methods", default="", help="e.g. xla,pallas (default: per backend)")
  p.add_argument("--out", default="bench_kernels.json")
  a = p.parse_args()
  suites = [s for s in a.suites.split(",") if s]
  for s in suites:
    if s not in SUITES:
      raise ValueError(f"--suites: {s!r} is not one of {SUITES}")
  dtype = jnp.dtype(a.dtype)
  peak = measure_peak(a.peak_n, jnp.bfloat16)
  print(f"bf16 matmul peak ({a.peak_n}^3): {peak:.1f} TFLOP/s", flush=True)
  rows = run(
    suites, [int(x) for x in a.seq_lens.split(",")], [int(x) for x in a.head_dims.split(",")],
    a.batch, a.heads, a.kv_heads, a.chunk, a.cache_size, a.iters, dtype, peak, a.methods,
  )  # fmt: skip
  md = table(rows, peak)
  print(md)
  ratios = speedups(rows)
  for key, ratio in ratios.items():
    print(f"pallas/xla time {key}: {ratio:.2f}")
  meta = dict(
    backend=jax.default_backend(), devices=[str(x) for x in jax.devices()], jax=jax.__version__,
    machine=platform.platform(), args=vars(a), bf16_matmul_peak_tflops=peak,
  )  # fmt: skip
  with open(a.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows, pallas_over_xla=ratios, markdown=md), f, indent=1)


if __name__ == "__main__":
  main()
