"""Linearising a GGUF through the training binary's loop (`config.pretrained.gguf`): only the
feature maps and gates change, the export writes them, and a warm start
(`config.pretrained.feature_maps`) begins from exactly the exported maps."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest
from cli_helpers import run_module
from train_helpers import with_overrides

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "convert"))
from gguf_helpers import write_tiny_gguf  # noqa: E402

from experiments.configs import smollm2_linearise  # noqa: E402
from lola_jax import pretrained  # noqa: E402
from lola_jax.convert import load_gguf_llama  # noqa: E402
from lola_jax.training import checkpoint as ckpt_lib  # noqa: E402
from lola_jax.training import pretrained_source, train_and_evaluate  # noqa: E402

MAP_NAMES = ("phi_q", "phi_k", "gate")


def _config(gguf_path: str, **over):
  c = smollm2_linearise.get_config("cpu")
  c.pretrained.gguf = gguf_path
  c.model.feature_dim = 8
  c.model.max_seq_len = 256
  c.lola.chunk_size = 8
  c.task.seq_len = 64
  c.train.steps = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 4
  c.train.eval_batches = 1
  c.train.async_checkpoint = False
  return with_overrides(c, **over)


def _is_map(path) -> bool:
  keys = [getattr(p, "key", None) for p in path]
  return "attn" in keys and any(k in MAP_NAMES for k in keys)


@pytest.fixture(scope="module")
def linearised(tmp_path_factory):
  """A 4-step linearisation of a tiny 2-layer GGUF and its exported feature maps."""
  tmp = tmp_path_factory.mktemp("linearise")
  gguf_path = write_tiny_gguf(str(tmp / "tiny.gguf"))
  workdir = tmp / "run"
  config = _config(gguf_path)
  train_and_evaluate(config, str(workdir))
  out = tmp / "maps.safetensors"
  config_arg = (
    f"--config={os.path.abspath(smollm2_linearise.__file__)}:cpu",
    f"--config.pretrained.gguf={gguf_path}",
    "--config.model.feature_dim=8",
    "--config.model.max_seq_len=256",
    "--config.lola.chunk_size=8",
    "--config.task.seq_len=64",
  )
  run_module(
    "experiments.smollm2.export", *config_arg, f"--workdir={workdir}", f"--out={out}", timeout=300
  )
  return gguf_path, config, workdir, str(out)


@pytest.mark.slow  # a run, an export subprocess and three GGUF loads: about a minute
def test_only_the_feature_maps_and_gates_move_and_the_export_holds_them(linearised):
  gguf_path, config, workdir, out = linearised
  mc = pretrained_source.model_config(config, gguf_path)
  fresh = pretrained_source.initial_params(mc, gguf_path, config.seed)
  abstract = jax.eval_shape(lambda: fresh)
  trained, meta = ckpt_lib.restore_params(os.path.join(workdir, "checkpoints"), abstract)
  assert int(meta["step"]) == 4
  moved = []
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(fresh), jax.tree.leaves(trained), strict=True
  ):
    if _is_map(path):
      moved.append(not np.array_equal(np.asarray(a), np.asarray(b)))
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  assert moved and all(moved), "every feature map and gate should have trained"
  exported = pretrained.load_feature_maps(out)
  expected = pretrained.feature_map_tensors(jax.device_get(trained))
  assert sorted(exported) == sorted(expected) and len(exported) == 3 * 2  # 2 layers x 3
  for name, value in expected.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  meta_file = pretrained.feature_maps_metadata(out)
  assert meta_file["checkpoint_step"] == "4"


@pytest.mark.slow
def test_warm_start_begins_from_the_file_and_everything_else_from_the_gguf(linearised):
  gguf_path, config, _, out = linearised
  warm = _config(gguf_path, pretrained__feature_maps=out, lola__chunk_size=16)
  maps = pretrained_source.feature_maps_path(warm)
  assert maps == out
  mc = pretrained_source.model_config(warm, gguf_path)
  assert mc.lola.chunk_size == 16
  params = pretrained_source.initial_params(mc, gguf_path, warm.seed, maps)
  # Independent: the converter itself with the file's mapping.
  _, expected = load_gguf_llama(
    gguf_path,
    "hybrid",
    16,
    0,
    feature_maps=pretrained.load_feature_maps(out),
    feature_map="hedgehog",
    feature_dim=8,
    max_seq_len=256,
    mix="gated",
  )
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  fresh = pretrained_source.initial_params(mc, gguf_path, warm.seed)
  differs = [
    not np.array_equal(np.asarray(a), np.asarray(b))
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(fresh), strict=True
    )
    if _is_map(path)
  ]
  assert differs and all(differs)


def test_feature_maps_setting_errors_name_the_setting(tmp_path):
  c = _config(str(tmp_path / "x.gguf"), pretrained__feature_maps=str(tmp_path / "none.st"))
  with pytest.raises(ValueError, match="pretrained.feature_maps must be"):
    pretrained_source.feature_maps_path(c)
  c = _config(str(tmp_path / "x.gguf"), pretrained__feature_maps="committed")
  with pytest.raises(ValueError, match="pretrained.feature_maps='committed' needs"):
    pretrained_source.feature_maps_path(c)
  c = smollm2_linearise.get_config("cpu_c256")
  assert pretrained_source.feature_maps_path(c) == pretrained.SMOLLM2_FEATURE_MAPS
