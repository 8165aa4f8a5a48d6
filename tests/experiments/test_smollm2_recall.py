"""experiments/smollm2/recall.py end to end on the real SmolLM2 (slow: the model loads and every
row prefills a prompt): each row runs the feature maps fitted to its window, its cells and
perplexities record them, and a rerun with other maps for the same rows is refused rather than
mixed."""

import json

import pytest
from cli_helpers import run_module

from experiments.smollm2 import methods
from lola_jax import pretrained


@pytest.mark.slow
def test_rows_score_with_their_windows_maps_and_other_maps_are_refused(tmp_path):
  args = (
    "--preset=demo",
    "--contexts=512",
    "--prompts=1",
    "--depths=1",
    "--methods=teacher,lola64_sre,lola64_sre_c256,lola64_sre_c256_lean",
    f"--workdir={tmp_path}",
    "--stages=recall,perplexity",
    "--perplexity_lengths=512",
    "--perplexity_tokens=512",
  )
  out = run_module("experiments.smollm2.recall", *args, timeout=1200).stdout
  cells = {c["method"]: c for c in map(json.loads, open(tmp_path / "cells.jsonl"))}
  assert set(cells) == {"teacher", "lola64_sre", "lola64_sre_c256", "lola64_sre_c256_lean"}
  assert "feature_maps" not in cells["teacher"]
  c64 = methods.feature_maps_id(pretrained.SMOLLM2_FEATURE_MAPS)
  c256 = methods.feature_maps_id(pretrained.SMOLLM2_REFITTED_FEATURE_MAPS[256])
  assert cells["lola64_sre"]["feature_maps"] == c64
  assert (
    cells["lola64_sre_c256"]["feature_maps"] == c256 and cells["lola64_sre_c256"]["window"] == 256
  )
  assert "LoLA C256 cache 64 sre" in out
  # The state that recomputes its window's features: same prompt, same scores up to rounding,
  # and 2C D float32 values fewer per kv head and layer (30 layers x 3 heads x 512 x 128 x 4 B).
  stored, lean = cells["lola64_sre_c256"], cells["lola64_sre_c256_lean"]
  assert lean["window_features"] == "recomputed" and lean["feature_maps"] == c256
  assert abs(lean["margin"] - stored["margin"]) <= 1e-3 * max(1.0, abs(stored["margin"]))
  assert stored["state_bytes"] - lean["state_bytes"] == 30 * 3 * 2 * 256 * 128 * 4
  results = json.load(open(tmp_path / "results.json"))
  assert {r["method"] for r in results} == set(cells)
  ppl = {r["method"]: r for r in json.load(open(tmp_path / "perplexity.json"))}
  assert ppl["lola64_sre_c256"]["feature_maps"] == c256 and "feature_maps" not in ppl["teacher"]
  # The same workdir with one maps file for every row: the linearised cells were scored with
  # other maps, so the binary refuses instead of summarising a mix.
  bad = run_module(
    "experiments.smollm2.recall",
    *args,
    f"--feature_maps={pretrained.SMOLLM2_FEATURE_MAPS}",
    "--noscore",
    check=False,
  )
  assert bad.returncode != 0
  assert "lola64_sre_c256" in bad.stderr and "use a fresh --workdir" in bad.stderr
  bad = run_module(
    "experiments.smollm2.recall",
    *args[:-3],
    "--stages=perplexity",
    "--perplexity_lengths=512",
    f"--feature_maps={pretrained.SMOLLM2_FEATURE_MAPS}",
    check=False,
  )
  assert bad.returncode != 0 and "perplexity of row 'lola64_sre_c256'" in bad.stderr
