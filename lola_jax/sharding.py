"""Device meshes, logical axis rules and shardings for parameters, optimizer state, batches and
decode states; the multi-host entry point.

The mesh has three named axes:
  data    pure data parallelism (parameters replicated);
  fsdp    data parallelism with parameters and optimizer state sharded along "embed" (ZeRO-3);
  tensor  Megatron-style model parallelism over heads, kv_heads, mlp and vocab.
Batches are split over ("data", "fsdp"). A logical dimension whose size does not divide by its
mesh axes stays replicated (e.g. 2 kv heads on a tensor axis of 4), so any mesh that fits the
devices runs; the rules decide only where data lives, never the numbers.

This module maps trees of logical axis names onto a mesh and knows nothing of the model: the
model declares the names (`lola_jax.model.logical_axes` for parameters,
`lola_jax.model.state_logical_axes` for decode states) and callers pass them in, with the arrays'
shapes. Train and eval steps (`lola_jax/training/steps.py`) are `jax.jit` with explicit
`in_shardings` and `out_shardings` built here: the same code runs on 1 CPU, 8 simulated CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), a GPU, a TPU slice or several
hosts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes (None = replicated). Parameters: embed, vocab, heads, kv_heads,
# head_dim, mlp, feature, norm; activations / states: batch, kv_heads.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("feature", None),
  ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; exactly one may be -1 (= all remaining devices)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`; ValueError naming the bad field."""
    sizes = {name: getattr(self, name) for name in MESH_AXES}
    for name, size in sizes.items():
      if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(f"mesh.{name} must be an int >= 1 or -1, got {size!r}")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
      raise ValueError(f"only one mesh axis may be -1, got {free} (mesh.{free[1]})")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
      if num_devices % fixed:
        raise ValueError(
          f"mesh.{free[0]}=-1: {num_devices} devices do not divide by the other axes ({fixed})"
        )
      sizes[free[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total > num_devices:
      raise ValueError(
        f"mesh {sizes} needs {total} devices but only {num_devices} exist "
        f"(mesh.data * mesh.fsdp * mesh.tensor must be <= {num_devices})"
      )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes).

  Axes are `AxisType.Auto`: shardings are given at the jit boundary and XLA's partitioner
  propagates them inside (pjit semantics).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = config.resolve(len(devices))
  n = math.prod(shape)
  if n == len(devices):
    try:
      return jax.make_mesh(
        shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3
      )
    except Exception:  # noqa: BLE001 - fall back to a plain reshape (e.g. odd topologies)
      pass
  return Mesh(
    np.asarray(devices[:n]).reshape(shape),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
  )


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
  names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> P:
  """PartitionSpec for an array with logical axis `names` and `shape` on `mesh`.

  A dimension is sharded only if its size divides by the mesh axes' size and those mesh axes
  are not already used by an earlier dimension; otherwise it is replicated.
  """
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape, strict=True):
    axes = table.get(name) if name is not None else None
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    flat = tuple(a for a in flat if mesh.shape.get(a, 1) > 1 and a not in used)
    if flat and size % _axis_size(mesh, flat) == 0:
      used.update(flat)
      spec.append(flat[0] if len(flat) == 1 else flat)
    else:
      spec.append(None)
  return P(*spec)


