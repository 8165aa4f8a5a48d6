"""The selection probe of the layer_budgets ablation: its replay of the cache rule equals the
core, the kernel recall, the secret's occurrences and the budget parser."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lola_jax import LoLAConfig, cached_positions, lola_prefill
from lola_jax.data import retrieval_example
from lola_jax.evaluation import selection_probe as lb


@pytest.mark.parametrize("t, chunk, cache", [(29, 4, 3), (40, 8, 5), (17, 4, 0)])
def test_replay_with_the_linear_state_equals_the_core(t, chunk, cache):
  """replay_selection + linear_recall is a second, NumPy float64 writing of the spec's update
  rule; on random positive features it must keep exactly the positions the core keeps."""
  rng = np.random.default_rng(t)
  hkv, d, feat = 2, 4, 6
  q = rng.normal(size=(1, t, hkv, d))
  k = rng.normal(size=(1, t, hkv, d))
  v = rng.normal(size=(1, t, hkv, d))
  phi_k = rng.uniform(0.1, 1.0, size=(1, t, hkv, feat))
  phi_q = rng.uniform(0.1, 1.0, size=(1, t, hkv, feat))
  config = LoLAConfig(chunk_size=chunk, cache_size=cache)
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v, phi_q, phi_k)]
  _, state = lola_prefill(*args, jnp.full((hkv,), 0.5), config=config)
  core = np.asarray(cached_positions(state))[0]
  for h in range(hkv):
    kept = lb.replay_selection(
      phi_k[0, :, h],
      v[0, :, h],
      lb.linear_recall(phi_k[0, :, h], v[0, :, h]),
      prompt_len=t,
      chunk=chunk,
      cache=cache,
    )
    np.testing.assert_array_equal(np.sort(core[h][core[h] >= 0]), kept)


def test_kernel_recall_is_nearest_neighbour_when_sharp():
  keys = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
  values = np.array([[1.0], [2.0], [3.0]])
  unit, recall = lb.kernel_recall(keys, values, beta=200.0)
  np.testing.assert_allclose(recall(unit[[0, 1]], np.array([0, 1])), [[1.0], [2.0]], atol=1e-6)
  np.testing.assert_allclose(recall(unit[[2]], np.array([], int)), [[0.0]])


def test_secret_occurrences_and_copy_pairs():
  ex = retrieval_example("passkey", 600, 0.5, 0, 0)
  occ = lb.secret_occurrences(ex)
  assert occ.shape == (2, 5)  # "The pass key is K. Remember it. K is the pass key."
  for row in occ:
    assert ex.prompt[row[0] : row[-1] + 1] == ex.key
  # Digits 2..5 of either copy count; the first digit does not.
  assert lb.copy_pairs_held(np.r_[occ[0, 1:3], occ[1, 3:]], occ) == 1.0
  assert lb.copy_pairs_held(occ[:, 0], occ) == 0.0
  assert lb.copy_pairs_held(occ[1, 1:2], occ) == 0.25


def test_parse_layer_caches_names_the_flag():
  assert lb.parse_layer_caches("16:all", 2, 999) == (16, 999)
  for bad in ("16", "16:x", "16:-1"):
    with pytest.raises(ValueError, match="--budgets: '" + bad):
      lb.parse_layer_caches(bad, 2, 999)
