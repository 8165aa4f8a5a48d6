"""Benchmark of causal linear attention: per-token scan, quadratic, XLA chunked and Pallas.

Times forward and forward+backward (grad of sum(y)) for B=2, 8 heads, T in --seq_lens and head
dims in --head_dims (D = dv = head dim), prints a markdown table and writes JSON.

  python -m experiments.benchmarks.bench_kernels --seq_lens=1024,4096,16384 --head_dims=64,128

FLOPs counted (per head and batch row, chunk C, D = dv = d): the chunked algorithm's useful work
4*T*C*d (intra-chunk scores and mix) + 6*T*d^2 (read-out, state update) for the forward, and 2x
that again for the backward; the same count is used for every method so TFLOP/s compare
throughput on one workload. Pallas runs only where it compiles natively (TPU/GPU).

--suite=lola times the fused LoLA chunk step instead: `lola_jax.lola_prefill` (inference, sparse
cache of --cache_size pairs, forward only) with implementation "xla" and, on TPU/GPU, "pallas"
(`pallas_kernels.lola_chunk`, one kernel per chunk; Pallas interpret mode on CPU says nothing
about speed, so it is skipped there). FLOPs per chunk, kv head and batch row (G query heads per
kv head, Nk = L + 2C keys, L + C candidates): 2*G*C*Nk*(dk + dv) softmax + 2*G*C*D*dv read-out +
4*(L + C)*D*dv self-recall errors and absorption, with dk = dv = D = head dim.

  python -m experiments.benchmarks.bench_kernels --suite=lola --seq_lens=4096 --head_dims=64
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from lola_jax import LoLAConfig, lola_prefill
from pallas_kernels import linear_attention
from pallas_kernels.linear.xla import (
  linear_attention_chunked,
  linear_attention_quadratic,
  linear_attention_scan,
)

PEAK_TFLOPS = {"cpu": None, "gpu": 989.0, "tpu": None}  # H200 dense bf16 ~989 TFLOP/s


def methods(chunk):
  out = {
    "scan": lambda q, k, v: linear_attention_scan(q, k, v)[0],
    "quadratic": lambda q, k, v: linear_attention_quadratic(q, k, v)[0],
    "xla_chunked": lambda q, k, v: linear_attention_chunked(q, k, v, chunk_size=chunk)[0],
  }
  if jax.default_backend() in ("gpu", "tpu"):
    out["pallas"] = lambda q, k, v: linear_attention(
      q, k, v, chunk_size=chunk, implementation="pallas"
    )[0]
  return out


def timeit(fn, args, iters):
  jax.block_until_ready(fn(*args))  # compile + warm up
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def flops(b, h, t, d, chunk):
  return b * h * (4 * t * min(chunk, t) * d + 6 * t * d * d)


def run(seq_lens, head_dims, batch, heads, chunk, iters, max_quadratic, max_scan, dtype):
  rows = []
  for d in head_dims:
    for t in seq_lens:
      ks = jax.random.split(jax.random.PRNGKey(0), 3)
      q = jax.nn.softplus(jax.random.normal(ks[0], (batch, t, heads, d))).astype(dtype)
      k = jax.nn.softplus(jax.random.normal(ks[1], (batch, t, heads, d))).astype(dtype)
      v = jax.random.normal(ks[2], (batch, t, heads, d)).astype(dtype)
      for name, fn in methods(chunk).items():
        if (name == "quadratic" and t > max_quadratic) or (name == "scan" and t > max_scan):
          continue
        fwd = jax.jit(fn)
        fwd_bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
        f = flops(batch, heads, t, d, chunk)
        for mode, g, mult in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
          sec = timeit(g, (q, k, v), iters)
          rows.append(
            dict(method=name, mode=mode, T=t, head_dim=d, seconds=sec,
                 tokens_per_s=batch * t / sec, tflops=mult * f / sec / 1e12)
          )  # fmt: skip
          print(rows[-1], flush=True)
  return rows


def lola_flops(b, hkv, group, t, d, chunk, cache):
  n_chunks = -(-t // chunk)
  nk, cand = cache + 2 * chunk, cache + chunk
  per_chunk = 2 * group * chunk * nk * 2 * d + 2 * group * chunk * d * d + 4 * cand * d * d
  return b * hkv * n_chunks * per_chunk


def run_lola(seq_lens, head_dims, batch, heads, kv_heads, chunk, cache, iters, dtype, impls=None):
  """lola_prefill forward, implementation "xla" (and "pallas" on TPU/GPU), policy sre."""
  if impls is None:
    impls = ["xla"] + (["pallas"] if jax.default_backend() in ("gpu", "tpu") else [])
  rows = []
  for d in head_dims:
    for t in seq_lens:
      ks = jax.random.split(jax.random.PRNGKey(0), 6)
      q = jax.random.normal(ks[0], (batch, t, heads, d)).astype(dtype)
      k = jax.random.normal(ks[1], (batch, t, kv_heads, d)).astype(dtype)
      v = jax.random.normal(ks[2], (batch, t, kv_heads, d)).astype(dtype)
      phi_q = jax.nn.softplus(jax.random.normal(ks[3], (batch, t, heads, d))).astype(dtype)
      phi_k = jax.nn.softplus(jax.random.normal(ks[4], (batch, t, kv_heads, d))).astype(dtype)
      gate = jax.nn.sigmoid(jax.random.normal(ks[5], (heads,)))
      f = lola_flops(batch, kv_heads, heads // kv_heads, t, d, chunk, cache)
      for impl in impls:
        config = LoLAConfig(chunk_size=chunk, cache_size=cache, implementation=impl)
        fn = jax.jit(lambda *xs, config=config: lola_prefill(*xs, config=config)[0])
        sec = timeit(fn, (q, k, v, phi_q, phi_k, gate), iters)
        rows.append(
          dict(method=f"lola_prefill[{impl}] L={cache}", mode="fwd", T=t, head_dim=d,
               seconds=sec, tokens_per_s=batch * t / sec, tflops=f / sec / 1e12)
        )  # fmt: skip
        print(rows[-1], flush=True)
  return rows


def table(rows, peak):
  lines = [
    "| method | mode | T | head dim | time (ms) | tokens/s | TFLOP/s |"
    + (" % peak |" if peak else ""),
    "|---|---|---|---|---|---|---|" + ("---|" if peak else ""),
  ]
  for r in rows:
    line = (
      f"| {r['method']} | {r['mode']} | {r['T']} | {r['head_dim']} | {r['seconds'] * 1e3:.1f} "
      f"| {r['tokens_per_s']:.3g} | {r['tflops']:.4f} |"
    )
    lines.append(line + (f" {100 * r['tflops'] / peak:.1f} |" if peak else ""))
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--suite", default="linear", choices=["linear", "lola"])
  p.add_argument("--seq_lens", default="1024,4096,16384")
  p.add_argument("--head_dims", default="64,128")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=8, help="--suite=lola: kv heads (GQA)")
  p.add_argument("--cache_size", type=int, default=64, help="--suite=lola: sparse cache L")
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--max_quadratic", type=int, default=4096, help="skip quadratic above this T")
  p.add_argument("--max_scan", type=int, default=16384, help="skip the per-token scan above this")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--out", default="bench_kernels.json")
  a = p.parse_args()
  seq_lens = [int(x) for x in a.seq_lens.split(",")]
  head_dims = [int(x) for x in a.head_dims.split(",")]
  if a.suite == "lola":
    rows = run_lola(
      seq_lens, head_dims, a.batch, a.heads, a.kv_heads, a.chunk, a.cache_size, a.iters,
      jnp.dtype(a.dtype),
    )  # fmt: skip
  else:
    rows = run(
      seq_lens, head_dims, a.batch, a.heads, a.chunk, a.iters, a.max_quadratic, a.max_scan,
      jnp.dtype(a.dtype),
    )  # fmt: skip
  backend = jax.default_backend()
  peak = PEAK_TFLOPS.get(backend)
  md = table(rows, peak)
  print(md)
  meta = dict(
    backend=backend, devices=[str(x) for x in jax.devices()], jax=jax.__version__,
    machine=platform.platform(), processor=platform.processor(), args=vars(a),
  )  # fmt: skip
  with open(a.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows, markdown=md), f, indent=1)


if __name__ == "__main__":
  main()