def _is_axes(x) -> bool:
  """A leaf of an axes tree: None or a tuple of logical names (str or None per dimension)."""
  return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def logical_shardings(axes, shapes, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedSharding per array of `shapes` from its logical axis names in `axes`.

  Args:
    axes: a tree matching `shapes` whose leaves are tuples of logical axis names (one per
      dimension, None for a dimension no rule shards) or None (replicated), e.g.
      `lola_jax.model.logical_axes(config)` or `lola_jax.model.state_logical_axes(config, s)`.
    shapes: the arrays (or `jax.ShapeDtypeStruct`s) the shardings are for.
    mesh, rules: the mesh and the logical axis -> mesh axes rules (`logical_to_spec`).
  """
  return jax.tree.map(
    lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)),
    axes,
    shapes,
    is_leaf=_is_axes,
  )


def param_shardings(axes, shapes, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """NamedSharding per parameter (MaxText's `param_shardings(logical_axes_tree, mesh)`):
  `axes = lola_jax.model.logical_axes(config)`, `shapes` the (abstract) parameters."""
  return logical_shardings(axes, shapes, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, params_abstract, param_sh, mesh: Mesh):
  """Optimizer-state shardings: moments follow their parameter, everything else replicated.

  Leaves an `optax.masked` optimizer keeps no state for (`MaskedNode`) stay `MaskedNode`.
  """
  state = jax.eval_shape(tx.init, params_abstract)
  replicated = NamedSharding(mesh, P())
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(
    tx,
    lambda v, sh: v if masked(v) else sh,
    state,
    param_sh,
    transform_non_params=lambda _: replicated,
    is_leaf=masked,
  )


def mesh_in_use() -> jax.sharding.AbstractMesh | None:
  """The mesh the current computation runs under, or None.

  That is the ambient mesh: set with `jax.set_mesh(mesh)` around a call, or with
  `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)` inside a traced function (the trainer's
  jitted steps do, `lola_jax/training/steps.py`). None when no mesh is set, or when none of its
  axes of size > 1 is still free (every axis already manual: the caller is inside a
  `jax.shard_map` of its own and the arrays are per-device shards).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  manual = set(mesh.manual_axes)
  if not any(size > 1 and name not in manual for name, size in mesh.shape.items()):
    return None
  return mesh


def free_rules(mesh, rules=DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
  """`rules` without the mesh axes that are already manual on `mesh` (inside a shard_map)."""
  manual = set(getattr(mesh, "manual_axes", ()))
  out = []
  for name, axes in rules:
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    flat = tuple(a for a in flat if a not in manual)
    out.append((name, flat or None))
  return tuple(out)


def shard_map_logical(fn, args: tuple, in_axes: tuple, out_axes, mesh, rules=DEFAULT_RULES):
  """`fn(*args)` run per device inside `jax.shard_map` over every free axis of `mesh`.

  Each array's PartitionSpec comes from its logical axis names (`logical_to_spec`: a dimension
  is split only where its size divides by the mesh axes, else replicated), so the caller's
  rules decide the split; every free mesh axis becomes manual (a Mosaic TPU kernel is only
  accepted when all axes are, `jax._src.tpu_custom_call`). `fn` must compute each output shard
  from the matching input shards alone (no collective inside): true of attention over batch
  rows and heads when both the query and the key/value heads are split the same way.

  Args:
    fn: the per-shard function (it sees local shapes).
    args: its positional arguments, pytrees of arrays (no None leaves).
    in_axes: per argument, a tree matching it whose leaves are tuples of logical names (one
      per dimension, None for an unsplit one) or None (replicated).
    out_axes: the same for the outputs of `fn`.
    mesh: the (abstract) mesh in use (`mesh_in_use()`); rules: logical name -> mesh axes.
  """
  rules = free_rules(mesh, rules)

  def specs(axes, tree):
    def spec(names, x):
      return P() if names is None or x is None else logical_to_spec(names, x.shape, mesh, rules)

    return jax.tree.map(spec, axes, tree, is_leaf=_is_axes)

  manual = set(mesh.manual_axes)
  free = frozenset(a for a in mesh.axis_names if a not in manual)
  out_shapes = jax.eval_shape(fn, *args)
  return jax.shard_map(
    fn,
    in_specs=tuple(specs(a, x) for a, x in zip(in_axes, args, strict=True)),
    out_specs=specs(out_axes, out_shapes),
    axis_names=free,
    # The kernels declare their outputs without `manual_axis_type` (pallas_call refuses
    # check_vma=True then); with False the transpose still sums the cotangents of replicated
    # inputs (the gate over batch shards) across devices.
    check_vma=False,
  )(*args)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T] batches: batch over ("data", "fsdp"), time replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  """ValueError naming `field` unless the batch splits evenly over the data-parallel axes."""
  dp = _axis_size(mesh, BATCH_AXES)
  if batch_size % dp:
    raise ValueError(
      f"{field}={batch_size} must be divisible by the data-parallel size "
      f"mesh.data * mesh.fsdp = {dp}"
    )


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a host array every process holds in full (deterministic data)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """A replicated (or fully addressable) array as numpy, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(jax.device_get(x))


def initialize_distributed(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """`jax.distributed.initialize` when a coordinator is given (multi-host); no-op otherwise.

  On Cloud TPU / SLURM / Kubernetes, `jax.distributed.initialize()` can discover these itself;
  pass them explicitly elsewhere (e.g. two local CPU processes on 127.0.0.1).
  """
  if not coordinator_address:
    return
  kwargs: dict[str, Any] = {"coordinator_address": coordinator_address}
  if num_processes is not None:
    kwargs["num_processes"] = num_processes
  if process_id is not None:
    kwargs["process_id"] = process_id
  # CPU devices of several processes talk through gloo (GPU/TPU use their own collectives).
  # Must not query the backend here: initialize() has to run before any backend exists.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
