"""Generation benchmark: process peak memory vs tokens generated, and decode speed / memory of a
1B-shaped model, LoLA vs full-KV softmax, at several context lengths.

  python -m experiments.benchmarks.bench_generate                      # both tables
  python -m experiments.benchmarks.bench_generate --lengths=10000,100000,1000000 --layers=16

Every measurement runs in its own subprocess and reports that process's RSS high-water mark
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`): XLA allocates outside Python's allocator, so
tracemalloc would see nothing.

Table 1 (flatness): a tiny LoLA model (1 layer, E=64) generates N tokens after an 8-token prompt
with `lola_jax.generate` (jitted blocks of 1000 tokens); peak RSS and decode state bytes per N.

Table 2 (decode at context S): Llama-3.2-1B layer shapes (E=2048, 32 query / 8 kv heads of 64,
MLP 8192, vocab 32000) with random weights and `--layers` of its 16 layers (CPU memory and time:
state bytes and per-token time scale linearly in layers). The decode state is built as if S
tokens had been read (KV cache of S + steps slots for softmax; the fixed LoLA state for lola),
without running a prefill of S tokens, then `--steps` decode steps are timed after a warm-up.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lola_jax import generate as gen
from lola_jax import model
from lola_jax.core.config import LoLAConfig

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["10000", "100000"], "Generated tokens for the flatness table.")
flags.DEFINE_list("contexts", ["4096", "32768", "131072"], "Contexts S for the decode table.")
flags.DEFINE_integer("layers", 2, "Decoder layers of the 1B-shaped model (the 1B has 16).")
flags.DEFINE_integer("steps", 16, "Timed decode steps per context.")
flags.DEFINE_integer("chunk_size", 64, "LoLA chunk size.")
flags.DEFINE_integer("cache_size", 64, "LoLA sparse-cache size.")
flags.DEFINE_string("child", None, "Internal: JSON job for a subprocess.")


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _flatness(n: int) -> dict:
  cfg = model.ModelConfig(
    vocab_size=256,
    num_layers=1,
    d_model=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    attention="lola",
    feature_dim=16,
    lola=LoLAConfig(chunk_size=64, cache_size=64),
  )
  params = model.init_params(cfg, jax.random.key(0))
  prompt = np.arange(1, 9, dtype=np.int32)[None]
  sampling = gen.Sampling(1.0, 0, 0.95)
  gen.generate(cfg, params, prompt, max_new_tokens=8, block_size=1000, sampling=sampling)  # compile
  rss_compiled = _peak_rss_mib()
  t0 = time.perf_counter()
  out = gen.generate(cfg, params, prompt, max_new_tokens=n, block_size=1000, sampling=sampling)
  dt = time.perf_counter() - t0
  return {
    "tokens": n,
    "seconds": dt,
    "tokens_per_s": n / dt,
    "state_bytes": gen.state_bytes(out.states),
    "rss_after_compile_mib": rss_compiled,
    "peak_rss_mib": _peak_rss_mib(),
    "num_tokens": int(out.states[0].num_tokens[0]),
  }


def _decode(kind: str, context: int, layers: int, steps: int, chunk: int, cache: int) -> dict:
  cfg = model.ModelConfig(
    vocab_size=32000,
    num_layers=layers,
    d_model=2048,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    attention=kind,
    feature_dim=64,
    tie_embeddings=True,
    scale_embeddings=False,
    rope_theta=500_000.0,
    lola=LoLAConfig(chunk_size=chunk, cache_size=cache),
  )
  params = model.init_params(cfg, jax.random.key(0))
  lm = model.bind(cfg, params)
  states = lm.init_states(1, max_len=context + 2 * steps + 1)

  def at_context(st):
    return dataclasses.replace(st, num_tokens=jnp.full_like(st.num_tokens, context))

  # Fresh buffers (init_kv_cache shares one zeros array between k and v; the loop donates them).
  states = jax.tree.map(jnp.copy, tuple(at_context(s) for s in states))
  nbytes = gen.state_bytes(states)
  logits = jnp.zeros((1, cfg.vocab_size), jnp.float32)
  done = jnp.zeros((1,), bool)
  count = jnp.zeros((1,), jnp.int32)
  keys = jax.random.split(jax.random.key(0), 1)
  stops = jnp.asarray([-1], jnp.int32)

  def run(states, logits, count):
    out = gen.decode_block(
      cfg,
      params,
      states,
      logits,
      done,
      count,
      keys,
      jnp.int32(steps),
      stops,
      jnp.int32(0),
      sampling=gen.Sampling(),
      block_size=steps,
    )
    jax.block_until_ready(out)
    return out

  _, states, logits, _, count, _ = run(states, logits, count)  # compile + warm-up
  t0 = time.perf_counter()
  run(states, logits, count)
  dt = time.perf_counter() - t0
  return {
    "kind": kind,
    "context": context,
    "layers": layers,
    "state_bytes": nbytes,
    "tokens_per_s": steps / dt,
    "ms_per_token": 1000 * dt / steps,
    "peak_rss_mib": _peak_rss_mib(),
  }


def _spawn(job: dict) -> dict:
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.benchmarks.bench_generate", f"--child={json.dumps(job)}"],
    capture_output=True,
    text=True,
  )
  if proc.returncode:
    return {"error": proc.stderr[-500:], **job}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.child:
    job = json.loads(FLAGS.child)
    res = _flatness(job["n"]) if job["what"] == "flat" else _decode(**job["args"])
    print(json.dumps(res), flush=True)
    return
  print("## Peak memory vs generated tokens (tiny LoLA, 1 layer, C=64, lambda=64)\n")
  print(
    "| generated tokens | decode state bytes | peak RSS (MiB) | RSS after compile (MiB) | tok/s |"
  )
  print("|---:|---:|---:|---:|---:|")
  for n in FLAGS.lengths:
    r = _spawn({"what": "flat", "n": int(n)})
    if "error" in r:
      print(f"| {n} | error: {r['error'][-200:]!r} |")
      continue
    print(
      f"| {r['tokens']:,} | {r['state_bytes']:,} | {r['peak_rss_mib']:.0f} | "
      f"{r['rss_after_compile_mib']:.0f} | {r['tokens_per_s']:.0f} |",
      flush=True,
    )
  print(
    f"\n## Decode at context S: 1B-shaped, {FLAGS.layers} of 16 layers, random weights "
    f"(LoLA C={FLAGS.chunk_size}, lambda={FLAGS.cache_size})\n"
  )
  print("| kind | context S | decode state (MiB) | tok/s | ms/token | peak RSS (MiB) |")
  print("|---|---:|---:|---:|---:|---:|")
  for s in FLAGS.contexts:
    for kind in ("lola", "softmax"):
      args = dict(
        kind=kind,
        context=int(s),
        layers=FLAGS.layers,
        steps=FLAGS.steps,
        chunk=FLAGS.chunk_size,
        cache=FLAGS.cache_size,
      )
      r = _spawn({"what": "decode", "args": args})
      if "error" in r:
        print(f"| {kind} | {s} | error: {r['error'][-200:]!r} |", flush=True)
        continue
      print(
        f"| {kind} | {int(s):,} | {r['state_bytes'] / 2**20:.1f} | {r['tokens_per_s']:.1f} | "
        f"{r['ms_per_token']:.1f} | {r['peak_rss_mib']:.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
