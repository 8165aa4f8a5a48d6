"""Orbax checkpoints of the whole training state, with integrity checks and fallback.

A checkpoint (directory `<workdir>/checkpoints/<step>`) holds two items:
  state: {'params', 'opt_state', 'rng'} sharded arrays (Orbax StandardSave);
  meta:  JSON {'step', 'data_position', 'fingerprint', 'model_config'}.

`step` is the number of optimizer steps taken; the data position is the index of the next batch
(`Task.batch(step, ...)` is deterministic in (seed, step)), so restoring both resumes exactly.

Orbax writes into a temporary directory and renames it when complete, so a save interrupted
half-way never shows up as a step. A finalised checkpoint that was damaged later (truncated or
deleted files, bit flips) is caught either by Orbax failing to read it or by the fingerprint
(float32 sum and sum of squares of every array) not matching; it is then reported, moved aside
to `corrupted-<step>-<time>`, and the previous step is tried. If checkpoints exist but none is
readable, restoring raises: training never silently restarts from scratch.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from lola_jax import sharding as sharding_lib


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them could be restored."""


@jax.jit
def _leaf_fingerprint(x):
  x = x.astype(jnp.float32)
  return jnp.stack([jnp.sum(x), jnp.sum(x * x)])


def fingerprint(tree) -> list[list[float]]:
  """[sum, sum of squares] per float leaf: a cheap content check of a restored state."""
  out = []
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      out.append([float(v) for v in sharding_lib.to_host(_leaf_fingerprint(leaf))])
  return out


def _fingerprints_match(a, b, rtol=1e-5) -> bool:
  if len(a) != len(b):
    return False
  fa, fb = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return bool(np.all(np.abs(fa - fb) <= rtol * (np.abs(fa) + np.abs(fb)) + 1e-6))


class Checkpointer:
  """Save every `every` steps (and on demand), keep the newest `keep`, restore with fallback."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      save_interval_steps=1,  # the loop decides when; `every` is applied by `should_save`
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: dict, meta: dict[str, Any]) -> None:
    """Save `state` (pytree of arrays) and `meta` (JSON) as checkpoint `step`."""
    meta = dict(meta, step=int(step), fingerprint=fingerprint(state))
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps(read=True))

  def restore_latest(self, abstract_state) -> tuple[dict, dict] | None:
    """(state, meta) of the newest readable checkpoint; None if there is none at all.

    `abstract_state`: pytree of jax.ShapeDtypeStruct with shardings (the restore target).
    Raises CheckpointError if checkpoints exist but every one of them is damaged.
    """
    steps = self.steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
          ),
        )
        state, meta = restored["state"], restored["meta"]
        if meta is None or int(meta.get("step", -1)) != step:
          raise ValueError(f"metadata missing or for another step: {meta!r}")
        if not _fingerprints_match(fingerprint(state), meta["fingerprint"]):
          raise ValueError("content fingerprint does not match the one saved with it")
      except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
        msg = f"checkpoint {step} in {self.directory} is corrupted or unreadable: {e!r}"
        logging.error(msg)
        moved = self._quarantine(step)
        print(
          f"WARNING: {msg[:400]}; moved it to {moved}; trying the previous checkpoint", flush=True
        )
        errors.append(msg[:1000])
        continue
      if errors:
        print(f"Resumed from checkpoint {step} after skipping {len(errors)} damaged one(s)")
      return state, meta
    raise CheckpointError(
      f"all {len(steps)} checkpoints in {self.directory} are damaged; refusing to restart from "
      "scratch (delete the directory to start over):\n" + "\n".join(errors)
    )

  def _quarantine(self, step: int) -> str:
    """Move a damaged step aside (kept for inspection) so that it can be written again."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupted-{step}-{int(time.time())}")
    if jax.process_index() == 0 and os.path.isdir(src):
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"lola_quarantine_{step}")
    self.manager.reload()
    return dst

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, abstract_params) -> tuple[Any, dict]:
  """Parameters (and meta) of the newest readable checkpoint of another run (e.g. a teacher).

  Only the 'params' subtree is read (partial restore of the saved state).
  """
  ckpt = Checkpointer(directory, every=0, keep=1000, async_save=False)
  steps = ckpt.steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  for step in reversed(steps):
    try:
      meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"
      ]
      restored = ckpt.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args=jax.tree.map(
              lambda s: ocp.ArrayRestoreArgs(
                sharding=s.sharding, global_shape=s.shape, dtype=s.dtype
              ),
              {"params": abstract_params},
            ),
            partial_restore=True,
          )
        ),
      )
      ckpt.close()
      return restored["state"]["params"], meta
    except Exception as e:  # noqa: BLE001
      msg = f"checkpoint {step} in {directory} is unreadable: {e!r}"
      logging.error(msg)
      print(f"WARNING: {msg}; trying the previous checkpoint", flush=True)
  ckpt.close()
  raise CheckpointError(f"no readable checkpoint in {directory}")


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def flat_params(params) -> dict[str, np.ndarray]:
  """{'blocks/0/attn/q_proj/kernel': array, ...}: a parameter pytree as named host arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {_path_name(path): np.asarray(v) for path, v in leaves}


def save_params_npz(params, path: str) -> None:
  """Writes a parameter pytree to a compressed .npz (names as in `flat_params`)."""
  np.savez_compressed(path, **flat_params(params))


def load_params_npz(path: str, abstract_params) -> Any:
  """A parameter pytree shaped like `abstract_params` from a `save_params_npz` file.

  Raises:
    ValueError: naming the file and the missing, unexpected or misshapen parameters.
  """
  stored = np.load(path)
  expected = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  missing = sorted(set(expected) - set(stored.files))
  extra = sorted(set(stored.files) - set(expected))
  if missing or extra:
    raise ValueError(
      f"{path} does not match the model: missing parameters {missing[:3]}, unexpected "
      f"{extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)"
    )
  bad = [n for n, x in expected.items() if stored[n].shape != tuple(x.shape)]
  if bad:
    n = bad[0]
    raise ValueError(
      f"{path}: parameter {n} has shape {stored[n].shape}, the model expects "
      f"{tuple(expected[n].shape)} ({len(bad)} mismatched)"
    )
  treedef = jax.tree_util.tree_structure(abstract_params)
  return jax.tree_util.tree_unflatten(
    treedef, [jnp.asarray(stored[n], x.dtype) for n, x in expected.items()]
  )
