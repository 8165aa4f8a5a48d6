"""Attention kernels under a mesh: `jax.shard_map` over rows and heads, same numbers as unsharded.

XLA cannot partition a Pallas kernel (on a TPU a Mosaic kernel under a mesh of more than one
device is refused: "Mosaic kernels cannot be automatically partitioned"), so the model's
attention calls its kernels inside `jax.shard_map` over the mesh in use
(`lola_jax.model.attention.kernel_call`). On 8 simulated CPU devices (a subprocess), the logits
and every parameter gradient of the model jitted with parameters sharded by
`lola_jax.sharding.param_shardings` equal the unsharded model's (relative RMS <= 1e-5, float32),
for attention lola and hybrid, with the Pallas kernels (interpret mode here) and the XLA forms.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from lola_jax import model as model_lib
from lola_jax import sharding as sharding_lib
from lola_jax.core.config import LoLAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5
# Longer than the window (previous + current chunk, 2 x 8 tokens): the linear state, the feature
# maps and the gate take part (at T <= 16 their gradients would be zero).
T = 32


def _config(kind, implementation, **changes):
  sizes = dict(vocab_size=16, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8)
  sizes.update(mlp_dim=64, feature_dim=8, max_seq_len=64)
  sizes.update(changes)
  lola = LoLAConfig(chunk_size=8, cache_size=4, implementation=implementation)
  return model_lib.ModelConfig(attention=kind, lola=lola, **sizes)


def _rel_rms(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.sqrt(np.mean((got - want) ** 2)) / max(np.sqrt(np.mean(want**2)), 1e-30))


def _child(cases):
  """In a subprocess with 8 CPU devices: per case, relative RMS of the sharded logits and
  gradients against the unsharded ones, and what the traced program contains."""
  import jax.numpy as jnp

  assert jax.device_count() == 8, jax.devices()
  out = {}
  for case in cases:
    start = time.time()
    kind, impl, mesh_shape, batch = case.split("/")
    mesh_shape = tuple(int(x) for x in mesh_shape.split("x"))
    mc = _config(kind, impl)
    params = model_lib.init_params(mc, jax.random.key(0))
    # Gates away from 0.5, different per head: a wrong head split changes the numbers.
    for block in params["blocks"].values():
      block["attn"]["gate"]["logit"] = jnp.linspace(-1.5, 2.0, mc.num_heads)
    tokens = jax.random.randint(jax.random.key(1), (int(batch), T), 0, mc.vocab_size)
    w = jax.random.normal(jax.random.key(2), (int(batch), T, mc.vocab_size))

    def loss(p, t, mc=mc, w=w):
      return jnp.sum(w * model_lib.logits(mc, p, t))

    fn = jax.jit(jax.value_and_grad(lambda p, t, mc=mc: (loss(p, t), model_lib.logits(mc, p, t))
                                    , has_aux=True))  # fmt: skip
    (_, ref_logits), ref_grads = fn(params, tokens)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(*mesh_shape))
    psh = sharding_lib.param_shardings(model_lib.logical_axes(mc), params, mesh)
    sharded_params = jax.device_put(params, psh)
    rows = sharding_lib.logical_to_spec(("batch", None), tokens.shape, mesh)
    sharded_tokens = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, rows))
    with jax.set_mesh(mesh):  # the ambient mesh the attention kernels shard over
      traced = fn.trace(sharded_params, sharded_tokens)
      (_, logits), grads = traced.lower().compile()(sharded_params, sharded_tokens)
    jaxpr = str(traced.jaxpr)
    grad_errors = jax.tree.map(_rel_rms, grads, ref_grads)
    out[case] = {
      "logits": _rel_rms(logits, ref_logits),
      "grads": max(jax.tree.leaves(grad_errors)),
      "gate_grads": [g["attn"]["gate"]["logit"] for g in grad_errors["blocks"].values()],
      "shard_maps": jaxpr.count("shard_map["),
      "pallas_calls": jaxpr.count("pallas_call["),
      "grad_spec": str(jax.tree.leaves(grads["blocks"])[0].sharding.spec),
      "seconds": time.time() - start,
    }
  print("RESULT" + json.dumps(out))


def _run_child(cases):
  env = dict(
    os.environ,
    # Compiling the interpret-mode kernels dominates: cheaper LLVM passes halve it.
    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
  )
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), ",".join(cases)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT") :])


def _check(out, case):
  got = out[case]
  assert got["logits"] <= TOL, (case, got)
  assert got["grads"] <= TOL, (case, got)
  assert all(e <= TOL for e in got["gate_grads"]), (case, got)
  assert got["shard_maps"] >= 2, (case, got)  # one per layer: the kernels ran inside shard_map
  if case.split("/")[1] == "pallas":
    assert got["pallas_calls"] >= 2, (case, got)


@pytest.mark.parametrize(
  "case",
  [
    "lola/pallas/2x2x2/8",
    pytest.param("hybrid/pallas/2x2x2/8", marks=pytest.mark.slow),  # the fused hybrid step
  ],
)
def test_kernels_under_a_mesh_equal_unsharded(case):
  """Forward and gradient of the sharded model equal the unsharded model's."""
  # (2, 2, 2): rows over data x fsdp (2 rows per device), heads over tensor (1 kv head each).
  # XLA under meshes: the trainer tests.
  out = _run_child([case])
  _check(out, case)
  if case.startswith("lola/"):  # the gate's gradient keeps its parameter's sharding
    assert out[case]["grad_spec"] == str(P("tensor"))


