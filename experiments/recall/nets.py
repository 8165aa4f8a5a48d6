"""The recall experiments' networks: the softmax teacher and its linearised hybrid.

Shared by the recall pipeline, the ablations (`cache_policies`, `layer_budgets`) and the notebook,
with explicit arguments (no binary's flags):

  apply_overrides(config, ["model.attention=lola", ...])   `key=value` config overrides
  load_net(config_module, workdir, overrides, params_file)  (ModelConfig, LoLALM) of one run
  load_nets(workdir, overrides, params_dir, ...)            (teacher, hybrid config, hybrid)
  load_hybrid(params_dir, preset)                           the committed distilled hybrid
"""

from __future__ import annotations

import ast
import importlib
import os

import jax
from flax import nnx

from experiments.recall.presets import PRESETS
from lola_jax import model as model_lib
from lola_jax.training import checkpoint as ckpt_lib
from lola_jax.training import trainer

TEACHER_CONFIG = "experiments.configs.recall_teacher"
DISTILL_CONFIG = "experiments.configs.recall_distill"
NETS = ("teacher", "hybrid")


def apply_overrides(config, overrides):
  """Sets every `path.to.field=value` of `overrides` on `config` (values parsed as Python literals
  where they are, kept as strings otherwise); returns `config`."""
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


def load_net(config_module: str, workdir, overrides, params_file=None):
  """(ModelConfig, LoLALM): the newest checkpoint of a training run, or a params .npz file.

  `config_module` is imported for its `get_config()`, `overrides` applied on top.
  """
  config = importlib.import_module(config_module).get_config()
  apply_overrides(config, overrides)
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
  ckpt_lib.save_params_npz(nnx.to_pure_dict(nnx.state(model)), path)


def load_nets(workdir, overrides, params_dir=None, *, teacher_params=None, export_dir=None):
  """(teacher, hybrid ModelConfig, hybrid): from the runs in `workdir`/{teacher,hybrid} or from
  `params_dir`/{teacher,hybrid}.npz.

  `teacher_params`: a teacher .npz used instead of the teacher's run (when no `params_dir`).
  `export_dir`: when given, teacher.npz and hybrid.npz are written there.
  """
  files = {n: os.path.join(params_dir, f"{n}.npz") if params_dir else None for n in NETS}
  if teacher_params and not params_dir:
    files["teacher"] = teacher_params
  _, teacher = load_net(
    TEACHER_CONFIG, os.path.join(workdir, "teacher"), overrides, files["teacher"]
  )
  hybrid_cfg, hybrid = load_net(
    DISTILL_CONFIG, os.path.join(workdir, "hybrid"), overrides, files["hybrid"]
  )
  if export_dir:
    os.makedirs(export_dir, exist_ok=True)
    for name, net in (("teacher", teacher), ("hybrid", hybrid)):
      export_params(net, os.path.join(export_dir, f"{name}.npz"))
    print(f"exported teacher.npz, hybrid.npz to {export_dir}", flush=True)
  return teacher, hybrid_cfg, hybrid


def load_hybrid(params_dir: str, preset: str = "demo"):
  """(ModelConfig, LoLALM): the distilled recall hybrid from `params_dir`/hybrid.npz, with the
  model overrides of the recall `preset` that built it."""
  path = os.path.join(params_dir, "hybrid.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no hybrid parameters at {path} (see experiments/recall/pipeline.py)")
  return load_net(DISTILL_CONFIG, None, list(PRESETS[preset]["overrides"]), path)
