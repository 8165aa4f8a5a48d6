"""Meshes, logical rules, and the same numbers under every mesh (8 simulated CPU devices)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lola_jax import sharding as sharding_lib

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mesh_config_resolves_and_validates():
  assert sharding_lib.MeshConfig(data=-1).resolve(8) == (8, 1, 1)
  assert sharding_lib.MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
  assert sharding_lib.MeshConfig(data=1, fsdp=1, tensor=1).resolve(8) == (1, 1, 1)
  with pytest.raises(ValueError, match="mesh.data"):
    sharding_lib.MeshConfig(data=16).resolve(8)
  with pytest.raises(ValueError, match="only one mesh axis"):
    sharding_lib.MeshConfig(data=-1, tensor=-1).resolve(8)
  with pytest.raises(ValueError, match="mesh.tensor"):
    sharding_lib.MeshConfig(tensor=0).resolve(8)
  with pytest.raises(ValueError, match="mesh.data=-1"):
    sharding_lib.MeshConfig(data=-1, tensor=3).resolve(8)


def test_logical_rules_replicate_what_does_not_divide():
  devs = np.array(jax.devices() * 1)
  mesh = jax.sharding.Mesh(devs.reshape(1, 1, 1), sharding_lib.MESH_AXES)
  spec = sharding_lib.logical_to_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh)
  assert spec == jax.sharding.PartitionSpec(None, None, None)  # size-1 axes are dropped


def test_mesh_larger_than_devices_fails_before_compilation():
  from train_helpers import tasks, tiny_config

  from lola_jax.training import setup

  c = tiny_config()
  c.mesh.data = 4
  with pytest.raises(ValueError, match="mesh.data"):
    setup(c, *tasks(c))
  c = tiny_config()
  c.model.attention = "ring"
  with pytest.raises(ValueError, match="model.attention"):
    setup(c, *tasks(c))
  c = tiny_config()
  c.model.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads"):
    setup(c, *tasks(c))


def _child(kinds):
  """Runs in a subprocess with 8 CPU devices: losses of two steps under each mesh, as JSON."""
  import jax.numpy as jnp
  from train_helpers import tasks, tiny_config

  from lola_jax.training import steps as steps_lib
  from lola_jax.training import trainer

  assert jax.device_count() == 8, jax.devices()
  out = {"errors": {}}
  c = tiny_config()
  c.train.batch_size = 6
  c.mesh.data = 8
  try:
    trainer.setup(c, *tasks(c))
  except ValueError as e:
    out["errors"]["batch"] = str(e)
  # Decode states: batch over (data, fsdp), kv heads over tensor.
  from flax import nnx

  from lola_jax.model import LoLALM, state_logical_axes

  c = tiny_config()
  mc = trainer.model_config_from(c).replace(attention="lola")
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  states = LoLALM(mc, rngs=nnx.Rngs(0)).init_states(8)
  axes = state_logical_axes(mc, states)
  placed = jax.device_put(states, sharding_lib.logical_shardings(axes, states, mesh))
  out["decode_state_spec"] = str(placed[0].linear_h.sharding.spec)
  for kind in kinds:
    host_state = None
    for mesh in MESHES:
      c = tiny_config()
      c.model.attention = kind
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
      s = trainer.setup(c, *tasks(c))
      if host_state is None:  # one initialisation, placed onto every mesh (fewer compiles)
        host_state = jax.device_get(trainer.initial_state(c, s))
      params = jax.device_put(host_state["params"], s.param_sh)
      opt = jax.device_put(host_state["opt_state"], s.opt_sh)
      step = steps_lib.jit_train_step(s.model_config, s.tx, s.mesh, s.param_sh, s.opt_sh)
      bsh = sharding_lib.batch_sharding(s.mesh)
      losses = []
      for i in range(2):
        batch = {k: sharding_lib.global_array(v, bsh) for k, v in s.task.batch(i, 8).items()}
        params, opt, m = step(params, opt, batch)
        losses.append(float(m["loss"]))
      norm = float(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(params)))
      out[f"{kind}/{mesh}"] = {
        "losses": losses,
        "param_sq_norm": norm,
        "embedding_spec": str(params["embed"]["embedding"].sharding.spec),
        "mlp_spec": str(params["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec),
      }
  print("RESULT" + json.dumps(out))


def _run_child(kinds):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
  )
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), ",".join(kinds)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT") :])


def _check_meshes(out, kind):
  ref = out[f"{kind}/{MESHES[0]}"]
  for mesh in MESHES[1:]:
    got = out[f"{kind}/{mesh}"]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["param_sq_norm"], ref["param_sq_norm"], rtol=1e-5)
  # Parameters really are spread: embed over fsdp, mlp over tensor.
  spec = jax.sharding.PartitionSpec
  assert out[f"{kind}/(2, 2, 2)"]["mlp_spec"] == str(spec("fsdp", "tensor"))
  assert out[f"{kind}/(1, 2, 4)"]["embedding_spec"] == str(spec("tensor", "fsdp"))


@pytest.mark.slow  # the default suite lowers the sharded step in test_sharded_export
def test_one_step_loss_equal_under_all_meshes_softmax():
  out = _run_child(["softmax"])
  assert "train.batch_size" in out["errors"]["batch"]
  spec = jax.sharding.PartitionSpec
  assert out["decode_state_spec"] == str(spec(("data", "fsdp"), "tensor", None, None))
  _check_meshes(out, "softmax")


@pytest.mark.slow
def test_one_step_loss_equal_under_all_meshes_lola_linear():
  out = _run_child(["lola", "linear"])
  _check_meshes(out, "lola")
  _check_meshes(out, "linear")


if __name__ == "__main__":
  _child(sys.argv[1].split(","))
