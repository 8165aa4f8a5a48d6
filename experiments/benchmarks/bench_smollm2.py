"""SmolLM2-135M on this machine: our XLA path against llama.cpp on the same GGUF, side by side.

  python -m experiments.benchmarks.bench_smollm2                       # docs/bench_smollm2.json
  python -m experiments.benchmarks.bench_smollm2 --contexts=1024,8192 --no_llama_cpp

Rows, one process, run one after the other on the same prompt (real held-out text,
`lola_jax.data.text`, the first `context` tokens of one window):

  lola64     the linearised model, LoLA C64 cache 64 `sre` (`lola_jax.pretrained.smollm2`),
             float32 weights dequantised from the GGUF;
  lola64_bf16  the same with bfloat16 weights and compute (`ModelConfig.dtype`; states and
             accumulators stay float32): half the bytes per token; on XLA:CPU a single
             call is slower (its bfloat16 dots; see docs/benchmarks.md);
  softmax    the same weights with full attention (a KV cache that grows with the context);
  llama.cpp  `llama_cpp.Llama` on the GGUF itself (Q4_1 weights, its own kernels), when the
             optional `llama-cpp-python` is installed; it is not a requirement of this project:
               CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36
             (builds llama.cpp from source, about 11 minutes on 2 cores).

Rows of an existing `--out` file that this run does not measure are kept (run one row again
with `--rows=`). Per context: prefill tokens/s (ours: `lm_scoring.segmented_prefill`,
`--segment` tokens per jitted layer call, compiled before timing; llama.cpp: `Llama.eval` of
the prompt with `n_batch=--segment`), and decode ms per token after that context (ours: the
median over 3 runs of `--steps` greedy tokens inside generation's jitted loop, plus one jitted
call per token; llama.cpp: the median of `--steps` single-token `Llama.eval` calls). Both sides
use `--threads` threads (ours: XLA's CPU thread pool is the machine's; run with `taskset` to
pin).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lola_jax import model as model_lib
from lola_jax import pretrained
from lola_jax.data import text
from lola_jax.evaluation import lm_scoring

FLAGS = flags.FLAGS
flags.DEFINE_list("contexts", ["1024", "4096", "8192"], "Prompt lengths in tokens.")
flags.DEFINE_list("rows", ["lola64", "lola64_bf16", "softmax", "llama.cpp"], "Which rows to run.")
flags.DEFINE_integer("steps", 32, "Decode tokens timed per context.")
flags.DEFINE_integer("segment", 512, "Prefill tokens per call (ours) and llama.cpp's n_batch.")
flags.DEFINE_integer("threads", 2, "llama.cpp threads (ours: XLA's pool).")
flags.DEFINE_bool("no_llama_cpp", False, "Skip the llama.cpp row even when it is installed.")
flags.DEFINE_bool(
  "matvec", True, "Also time matrix-vector products of SmolLM2's shapes per weight dtype."
)
flags.DEFINE_string("out", "docs/bench_smollm2.json", "JSON output.")

_ROWS = {  # attention, cache size, dtype of weights and compute
  "lola64": ("lola", 64, "float32"),
  "lola64_bf16": ("lola", 64, "bfloat16"),
  "softmax": ("softmax", 0, "float32"),
}


def _prompt(tokenizer, length: int) -> np.ndarray:
  return text.held_out_windows(tokenizer, length, 1)[0, :length].astype(np.int32)


def _ours(row: str, prompts: dict[int, np.ndarray], steps: int, segment: int) -> list[dict]:
  attention, cache, dtype = _ROWS[row]
  config, params, _ = pretrained.smollm2(
    attention=attention, chunk_size=64, cache_size=cache, dtype=dtype
  )
  if dtype != "float32":  # matrices stored in the compute dtype; norm scales stay float32
    params = jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 else x, params)
  model = model_lib.bind(config, params)
  warm = prompts[min(prompts)][None, :segment]
  jax.block_until_ready(lm_scoring.segmented_prefill(model, warm, segment=segment))  # compile
  out = []
  for ctx, ids in prompts.items():
    dec = lm_scoring.decode_latency(model, ctx, steps=steps, segment=segment, tokens=ids)
    out.append(_report(row, ctx, dec["prefill_s"], dec["ms_per_token"], dec["single_call_ms"]))
    out[-1]["state_bytes"] = dec["state_bytes"]
  return out


def _llama_cpp(prompts: dict[int, np.ndarray], steps: int, segment: int, threads: int):
  import llama_cpp  # optional, see the module doc

  llm = llama_cpp.Llama(
    model_path=pretrained.smollm2_gguf_path(),
    n_ctx=max(prompts) + steps + 8,
    n_batch=segment,
    n_threads=threads,
    n_threads_batch=threads,
    verbose=False,
  )
  llm.eval(prompts[min(prompts)][:16].tolist())  # warm up
  out = []
  for ctx, ids in prompts.items():
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids.tolist())
    prefill_s = time.perf_counter() - t0
    token = _llama_argmax(llm)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      llm.eval([token])
      times.append(time.perf_counter() - t0)
      token = _llama_argmax(llm)
    ms = 1e3 * float(np.median(times))
    out.append(_report("llama.cpp", ctx, prefill_s, ms, ms))
  return out, llama_cpp.__version__


def _llama_argmax(llm) -> int:
  """Greedy next token from the context's last logits (`Llama.scores` is only filled with
  `logits_all=True`, which would copy every prompt position's logits)."""
  logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
  return int(np.argmax(logits))


