"""`layers.softmax_attention` by query blocks: the float64 NumPy numbers, bounded memory.

The recall evaluation prefills 16K tokens per batch at every context; with the whole [B, Hq, T, S]
score matrix that held 4.7 GB at T = 4K (and twice that at 8K: the notebook's kernel was
OOM-killed). Queries now go `query_block` at a time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lola_jax.model import layers


def _reference(q, k, v, q_pos, k_pos, k_valid, scale):
  """float64 NumPy causal GQA softmax attention."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) * scale
  mask = (np.asarray(k_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]) & np.asarray(k_valid)[
    :, None, :
  ]
  logits = np.where(mask[:, None], logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _rel_rms(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2))


def _inputs(t=200, s=None, b=2, hq=4, hkv=2, d=16):
  s = s or t
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, hq, d))
  k = jax.random.normal(ks[1], (b, s, hkv, d))
  v = jax.random.normal(ks[2], (b, s, hkv, d))
  q_pos = jnp.broadcast_to(jnp.arange(s - t, s), (b, t))  # the last t of s positions
  k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  filled = jnp.array([s, s - 7][:b])[:, None]  # row 1: 7 empty slots
  k_valid = jnp.arange(s)[None, :] < filled
  return q, k, v, q_pos, k_pos, k_valid, d**-0.5


@pytest.mark.parametrize("query_block", [None, 64, 37, 200, 512])
def test_blocks_match_the_float64_reference(query_block):
  args = _inputs(t=200, s=230)  # 200 queries: 64 and 37 do not divide it
  got = layers.softmax_attention(*args, query_block=query_block)
  assert got.shape == args[0].shape
  assert _rel_rms(got, _reference(*args)) <= 1e-6


def test_blocked_gradient_equals_unblocked():
  q, k, v, q_pos, k_pos, k_valid, scale = _inputs(t=150)
  w = jax.random.normal(jax.random.key(1), q.shape)

  def loss(q, k, v, block):
    y = layers.softmax_attention(q, k, v, q_pos, k_pos, k_valid, scale, query_block=block)
    return jnp.sum(w * y)

  want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None)
  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 32)
  for g, r in zip(got, want, strict=True):
    assert _rel_rms(g, r) <= 1e-6


def test_blocks_bound_the_scores_memory():
  args = _inputs(t=2048, b=1, hq=4, hkv=2, d=16)

  def temp_bytes(block):
    fn = jax.jit(lambda *a: layers.softmax_attention(*a[:-1], a[-1], query_block=block),
                 static_argnums=6)  # fmt: skip
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

  scores = 1 * 4 * 2048 * 2048 * 4  # one float32 [B, Hq, T, S]
  whole, blocked = temp_bytes(None), temp_bytes(256)
  assert whole >= scores  # the whole score matrix is materialised
  # A [B, Hq, 256, S] block (1/8 of the scores) at a time; measured: whole 202 MB, blocked 18 MB.
  assert blocked <= scores / 2 and whole >= 8 * blocked, (whole, blocked)


def _cache_inputs(t=50, s=230, filled=(200, 150), hq=4, hkv=2, d=16):
  """A KV cache of s slots, row b filled up to filled[b], and t queries at the last t filled
  positions of each row (a segment just written)."""
  b = len(filled)
  ks = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(ks[0], (b, t, hq, d))
  k = jax.random.normal(ks[1], (b, s, hkv, d))
  v = jax.random.normal(ks[2], (b, s, hkv, d))
  num = jnp.asarray(filled, jnp.int32)
  cache = layers.KVCache(k=k, v=v, num_tokens=num)
  q_pos = num[:, None] - t + jnp.arange(t)[None, :]
  k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  return cache, q, q_pos, (k_pos, k_pos < num[:, None])


@pytest.mark.parametrize("key_block", [None, 16, 37, 64, 229])
def test_cache_attention_by_key_blocks_matches_the_float64_reference(key_block):
  # Blocks beyond both rows' filled slots (from 200 on at block 16) are skipped; 37 and 229 do
  # not divide the 230 slots (the last block overlaps the one before it).
  cache, q, q_pos, (k_pos, k_valid) = _cache_inputs()
  got = layers.kv_cache_attention(cache, q, q_pos, 0.25, key_block=key_block)
  want = _reference(q, cache.k, cache.v, q_pos, k_pos, k_valid, 0.25)
  assert got.shape == q.shape
  assert _rel_rms(got, want) <= 1e-6


def test_cache_attention_by_key_blocks_is_differentiable_and_jits():
  cache, q, q_pos, _ = _cache_inputs(t=20, s=100, filled=(90, 40))
  w = jax.random.normal(jax.random.key(3), q.shape)

  def loss(q, k, v, block):
    c = layers.KVCache(k=k, v=v, num_tokens=cache.num_tokens)
    return jnp.sum(w * layers.kv_cache_attention(c, q, q_pos, 0.25, key_block=block))

  want = jax.grad(loss, argnums=(0, 1, 2))(q, cache.k, cache.v, None)
  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, cache.k, cache.v, 16)
  for g, r in zip(got, want, strict=True):
    assert _rel_rms(g, r) <= 1e-6
