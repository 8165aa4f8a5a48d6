"""One run per workdir, one metrics row per step, pipeline step flags honoured (issue 16, items
3, 4 and the pipeline part of 5)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from train_helpers import tasks, tiny_config

from lola_jax.training import train_and_evaluate, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Holds <workdir>/train.lock the way a run does (flock + JSON naming the holder), then waits.
HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(os.path.join(sys.argv[1], "train.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
print("locked", flush=True)
time.sleep(120)
"""


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


def run(config, workdir):
  return train_and_evaluate(config, str(workdir), task=tasks(config)[0], eval_task=tasks(config)[1])


# --- item 3: the workdir lock -------------------------------------------------------------------


def test_a_second_run_on_a_held_workdir_refuses_at_once_naming_the_holder(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    start = time.time()
    with pytest.raises(workdir_lock.WorkdirLockedError) as err:
      run(tiny_config(train__steps=2), tmp_path)
    assert time.time() - start < 30
    assert f"pid {holder.pid} on host {socket.gethostname()}" in str(err.value)
    assert not os.path.exists(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / "metrics.jsonl")
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder died holding the flock, which the kernel released: its lock file is stale.
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()
  assert not os.path.exists(tmp_path / workdir_lock.LOCK_NAME)  # removed on release


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
    check=True,
  )
  pid = int(dead.stdout)
  with open(tmp_path / workdir_lock.LOCK_NAME, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": pid, "started": "earlier"}, f)
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()
  assert f"left by pid {pid} on host" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / workdir_lock.LOCK_NAME)


@pytest.mark.slow
def test_two_binaries_on_one_workdir(tmp_path):
  """The issue's scenario with the real binary: the second exits non-zero at once."""
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
  ]
  first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "metrics.jsonl") and time.time() < deadline:
      assert first.poll() is None, first.stdout.read().decode()[-3000:]
      time.sleep(0.5)
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert second.returncode != 0
  assert f"is in use by pid {first.pid}" in second.stderr + second.stdout


# --- item 4: one metrics row per step after a resume ----------------------------------------------


def test_metrics_have_one_row_per_step_after_a_crash_and_resume(tmp_path):
  run(tiny_config(train__steps=8, train__checkpoint_every=5, train__log_every=1), tmp_path)
  # As if the run had crashed after step 8 before saving it: the newest checkpoint is 5.
  os.rename(tmp_path / "checkpoints" / "8", tmp_path / "8-aside")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "lo')  # a row cut short by the crash
  run(tiny_config(train__steps=10, train__checkpoint_every=5, train__log_every=1), tmp_path)
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 11))


# --- item 5: the recall pipeline's step flags ----------------------------------------------------

# Runs the pipeline's main with training replaced by a print of the overrides it would use.
PIPELINE = """
import sys
from absl import app
from experiments.recall import pipeline
pipeline._train = lambda config, workdir, overrides, log: print("TRAIN", config, overrides) or ""
sys.argv = ["pipeline"] + sys.argv[1:]
app.run(pipeline.main)
"""


def test_pipeline_step_flags_of_zero_are_honoured(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      PIPELINE,
      "--preset=tiny",
      f"--workdir={tmp_path}",
      "--stages=teacher,distill",
      "--teacher_steps=0",
      "--distill_steps=0",
      "--finetune_steps=0",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("TRAIN")]
  assert len(lines) == 2
  assert "'train.steps=0'" in lines[0]
  assert "'train.steps=0'" in lines[1] and "'distill.finetune_steps=0'" in lines[1]