@pytest.mark.slow
def test_kernels_under_meshes_that_do_not_divide():
  # 4 tensor shards for 2 kv heads: heads stay whole; 6 rows over data=4: rows stay whole;
  # all of the batch over data; LoLA's XLA form and the linear kernel too.
  cases = [
    "lola/xla/2x2x2/8",
    "lola/pallas/1x2x4/8",
    "hybrid/pallas/1x2x4/8",
    "hybrid/pallas/4x1x2/6",
    "lola/xla/8x1x1/8",
    "linear/pallas/2x2x2/8",
  ]
  out = _run_child(cases)
  for case in cases:
    _check(out, case)


# In-process checks of the mesh in use (no devices needed: abstract meshes).


def test_no_mesh_calls_the_kernel_directly():
  mc = _config("hybrid", "xla", num_layers=1)
  params = model_lib.init_params(mc, jax.random.key(0))
  tokens = np.zeros((2, 16), np.int32)
  assert sharding_lib.mesh_in_use() is None
  jaxpr = str(jax.make_jaxpr(lambda p: model_lib.logits(mc, p, tokens))(params))
  assert "shard_map[" not in jaxpr


def test_mesh_in_use_and_free_rules():
  mesh = AbstractMesh((2, 2, 2), sharding_lib.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  with jax.sharding.use_abstract_mesh(mesh):
    assert sharding_lib.mesh_in_use() == mesh
  single = AbstractMesh((1, 1, 1), sharding_lib.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  with jax.sharding.use_abstract_mesh(single):
    assert sharding_lib.mesh_in_use() is None  # nothing to split over
  # Inside a caller's shard_map over data and fsdp, only tensor is left to the kernels.
  manual = (AxisType.Manual, AxisType.Manual, AxisType.Auto)
  partly = AbstractMesh((2, 2, 2), sharding_lib.MESH_AXES, axis_types=manual)
  rules = dict(sharding_lib.free_rules(partly))
  assert rules["batch"] is None and rules["heads"] == ("tensor",)
  with jax.sharding.use_abstract_mesh(partly):
    assert sharding_lib.mesh_in_use() == partly
  every = AbstractMesh((2, 2, 2), sharding_lib.MESH_AXES, axis_types=(AxisType.Manual,) * 3)
  with jax.sharding.use_abstract_mesh(every):
    assert sharding_lib.mesh_in_use() is None  # already per-device shards


if __name__ == "__main__":
  _child(sys.argv[1].split(","))
