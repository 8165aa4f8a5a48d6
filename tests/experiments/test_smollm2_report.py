"""The SmolLM2 evaluation's bookkeeping: method rows, per-depth aggregation, tables, figures,
and the cache probe's held shares (synthetic inputs; the real model runs in the slow suite)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.smollm2 import methods, report
from lola_jax import generate, pretrained
from lola_jax import model as model_lib
from lola_jax.model import ModelConfig


def _cells():
  rng = np.random.default_rng(0)
  cells = []
  for method in ("teacher", "lola64_sre", "hybrid"):
    for ctx in (2048, 4096):
      for i in range(6):
        cells.append(
          {
            "method": method,
            "task": "passkey",
            "context": ctx,
            "index": i,
            "depth": [0.0, 0.5, 1.0][i % 3],
            "forced": bool(rng.random() < 0.6),
          }
        )
  return cells


def test_depth_cells_average_forced_per_depth():
  cells = _cells()
  labels = {"teacher": "teacher (full KV)", "lola64_sre": "LoLA 64"}
  out = report.depth_cells(cells, labels)
  assert {c["label"] for c in out} == set(labels.values())  # hybrid is not asked for
  assert len(out) == 2 * 2 * 3
  for c in out:
    name = next(k for k, v in labels.items() if v == c["label"])
    same = [
      x["forced"]
      for x in cells
      if x["method"] == name and x["context"] == c["context"] and x["depth"] == c["depth"]
    ]
    assert len(same) == 2
    assert c["accuracy"] == sum(same) / 2


def test_figures_and_table(tmp_path):
  cells = _cells()
  labels = {"teacher": "teacher (full KV)", "lola64_sre": "LoLA 64", "hybrid": "hybrid"}
  rows = [
    {
      "label": labels[m],
      "task": "passkey",
      "context": ctx,
      "prompts": 6,
      "accuracy": a,
      "greedy_accuracy": a / 2,
      "state_bytes": 2**20,
      "full_kv_bytes": 2**23,
    }
    for m, a in (("teacher", 1.0), ("lola64_sre", 0.5), ("hybrid", 0.25))
    for ctx in (2048, 4096)
  ]
  table = report.recall_table(rows)
  assert "| LoLA 64 | 50% / 25% (6) | 50% / 25% (6) | 1.00 | 8.00 |" in table
  for fn, name in ((report.plot_recall, "recall.png"),):
    path = fn(rows, str(tmp_path / name))
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", path
  report.plot_depths(cells, labels, str(tmp_path / "depths.png"))
  assert (tmp_path / "depths.png").stat().st_size > 1000
  # A run of needle-in-prose only: its own heat map; asking for a task it lacks names the task.
  niah = [{**c, "task": "niah"} for c in cells]
  report.plot_depths(niah, labels, str(tmp_path / "depths_niah.png"), task="niah")
  assert (tmp_path / "depths_niah.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="no cells of task 'passkey'"):
    report.plot_depths(niah, labels, str(tmp_path / "none.png"))


def test_policy_grid_figure(tmp_path):
  def row(method, attention, window, cache, policy, accuracy, ctx=4096):
    return {
      "method": method, "label": method, "attention": attention, "window": window,
      "cache_size": cache, "policy": policy, "task": "passkey", "context": ctx,
      "prompts": 20, "accuracy": accuracy,
    }  # fmt: skip

  rows = [row("teacher", "softmax", None, 0, None, 1.0), row("hyb", "hybrid", 256, 0, None, 0.25)]
  rows += [
    row(f"lola{c}_{p}", "lola", 256, c, p, a)
    for c, p, a in [(16, "sre", 0.9), (64, "sre", 1.0), (16, "recency", 0.2), (64, "recency", 0.2)]
  ]
  rows.append(row("lola64_sre_c64", "lola", 64, 64, "sre", 0.3))  # one policy: not a grid
  rows.append(row("lola64_sre_2k", "lola", 256, 64, "sre", 1.0, ctx=2048))  # one cache: neither
  grids = report.policy_grids(rows)
  assert list(grids) == [("passkey", 4096, 256)] and len(grids["passkey", 4096, 256]) == 4
  path = report.plot_policies(rows, str(tmp_path / "policies.png"))
  assert path and (tmp_path / "policies.png").stat().st_size > 1000
  assert report.plot_policies(rows[:2] + rows[-2:], str(tmp_path / "none.png")) is None
  assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize(
  "wide_name, lola_name, chunk",
  [("hybrid_wide", "lola64_sre", 8), ("hybrid_wide_c256_lean", "lola64_sre_c256_lean", 256)],
)
def test_equal_bytes_window_holds_lolas_bytes_in_the_decode_state(wide_name, lola_name, chunk):
  # The equal-bytes hybrid rows against the state the model really builds (generate.state_bytes
  # of a prefilled decode state), not against the formula that chose them; the lean pair keeps
  # no phi_k of its window, so a window token costs less than a cached pair.
  base = ModelConfig(
    vocab_size=32, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=32
  )
  rows = methods.all_methods(base, chunk=8)
  wide, lola = rows[wide_name], rows[lola_name]
  assert wide.cache_size == 0 and wide.chunk_size > chunk == lola.chunk_size
  assert wide.window_features == lola.window_features

  def measured(m):
    config = m.model_config(base)
    params = model_lib.init_params(config, jax.random.PRNGKey(0))
    _, states = generate.prefill(config, params, jnp.ones((1, 4), jnp.int32), max_len=8)
    return generate.state_bytes(states)

  # Not above LoLA's bytes, and one more window token per chunk would be.
  assert measured(wide) <= measured(lola)
  over = methods.Method(
    "over", "", "hybrid", wide.chunk_size + 1, window_features=wide.window_features
  )
  assert measured(over) > measured(lola)


def test_segment_is_a_multiple_of_each_rows_chunk():
  assert methods.segment_for(methods.Method("h", "", "hybrid", 95), 512) == 475
  assert methods.segment_for(methods.Method("l", "", "lola", 64, 64), 512) == 512
  assert methods.segment_for(methods.Method("w", "", "hybrid", 700), 512) == 700
  with pytest.raises(ValueError, match="segment must be a positive number of tokens, got 0"):
    methods.segment_for(methods.Method("l", "", "lola", 64, 64), 0)


def test_probe_held_shares():
  # Two layers, 2 kv heads, cache of 3 slots, chunk 4, 20 tokens seen: window from 12 on.
  def state(slots):
    return types.SimpleNamespace(
      cache_positions=np.asarray([slots]),
      num_tokens=np.asarray([20]),
      window_k=np.zeros((1, 2, 4, 8)),
    )

  states = [state([[1, 5, -1], [7, 9, 11]]), state([[-1, -1, -1], [-1, -1, -1]])]
  positions = np.asarray([5, 6, 7, 17])
  held, window = report.held_shares(states, positions)
  np.testing.assert_allclose(held, [0.5, 0.0])  # 5 and 7 cached (different heads)
  np.testing.assert_allclose(window, [0.25, 0.25])  # window = positions >= (20 // 4 - 1) * 4


def test_cells_of_a_redefined_row_are_refused():
  rows = [methods.Method("hybrid_wide", "", "hybrid", 95)]
  fresh = {"method": "hybrid_wide", **methods.row_setting(rows[0])}
  methods.check_cells(
    [fresh, {"method": "hybrid_wide"}, {"method": "other", "window": 1}], rows, "c"
  )
  stale = {**fresh, "window": 128}
  with pytest.raises(ValueError, match="row 'hybrid_wide' scored with .*'window': 128.*now"):
    methods.check_cells([stale], rows, "runs/x/cells.jsonl")


def test_cells_scored_with_other_feature_maps_are_refused(tmp_path):
  a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
  a.write_bytes(b"maps one")
  b.write_bytes(b"maps two")
  id_a, id_b = methods.feature_maps_id(str(a)), methods.feature_maps_id(str(b))
  assert id_a.startswith("a.safetensors@") and id_a != id_b
  rows = [methods.Method("lola", "", "lola", 64, 64), methods.Method("teacher", "", "softmax")]
  cell = {"method": "lola", **methods.row_setting(rows[0]), "feature_maps": id_a}
  teacher = {"method": "teacher", **methods.row_setting(rows[1])}
  methods.check_cells([cell, teacher], rows, "c", feature_maps={"lola": id_a})
  methods.check_cells([teacher], rows, "c", feature_maps={"lola": id_b, "teacher": id_b})
  with pytest.raises(ValueError, match="row 'lola' scored with .*a.safetensors@"):
    methods.check_cells([cell], rows, "runs/x/cells.jsonl", feature_maps={"lola": id_b})


def test_rows_run_the_maps_fitted_to_their_window():
  rows = methods.all_methods(types.SimpleNamespace(head_dim=64, phi_dim=128, dtype="float32"))
  c256 = pretrained.SMOLLM2_REFITTED_FEATURE_MAPS[256]
  assert rows["lola64_sre_c256"].feature_maps_file() == c256
  assert rows["hybrid_c256"].feature_maps_file() == c256
  lean = rows["lola64_sre_c256_lean"]
  assert lean.feature_maps_file() == c256 and (lean.chunk_size, lean.cache_size) == (256, 64)
  base = ModelConfig()
  assert lean.model_config(base).lola.window_features == "recomputed"
  assert rows["lola64_sre_c256"].model_config(base).lola.window_features == "stored"
  for cache in (16, 64, 256):
    for policy in ("sre", "recency", "sre_below", "energy"):
      other = rows[f"lola{cache}_{policy}_c256_lean"]
      assert other.feature_maps_file() == c256 and other.model_config(base).lola.policy == policy
      assert (other.chunk_size, other.cache_size, other.window_features) == (
        256, cache, "recomputed"
      )  # fmt: skip
  wide = rows["hybrid_wide_c256_lean"]
  assert wide.feature_maps_file() == c256 and wide.window_features == "recomputed"
  for name in ("lola64_sre_c256_m64", "hybrid_c256_m64", "lola64_sre", "hybrid", "hybrid_wide"):
    assert rows[name].feature_maps_file() == pretrained.SMOLLM2_FEATURE_MAPS, name
