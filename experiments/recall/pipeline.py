"""LoLA's recall result in miniature: train a softmax teacher, linearise it, evaluate recall.

  python -m experiments.recall.pipeline --preset=demo --workdir=runs/demo

Stages (each skipped when its output exists, so a rerun resumes):
  1. teacher  `python -m experiments.train --config=experiments/configs/recall_teacher.py`:
              softmax LM on the task mix at a short context (512 tokens);
  2. distill  `... --config=experiments/configs/recall_distill.py`: `hybrid` (window/chunk 64,
              Hedgehog), attention transfer from the teacher, then a short finetune;
  3. eval     pass-key and needle-in-pydoc at longer contexts and spread depths, MQAR against the
              number of pairs, for the teacher (full KV), hybrid (cache 0), hybrid with a wider
              window of LoLA's memory, LoLA with caches of several sizes (sre) and with `recency`;
              every row with its decode-state bytes next to the full KV cache's.
Writes `results.json` (rows), `cells.json` (per depth x context), `report.md`, `figures/*.png`,
`timings.json` into the workdir; `--publish_dir=docs` also copies them into the docs.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

from experiments.recall.presets import PRESETS

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "demo", sorted(PRESETS), "Size of the run.")
flags.DEFINE_string("workdir", None, "Output directory (default runs/<preset>).")
flags.DEFINE_list(
  "stages",
  ["teacher", "distill", "eval"],
  "Stages to run, of teacher, distill, export (write the parameters to --export_params_dir "
  "without evaluating), eval.",
)
flags.DEFINE_string("publish_dir", None, "If set (e.g. docs), copy results, figures and report.")
flags.DEFINE_string(
  "params_dir", None, "Skip training: evaluate teacher.npz / hybrid.npz from here."
)
flags.DEFINE_string("export_params_dir", None, "Write the evaluated parameters as .npz here.")
flags.DEFINE_list(
  "overrides",
  [],
  "Extra config overrides after the preset's, e.g. model.rope_fraction=0.5 (applied to the "
  "teacher and distill configs, and when loading for evaluation).",
)
flags.DEFINE_integer(
  "teacher_steps", None, "Teacher training steps (default: the preset's).", lower_bound=0
)
flags.DEFINE_integer(
  "distill_steps", None, "Attention-transfer steps (default: the preset's).", lower_bound=0
)
flags.DEFINE_integer(
  "finetune_steps", None, "Finetune steps after it (default: the preset's).", lower_bound=0
)
flags.DEFINE_string(
  "teacher_params",
  None,
  "Skip the teacher stage: distill from (and evaluate) this teacher .npz (e.g. one trained on a "
  "GPU with experiments/benchmarks/gpu_session.sh).",
)
flags.DEFINE_bool("mqar", True, "Evaluate MQAR.")
flags.DEFINE_bool("niah", True, "Evaluate the needle in natural text.")

TEACHER_CONFIG = "experiments/configs/recall_teacher.py"
DISTILL_CONFIG = "experiments/configs/recall_distill.py"
NETS = ("teacher", "hybrid")


def _train(config_path, workdir, overrides, log):
  """Runs the absl training binary as a subprocess (output streamed and logged)."""
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    f"--config={config_path}",
    f"--workdir={workdir}",
  ] + [f"--config.{o}" for o in overrides]
  print("$ " + " ".join(cmd[1:]), flush=True)
  with open(log, "a") as f:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
      cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    for line in proc.stdout:
      f.write(line)
      if line.startswith(("step", "Training", "eval", "Preempted", "Traceback", "Error")) or (
        "Error" in line
      ):
        print("  " + line.rstrip(), flush=True)
    if proc.wait():
      raise RuntimeError(f"training failed ({config_path}); see {log}")
  return " ".join(["python"] + cmd[1:])


def _apply_overrides(config, overrides):
  for item in overrides:
    path, value = item.split("=", 1)
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    node[leaf] = value
  return config


def _load(config_module, workdir, overrides, params_file=None):
  """(ModelConfig, LoLALM): the newest checkpoint of a training run, or a params .npz file."""
  import importlib

  import jax

  from lola_jax import model as model_lib
  from lola_jax.training import checkpoint as ckpt_lib
  from lola_jax.training import trainer

  config = importlib.import_module(config_module).get_config()
  _apply_overrides(config, overrides)
  config.train.mode = "lm"  # distill mode would look for the teacher's run, not needed here
  model_config = trainer.model_config_from(config)
  if params_file:
    shapes = jax.eval_shape(lambda: model_lib.init_params(model_config, jax.random.key(0)))
    params = ckpt_lib.load_params_npz(params_file, shapes)
  else:
    s = trainer.setup(config)
    params, _ = ckpt_lib.restore_params(os.path.join(workdir, "checkpoints"), s.abstract_params)
  return model_config, model_lib.bind(model_config, params)


def export_params(model, path):
  """Saves a model's parameters (float32, a few MB) to an .npz file."""
  from flax import nnx

  from lola_jax.training import checkpoint as ckpt_lib

  ckpt_lib.save_params_npz(nnx.to_pure_dict(nnx.state(model)), path)


