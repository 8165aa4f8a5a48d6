r"""Core LoLA benchmark: prefill throughput, flat decode latency, state bytes, achieved GFLOP/s.

Usage:
  python -m experiments.benchmarks.bench_core                 # full grid (about 10 min on 2 cores)
  python -m experiments.benchmarks.bench_core --preset=small  # a quick look (about 1 min)

Prints markdown tables and writes JSON (--out). Timings are medians of --repeats runs after one
compile-and-warm-up run; ratios are taken within this one run.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lola_jax import LoLAConfig, lola_decode, lola_prefill

_PRESET = flags.DEFINE_enum("preset", "full", ["full", "small"], "Grid size.")
_OUT = flags.DEFINE_string("out", "docs/bench_core.json", "Where to write the JSON results.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per prefill setting (median).")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 128, "Timed decode steps per position.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "dk = dv.")
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 128, "D, the feature-map width.")
_CHUNK = flags.DEFINE_integer("chunk", 64, "Chunk size C.")

BYTES_F32 = 4


def _inputs(t, hq, hkv, d, feat, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(1, t, hq, d)).astype(np.float32)
  k = rng.normal(size=(1, t, hkv, d)).astype(np.float32)
  v = rng.normal(size=(1, t, hkv, d)).astype(np.float32)
  phi_q = np.exp(0.3 * rng.normal(size=(1, t, hq, feat))).astype(np.float32) / feat
  phi_k = np.exp(0.3 * rng.normal(size=(1, t, hkv, feat))).astype(np.float32) / feat
  gate = np.full((hq,), 0.5, np.float32)
  return tuple(jnp.asarray(x) for x in (q, k, v, phi_q, phi_k, gate))


def _timeit(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def prefill_flops(t, c, lam, hq, hkv, dk, dv, feat):
  """FLOPs of the per-chunk matmuls of one prefill (batch 1), as the scan executes them.

  Per chunk: logits and weighted values over [cache; window; chunk] (Hq*C*(L+2C)*(dk+dv)*2),
  the linear read-out (Hq*C*D*(dv+1)*2), the self-recall errors and the absorption of the L+C
  candidates (2 * Hkv*(L+C)*D*(dv+1)*2).
  """
  chunks = -(-t // c)
  attn = hq * c * (lam + 2 * c) * (dk + dv) * 2
  linear = hq * c * feat * (dv + 1) * 2
  update = 2 * hkv * (lam + c) * feat * (dv + 1) * 2
  return chunks * (attn + linear + update)


def matmul_gflops(n=2048, repeats=5):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
  f = jax.jit(lambda x: x @ x)
  sec = _timeit(lambda: f(a), repeats)
  return 2 * n**3 / sec / 1e9


def kv_cache_bytes(t, hkv, dk, dv, bytes_per=BYTES_F32):
  return t * hkv * (dk + dv) * bytes_per


@functools.partial(jax.jit, donate_argnums=(1, 2))  # the KV cache is updated in place
def _softmax_decode(q, k_cache, v_cache, k, v, pos):
  """Full-attention decode: write slot `pos` of a context-sized KV cache, attend to [0, pos]."""
  k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k[:, None], pos, axis=1)
  v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v[:, None], pos, axis=1)
  group = q.shape[1] // k.shape[1]
  qg = q.reshape(q.shape[0], k.shape[1], group, q.shape[-1])
  logits = jnp.einsum("bhgd,bthd->bhgt", qg, k_cache) * q.shape[-1] ** -0.5
  logits = jnp.where(jnp.arange(k_cache.shape[1]) <= pos, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  y = jnp.einsum("bhgt,bthd->bhgd", p, v_cache)
  return y.reshape(q.shape[0], -1, v.shape[-1]), k_cache, v_cache


def bench_prefill(seq_lens, caches, dims, repeats):
  hq, hkv, d, feat, c = dims
  rows = []
  for t in seq_lens:
    inputs = _inputs(t, hq, hkv, d, feat)
    for lam in caches:
      config = LoLAConfig(chunk_size=c, cache_size=lam)
      sec = _timeit(
        lambda config=config, inputs=inputs: lola_prefill(*inputs, config=config), repeats
      )
      flops = prefill_flops(t, c, lam, hq, hkv, d, d, feat)
      _, state = lola_prefill(*inputs, config=config)
      row = dict(
        T=t,
        cache=lam,
        seconds=sec,
        tokens_per_s=t / sec,
        gflops=flops / 1e9,
        gflop_per_s=flops / sec / 1e9,
        state_bytes=state.nbytes(),
        kv_cache_bytes=kv_cache_bytes(t, hkv, d, d),
      )
      rows.append(row)
      print(
        f"  prefill T={t:>6} cache={lam:>4}: {sec * 1e3:9.1f} ms, {t / sec:9.0f} tok/s, "
        f"{row['gflop_per_s']:6.1f} GFLOP/s",
        flush=True,
      )
  return rows


def bench_decode(positions, lam, dims, steps):
  """Median and mean per-token latency of `steps` decode steps starting at each position."""
  hq, hkv, d, feat, c = dims
  config = LoLAConfig(chunk_size=c, cache_size=lam)
  rows = []
  for pos in positions:
    max_pos = pos + steps  # the baseline's KV cache holds exactly this context
    inputs = _inputs(pos + steps, hq, hkv, d, feat, seed=1)
    _, state = lola_prefill(*(x[:, :pos] for x in inputs[:5]), inputs[5], config=config)
    step_inputs = [tuple(x[:, pos + i] for x in inputs[:5]) + (inputs[5],) for i in range(steps)]
    jax.block_until_ready(lola_decode(*step_inputs[0], config=config, state=state))  # compile
    lat = []
    for i in range(steps):
      start = time.perf_counter()
      _, state = jax.block_until_ready(lola_decode(*step_inputs[i], config=config, state=state))
      lat.append(time.perf_counter() - start)
    # Full-attention baseline: the same positions with a KV cache of the full context.
    q, k, v = (x[0] for x in inputs[:3])
    k_cache = jnp.zeros((1, max_pos, hkv, d), jnp.float32).at[:, :pos].set(k[None, :pos])
    v_cache = jnp.zeros((1, max_pos, hkv, d), jnp.float32).at[:, :pos].set(v[None, :pos])
    # Compile and warm up on copies: the real caches are donated step by step below.
    jax.block_until_ready(
      _softmax_decode(q[None, pos], k_cache + 0, v_cache + 0, k[None, pos], v[None, pos], pos)
    )
    full = []
    for i in range(steps):
      p = pos + i
      start = time.perf_counter()
      _, k_cache, v_cache = jax.block_until_ready(
        _softmax_decode(q[None, p], k_cache, v_cache, k[None, p], v[None, p], p)
      )
      full.append(time.perf_counter() - start)
    row = dict(
      position=pos,
      cache=lam,
      lola_median_ms=statistics.median(lat) * 1e3,
      lola_mean_ms=statistics.mean(lat) * 1e3,
      full_median_ms=statistics.median(full) * 1e3,
      full_mean_ms=statistics.mean(full) * 1e3,
      state_bytes=state.nbytes(),
      kv_cache_bytes=kv_cache_bytes(pos, hkv, d, d),
    )
    rows.append(row)
    print(
      f"  decode pos={pos:>6}: LoLA {row['lola_median_ms']:.3f} ms (mean "
      f"{row['lola_mean_ms']:.3f}), full attention {row['full_median_ms']:.3f} ms",
      flush=True,
    )
  return rows


def _table(headers, rows):
  out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
  return "\n".join(out)


def _fmt_bytes(n):
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def report(results):
  pre, dec, mm = results["prefill"], results["decode"], results["matmul_gflop_per_s"]
  lines = [
    f"Machine: {results['machine']}; jax {results['jax']}; one jnp.matmul "
    f"(2048^2 f32): {mm:.1f} GFLOP/s.",
    "",
    "Prefill (batch 1):",
    "",
  ]
  lines.append(
    _table(
      ["T", "cache", "ms", "tokens/s", "GFLOP/s", "% matmul", "state", "full KV cache"],
      [
        [
          r["T"],
          r["cache"],
          f"{r['seconds'] * 1e3:.1f}",
          f"{r['tokens_per_s']:.0f}",
          f"{r['gflop_per_s']:.1f}",
          f"{100 * r['gflop_per_s'] / mm:.0f}%",
          _fmt_bytes(r["state_bytes"]),
          _fmt_bytes(r["kv_cache_bytes"]),
        ]
        for r in pre
      ],
    )
  )
  lines += [
    "",
    "Decode, per token (median / mean over consecutive steps, chunk updates included in the mean):",
    "",
  ]
  lines.append(
    _table(
      [
        "position",
        "LoLA median ms",
        "LoLA mean ms",
        "full attn median ms",
        "full / LoLA",
        "LoLA state",
        "full KV cache",
      ],
      [
        [
          r["position"],
          f"{r['lola_median_ms']:.3f}",
          f"{r['lola_mean_ms']:.3f}",
          f"{r['full_median_ms']:.3f}",
          f"{r['full_median_ms'] / r['lola_median_ms']:.1f}x",
          _fmt_bytes(r["state_bytes"]),
          _fmt_bytes(r["kv_cache_bytes"]),
        ]
        for r in dec
      ],
    )
  )
  lines += ["", "Targets:", ""]
  lines.append(
    _table(
      ["target", "measured", "met"],
      [[n, m, "yes" if ok else "NO"] for n, m, ok in results["targets"]],
    )
  )
  return "\n".join(lines)


def targets(pre, dec, mm):
  out = []
  by = {(r["T"], r["cache"]): r for r in pre}
  caches = sorted({r["cache"] for r in pre})
  if (65536, caches[-1]) in by and (16384, caches[-1]) in by:
    ratio = max(by[(65536, c)]["seconds"] / by[(16384, c)]["seconds"] for c in caches)
    out.append(("prefill 64K/16K time ratio <= 4.4 (worst cache)", f"{ratio:.2f}", ratio <= 4.4))
  if dec:
    first, last = dec[0], dec[-1]
    drift = last["lola_median_ms"] / first["lola_median_ms"] - 1
    out.append(
      (
        f"decode at {last['position']} within 15% of {first['position']}",
        f"{100 * drift:+.1f}%",
        abs(drift) <= 0.15,
      )
    )
    speedup = last["full_median_ms"] / last["lola_median_ms"]
    out.append(
      (
        f"decode at {last['position']} >= 10x faster than full attention",
        f"{speedup:.1f}x",
        speedup >= 10,
      )
    )
  t_big = max(r["T"] for r in pre)
  if caches[0] == 0 and caches[-1] > 0:
    lo, hi = by[(t_big, 0)], by[(t_big, caches[-1])]
    time_ratio, flop_ratio = hi["seconds"] / lo["seconds"], hi["gflops"] / lo["gflops"]
    out.append(
      (
        f"cache {caches[-1]} vs 0 time ratio <= 1.25x FLOP ratio (T={t_big})",
        f"{time_ratio:.2f} vs {flop_ratio:.2f} (x{time_ratio / flop_ratio:.2f})",
        time_ratio <= 1.25 * flop_ratio,
      )
    )
  t16 = 16384 if any(r["T"] == 16384 for r in pre) else t_big
  best = max(r["gflop_per_s"] for r in pre if r["T"] == t16)
  out.append(
    (
      f"prefill GFLOP/s at T={t16} >= 30% of matmul (best cache)",
      f"{100 * best / mm:.0f}%",
      best >= 0.3 * mm,
    )
  )
  return out


def main(argv):
  del argv
  dims = (_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, _FEATURE_DIM.value, _CHUNK.value)
  if _PRESET.value == "small":
    seq_lens, caches, positions = [1024, 4096], [0, 64], [1024, 4096]
  else:
    seq_lens, caches, positions = (
      [1024, 4096, 16384, 65536],
      [0, 64, 256, 512],
      [1024, 16384, 65536],
    )
  print(f"bench_core: preset={_PRESET.value}, devices={jax.devices()}", flush=True)
  mm = matmul_gflops()
  print(f"  one 2048^2 matmul: {mm:.1f} GFLOP/s", flush=True)
  pre = bench_prefill(seq_lens, caches, dims, _REPEATS.value)
  dec = bench_decode(positions, 64, dims, _DECODE_STEPS.value)
  results = dict(
    machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
    f"{jax.devices()[0].platform}",
    jax=jax.__version__,
    preset=_PRESET.value,
    dims=dict(zip(["heads", "kv_heads", "head_dim", "feature_dim", "chunk"], dims, strict=True)),
    matmul_gflop_per_s=mm,
    prefill=pre,
    decode=dec,
  )
  results["targets"] = targets(pre, dec, mm)
  print()
  print(report(results))
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
