"""The sharded training step exported for TPU (issue 15 part 4, its sharded half).

On 8 simulated CPU devices, the trainer's jitted step (`steps.jit_train_step`: parameters and
optimizer state sharded by `lola_jax.sharding`, batch over ("data", "fsdp")) with attention lola
and hybrid and the Mosaic TPU kernels (`implementation="pallas_tpu"`) is exported with
`jax.export` for `platforms=["tpu"]`. Without the model's `shard_map` around the kernels
(`lola_jax.model.attention.kernel_call`) this raises "Mosaic kernels cannot be automatically
partitioned"; here the exported module holds the Mosaic kernels (`tpu_custom_call`) inside
manual computations over the mesh.
"""

import json
import os
import re
import subprocess
import sys

import pytest

import pallas_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The Mosaic TPU family once the kernels name it; before that the local backend's Pallas (which
# on CPU is interpret mode: plain HLO, no Mosaic kernel to check).
IMPLEMENTATION = "pallas_tpu" if "pallas_tpu" in pallas_kernels.IMPLEMENTATIONS else "pallas"
MESHES = [(2, 2, 2), (4, 2, 1)]


def _child(kinds):
  """In a subprocess with 8 CPU devices: export the train step per kind and mesh; what the
  exported StableHLO holds, as JSON."""
  import jax
  from jax import export
  from train_helpers import tasks, tiny_config

  from lola_jax import model as model_lib
  from lola_jax import sharding as sharding_lib
  from lola_jax.training import steps as steps_lib
  from lola_jax.training import trainer

  assert jax.device_count() == 8, jax.devices()
  out = {}
  for kind in kinds:
    for mesh_shape in MESHES:
      c = tiny_config()
      c.model.attention = kind
      c.model.head_dim = 128  # the TPU lane width
      c.lola.implementation = IMPLEMENTATION
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
      s = trainer.setup(c, *tasks(c))
      step = steps_lib.jit_train_step(s.model_config, s.tx, s.mesh, s.param_sh, s.opt_sh)
      opt = jax.eval_shape(s.tx.init, s.abstract_params)
      opt = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt, s.opt_sh
      )
      bsh = sharding_lib.batch_sharding(s.mesh)
      batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh)
        for k, v in s.task.batch(0, c.train.batch_size).items()
      }
      exported = export.export(step, platforms=["tpu"])(s.abstract_params, opt, batch)
      text = exported.mlir_module()
      # The same forward with no mesh in use calls the kernels directly: XLA must partition
      # them itself, which Mosaic kernels refuse.
      forward = jax.jit(lambda p, x, mc=s.model_config: model_lib.logits(mc, p, x))
      try:
        export.export(forward, platforms=["tpu"])(s.abstract_params, batch["inputs"])
        unwrapped = "exported"
      except NotImplementedError as e:
        unwrapped = str(e)
      out[f"{kind}/{mesh_shape}"] = {
        "unwrapped": unwrapped,
        "platforms": list(exported.platforms),
        "nr_devices": exported.nr_devices,
        "mosaic_kernels": text.count("tpu_custom_call"),
        "manual": text.count("sdy.manual_computation") + text.count("SPMDFullToShardShape"),
        "names": sorted(set(re.findall(r"kernel_name = \"([^\"]*)\"", text))),
      }
  print("RESULT" + json.dumps(out))


def _generate_child():
  """Exports generation's jitted prefill (LoLA, Mosaic kernels) on a (4, 2, 1) mesh for TPU, with
  the decode states' shardings given (traced under their mesh) and without (no mesh in use)."""
  import jax
  from flax import nnx
  from jax import export
  from train_helpers import tiny_config

  from lola_jax import generate
  from lola_jax import model as model_lib
  from lola_jax import sharding as sharding_lib
  from lola_jax.model import LoLALM, state_logical_axes
  from lola_jax.training import trainer

  c = tiny_config()
  c.model.attention = "lola"
  c.model.head_dim = 128
  c.lola.implementation = IMPLEMENTATION
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=4, fsdp=2, tensor=1))
  mc = trainer.model_config_from(c)
  params = jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.PRNGKey(0)))
  states = jax.eval_shape(lambda: LoLALM(mc, rngs=nnx.Rngs(0)).init_states(8))
  shardings = sharding_lib.logical_shardings(state_logical_axes(mc, states), states, mesh)
  prompts = jax.ShapeDtypeStruct(
    (8, 64), jax.numpy.int32, sharding=sharding_lib.batch_sharding(mesh)
  )
  lengths = jax.ShapeDtypeStruct((8,), jax.numpy.int32, sharding=sharding_lib.batch_sharding(mesh))
  out = {}
  for name, sh in [("sharded", generate.StateSharding(shardings)), ("plain", None)]:
    fn = lambda p, x, n, sh=sh: generate._prefill(mc, p, x, n, max_len=64, state_sharding=sh)
    try:
      text = export.export(jax.jit(fn), platforms=["tpu"])(params, prompts, lengths).mlir_module()
      out[name] = {
        "mosaic_kernels": text.count("tpu_custom_call"),
        "manual": text.count("sdy.manual_computation") + text.count("SPMDFullToShardShape"),
      }
    except NotImplementedError as e:
      out[name] = {"error": str(e)}
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


@pytest.mark.parametrize("kind", ["lola", "hybrid"])
def test_sharded_train_step_exports_for_tpu(kind):
  out = _run_child([kind])
  for mesh_shape in MESHES:
    got = out[f"{kind}/{mesh_shape}"]
    assert got["platforms"] == ["tpu"] and got["nr_devices"] == 8, got
    assert got["manual"] >= 1, got  # the kernels run inside shard_map
    if IMPLEMENTATION == "pallas_tpu":
      # The Mosaic kernels of the forward and the backward (LoLA's fused chunk step; the
      # hybrid's forward and its two backward kernels).
      want = ["lola_chunk_step"] if kind == "lola" else [
        "lola_hybrid_bwd_kv", "lola_hybrid_bwd_q", "lola_hybrid_fwd"
      ]  # fmt: skip
      assert got["names"] == want, got
      assert "Mosaic kernels cannot be automatically partitioned" in got["unwrapped"], got


def test_sharded_generation_prefill_exports_for_tpu():
  out = _run_child(["generate"])
  assert out["sharded"].get("manual", 0) >= 1, out
  if IMPLEMENTATION == "pallas_tpu":
    assert out["sharded"]["mosaic_kernels"] >= 1, out
    assert "Mosaic kernels cannot be automatically partitioned" in out["plain"]["error"], out


if __name__ == "__main__":
  if sys.argv[1] == "generate":
    _generate_child()
  else:
    _child(sys.argv[1].split(","))
