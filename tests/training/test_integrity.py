"""The exact content checksum (training/integrity.py): equal to a NumPy implementation of its
formula for every dtype the state holds, changed by a one-ulp change, and independent of how the
array is sharded (the claim that lets a run saved on N devices restore on M)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from lola_jax.training import integrity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fmix32_np(h):
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _checksum_np(x: np.ndarray) -> list[int]:
  """The module docstring's formula in NumPy (wrapping uint32 arithmetic)."""
  if x.dtype == np.bool_:
    w = x.astype(np.uint32)
  elif x.dtype.itemsize == 4:
    w = x.view(np.uint32)
  else:
    w = x.view({2: np.uint16, 1: np.uint8}[x.dtype.itemsize]).astype(np.uint32)
  w = w.reshape(-1)
  i = np.arange(w.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    return [
      int(np.sum(_fmix32_np(w ^ _fmix32_np(i + np.uint32(c))), dtype=np.uint32))
      for c in (0x9E3779B9, 0x7F4A7C15)
    ]


def test_checksum_matches_numpy_formula_and_sees_one_ulp():
  rng = np.random.default_rng(0)
  tree = {
    "f32": rng.normal(size=(5, 7)).astype(np.float32),
    "bf16": jnp.asarray(rng.normal(size=(9,)), jnp.bfloat16),
    "i32": rng.integers(-5, 5, (3, 4)).astype(np.int32),
    "u32": rng.integers(0, 2**32, (2,), dtype=np.uint64).astype(np.uint32),
    "mask": rng.random(6) < 0.5,
    "nan": np.array([np.nan, 1.0], np.float32),
  }
  sums, nonfinite = integrity.summarize(jax.tree.map(jnp.asarray, tree))
  assert nonfinite == ["nan"]
  for name, x in tree.items():
    assert sums[name] == _checksum_np(np.asarray(x)), name
  x = tree["f32"].copy()
  x[3, 2] = np.nextafter(x[3, 2], np.float32(np.inf))
  changed, _ = integrity.summarize({"f32": jnp.asarray(x)})
  assert changed["f32"][0] != sums["f32"][0] and changed["f32"][1] != sums["f32"][1]


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lola_jax.training import integrity
assert jax.device_count() == 4
x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
tree = {"w": x}
one, _ = integrity.summarize(tree)
for spec in (P("a", "b"), P(None, "a"), P(("a", "b"))):
  sharded, _ = integrity.summarize({"w": jax.device_put(x, NamedSharding(mesh, spec))})
  assert sharded == one, (spec, sharded, one)
print("same", one["w"])
"""


def test_checksum_does_not_depend_on_the_sharding():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(SHARDED)],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  x = np.asarray(np.random.default_rng(0).normal(size=(8, 6)), np.float32)
  assert proc.stdout.split("same ")[1].strip() == str(_checksum_np(x))