def load_nets(workdir, overrides, params_dir=None):
  """(teacher, hybrid ModelConfig, hybrid): from the runs in `workdir` or `params_dir`/*.npz.

  With --export_params_dir, also writes teacher.npz and hybrid.npz there.
  """
  files = {n: os.path.join(params_dir, f"{n}.npz") if params_dir else None for n in NETS}
  if FLAGS.teacher_params and not params_dir:
    files["teacher"] = FLAGS.teacher_params
  _, teacher = _load(
    "experiments.configs.recall_teacher",
    os.path.join(workdir, "teacher"),
    overrides,
    files["teacher"],
  )
  hybrid_cfg, hybrid = _load(
    "experiments.configs.recall_distill",
    os.path.join(workdir, "hybrid"),
    overrides,
    files["hybrid"],
  )
  if FLAGS.export_params_dir:
    os.makedirs(FLAGS.export_params_dir, exist_ok=True)
    for name, net in (("teacher", teacher), ("hybrid", hybrid)):
      export_params(net, os.path.join(FLAGS.export_params_dir, f"{name}.npz"))
    print(f"exported teacher.npz, hybrid.npz to {FLAGS.export_params_dir}", flush=True)
  return teacher, hybrid_cfg, hybrid


def methods(preset, hybrid_config):
  """(label, method, attention, LoLAConfig, layer_cache_sizes or None) of every evaluated row."""
  from lola_jax.core.config import LoLAConfig
  from lola_jax.evaluation import equal_memory_chunk

  c = hybrid_config.lola.chunk_size
  out = [
    ("teacher (full KV)", "teacher", "softmax", hybrid_config.lola, None),
    (f"hybrid C{c}", "hybrid", "hybrid", LoLAConfig(chunk_size=c, cache_size=0), None),
  ]
  for lam in preset["wide_for"]:
    wide = equal_memory_chunk(
      chunk_size=c,
      cache_size=lam,
      key_dim=hybrid_config.head_dim,
      value_dim=hybrid_config.head_dim,
      feature_dim=hybrid_config.phi_dim,
      kv_dtype=hybrid_config.dtype,
    )
    out.append(
      (
        f"hybrid_wide C{wide} (= lola {lam})",
        "hybrid_wide",
        "hybrid",
        LoLAConfig(chunk_size=wide, cache_size=0),
        None,
      )
    )
  for lam in preset["caches"]:
    out.append(
      (
        f"lola C{c} cache {lam}",
        "lola",
        "lola",
        LoLAConfig(chunk_size=c, cache_size=lam, policy="sre"),
        None,
      )
    )
  lam = preset["recency_cache"]
  out.append(
    (
      f"lola C{c} cache {lam} recency",
      "lola",
      "lola",
      LoLAConfig(chunk_size=c, cache_size=lam, policy="recency"),
      None,
    )
  )
  # Our extension: each layer first keeps what the layer below keeps (policy "sre_below"), with
  # the same cache size in every layer or one per layer ("16:64": 16 slots in layer 0, 64 above).
  for lam in preset.get("below_caches", []):
    sizes = tuple(lam) if isinstance(lam, (list, tuple)) else None
    name = ":".join(map(str, sizes)) if sizes else str(lam)
    out.append(
      (
        f"lola C{c} cache {name} sre_below",
        "lola",
        "lola",
        LoLAConfig(chunk_size=c, cache_size=max(sizes) if sizes else lam, policy="sre_below"),
        sizes,
      )
    )
  return out


