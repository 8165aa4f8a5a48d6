"""Orbax checkpoints of the whole training state, with integrity checks and fallback.

A checkpoint (directory `<workdir>/checkpoints/<step>`) holds two items:
  state: {'params', 'opt_state', 'rng'} sharded arrays (Orbax StandardSave);
  meta:  JSON {'step', 'data_position', 'checksum', 'config', ...}.

`step` is the number of optimizer steps taken; the data position is the index of the next batch
(`Task.batch(step, ...)` is deterministic in (seed, step)), so restoring both resumes exactly.

What is checked, and what happens:
- Saving a state that holds NaN or Inf raises `NonFiniteStateError` before anything is written
  (the test runs on device, `integrity.summarize`), so a diverged run can neither overwrite nor
  prune (retention) the finite checkpoints before it.
- `meta['config']` holds the settings that define the state (the caller's flat
  {'model.d_model': 32, ...}). A rerun whose settings differ, or whose model's arrays have other
  names or shapes than the saved ones, raises `ConfigMismatchError` naming the fields (or arrays)
  and leaves every checkpoint in place: a different configuration is not damage.
- Orbax writes into a temporary directory and renames it when complete, so a save interrupted
  half-way never shows up as a step. A finalised checkpoint that was damaged later (truncated or
  deleted files, any changed byte) is caught either by Orbax failing to read it or by the exact
  checksum (`integrity`, two 32-bit sums per array) not matching the one saved with it; it is
  reported, moved aside to `corrupted-<step>-<time>`, and the previous step is tried. If
  checkpoints exist but none is readable, restoring raises: training never silently restarts
  from scratch.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from lola_jax.training import integrity


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them could be restored."""


class ConfigMismatchError(ValueError):
  """The checkpoints were written by a run with other settings (they are left in place)."""


class NonFiniteStateError(FloatingPointError):
  """A state with NaN or Inf was about to be saved (nothing was written)."""

  def __init__(self, step: int, leaves: list[str]):
    self.step, self.leaves = step, leaves
    super().__init__(
      f"the state at step {step} holds NaN or Inf in {len(leaves)} array(s) "
      f"({', '.join(leaves[:3])}{', ...' if len(leaves) > 3 else ''}); not saved"
    )


def _json_normal(value):
  """The value as JSON reads it back (tuples become lists, ...)."""
  return json.loads(json.dumps(value))


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """'name: <saved> in the checkpoint, <now> now' for each field both hold with other values."""
  now = _json_normal(now)
  return [
    f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now"
    for k in sorted(set(saved) & set(now))
    if saved[k] != now[k]
  ]


