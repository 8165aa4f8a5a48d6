"""Checkpoints are never lost or silently wrong (issue 16, items 1, 2, 5, 6).

A rerun with another configuration is refused with the fields named and the checkpoints left in
place; a diverging run stops at the first save on a non-finite state, naming the step, without
writing or pruning anything; a tiny change in a saved array is caught by the exact checksum
(its formula is tested in test_integrity.py); settings that
used to do nothing or the wrong thing (keep_checkpoints=0, fewer steps than done) raise.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import tasks, tiny_config

from lola_jax.training import checkpoint as ckpt_lib
from lola_jax.training import train_and_evaluate, trainer


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


def entries(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def saved_steps(workdir) -> list[int]:
  return sorted(int(n) for n in entries(workdir) if n.isdigit())


def restore_state(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",)) as m:
    return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


# --- item 1: a config change is not corruption ------------------------------------------------


def test_config_change_is_refused_naming_fields_and_keeps_checkpoints(tmp_path, capsys):
  run(tiny_config(train__steps=4, train__checkpoint_every=2), tmp_path)
  assert entries(tmp_path) == ["2", "4"]
  changed = tiny_config(train__steps=4, train__checkpoint_every=2)
  changed.model.d_model = 64
  with pytest.raises(
    ckpt_lib.ConfigMismatchError, match=r"model\.d_model: 32 in the checkpoint, 64"
  ):
    run(changed, tmp_path)
  assert entries(tmp_path) == ["2", "4"]  # nothing moved aside
  capsys.readouterr()
  resumed = run(tiny_config(train__steps=6, train__checkpoint_every=2), tmp_path)
  assert "Resumed from checkpoint 4" in capsys.readouterr().out
  assert resumed["step"] == 6 and saved_steps(tmp_path) == [2, 4, 6]


def _small_state(d=4):
  return {"params": {"w": jnp.arange(d * 3, dtype=jnp.float32).reshape(d, 3) / 7 + 1e-6}}


def test_checkpoint_without_stored_config_compares_array_shapes(tmp_path):
  """Checkpoints that hold no config (older runs) are compared by their arrays' shapes."""
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  ckpt.save(1, _small_state(4), {"data_position": 1})
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  abstract = jax.eval_shape(lambda: _small_state(5))
  with pytest.raises(ckpt_lib.ConfigMismatchError, match=r"params/w: shape \(4, 3\) float32 in"):
    ckpt.restore_latest(abstract)
  assert sorted(os.listdir(tmp_path)) == ["1"]
  ckpt.close()


# --- item 2: a diverging run keeps the finite checkpoints -------------------------------------


def test_divergence_stops_at_a_named_step_without_saving_or_pruning(tmp_path, capsys):
  run(tiny_config(train__steps=10, train__checkpoint_every=5, train__keep_checkpoints=2), tmp_path)
  assert saved_steps(tmp_path) == [5, 10]
  bad = tiny_config(
    train__steps=40, train__checkpoint_every=5, train__keep_checkpoints=2, train__log_every=50
  )
  bad.optim.lr = 1e6
  with pytest.raises(FloatingPointError, match=r"diverged at step (\d+).*optim\.lr") as err:
    run(bad, tmp_path)
  step = int(err.value.args[0].split("diverged at step ")[1].split(":")[0])
  assert 10 < step <= 40
  kept = saved_steps(tmp_path)
  assert 1 <= len(kept) <= 2 and 10 <= kept[-1] < step
  assert f"step {kept[-1]}, is kept" in str(err.value)
  for s in kept:  # every checkpoint left is finite: none was written from a NaN state
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restore_state(tmp_path, s)))
  capsys.readouterr()
  healthy = run(tiny_config(train__steps=kept[-1] + 1, train__checkpoint_every=5), tmp_path)
  out = capsys.readouterr().out
  assert "corrupted" not in out and f"Resumed from checkpoint {kept[-1]}" in out
  assert healthy["step"] == kept[-1] + 1 and np.isfinite(healthy["loss"])


def test_saving_a_non_finite_state_writes_nothing(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
  ckpt.save(1, _small_state(), {"data_position": 1})
  state = _small_state()
  state["params"]["w"] = state["params"]["w"].at[2, 1].set(jnp.inf)
  with pytest.raises(ckpt_lib.NonFiniteStateError, match=r"step 2 .*\(params/w\)"):
    ckpt.save(2, state, {"data_position": 2})
  assert ckpt.steps() == [1]  # keep=1 would have pruned step 1 had step 2 been written
  ckpt.close()


# --- item 6: an exact checksum ------------------------------------------------------------------


def test_restore_catches_a_tiny_change_the_old_fingerprint_accepted(tmp_path, capsys):
  """A saved array whose value 2e-6 reads back as 3e-6 (the issue's 4-byte flip) is damage."""
  good = {"params": {"w": jnp.full((4, 3), 2e-6, jnp.float32)}}
  bad = {"params": {"w": good["params"]["w"].at[1, 1].set(3e-6)}}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  ckpt.save(1, good, {"data_position": 1})
  ckpt.save(2, bad, {"data_position": 2})
  ckpt.close()
  # Step 2's data now differs from what its metadata was computed from: give it step 1's meta.
  meta1 = json.load(open(tmp_path / "1" / "meta" / "metadata"))
  json.dump(dict(meta1, step=2), open(tmp_path / "2" / "meta" / "metadata", "w"))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  state, meta = ckpt.restore_latest(jax.eval_shape(lambda: good))
  ckpt.close()
  assert meta["step"] == 1
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(good["params"]["w"]))
  out = capsys.readouterr().out
  assert "checkpoint 2" in out and "checksum" in out and "corrupted" in out


# --- item 5: settings that did nothing (or the wrong thing) -----------------------------------


def test_keep_checkpoints_zero_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"train\.keep_checkpoints must be an int >= 1 .*got 0"):
    run(tiny_config(train__keep_checkpoints=0), tmp_path)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_fewer_steps_than_done_is_refused(tmp_path):
  run(tiny_config(train__steps=4, train__checkpoint_every=2), tmp_path)
  with pytest.raises(ValueError, match=r"at step 4, past the 2 steps .*train\.steps=2"):
    run(tiny_config(train__steps=2, train__checkpoint_every=2), tmp_path)
  assert entries(tmp_path) == ["2", "4"]


def test_state_config_names_the_config_fields():
  c = tiny_config()
  flat = trainer.state_config(c, trainer.model_config_from(c))
  assert flat["model.d_model"] == 32 and flat["lola.cache_size"] == 4
  assert flat["train.mode"] == "lm" and "lola.implementation" not in flat
