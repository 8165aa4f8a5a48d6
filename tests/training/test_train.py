"""Training loop: loss falls, exact resume, corrupted-checkpoint fallback, SIGTERM, distillation,
metrics files."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from train_helpers import tasks, tiny_config

from lola_jax import model as model_lib
from lola_jax.training import checkpoint as ckpt_lib
from lola_jax.training import metrics as metrics_lib
from lola_jax.training import model_config_from, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(config, workdir):
  return train_and_evaluate(
    config, str(workdir), **dict(zip(("task", "eval_task"), tasks(config), strict=True))
  )


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs below recompile identical programs (fresh closures): reuse them via the cache."""
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield
  for n, v in old.items():
    jax.config.update(n, v)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """20 steps in one go (checkpoints at 10 and 20): the reference run."""
  wd = tmp_path_factory.mktemp("straight")
  result = run(tiny_config(), wd)
  return wd, result


def test_loss_falls_and_metrics_are_written(straight):
  wd, result = straight
  assert result["step"] == 20 and not result["preempted"]
  records = read_metrics(wd)
  losses = {r["step"]: r["loss"] for r in records if "loss" in r}
  assert losses[20] < 0.8 * losses[1], losses
  assert all("step" in r for r in records)
  events = glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
  assert len(events) == 1
  parsed = dict(metrics_lib.read_events(events[0]))
  assert abs(parsed[20]["loss"] - losses[20]) < 1e-4
  assert sorted(
    int(os.path.basename(p))
    for p in glob.glob(os.path.join(wd, "checkpoints", "*"))
    if os.path.basename(p).isdigit()
  ) == [10, 20]


def test_exact_resume_and_corrupted_checkpoint_fallback(straight, tmp_path, capsys):
  ref_wd, ref = straight
  # 10 steps, stop (checkpoints at 5 and 10), then damage checkpoint 10.
  c = tiny_config(train__checkpoint_every=5, train__stop_at_step=10)
  first = run(c, tmp_path)
  assert first["step"] == 10 and first["preempted"]
  # The plain restart path: 10 + restart + 10 equals 20 straight.
  wd2 = tmp_path / "copy"
  shutil.copytree(tmp_path / "checkpoints", wd2 / "checkpoints")
  resumed = run(tiny_config(train__checkpoint_every=5), wd2)
  chex.assert_trees_all_equal(jax.device_get(resumed["params"]), jax.device_get(ref["params"]))
  ref_losses = {r["step"]: r["loss"] for r in read_metrics(ref_wd) if "loss" in r}
  new_losses = {r["step"]: r["loss"] for r in read_metrics(wd2) if "loss" in r}
  for s in (15, 20):
    assert new_losses[s] == ref_losses[s]
  # Corrupt the newest checkpoint (10): flip bytes in its array data.
  files = [
    p
    for p in glob.glob(str(tmp_path / "checkpoints" / "10" / "state" / "**" / "*"), recursive=True)
    if os.path.isfile(p) and "/d/" in p
  ]
  assert files
  for p in files:
    data = bytearray(open(p, "rb").read())
    for i in range(0, len(data), 7):
      data[i] ^= 0xFF
    open(p, "wb").write(bytes(data))
  capsys.readouterr()
  fallback = run(tiny_config(train__checkpoint_every=5), tmp_path)
  out = capsys.readouterr().out
  assert "checkpoint 10" in out and "corrupted" in out
  assert "Resumed from checkpoint 5" in out
  chex.assert_trees_all_equal(jax.device_get(fallback["params"]), jax.device_get(ref["params"]))


def test_all_checkpoints_damaged_refuses_to_restart(tmp_path):
  run(tiny_config(train__stop_at_step=2, train__checkpoint_every=1), tmp_path)
  for p in glob.glob(str(tmp_path / "checkpoints" / "*" / "state" / "*")):
    if os.path.isfile(p):
      os.remove(p)
    else:
      shutil.rmtree(p)
  with pytest.raises(ckpt_lib.CheckpointError, match="refusing"):
    run(tiny_config(train__stop_at_step=2, train__checkpoint_every=1), tmp_path)


