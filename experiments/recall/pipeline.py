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

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

from experiments.recall import grid, nets
from experiments.recall.presets import PRESETS
from experiments.reporting import report

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


def _load_nets(workdir, overrides):
  """(teacher, hybrid ModelConfig, hybrid) as the flags say (runs, --params_dir, exports)."""
  return nets.load_nets(
    workdir,
    overrides,
    FLAGS.params_dir,
    teacher_params=FLAGS.teacher_params,
    export_dir=FLAGS.export_params_dir,
  )


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
    _load_nets(workdir, overrides)
  if "eval" in FLAGS.stages:
    print("== stage eval ==", flush=True)
    start = time.time()
    teacher, _, hybrid = _load_nets(workdir, overrides)
    rows, cells = grid.evaluate(preset, teacher, hybrid, niah=FLAGS.niah, mqar=FLAGS.mqar)
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
    paths = grid.write_report(FLAGS.preset, preset, workdir, rows, cells, timings, commands)
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