def _shape_differences(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  out = [f"{n}: missing in the checkpoint" for n in sorted(set(expected) - set(saved))]
  out += [f"{n}: in the checkpoint, not in this model" for n in sorted(set(saved) - set(expected))]
  out += [
    f"{n}: shape {saved[n][0]} {saved[n][1]} in the checkpoint, {expected[n][0]} {expected[n][1]} "
    "now"
    for n in sorted(set(saved) & set(expected))
    if saved[n] != expected[n]
  ]
  return out


def _shapes(tree) -> dict[str, tuple]:
  """{leaf name: (shape, dtype name)} of a pytree of arrays or array metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {
    integrity.path_name(p): (tuple(int(d) for d in x.shape), np.dtype(x.dtype).name)
    for p, x in leaves
    if hasattr(x, "shape")
  }


def _registry():
  """Handlers for both items, so that metadata can be read before any restore."""
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    reg.add("state", args, ocp.StandardCheckpointHandler())
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    reg.add("meta", args, ocp.JsonCheckpointHandler())
  return reg


class Checkpointer:
  """Save every `every` steps (and on demand), keep the newest `keep`, restore with fallback."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
      raise ValueError(f"keep (checkpoints kept) must be an int >= 1, got {keep!r}")
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
      self.directory, options=options, handler_registry=_registry()
    )

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: dict, meta: dict[str, Any]) -> None:
    """Save `state` (pytree of arrays) and `meta` (JSON) as checkpoint `step`.

    Raises:
      NonFiniteStateError: `state` holds NaN or Inf; nothing is written or pruned.
    """
    checksums, nonfinite = integrity.summarize(state)
    if nonfinite:
      raise NonFiniteStateError(step, nonfinite)
    meta = dict(meta, step=int(step), checksum=checksums)
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def _read_meta(self, step: int) -> dict:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or int(meta.get("step", -1)) != step:
      raise ValueError(f"metadata missing or for another step: {meta!r}")
    return meta

  def _check_compatible(self, step: int, meta: dict, abstract_state, config) -> None:
    """Raises ConfigMismatchError if checkpoint `step` was written with other settings/arrays."""
    diffs = config_differences(meta.get("config") or {}, config or {})
    if not diffs:
      saved = _shapes(self.manager.item_metadata(step)["state"])
      if not saved:
        raise ValueError("the array metadata is missing")  # damage, not another configuration
      diffs = _shape_differences(saved, _shapes(abstract_state))
    if diffs:
      raise ConfigMismatchError(
        f"checkpoint {step} in {self.directory} was written by a run with another "
        f"configuration: {'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}. Resume with "
        "the checkpoint's settings, or start this configuration in another workdir; the "
        "checkpoints are left in place."
      )

  def restore_latest(self, abstract_state, config: dict | None = None) -> tuple[dict, dict] | None:
    """(state, meta) of the newest readable checkpoint; None if there is none at all.

    `abstract_state`: pytree of jax.ShapeDtypeStruct with shardings (the restore target).
    `config`: the flat settings the run saves in meta['config'] ({'model.d_model': 32, ...}).
    Raises ConfigMismatchError (nothing moved) if the newest readable checkpoint's settings or
    array shapes differ from `config` / `abstract_state`; CheckpointError if checkpoints exist
    but every one of them is damaged.
    """
    steps = self.steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        meta = self._read_meta(step)
        self._check_compatible(step, meta, abstract_state, config)
        state = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )["state"]
        _verify(step, state, meta)
      except ConfigMismatchError:
        raise
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


def _verify(step: int, state, meta: dict, prefix: str = "") -> None:
  """Raises ValueError if `state` differs from what was saved (checksum) or is not finite."""
  checksums, nonfinite = integrity.summarize(state)
  if prefix:
    checksums = {f"{prefix}/{n}": c for n, c in checksums.items()}
  if "checksum" in meta:
    bad = integrity.checksum_mismatches(meta["checksum"], checksums)
    if bad:
      raise ValueError(
        f"content checksum of {len(bad)} array(s) ({', '.join(bad[:3])}) differs from the one "
        "saved with it"
      )
  else:
    print(
      f"WARNING: checkpoint {step} has no checksum (written by an older version); its content "
      "is not verified",
      flush=True,
    )
  if nonfinite:
    raise ValueError(f"holds NaN or Inf in {', '.join(nonfinite[:3])}")


def restore_params(directory: str, abstract_params) -> tuple[Any, dict]:
  """Parameters (and meta) of the newest readable checkpoint of another run (e.g. a teacher).

  Only the 'params' subtree is read (partial restore of the saved state) and checked against
  the checksums saved with it.
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  for step in reversed(steps):
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      restored = manager.restore(
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
      params = restored["state"]["params"]
      _verify(step, params, meta, prefix="params")
      manager.close()
      return params, meta
    except Exception as e:  # noqa: BLE001
      msg = f"checkpoint {step} in {directory} is unreadable: {e!r}"
      logging.error(msg)
      print(f"WARNING: {msg}; trying the previous checkpoint", flush=True)
  manager.close()
  raise CheckpointError(f"no readable checkpoint in {directory}")


def flat_params(params) -> dict[str, np.ndarray]:
  """{'blocks/0/attn/q_proj/kernel': array, ...}: a parameter pytree as named host arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {integrity.path_name(path): np.asarray(v) for path, v in leaves}


def save_params_npz(params, path: str) -> None:
  """Writes a parameter pytree to a compressed .npz (names as in `flat_params`)."""
  np.savez_compressed(path, **flat_params(params))


def load_params_npz(path: str, abstract_params) -> Any:
  """A parameter pytree shaped like `abstract_params` from a `save_params_npz` file.

  Raises:
    ValueError: naming the file and the missing, unexpected or misshapen parameters.
  """
  stored = np.load(path)
  leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  expected = {integrity.path_name(p): x for p, x in leaves}
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
