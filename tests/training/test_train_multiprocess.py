"""Two local CPU processes joined by jax.distributed on loopback agree with one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config.train.steps=6", "--config.train.log_every=1", "--config.train.checkpoint_every=3"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "experiments.train",
    f"--config={os.path.join(ROOT, 'tests', 'train_helpers.py')}",
    f"--workdir={workdir}",
    *ARGS,
    *extra,
  ]


def _env(devices: int):
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), JAX_PLATFORMS="cpu"
  )
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
  port = _free_port()
  mp_dir = tmp_path / "two"
  procs = [
    subprocess.Popen(
      _cmd(
        mp_dir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"
      ),
      env=_env(1),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert "(2 devices, 2 processes)" in outs[0]
  one = subprocess.run(
    _cmd(tmp_path / "one"), env=_env(2), cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert one.returncode == 0, one.stderr[-3000:]
  assert "(2 devices, 1 processes)" in one.stdout
  two, single = _losses(mp_dir), _losses(tmp_path / "one")
  assert sorted(two) == sorted(single) == list(range(1, 7))
  np.testing.assert_allclose(
    [two[s] for s in range(1, 7)], [single[s] for s in range(1, 7)], rtol=1e-5, atol=1e-5
  )
  assert sorted(os.listdir(mp_dir / "checkpoints")) == ["3", "6"]