def _median_ms(fn, *args, repeats: int = 30) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def _stored_as(a, dtype):
  return (a * 40).astype(dtype) if dtype == "int8" else a.astype(dtype)  # int8: a spread of ints


def _matvec_table() -> list[dict]:
  """GB/s of weights read by one decode token's matrix-vector products, per storage dtype.

  Shapes of SmolLM2: the 30 layers' MLP matrices ([576, 3 x 1536] each) stacked and taken one
  per step of a `fori_loop` ("mlp stack") or as 30 separate arrays in one unrolled program, as
  the model holds them ("mlp layers"), and the tied embedding as output matrix ([49152, 576]).
  "compute" is the dtype the dot runs in: the stored dtype, or float32 after a convert in the
  same program.
  """
  x = jnp.ones((1, 576), jnp.float32)
  stack = jax.random.normal(jax.random.key(0), (30, 576, 3 * 1536), jnp.float32)
  head = jax.random.normal(jax.random.key(1), (49152, 576), jnp.float32)

  def mlp(x, w, compute):
    def body(i, acc):
      y = jnp.einsum("be,em->bm", acc.astype(compute), w[i].astype(compute))
      return acc + 1e-3 * y[:, :576].astype(jnp.float32)

    return jax.lax.fori_loop(0, w.shape[0], body, x)

  def layers(x, ws, compute):
    return sum(
      jnp.einsum("be,em->bm", x.astype(compute), w.astype(compute))[:, :576].astype(jnp.float32)
      for w in ws
    )

  def out(x, w, compute):
    return jnp.einsum("be,ve->bv", x.astype(compute), w.astype(compute))

  rows = []
  for stored, compute in (
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("bfloat16", "float32"),
    ("int8", "float32"),
  ):
    for name, fn, w in (
      ("mlp stack", mlp, stack),
      ("mlp layers", layers, list(stack)),
      ("output matrix", out, head),
    ):
      w = jax.tree.map(functools.partial(_stored_as, dtype=stored), w)
      nbytes = sum(a.nbytes for a in jax.tree.leaves(w))
      ms = _median_ms(jax.jit(fn, static_argnums=2), x, w, jnp.dtype(compute))
      rows.append(
        {
          "matrices": name,
          "stored": stored,
          "compute": compute,
          "ms": ms,
          "gb_per_s": nbytes / ms / 1e6,
        }
      )
      gbs = rows[-1]["gb_per_s"]
      print(f"matvec {name:13s} {stored:8s} -> {compute:8s}: {ms:7.2f} ms, {gbs:5.1f} GB/s")
  return rows


def _report(row, ctx, prefill_s, ms_loop, ms_single) -> dict:
  r = {
    "row": row,
    "context": ctx,
    "prefill_tokens_per_s": ctx / prefill_s,
    "prefill_s": prefill_s,
    "decode_ms_per_token": ms_loop,
    "decode_single_call_ms": ms_single,
  }
  print(
    f"{row:10s} ctx {ctx:6d}: prefill {r['prefill_tokens_per_s']:7.0f} tok/s ({prefill_s:.1f} s)"
    f", decode {ms_loop:6.1f} ms/token (single call {ms_single:.1f})",
    flush=True,
  )
  return r


def main(argv):
  del argv
  contexts = sorted(int(c) for c in FLAGS.contexts)
  unknown = sorted(set(FLAGS.rows) - {*_ROWS, "llama.cpp"})
  if unknown or min(contexts) < FLAGS.segment:
    raise app.UsageError(
      f"--rows must be among {[*_ROWS, 'llama.cpp']}, got {unknown}; --contexts must be >= "
      f"--segment {FLAGS.segment}, got {contexts}"
    )
  _, _, tokenizer = pretrained.smollm2(attention="softmax")
  prompts = {c: _prompt(tokenizer, c) for c in contexts}
  results, meta = [], {"llama_cpp": None}
  for row in FLAGS.rows:
    if row in _ROWS:
      results += _ours(row, prompts, FLAGS.steps, FLAGS.segment)
    elif FLAGS.no_llama_cpp:
      continue
    elif importlib.util.find_spec("llama_cpp") is None:
      print("llama.cpp row skipped: llama-cpp-python is not installed (see the module doc)")
    else:
      rows, meta["llama_cpp"] = _llama_cpp(prompts, FLAGS.steps, FLAGS.segment, FLAGS.threads)
      results += rows

  matvec = _matvec_table() if FLAGS.matvec else None
  print("\n| row | context | prefill tok/s | decode ms/token (loop) | decode ms (single call) |")
  print("|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['row']} | {r['context']} | {r['prefill_tokens_per_s']:.0f} | "
      f"{r['decode_ms_per_token']:.1f} | {r['decode_single_call_ms']:.1f} |"
    )
  meta.update(
    jax=jax.__version__,
    cpu=platform.processor() or platform.machine(),
    cores=os.cpu_count(),
    steps=FLAGS.steps,
    segment=FLAGS.segment,
    threads=FLAGS.threads,
  )
  old = {"meta": {}, "results": [], "matvec": None}
  if os.path.exists(FLAGS.out):  # keep what this run did not measure
    with open(FLAGS.out) as f:
      old = json.load(f)
  ran = {r["row"] for r in results}
  out = {
    "meta": {**old["meta"], **meta, "llama_cpp": meta["llama_cpp"] or old["meta"].get("llama_cpp")},
    "results": [r for r in old["results"] if r["row"] not in ran] + results,
    "matvec": matvec if matvec is not None else old.get("matvec"),
  }
  with open(FLAGS.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