def test_distillation_trains_only_feature_maps_then_finetunes(straight, tmp_path):
  teacher_wd, teacher = straight
  c = tiny_config(train__steps=10, train__mode="distill", train__stop_at_step=10)
  c.model.attention = "hybrid"
  c.distill.teacher_workdir = str(teacher_wd)
  c.distill.finetune_steps = 4
  c.optim.lr = 3e-2
  c.optim.weight_decay = 0.0
  stage1 = run(c, tmp_path)
  assert stage1["step"] == 10
  student = jax.device_get(stage1["params"])
  t = jax.device_get(teacher["params"])
  flat_s = jax.tree_util.tree_flatten_with_path(student)[0]
  flat_t = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(t)[0])
  changed = {
    jax.tree_util.keystr(p)
    for p, x in flat_s
    if not np.array_equal(x, flat_t[jax.tree_util.keystr(p)])
  }
  assert changed and all(("['attn']['phi_" in n or "['attn']['gate']" in n) for n in changed), (
    changed
  )
  assert [r["stage"] for r in read_metrics(tmp_path)] == ["distill"] * 3
  # The same distillation from the teacher's exported .npz instead of its workdir.
  npz = str(tmp_path / "teacher.npz")
  ckpt_lib.save_params_npz(t, npz)
  c_npz = c.copy_and_resolve_references()
  c_npz.distill.teacher_workdir = ""
  c_npz.distill.teacher_params = npz
  from_npz = jax.device_get(run(c_npz, tmp_path / "from_npz")["params"])
  chex.assert_trees_all_close(from_npz, student, atol=1e-6, rtol=1e-6)
  # The attention-transfer MSE on a fixed batch fell from the teacher's feature maps.
  mc = model_config_from(c)
  mse = jax.jit(lambda p, x: model_lib.bind(mc, p).distill(x)[1])
  inputs = tasks(c)[1].batch(0, 8)["inputs"]
  assert float(mse(student, inputs).sum()) < 0.98 * float(mse(t, inputs).sum())
  c.train.stop_at_step = 0
  final = run(c, tmp_path)
  assert final["step"] == 14 and final["stage"] == "lm"
  after = jax.tree_util.tree_flatten_with_path(jax.device_get(final["params"]))[0]
  assert any(
    "mlp" in jax.tree_util.keystr(p) and not np.array_equal(x, flat_t[jax.tree_util.keystr(p)])
    for p, x in after
  )


def test_sigterm_saves_and_exits_zero(tmp_path):
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), JAX_PLATFORMS="cpu"
  )
  env.pop("XLA_FLAGS", None)
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    f"--config={os.path.join(ROOT, 'tests', 'train_helpers.py')}",
    f"--workdir={tmp_path}",
    "--config.train.steps=100000",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=100000",
  ]
  proc = subprocess.Popen(
    cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM received" in out and "Preempted at step" in out
  step = int(out.split("Preempted at step ")[1].split(";")[0])
  assert step >= 3
  assert os.path.isdir(tmp_path / "checkpoints" / str(step))


def test_params_npz_round_trip_and_named_errors(tmp_path):
  cfg = model_config_from(tiny_config())
  params = model_lib.init_params(cfg, jax.random.key(3))
  shapes = jax.eval_shape(lambda: params)
  path = str(tmp_path / "p.npz")
  ckpt_lib.save_params_npz(params, path)
  chex.assert_trees_all_equal(ckpt_lib.load_params_npz(path, shapes), params)
  flat = ckpt_lib.flat_params(params)
  name = next(n for n in flat if n.endswith("q_proj/kernel"))
  np.savez(path, **{**flat, name: flat[name][:1]})
  with pytest.raises(ValueError, match=f"parameter {name} has shape"):
    ckpt_lib.load_params_npz(path, shapes)
  np.savez(path, **{n: x for n, x in flat.items() if n != name})
  with pytest.raises(ValueError, match="missing parameters"):
    ckpt_lib.load_params_npz(path, shapes)
