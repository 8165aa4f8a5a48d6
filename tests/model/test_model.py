"""LoLALM: the three entry points agree, kinds relate as the spec says, configs validate."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lola_jax import LoLAConfig
from lola_jax import model as model_lib
from lola_jax.model import LoLALM, ModelConfig, layers

KINDS = ("softmax", "linear", "hybrid", "lola")


def tiny(**kw) -> ModelConfig:
  base = dict(
    vocab_size=61,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    feature_dim=8,
    max_seq_len=48,
    lola=LoLAConfig(chunk_size=4, cache_size=3),
  )
  base.update(kw)
  return ModelConfig(**base)


def tokens(b=2, t=19, seed=1, vocab=61):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


class Jitted:
  """Jitted entry points of a model (eager op-by-op dispatch is slow on CPU)."""

  def __init__(self, m: LoLALM):
    self.config = m.config
    g, st = nnx.split(m)
    self._st = st
    self._fwd = jax.jit(lambda st, t: nnx.merge(g, st)(t))
    self._prefill = jax.jit(lambda st, t, n, s: nnx.merge(g, st).prefill(t, n, s))
    self._decode = jax.jit(lambda st, t, s: nnx.merge(g, st).decode(t, s))
    self._distill = jax.jit(lambda st, t: nnx.merge(g, st).distill(t))
    self.model = m

  def __call__(self, t):
    return self._fwd(self._st, t)

  def prefill(self, t, lengths=None, states=None):
    return self._prefill(self._st, t, lengths, states)

  def decode(self, t, states):
    return self._decode(self._st, t, states)

  def distill(self, t):
    return self._distill(self._st, t)

  def with_lola_config(self, *a, **kw):
    return Jitted(self.model.with_lola_config(*a, **kw))


def make1(**kw) -> Jitted:
  """One layer: for tests that do not need the per-layer state plumbing (compiles faster)."""
  return make(num_layers=1, **kw)


def make(**kw) -> Jitted:
  return Jitted(LoLALM(tiny(**kw), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize(
  "kind,rope_fraction", [(k, 1.0) for k in KINDS] + [("softmax", 0.5), ("lola", 0.5)]
)
def test_prefill_and_decode_equal_training_forward(kind, rope_fraction):
  """Padded prefill, a continuing prefill, then decode steps: every logit equals the forward.

  Row 0 is prefilled with 8 tokens, row 1 with 5 (padded to 8); both continue with a 6-token
  prefill and then decode one token at a time. Causality makes the forward's prefix logits the
  reference for every step.
  """
  m = make(attention=kind, rope_fraction=rope_fraction)
  t_total = 19
  toks = tokens(t=t_total)
  full = m(toks)
  chex.assert_shape(full, (2, t_total, 61))
  close = lambda a, b: chex.assert_trees_all_close(a, b, atol=2e-5, rtol=2e-5)
  pos = np.array([8, 5])
  logits, st = m.prefill(toks[:, :8], jnp.asarray(pos))
  close(logits[0], full[0, :8])
  close(logits[1, :5], full[1, :5])
  cont = jnp.stack([toks[r, pos[r] : pos[r] + 6] for r in range(2)])
  logits, st = m.prefill(cont, None, st)
  for r in range(2):
    close(logits[r], full[r, pos[r] : pos[r] + 6])
  pos = pos + 6
  while pos[1] < t_total - 3:
    step_logits, st = m.decode(jnp.asarray(toks[np.arange(2), pos]), st)
    close(step_logits, full[np.arange(2), pos])
    pos = pos + 1
  np.testing.assert_array_equal(np.asarray(st[0].num_tokens), pos)


def test_lola_with_large_cache_equals_softmax():
  soft = make1(attention="softmax")
  toks = tokens(t=23)
  for mix in ("gated", "lolcats"):
    lola = soft.with_lola_config("lola", LoLAConfig(chunk_size=4, cache_size=32, mix=mix))
    assert lola.config.attention == "lola"
    chex.assert_trees_all_close(lola(toks), soft(toks), atol=2e-5, rtol=2e-5)
  # Hybrid (no cache) differs once tokens leave the window.
  hybrid = soft.with_lola_config("hybrid")
  assert hybrid.config.lola_config.cache_size == 0
  assert float(jnp.max(jnp.abs(hybrid(toks) - soft(toks)))) > 1e-3


@pytest.mark.slow  # about a minute on 2 cores
def test_layer_cache_sizes_give_each_layer_its_own_cache():
  """Cache 0 in layer 0 and a cache holding every token in layer 1 must be the LoLCATs hybrid in
  layer 0 followed by exact softmax attention in layer 1 (the spec's two limits), composed here
  block by block from the uniform kinds; and (3, 3) must equal cache_size 3 everywhere."""
  toks = tokens(t=23)
  base = LoLALM(tiny(attention="lola"), rngs=nnx.Rngs(0))
  mixed = base.with_lola_config(layer_cache_sizes=(0, 32))
  assert mixed.blocks[0].attn.config.lola_config.cache_size == 0
  assert mixed.blocks[1].attn.config.lola_config.cache_size == 32
  hybrid, soft = base.with_lola_config("hybrid"), base.with_lola_config("softmax")
  positions = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
  x = base.embed(toks)
  x, _, _ = hybrid.blocks[0](x, positions)
  x, _, _ = soft.blocks[1](x, positions)
  expected = base._head(x)
  logits, states = Jitted(mixed).prefill(toks)
  chex.assert_trees_all_close(logits, expected, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(Jitted(mixed)(toks), expected, atol=2e-5, rtol=2e-5)
  assert states[0].cache_k.shape[2] == 0 and states[1].cache_k.shape[2] == 32
  same = base.with_lola_config(layer_cache_sizes=(3, 3))
  chex.assert_trees_all_close(Jitted(same)(toks), Jitted(base)(toks), atol=1e-6, rtol=1e-6)
  # Lists (from ml_collections or flags) become a hashable tuple.
  assert tiny(layer_cache_sizes=[1, 2]).layer_cache_sizes == (1, 2)


@pytest.mark.slow  # sre_below prefill == decode stays in the default suite (tests/core)
def test_sre_below_stacks_selection_exactly_across_prefill_and_decode():
  """With policy "sre_below" each layer ranks first what the layer below holds. The prefill path
  (C-token segments through all layers) and token-by-token decode (priors from each step) must
  agree on every logit and every final state; and with room for the whole prior, layer 1 ends
  holding every position layer 0 holds (those left the window in both layers at the same
  chunk end and were ranked first ever since)."""
  cfg = tiny(
    attention="lola",
    lola=LoLAConfig(chunk_size=4, cache_size=4, policy="sre_below"),
    layer_cache_sizes=(2, 4),
  )
  m = Jitted(LoLALM(cfg, rngs=nnx.Rngs(3)))
  toks = tokens(t=27, seed=5)
  full, st_full = m.prefill(toks)
  chex.assert_trees_all_close(m(toks), full, atol=1e-5, rtol=1e-5)
  logits, st = m.prefill(toks[:, :7])
  steps = [logits]
  for t in range(7, 27):
    step_logits, st = m.decode(toks[:, t], st)
    steps.append(step_logits[:, None])
  chex.assert_trees_all_close(jnp.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(st, st_full, atol=1e-5, rtol=1e-5)
  low = np.asarray(st_full[0].cache_positions)
  high = np.asarray(st_full[1].cache_positions)
  assert (low >= 0).sum() > 0
  for b in range(low.shape[0]):
    for p in set(low[b][low[b] >= 0].tolist()):
      assert (high[b] == p).any(-1).all(), (b, p, low[b], high[b])
  # Plain "sre" with the same sizes does not hold them all (the test would pass vacuously if so).
  plain = Jitted(m.model.with_lola_config(lola=LoLAConfig(chunk_size=4, cache_size=4)))
  _, st_plain = plain.prefill(toks)
  high_plain = np.asarray(st_plain[1].cache_positions)
  low_plain = np.asarray(st_plain[0].cache_positions)
  assert any(
    not (high_plain[b] == p).any(-1).all()
    for b in range(low_plain.shape[0])
    for p in low_plain[b][low_plain[b] >= 0]
  )


def test_with_lola_config_shares_parameters():
  m = LoLALM(tiny(attention="hybrid"), rngs=nnx.Rngs(0))
  other = m.with_lola_config(lola=LoLAConfig(chunk_size=4, cache_size=8))
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(m)), nnx.to_pure_dict(nnx.state(other)))


def test_pure_logits_helper_matches_module():
  cfg = tiny(attention="lola", tie_embeddings=False, num_layers=1)
  m = LoLALM(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(m))
  toks = tokens()
  out = jax.jit(model_lib.logits, static_argnums=0)(cfg, params, toks)
  chex.assert_trees_all_close(out, Jitted(m)(toks), atol=1e-6, rtol=1e-6)
  fresh = model_lib.init_params(cfg, jax.random.key(0))
  chex.assert_trees_all_equal_shapes(fresh, params)


def test_distill_targets_are_softmax():
  cfg = tiny(attention="lola", lola=LoLAConfig(chunk_size=4, cache_size=32), num_layers=1)
  m = Jitted(LoLALM(cfg, rngs=nnx.Rngs(0)))
  toks = tokens()
  logits, mses = m.distill(toks)
  chex.assert_shape(mses, (1,))
  soft = m.with_lola_config("softmax")
  chex.assert_trees_all_close(logits, soft(toks), atol=1e-5, rtol=1e-5)
  assert float(jnp.max(mses)) < 1e-10  # cache >= T: LoLA is exact softmax
  _, mses_h = m.with_lola_config("hybrid").distill(toks)
  assert float(jnp.min(mses_h)) > 0


@pytest.mark.parametrize("feature_map", ["hedgehog", "elu", "identity"])
def test_feature_maps(feature_map):
  cfg = tiny(attention="linear", feature_map=feature_map, num_layers=1)
  assert cfg.phi_dim == (16 if feature_map == "hedgehog" else 8)
  out = Jitted(LoLALM(cfg, rngs=nnx.Rngs(0)))(tokens())
  assert bool(jnp.all(jnp.isfinite(out))) or feature_map == "identity"


def test_bfloat16_compute_keeps_float32_params_and_states():
  cfg = tiny(attention="lola", dtype="bfloat16", num_layers=1)
  m = Jitted(LoLALM(cfg, rngs=nnx.Rngs(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m.model)))
  toks = tokens()
  out = m(toks)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  _, st = m.prefill(toks)
  assert st[0].linear_h.dtype == jnp.float32
  ref = m.with_lola_config(dtype="float32")(toks)
  assert float(jnp.sqrt(jnp.mean((out - ref) ** 2) / jnp.mean(ref**2))) < 0.05


@pytest.mark.parametrize(
  "kw, field",
  [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(attention="flash"), "attention"),
    (dict(feature_map="relu"), "feature_map"),
    (dict(head_dim=7), "head_dim"),
    (dict(dtype="int8"), "dtype"),
    (dict(layer_cache_sizes=(3,)), "layer_cache_sizes"),
    (dict(layer_cache_sizes=(3, -1)), "layer_cache_sizes"),
    (dict(layer_cache_sizes=(3, 2.0)), "layer_cache_sizes"),
    (dict(layer_cache_sizes=(True, 2)), "layer_cache_sizes"),
  ],
)
def test_bad_config_names_field(kw, field):
  with pytest.raises(ValueError, match=field):
    tiny(**kw)


def test_partial_rotary_against_numpy():
  """apply_rope with rotary_dim r: the first r features rotate (rotate-half, base theta, r-dim
  frequencies), the rest pass unchanged; so their dot products ignore position."""
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 2, 8)), np.float64)
  pos = np.array([[0, 3, 7, 100, 513]])
  out = np.asarray(layers.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), 100.0, None, 4))
  freq = 100.0 ** (-np.arange(2) * 2.0 / 4)
  ang = pos[..., None, None] * freq
  x1, x2 = x[..., :2], x[..., 2:4]
  ref = np.concatenate(
    [x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang), x[..., 4:]], -1
  )
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert tiny(rope_fraction=0.5).rotary_dim == 4 and tiny().rotary_dim == 8
  with pytest.raises(ValueError, match="rope_fraction"):
    tiny(rope_fraction=0.0)
  with pytest.raises(ValueError, match="rotary_dim"):
    layers.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), 100.0, None, 3)
