"""Generation: greedy == transformers.generate, padded batches == rows alone, sampling, stop
tokens, streaming, constant state size, and 8 simulated devices."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lola_jax import generate as gen
from lola_jax import model
from lola_jax.core.config import LoLAConfig
from lola_jax.evaluation.memory import model_state_bytes

TINY = model.ModelConfig(
  vocab_size=64,
  num_layers=1,
  d_model=32,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
  attention="lola",
  feature_dim=8,
  lola=LoLAConfig(chunk_size=4, cache_size=4),
)
SAMPLING = gen.Sampling(temperature=0.8, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def tiny_params():
  return model.init_params(TINY, jax.random.key(0))


def test_greedy_matches_transformers_generate(tmp_path):
  from hf_helpers import hf_greedy, save_tiny_llama

  from lola_jax.convert import load_hf_llama

  hf = save_tiny_llama(tmp_path, "gqa")
  prompt = np.random.RandomState(1).randint(3, 97, (10,))
  want = hf_greedy(hf, prompt, 32)
  config, params = load_hf_llama(str(tmp_path))
  out = gen.generate(config, params, prompt[None], max_new_tokens=32, block_size=16)
  np.testing.assert_array_equal(out.tokens[0], want)
  assert out.num_generated.tolist() == [32]
  # A stop token ends the row there and pads the rest.
  stop = int(want[5])
  first = int(np.argmax(want == stop))
  out = gen.generate(
    config, params, prompt[None], max_new_tokens=32, block_size=16, stop_tokens=(stop,), pad_id=-1
  )
  np.testing.assert_array_equal(out.tokens[0, : first + 1], want[: first + 1])
  assert (out.tokens[0, first + 1 :] == -1).all() and out.num_generated.tolist() == [first + 1]


def test_padded_batch_rows_equal_rows_alone_and_stream_equals_generate(tiny_params):
  lengths = [3, 11, 6]
  rng = np.random.RandomState(0)
  prompts = np.zeros((3, 11), np.int32)  # right padding
  for b, n in enumerate(lengths):
    prompts[b, :n] = rng.randint(1, 64, n)
  keys = jax.random.split(jax.random.key(7), 3)
  kw = dict(max_new_tokens=20, sampling=SAMPLING, block_size=8)
  out = gen.generate(TINY, tiny_params, prompts, lengths, key=keys, **kw)
  assert out.tokens.shape == (3, 20) and out.num_generated.tolist() == [20] * 3
  np.testing.assert_array_equal(out.states[0].num_tokens, np.asarray(lengths) + 20)
  for b in (0,):
    alone = gen.generate(
      TINY, tiny_params, prompts[b : b + 1, : lengths[b]], key=keys[b : b + 1], **kw
    )
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[b])
  blocks = []
  streamed = list(gen.generate_stream(TINY, tiny_params, prompts, lengths, key=keys, **kw))
  assert [x.shape[1] for x in streamed] == [8, 8, 4]
  np.testing.assert_array_equal(np.concatenate(streamed, axis=1), out.tokens)
  gen.generate(TINY, tiny_params, prompts, lengths, key=keys, callback=blocks.append, **kw)
  assert len(blocks) == 3
  # Same key, same tokens; another key, other tokens.
  again = gen.generate(TINY, tiny_params, prompts, lengths, key=keys, **kw)
  np.testing.assert_array_equal(again.tokens, out.tokens)
  other = gen.generate(TINY, tiny_params, prompts, lengths, key=jax.random.key(8), **kw)
  assert (other.tokens != out.tokens).any()


def test_recomputed_window_features_generate_alike_in_a_smaller_state(tiny_params):
  """A model whose LoLA state keeps no window features (recomputed by each layer's key map)
  greedily generates the tokens of the stored variant, with logits within float32 rounding."""
  lean = TINY.replace(lola=dataclasses.replace(TINY.lola, window_features="recomputed"))
  prompts = np.random.RandomState(1).randint(1, 64, (2, 9)).astype(np.int32)
  kw = dict(max_new_tokens=15, block_size=8)  # C = 4: several chunk ends in prefill and decode
  ref = gen.generate(TINY, tiny_params, prompts, [9, 5], **kw)
  out = gen.generate(lean, tiny_params, prompts, [9, 5], **kw)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  assert not out.states[0].stores_window_features
  one_row = model_state_bytes(lean, 0)
  assert gen.state_bytes(model.bind(lean, tiny_params).init_states(1)) == one_row
  assert one_row < model_state_bytes(TINY, 0)
  logits = []
  for config in (TINY, lean):
    m = model.bind(config, tiny_params)
    y, states = m.prefill(prompts[:, :6])
    steps = [y[:, -1]]
    for t in range(6, 9):
      y, states = m.decode(prompts[:, t], states)
      steps.append(y)
    logits.append(np.stack(steps, 1))
  err = np.sqrt(np.mean((logits[1] - logits[0]) ** 2) / np.mean(logits[0] ** 2))
  assert err <= 1e-5


@pytest.mark.parametrize("policy, features", [("sre", "stored"), ("sre_below", "recomputed")])
def test_generation_loop_in_chunk_segments_equals_token_by_token_decode(policy, features):
  """`decode_block` decodes a segment's tokens with the chunk end deferred and runs
  `end_chunks` once per segment: the tokens and final states equal a Python loop of plain
  jitted `decode` calls (two layers, so "sre_below" stacks; rows at different chunk phases).

  The loop is jitted like generation's: a tiny random model repeats tokens, a repeated token has
  the same value vector at layer 0, and the first absorption scores against H = 0, so two
  candidates can tie exactly in self-recall error up to rounding, which differs between an eager
  and a jitted program."""
  lola = dataclasses.replace(TINY.lola, policy=policy, window_features=features)
  config = TINY.replace(num_layers=2, lola=lola)
  params = model.init_params(config, jax.random.key(3))
  prompts = np.random.RandomState(2).randint(1, 64, (2, 7)).astype(np.int32)
  lengths = np.asarray([7, 2], np.int32)
  out = gen.generate(config, params, prompts, lengths, max_new_tokens=14, block_size=8)
  decode = jax.jit(lambda p, tok, st: model.bind(config, p).decode(tok, st))
  logits, states = model.bind(config, params).prefill(prompts, lengths)
  logits = logits[np.arange(2), lengths - 1]
  tokens = []
  for _ in range(14):
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens.append(tok)
    logits, states = decode(params, tok, states)
  np.testing.assert_array_equal(out.tokens, np.stack(tokens, axis=1))
  for a, b in zip(jax.tree.leaves(out.states), jax.tree.leaves(states), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sample_logits_filters():
  logits = jax.numpy.asarray(np.random.RandomState(0).randn(4, 50).astype(np.float32))
  keys = jax.random.split(jax.random.key(0), 4)
  greedy = np.asarray(gen.sample_logits(logits, keys, gen.Sampling()))
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
  for s in (gen.Sampling(1.0, top_k=1), gen.Sampling(1.0, top_p=1e-6)):
    np.testing.assert_array_equal(np.asarray(gen.sample_logits(logits, keys, s)), greedy)
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  for i in range(5):
    ks = jax.random.split(jax.random.key(i), 4)
    tok = np.asarray(gen.sample_logits(logits, ks, gen.Sampling(2.0, top_k=3)))
    assert all(tok[b] in top3[b] for b in range(4))
  with pytest.raises(ValueError, match="top_p"):
    gen.Sampling(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    gen.Sampling(temperature=-1.0)


def test_bad_inputs_raise(tiny_params):
  with pytest.raises(ValueError, match="lengths"):
    gen.generate(TINY, tiny_params, np.ones((2, 4), np.int32), [0, 4], max_new_tokens=2)
  with pytest.raises(ValueError, match="prompts"):
    gen.generate(TINY, tiny_params, np.ones((4,), np.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.generate(TINY, tiny_params, np.ones((1, 4), np.int32), max_new_tokens=0)


def _constant_state(params, n):
  prompt = np.arange(1, 4, dtype=np.int32)[None]  # the shapes of the "alone" run: no recompiling
  final = {}
  sizes, shapes = [], []
  stream = gen.generate_stream(
    TINY, params, prompt, max_new_tokens=n, block_size=8, sampling=SAMPLING, final=final
  )
  for _ in stream:
    pass
  states = final["states"]
  sizes.append(gen.state_bytes(states))
  shapes.append(jax.tree.map(lambda x: x.shape, states))
  fresh = model.bind(TINY, params).init_states(1)
  assert gen.state_bytes(fresh) == sizes[0]
  assert jax.tree.map(lambda x: x.shape, fresh) == shapes[0]
  assert int(states[0].num_tokens[0]) == 3 + n
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(states))


def test_state_size_constant_over_5k_tokens(tiny_params):
  _constant_state(tiny_params, 5_000)


@pytest.mark.slow
def test_state_size_constant_over_100k_tokens(tiny_params):
  _constant_state(tiny_params, 100_000)


_SHARDED = textwrap.dedent(
  """
  import json, jax, numpy as np
  from lola_jax import generate as gen, model, sharding
  from lola_jax.core.config import LoLAConfig
  cfg = model.ModelConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_dim=64, attention=ATTN, feature_dim=4,
                          lola=LoLAConfig(chunk_size=4, cache_size=4, window_features=FEATURES))
  p = model.init_params(cfg, jax.random.key(0))
  prompts = np.random.RandomState(0).randint(1, 64, (4, 7)).astype(np.int32)
  lengths = [7, 3, 5, 2]
  kw = dict(max_new_tokens=12, block_size=6)
  ref = gen.generate(cfg, p, prompts, lengths, **kw)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  out = gen.generate(cfg, p, prompts, lengths, mesh=mesh, **kw)
  specs = [str(x.sharding.spec) for x in jax.tree.leaves(out.states)]
  print(json.dumps({"devices": jax.device_count(), "equal": bool((ref.tokens == out.tokens).all()),
                    "specs": specs}))
  """
)


@pytest.mark.slow
@pytest.mark.parametrize("attention, features", [("lola", "stored"), ("lola", "recomputed")])
def test_sharded_generation_on_8_cpu_devices(attention, features):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      _SHARDED.replace("ATTN", repr(attention)).replace("FEATURES", repr(features)),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["devices"] == 8 and res["equal"], res
  assert any("data" in s and "tensor" in s for s in res["specs"]), res["specs"]


@pytest.mark.slow  # two subprocesses that load and compile a model
def test_cli_window_features_recomputed_generates_the_stored_tokens(tmp_path):
  from cli_helpers import run_module
  from hf_helpers import save_tiny_llama  # needs torch and transformers (test-only)

  save_tiny_llama(tmp_path, "gqa")
  flags = (f"--hf_path={tmp_path}", "--attention=lola", "--chunk_size=4", "--cache_size=2",
           "--prompt_ids=" + ",".join(str(i) for i in range(1, 20)), "--max_new_tokens=12",
           "--stop_tokens=-1")  # fmt: skip
  stored = run_module("experiments.generate", *flags)
  lean = run_module("experiments.generate", *flags, "--window_features=recomputed")
  assert stored.stdout.strip() and lean.stdout == stored.stdout