def evaluate(preset, workdir, overrides, params_dir=None):
  """Stage 3: every method on pass-key, niah and MQAR; returns (rows, cells)."""
  import numpy as np

  from lola_jax.evaluation import (
    evaluate_mqar,
    evaluate_retrieval,
    full_kv_bytes,
    model_generate,
    model_predict,
    model_state_bytes,
    retrieval_cache_coverage,
  )
  from lola_jax.core.state import LoLAState, cached_positions

  teacher, hybrid_cfg, hybrid = load_nets(workdir, overrides, params_dir)
  tasks = ["passkey"] + (["niah"] if FLAGS.niah else [])
  rows, cells = [], []
  for label, method, attention, lola, layer_sizes in methods(preset, hybrid_cfg):
    base = teacher if method == "teacher" else hybrid
    model = base.with_lola_config(attention=attention, lola=lola, layer_cache_sizes=layer_sizes)
    cfg = model.config
    recorded = {}  # (task, context) -> per prompt batch, per layer cached positions [B,Hkv,lam]
    current = {}

    def record(states, current=current, recorded=recorded):
      if isinstance(states[0], LoLAState):
        recorded.setdefault(current["key"], []).append(
          [np.asarray(cached_positions(st)) for st in states]
        )

    generate_fn = model_generate(model, on_prefill=record)

    def generate(prompts, num_new, current=current, generate_fn=generate_fn):
      current["key"] = (current["task"], prompts.shape[1])
      return generate_fn(prompts, num_new)

    common = {
      "label": label,
      "method": method,
      "window": None if method == "teacher" else lola.chunk_size,
      "cache_size": 0 if method == "teacher" else (lola.cache_size if attention == "lola" else 0),
      "policy": lola.policy if attention == "lola" else None,
    }
    if layer_sizes:
      common["layer_cache_sizes"] = list(layer_sizes)

    def kv(context, cfg=cfg):
      return full_kv_bytes(
        context,
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        key_dim=cfg.head_dim,
        value_dim=cfg.head_dim,
        kv_dtype=cfg.dtype,
      )

    for task in tasks:
      current["task"] = task
      task_cells = []
      for context in preset["contexts"]:
        task_cells += evaluate_retrieval(
          generate,
          task,
          [context],
          preset["depths"],
          preset["samples"],
          seed=0,
          batch_size=max(1, 16384 // context),
          label=label,
        )
      for context in preset["contexts"]:
        sel = [x for x in task_cells if x.context == context]
        acc = sum(x.correct for x in sel) / sum(x.num for x in sel)
        extra = {}
        if attention == "lola":  # is the secret in the sparse cache after the prompt?
          coverage = retrieval_cache_coverage(
            recorded[(task, context)], task, context, preset["depths"], preset["samples"]
          )
          extra["needle_in_cache"] = float(coverage.mean())
        rows.append(
          dict(
            common,
            task=task,
            context=context,
            accuracy=acc,
            state_bytes=model_state_bytes(cfg, context),
            full_kv_bytes=kv(context),
            **extra,
          )
        )
      cells += [dict(label=label, **dataclasses.asdict(x), accuracy=x.accuracy) for x in task_cells]
      print(
        f"  {label:36s} {task:8s} "
        + " ".join(
          f"{r['context']}:{100 * r['accuracy']:.0f}%"
          for r in rows
          if r["label"] == label and r["task"] == task
        ),
        flush=True,
      )
    if FLAGS.mqar:
      acc = evaluate_mqar(
        model_predict(model),
        preset["mqar_pairs"],
        preset["mqar_seq_len"],
        preset["mqar_samples"],
        seed=0,
        label=label,
      )
      t = preset["mqar_seq_len"]
      for n, a in acc.items():
        rows.append(
          dict(
            common,
            task="mqar",
            context=t,
            num_pairs=n,
            accuracy=a,
            state_bytes=model_state_bytes(cfg, t),
            full_kv_bytes=kv(t),
          )
        )
      print(
        f"  {label:36s} mqar     " + " ".join(f"N={n}:{100 * a:.0f}%" for n, a in acc.items()),
        flush=True,
      )
  return rows, cells


def write_report(preset_name, preset, workdir, rows, cells, timings, commands):
  """report.md and figures/ in the workdir."""
  from lola_jax.evaluation import plots, report

  fig_dir = os.path.join(workdir, "figures")
  contexts = preset["contexts"]
  # The Pareto view at 4x the 512-token training length, where the targets are set.
  pareto = 2048 if 2048 in contexts else contexts[-1]
  paths = plots.all_plots(rows, cells, fig_dir, pareto)
  lines = [
    f"# Recall in miniature: preset `{preset_name}`",
    "",
    "Commands (stage wall times in seconds: "
    + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
    + "):",
    "",
    "```",
  ]
  lines += commands + ["```", ""]
  for task in ("passkey", "niah"):
    if any(r["task"] == task for r in rows):
      lines += [
        f"## {task}: exact-match accuracy per context",
        "",
        report.retrieval_table(rows, task),
        "",
      ]
  if any("needle_in_cache" in r for r in rows):
    lines += [
      "## Share of the secret's tokens held in the sparse cache after the prompt",
      "",
      "(mean over layers, kv heads and prompts: what the model could still retrieve exactly)",
      "",
      report.coverage_table(rows),
      "",
    ]
  lines += [
    "## Decode-state bytes per sequence (all layers) vs the full KV cache",
    "",
    report.bytes_table(rows, "passkey"),
    "",
  ]
  if any(r["task"] == "mqar" for r in rows):
    lines += [
      f"## MQAR (T = {preset['mqar_seq_len']}): accuracy per number of pairs",
      "",
      report.mqar_table(rows),
      "",
    ]
  lines += ["## Figures", ""] + [
    f"![{os.path.basename(p)}](figures/{os.path.basename(p)})" for p in paths
  ]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return paths


def main(argv):
  del argv
  preset = PRESETS[FLAGS.preset]
  unknown = sorted(set(FLAGS.stages) - {"teacher", "distill", "export", "eval"})
  if unknown:
    raise app.UsageError(
      f"--stages: unknown stage(s) {unknown}; expected teacher, distill, export, eval"
    )
  workdir = FLAGS.workdir or os.path.join("runs", FLAGS.preset)
  os.makedirs(workdir, exist_ok=True)
  overrides = list(preset["overrides"]) + list(FLAGS.overrides)
  timings_path = os.path.join(workdir, "timings.json")
  timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
  commands = []
  log = os.path.join(workdir, "train.log")
  teacher_dir, hybrid_dir = os.path.join(workdir, "teacher"), os.path.join(workdir, "hybrid")
  # A flag of 0 is a value (0 steps), not "unset": only None falls back to the preset.
  steps = {
    k: preset[k] if getattr(FLAGS, k) is None else getattr(FLAGS, k)
    for k in ("teacher_steps", "distill_steps", "finetune_steps")
  }
  t_over = overrides + [f"train.steps={steps['teacher_steps']}"]
  d_over = overrides + [
    f"train.steps={steps['distill_steps']}",
    f"distill.finetune_steps={steps['finetune_steps']}",
    f"distill.teacher_params={FLAGS.teacher_params}"
    if FLAGS.teacher_params
    else f"distill.teacher_workdir={teacher_dir}",
  ]
  for stage, config, wd, over in (
    ("teacher", TEACHER_CONFIG, teacher_dir, t_over),
    ("distill", DISTILL_CONFIG, hybrid_dir, d_over),
  ):
    if stage == "teacher" and FLAGS.teacher_params:
      continue
    if stage in FLAGS.stages and not FLAGS.params_dir:
      print(f"== stage {stage} ==", flush=True)
      start = time.time()
      commands.append(_train(config, wd, over, log))
      timings[stage] = timings.get(stage, 0.0) + time.time() - start
      json.dump(timings, open(timings_path, "w"), indent=1)
  if "export" in FLAGS.stages and "eval" not in FLAGS.stages:
    if not FLAGS.export_params_dir:
      raise app.UsageError("--stages=export needs --export_params_dir")
    load_nets(workdir, overrides, FLAGS.params_dir)
  if "eval" in FLAGS.stages:
    print("== stage eval ==", flush=True)
    start = time.time()
    rows, cells = evaluate(preset, workdir, overrides, FLAGS.params_dir)
    timings["eval"] = time.time() - start
    json.dump(timings, open(timings_path, "w"), indent=1)
    keys = (
      "method",
      "window",
      "cache_size",
      "policy",
      "context",
      "task",
      "accuracy",
      "state_bytes",
      "full_kv_bytes",
      "label",
      "num_pairs",
      "needle_in_cache",
      "layer_cache_sizes",
    )
    rows = [{k: r[k] for k in keys if k in r} for r in rows]
    json.dump(rows, open(os.path.join(workdir, "results.json"), "w"), indent=1)
    json.dump(cells, open(os.path.join(workdir, "cells.json"), "w"), indent=1)
    commands.insert(
      0,
      f"python -m experiments.recall.pipeline --preset={FLAGS.preset} "
      f"--workdir={workdir}   # runs the commands below, then evaluates",
    )
    paths = write_report(FLAGS.preset, preset, workdir, rows, cells, timings, commands)
    from lola_jax.evaluation import report

    print("\nPass-key exact-match accuracy (state bytes per sequence, all layers):")
    print(report.retrieval_table(rows, "passkey"), flush=True)
    print(f"\nwrote {workdir}/results.json, cells.json, report.md, " + ", ".join(paths))
    if FLAGS.publish_dir:
      pub = FLAGS.publish_dir
      os.makedirs(os.path.join(pub, "figures"), exist_ok=True)
      for p in paths:
        shutil.copy(p, os.path.join(pub, "figures", os.path.basename(p)))
      os.makedirs(os.path.join(pub, "results"), exist_ok=True)
      for name in ("results.json", "cells.json", "timings.json", "report.md"):
        shutil.copy(
          os.path.join(workdir, name), os.path.join(pub, "results", f"recall_{FLAGS.preset}_{name}")
        )


if __name__ == "__main__":
  app.run(main)
