"""Training throughput (tokens/s) and model FLOP utilisation per attention kind.

  python -m experiments.benchmarks.bench_train --config=experiments/configs/default.py \
      --steps=20 --out=/tmp/bench_train.json

For each attention kind the default config's jitted, sharded train step (the same one
`experiments/train.py` runs) is compiled, warmed up, and timed over `--steps` steps on batches
generated beforehand (data generation is not timed). Reported per kind:

  tokens/s      batch_size * seq_len * steps / wall time;
  model TFLOP/s analytical training FLOPs per token (6N + attention, `model_flops_per_token`)
                times tokens/s;
  XLA GFLOP/step the compiled step's own cost analysis (counts what XLA executes, including
                the LoLA scan's extra work);
  MFU           model FLOP/s over the peak: a measured float32 matmul throughput on this host
                (CPU has no datasheet peak that means anything) or `--peak_tflops` if given.
"""

from __future__ import annotations

import json
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from lola_jax import sharding as sharding_lib
from lola_jax.training import steps as steps_lib
from lola_jax.training import trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Training config.")
flags.DEFINE_list(
  "kinds",
  ["softmax", "linear", "hybrid", "hybrid@reference", "lola"],
  "Attention kinds to time; kind@impl sets lola.implementation (hybrid@reference = core scan "
  "instead of pallas_kernels.hybrid_attention).",
)
flags.DEFINE_integer("steps", 20, "Timed steps per kind.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s for MFU; 0 = measure a float32 matmul.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def measure_matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """Best observed float32 matmul throughput on the default device, in FLOP/s."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def bench_kind(config, kind: str, steps: int, warmup: int) -> dict:
  config = config.copy_and_resolve_references()
  config.model.attention, _, impl = kind.partition("@")
  if impl:
    config.lola.implementation = impl
  s = trainer.setup(config)
  state = trainer.initial_state(config, s)
  step = steps_lib.jit_train_step(
    s.model_config, s.tx, s.mesh, s.param_sh, s.opt_sh, accum=config.train.grad_accum_steps
  )
  bsh = sharding_lib.batch_sharding(s.mesh)
  bsz, seq = config.train.batch_size, config.task.seq_len
  batches = [
    {k: sharding_lib.global_array(v, bsh) for k, v in s.task.batch(i, bsz).items()}
    for i in range(warmup + steps)
  ]
  params, opt = state["params"], state["opt_state"]
  t0 = time.perf_counter()
  compiled = step.lower(params, opt, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  for b in batches[:warmup]:
    params, opt, m = compiled(params, opt, b)
  jax.block_until_ready(m["loss"])
  t0 = time.perf_counter()
  for b in batches[warmup:]:
    params, opt, m = compiled(params, opt, b)
  jax.block_until_ready(m["loss"])
  wall = time.perf_counter() - t0
  tokens_per_s = bsz * seq * steps / wall
  flops_per_token = trainer.model_flops_per_token(s.model_config, seq)
  return {
    "attention": kind,
    "tokens_per_s": tokens_per_s,
    "step_ms": 1000 * wall / steps,
    "compile_s": compile_s,
    "model_flops_per_token": flops_per_token,
    "model_tflops": flops_per_token * tokens_per_s / 1e12,
    "xla_gflops_per_step": xla_flops / 1e9,
    "final_loss": float(m["loss"]),
  }


def main(argv):
  del argv
  config = FLAGS.config
  peak = FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops else measure_matmul_peak()
  rows = []
  for kind in FLAGS.kinds:
    row = bench_kind(config, kind, FLAGS.steps, FLAGS.warmup)
    row["mfu"] = row["model_tflops"] * 1e12 / peak
    rows.append(row)
    print(f"{kind}: {row['tokens_per_s']:.0f} tokens/s", flush=True)
  device = jax.devices()[0]
  header = {
    "device": f"{device.platform}:{getattr(device, 'device_kind', '')} x{jax.device_count()}",
    "host": platform.processor() or platform.machine(),
    "peak_tflops": peak / 1e12,
    "peak_source": "flag" if FLAGS.peak_tflops else "measured f32 2048^3 matmul",
    "batch_size": config.train.batch_size,
    "seq_len": config.task.seq_len,
    "steps": FLAGS.steps,
    "jax": jax.__version__,
  }
  print()
  print(
    f"{header['device']}, batch {header['batch_size']} x {header['seq_len']} tokens, "
    f"peak {header['peak_tflops'] * 1000:.1f} GFLOP/s ({header['peak_source']})"
  )
  print()
  print("| attention | tokens/s | step ms | model GFLOP/s | XLA GFLOP/step | MFU | compile s |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(
      f"| {r['attention']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
      f"{r['model_tflops'] * 1000:.2f} | {r['xla_gflops_per_step']:.2f} | "
      f"{100 * r['mfu']:.1f}% | {r['compile_s']:.1f} |"
    )
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"setup": header, "results": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
