"""LoLA attention as pure functions: the chunked prefill scan and the one-token decode step.

A query at position t in chunk n = t // C attends with exact softmax to

  U_t = G + (chunk n-1) + {tokens of chunk n at positions <= t}

(the sparse cache, the previous complete chunk and the causal part of its own chunk), and reads
the linear state (H, s) as it stood at the start of chunk n. The two branches are combined with
one shared denominator (`pallas_kernels.equations`). When chunk n completes, the pairs of chunk
n-1 and the old cache compete for the cache (`lola_jax.core.selection`), the losers are absorbed
into (H, s), and chunk n becomes the window.

Prefill walks the sequence chunk by chunk with `lax.scan` over `_chunk_step`; every step is a few
dense matmuls: the logits of C queries against the L + 2C keys of [cache; window; chunk], the
linear read-out, the self-recall errors of the L + C candidates and one absorption matmul.
`_chunk_attend` is the one place that picks the fused Pallas kernel or the XLA form of the step
(`pallas_kernels.lola_chunk`). Decode appends one token to the current chunk and runs the same
cache update when the chunk completes, so scoring is paid once per chunk, not per token.

Shapes: see the legend in `lola_jax.core.state`; G = Hq // Hkv query heads share each kv head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lola_jax.core import validation
from lola_jax.core.compiler import decode_jit
from lola_jax.core.config import LoLAConfig
from lola_jax.core.key_features import (
  check_key_feature_map,
  key_features,
  with_window_features,
  without_window_features,
)
from lola_jax.core.selection import SRE_POLICIES, Candidates, update_sparse_cache
from lola_jax.core.state import LoLAState, init_state
from pallas_kernels.common import resolve_implementation
from pallas_kernels.equations import gate_terms, mix_branches, mix_weights
from pallas_kernels.lola_chunk import attend, lola_chunk_step
from pallas_kernels.lola_chunk.xla import chunk_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkCarry:
  """What the prefill scan carries from one chunk to the next (shapes as in `LoLAState`).

  Attributes:
    cache: the sparse cache as Candidates (L slots; `mass` only for the "attention" policy).
    window_k, window_v, window_phi_k: [B, Hkv, C, .] the previous complete chunk.
    window_mass: [B, Hkv, C] softmax mass the window's pairs received ([B, Hkv, 0] untracked).
    has_window: [B] bool, whether the row has completed a chunk.
    linear_h: [B, Hkv, D, dv] float32.  linear_s: [B, Hkv, D] float32.
  """

  cache: Candidates
  window_k: jax.Array
  window_v: jax.Array
  window_phi_k: jax.Array
  window_mass: jax.Array
  has_window: jax.Array
  linear_h: jax.Array
  linear_s: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkBlock:
  """One chunk of the laid-out tokens (the scan's input slice).

  Attributes:
    q: [B, C, Hq, dk]  phi_q: [B, C, Hq, D]  k: [B, C, Hkv, dk]  v: [B, C, Hkv, dv]
    phi_k: [B, C, Hkv, D]
    real: [B, C] bool, slots holding a token (buffered tokens of the state included).
    new_query: [B, C] bool, slots holding a token of this call (their mass is accumulated).
    mass: [B, Hkv, C] mass the block's buffered tokens already received ([B, Hkv, 0] untracked).
    index: [B] int32 chunk index n of the block.
  """

  q: jax.Array
  phi_q: jax.Array
  k: jax.Array
  v: jax.Array
  phi_k: jax.Array
  real: jax.Array
  new_query: jax.Array
  mass: jax.Array
  index: jax.Array


def _attend(config, q, phi_q, keys, values, key_mask, linear_h, linear_s, gates, mass_queries=None):
  """LoLA outputs of a block of queries (`pallas_kernels.lola_chunk.attend`), and the softmax
  mass the keys received.

  Args:
    q: [B, Hkv, G, Tq, dk]  phi_q: [B, Hkv, G, Tq, D]
    keys: [B, Hkv, Tk, dk]  values: [B, Hkv, Tk, dv]
    key_mask: bool, broadcastable to [B, Hkv, Tq, Tk]: key i is in query t's softmax set.
    linear_h: [B, Hkv, D, dv] float32  linear_s: [B, Hkv, D] float32
    gates: (g, log g, log(1-g)), each [Hkv, G] (`pallas_kernels.equations.gate_terms`).
    mass_queries: optional [B, Tq] bool, the queries whose softmax mass is accumulated.

  Returns:
    y [B, Hkv, G, Tq, dv] float32, and the softmax mass each key received from `mass_queries`
    summed over the group, [B, Hkv, Tk] (None when `mass_queries` is None):
    mass_i = sum_{g, t} e^{l_ti - m_t} / S_t.
  """
  y, p, s = attend(
    q, phi_q, keys, values, key_mask, linear_h, linear_s, gates,
    scale=config.scale(q.shape[-1]), mix=config.mix,
  )  # fmt: skip
  if mass_queries is None:
    return y, None
  p = p / jnp.where(s > 0, s, 1.0)
  mass = jnp.einsum("bhgqk,bq->bhk", jax.lax.stop_gradient(p), mass_queries.astype(linear_h.dtype))
  return y, mass


def _group_queries(x, num_kv_heads):
  """[B, T, Hq, d] -> [B, Hkv, G, T, d]."""
  b, t, hq, d = x.shape
  x = x.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)
  return x.transpose(0, 2, 3, 1, 4)


def _ungroup(y):
  """[B, Hkv, G, T, dv] -> [B, T, Hq, dv]."""
  b, h, g, t, d = y.shape
  return y.transpose(0, 3, 1, 2, 4).reshape(b, t, h * g, d)


def _heads_first(x):
  """[B, C, H, d] -> [B, H, C, d]."""
  return x.transpose(0, 2, 1, 3)


def _end_of_chunk(
  config, state_cache: Candidates, window: Candidates, linear_h, linear_s, scores=None, prior=None
):
  """Cache update when a chunk completes: candidates are the old cache + the leaving window.

  `scores`: optional [B, Hkv, L + C] self-recall errors of [cache; window] already computed
  against (linear_h, linear_s) (the fused Pallas step). `prior`: [B, P] positions held by the
  layer below ("sre_below").
  """
  cand = jax.tree_util.tree_map(
    lambda a, b: jnp.concatenate([a, b], axis=-2 if a.ndim == 4 else -1), state_cache, window
  )
  return update_sparse_cache(config, cand, linear_h, linear_s, scores=scores, prior=prior)


def _uses_pallas(config: LoLAConfig, acc_dtype) -> bool:
  """Which chunk step `lola_prefill` runs, from `config.implementation`.

  "pallas" (the local backend's kernels), "pallas_tpu", "pallas_triton": the fused Pallas chunk
  step (`pallas_kernels.lola_chunk`; interpret mode on CPU, and a forced family lowers for its
  platform from any machine). "xla": the plain-JAX step. None: Pallas on TPU, XLA on GPU/CPU
  (`pallas_kernels.common.resolve_implementation`).
  "reference": the XLA step too (`lola_reference` is float64 NumPy and cannot run under jit; call
  it directly). Float64 inputs (whose state accumulates in float64) always take the XLA step: the
  kernel accumulates in f32; so does the "attention" policy, whose per-pair softmax mass the
  kernel does not produce.
  """
  impl = resolve_implementation(config.implementation)
  pallas = impl in ("pallas_tpu", "pallas_triton")
  return pallas and acc_dtype != jnp.float64 and config.policy != "attention"


def _select(pred, new, old):
  """Per-row choice between two pytrees; pred [B] broadcasts over trailing axes."""

  def pick(a, b):
    p = pred.reshape(pred.shape + (1,) * (a.ndim - pred.ndim))
    return jnp.where(p, a, b)

  return jax.tree_util.tree_map(pick, new, old)


def _window_candidates(k, v, phi_k, has_window, start, mass=None):
  """The window as cache candidates. k/v/phi_k: [B, Hkv, C, .]; has_window, start: [B]."""
  c = k.shape[-2]
  pos = start[:, None] + jnp.arange(c, dtype=jnp.int32)
  pos = jnp.where(has_window[:, None], pos, -1)
  pos = jnp.broadcast_to(pos[:, None, :], k.shape[:-1])
  return Candidates(k=k, v=v, phi_k=phi_k, positions=pos, mass=mass)


def _sparse_cache(state: LoLAState, track: bool) -> Candidates:
  """The state's sparse cache as Candidates (with its mass for the "attention" policy)."""
  return Candidates(
    k=state.cache_k,
    v=state.cache_v,
    phi_k=state.cache_phi_k,
    positions=state.cache_positions,
    mass=state.cache_mass if track else None,
  )


def _cache_fields(cache: Candidates) -> dict:
  """The LoLAState fields of a sparse cache held as Candidates (mass aside)."""
  return dict(
    cache_k=cache.k, cache_v=cache.v, cache_phi_k=cache.phi_k, cache_positions=cache.positions
  )


def _chunk_attend(config, carry: ChunkCarry, q, phi_q, keys, values, key_mask, gates, new_query):
  """The chunk's outputs, by the fused Pallas kernel or the XLA form: the one dispatch point.

  Args:
    q: [B, Hkv, G, C, dk]  phi_q: [B, Hkv, G, C, D]  keys/values: [B, Hkv, L + 2C, .]
      ([cache; window; chunk]).  key_mask: [B, Hkv, L + 2C] which keys exist (the causal
      structure inside the chunk is applied here).  gates: the gate terms, [Hkv, G] each.
    new_query: [B, C] bool, the queries whose softmax mass is accumulated ("attention" policy).

  Returns:
    y [B, Hkv, G, C, dv]; the self-recall errors [B, Hkv, L + C] of [cache; window] when the
    kernel computed them for the policy (else None); the mass [B, Hkv, L + 2C] each key received
    ("attention" policy, else None).
  """
  lam, c = config.cache_size, config.chunk_size
  if _uses_pallas(config, carry.linear_h.dtype):
    y, scores = lola_chunk_step(
      q, phi_q, keys, values, key_mask,
      jnp.concatenate([carry.cache.phi_k, carry.window_phi_k], axis=-2),
      carry.linear_h, carry.linear_s, None,
      cache_size=lam, mix=config.mix, softmax_scale=config.softmax_scale, eps=config.eps,
      with_sre=config.policy in SRE_POLICIES and lam > 0, gates=gates,
      implementation=resolve_implementation(config.implementation),
    )  # fmt: skip
    return y, scores, None
  track = config.policy == "attention"
  y, key_mass = _attend(
    config, q, phi_q, keys, values, chunk_mask(key_mask, lam, c), carry.linear_h,
    carry.linear_s, gates, mass_queries=new_query if track else None,
  )  # fmt: skip
  return y, None, key_mass


def _chunk_step(config, gates, prior_positions, carry: ChunkCarry, block: ChunkBlock):
  """One chunk of the prefill scan: its outputs, then the cache update of the rows it completes.

  Args:
    config: the layer's LoLAConfig.  gates: the gate terms, [Hkv, G] each.
    prior_positions: [B, P] or None ("sre_below").  carry: the state before the chunk.
    block: the chunk's tokens.

  Returns:
    The carry after the chunk (rows whose chunk is incomplete keep theirs, with the mass their
    pairs received added), and (y [B, C, Hq, dv], the block's mass [B, Hkv, C]).
  """
  c = config.chunk_size
  b, hkv = block.k.shape[0], block.k.shape[2]
  k, v, phi_k = _heads_first(block.k), _heads_first(block.v), _heads_first(block.phi_k)
  cache = carry.cache
  keys = jnp.concatenate([cache.k, carry.window_k, k], axis=-2)
  values = jnp.concatenate([cache.v, carry.window_v, v], axis=-2)
  key_mask = jnp.concatenate(
    [
      cache.valid,
      jnp.broadcast_to(carry.has_window[:, None, None], (b, hkv, c)),
      jnp.broadcast_to(block.real[:, None, :], (b, hkv, c)),
    ],
    axis=-1,
  )
  # A non-finite value of this chunk must reach only the queries at or after it (as in the
  # reference), but in the masked product p @ v a future key's weight 0 times NaN is NaN: attend
  # with such values zeroed, then mark each output component that a non-finite value at or
  # before its position feeds. Older pairs (cache, window, H) reach every query: no masking.
  bad = ~jnp.isfinite(v) & block.real[:, None, :, None]  # [B, Hkv, C, dv]
  seen_bad = jnp.cumsum(bad, axis=-2, dtype=jnp.int32) > 0
  values = values.at[..., -c:, :].set(jnp.where(bad, jnp.zeros((), v.dtype), v))
  y, scores, key_mass = _chunk_attend(
    config, carry, _group_queries(block.q, hkv), _group_queries(block.phi_q, hkv), keys, values,
    key_mask, gates, block.new_query,
  )  # fmt: skip
  y = jnp.where(seen_bad[:, :, None], jnp.nan, y)
  track = config.policy == "attention"
  block_mass = block.mass
  if track:  # every pair keeps the mass it received, whether or not the chunk completes
    lam = cache.k.shape[-2]
    carry = dataclasses.replace(
      carry,
      cache=dataclasses.replace(cache, mass=cache.mass + key_mass[..., :lam]),
      window_mass=carry.window_mass + key_mass[..., lam : lam + c],
    )
    block_mass = block_mass + key_mass[..., lam + c :]
  # End of chunk: the old window competes for the cache, this chunk becomes the window.
  window = _window_candidates(
    carry.window_k,
    carry.window_v,
    carry.window_phi_k,
    carry.has_window,
    (block.index - 1) * c,
    carry.window_mass if track else None,
  )
  new_cache, new_h, new_s = _end_of_chunk(
    config, carry.cache, window, carry.linear_h, carry.linear_s, scores, prior_positions
  )
  updated = ChunkCarry(
    cache=new_cache,
    window_k=k,
    window_v=v,
    window_phi_k=phi_k,
    window_mass=block_mass,
    has_window=jnp.ones_like(carry.has_window),
    linear_h=new_h,
    linear_s=new_s,
  )
  return _select(block.real[:, -1], updated, carry), (_ungroup(y), block_mass)


def _lay_out(x, buffered, *, first_slot, padded_len: int, fresh: bool):
  """[B, T, H, d] -> [B, P, H, d] on the chunk grid (slot p of row b is position n_b * C + p,
  n_b the row's current chunk).

  A fresh call starts at slot 0. A continued call puts row b's T tokens after the first_slot[b]
  tokens its state buffers in the current chunk, and lays those (`buffered` [B, H, C, d]; None
  for queries, which are not buffered) in front.
  """
  b = x.shape[0]
  if fresh and x.shape[1] == padded_len:  # T a multiple of C: the tokens are the grid already
    return x
  if fresh:
    return jnp.pad(x, [(0, 0), (0, padded_len - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  out = jnp.zeros((b, padded_len) + x.shape[2:], x.dtype)
  if buffered is not None:
    c = buffered.shape[2]
    out = out.at[:, :c].set(_heads_first(buffered).astype(x.dtype))
  place = lambda o, xi, ri: jax.lax.dynamic_update_slice_in_dim(o, xi, ri, axis=0)
  return jax.vmap(place)(out, x, first_slot)


def _blocks(x, chunk_size: int):
  """[B, P, ...] -> [N, B, C, ...] (the scan axis first)."""
  b, padded_len = x.shape[:2]
  x = x.reshape((b, padded_len // chunk_size, chunk_size) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _current_chunk(x, last_block, keep):
  """The tokens of the incomplete chunk: [B, P, Hkv, d] -> [B, Hkv, C, d] (zeros past r')."""
  b, c = keep.shape
  x = x.reshape((b, x.shape[1] // c, c) + x.shape[2:])
  x = jnp.take_along_axis(x, last_block[:, None, None, None, None], axis=1)[:, 0]
  return _heads_first(jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype)))


def _parallel_path(config: LoLAConfig, acc_dtype) -> bool:
  """Whether `lola_prefill` takes the chunk-parallel XLA form (`_prefill_parallel`).

  Every configuration does but the fused Pallas step (`_uses_pallas`) and the "attention"
  policy, whose per-pair softmax mass needs each chunk's whole softmax inside the scan: those
  keep the one-chunk-at-a-time `_chunk_step`. Both give the same numbers (tests/core).
  """
  return config.policy != "attention" and not _uses_pallas(config, acc_dtype)


def _to_chunks(x, chunk_size: int):
  """[B, P, H, d] -> [N, B, H, C, d] (chunk axis first, heads before slots)."""
  b, p, h, d = x.shape
  return x.reshape(b, p // chunk_size, chunk_size, h, d).transpose(1, 0, 3, 2, 4)


def _query_rows(x, num_kv_heads: int, chunk_size: int):
  """[B, P, Hq, d] -> [N, B, Hkv, G*C, d]: the G query heads of a kv head stacked on the row
  axis (row r is query head r // C of the group at slot r % C), one matmul per kv head."""
  b, p, hq, d = x.shape
  n, g = p // chunk_size, hq // num_kv_heads
  x = x.reshape(b, n, chunk_size, num_kv_heads, g, d).transpose(1, 0, 3, 4, 2, 5)
  return x.reshape(n, b, num_kv_heads, g * chunk_size, d)


def _rows_to_tokens(y, num_heads: int, chunk_size: int):
  """[N, B, Hkv, G*C, dv] -> [B, P, Hq, dv] (inverse of `_query_rows`)."""
  n, b, hkv, r, d = y.shape
  g = r // chunk_size
  y = y.reshape(n, b, hkv, g, chunk_size, d).transpose(1, 0, 4, 2, 3, 5)
  return y.reshape(b, n * chunk_size, num_heads, d)


def _local_softmax(q, prev_k, prev_v, k, v, has_prev, real, *, scale: float, acc):
  """Softmax statistics of every chunk's queries over its window (the previous chunk) and its
  own causal part, all chunks, kv heads and query rows at once: nothing here depends on the
  sparse cache or the linear state, so it is outside the scan, as batched matmuls
  [N*B*Hkv] x ([G*C, dk] x [dk, C]).

  Args:
    q: [N, B, Hkv, R, dk] query rows (R = G*C, row r at slot r % C); the leading N may be
      absent (one chunk, inside the scan: `_scan_step`).
    prev_k: [N, B, Hkv, C, dk], prev_v: [N, B, Hkv, C, dv] the window of each chunk.
    k: [N, B, Hkv, C, dk], v: [N, B, Hkv, C, dv] the chunk itself (v with non-finite values of
      the chunk zeroed: see `_prefill_parallel`).
    has_prev: [N, B] bool, whether the window holds a chunk.  real: [N, B, C] bool.

  Returns:
    m [N, B, Hkv, R, 1] the max visible logit (-inf where none is visible), and, relative to
    m (0 where it is -inf), S = sum e^{l-m} [.., R, 1] and N = sum e^{l-m} v [.., R, dv] in acc.
  """
  c, r = k.shape[-2], q.shape[-2]
  lw = jnp.einsum("...rd,...kd->...rk", q, prev_k, preferred_element_type=acc) * scale
  lc = jnp.einsum("...rd,...kd->...rk", q, k, preferred_element_type=acc) * scale
  slot = jnp.arange(r) % c
  vis_w = has_prev[..., None, None, None]
  vis_c = (jnp.arange(c)[None, :] <= slot[:, None]) & real[..., None, None, :]
  lw = jnp.where(vis_w, lw, -jnp.inf)
  lc = jnp.where(vis_c, lc, -jnp.inf)
  m = jnp.maximum(jnp.max(lw, axis=-1, keepdims=True), jnp.max(lc, axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(m), m, 0.0)
  pw = jnp.where(vis_w, jnp.exp(lw - shift), 0.0)
  pc = jnp.where(vis_c, jnp.exp(lc - shift), 0.0)
  s = jnp.sum(pw, axis=-1, keepdims=True) + jnp.sum(pc, axis=-1, keepdims=True)
  n = jnp.einsum("...rk,...kd->...rd", pw.astype(prev_v.dtype), prev_v, preferred_element_type=acc)
  n = n + jnp.einsum("...rk,...kd->...rd", pc.astype(v.dtype), v, preferred_element_type=acc)
  return m, s, n


def _mix_rows(config, gate_rows, shift, s, n, phi_q, linear_h, linear_s):
  """LoLA outputs of query rows from the softmax statistics (relative to `shift`, the max
  visible logit or 0) and the linear state; every array shaped [..., Hkv, R, .] alike
  (`pallas_kernels.equations`: y = (w_s N + w_l a) / (w_s S + w_l z)).

  gate_rows: (g, log g, log(1-g)), each [Hkv, R].  linear_h [..., Hkv, D, dv], linear_s [.., D].
  """
  phi_q = phi_q.astype(linear_h.dtype)
  a = jnp.einsum("...rf,...fe->...re", phi_q, linear_h)
  z = jnp.einsum("...rf,...f->...r", phi_q, linear_s)[..., None]
  return _mix(config, gate_rows, shift, s, n, a, z)


def _mix(config, gate_rows, shift, s, n, a, z):
  """`_mix_rows` from the linear read-out (a = phi_q H [..., R, dv], z = phi_q s [..., R, 1])."""
  g, lg, lg1 = (jnp.asarray(x, z.dtype)[..., None] for x in gate_rows)
  w_s, w_l = mix_weights(shift, z, g, config.mix, log_gate=lg, log_1m_gate=lg1)
  y, _ = mix_branches(w_s, w_l, s, n, a, z)
  return y


def _with_cache(config, q, local, cache: Candidates):
  """Adds the sparse cache to a chunk's local softmax statistics: the only softmax work that
  depends on the scan's carry. q [B, Hkv, R, dk]; local (m, S, N) as `_local_softmax` returns
  them for one chunk. Returns (shift, S, N) over [cache; window; chunk], shift the max visible
  logit (0 where none)."""
  m_w, s_w, n_w = local
  acc = s_w.dtype
  logits = jnp.einsum("bhrd,bhkd->bhrk", q, cache.k, preferred_element_type=acc)
  logits = logits * config.scale(q.shape[-1])
  vis = cache.valid[:, :, None, :]
  logits = jnp.where(vis, logits, -jnp.inf)
  m = jnp.maximum(m_w, jnp.max(logits, axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(vis, jnp.exp(logits - shift), 0.0)
  rescale = jnp.where(jnp.isfinite(m_w), jnp.exp(m_w - shift), 0.0)
  s = s_w * rescale + jnp.sum(p, axis=-1, keepdims=True)
  pv = jnp.einsum("bhrk,bhkd->bhrd", p.astype(cache.v.dtype), cache.v, preferred_element_type=acc)
  return shift, s, n_w * rescale + pv


def _cache_step(config, gate_rows, prior_positions, carry, x):
  """One chunk of the parallel path's scan: what depends on the sparse cache and the linear
  state (the cache's logits and values, the linear read-out, the end-of-chunk update).

  carry: (cache Candidates [B, Hkv, L], linear_h, linear_s).  x: the chunk's query rows q,
  phi_q [B, Hkv, R, .], its local statistics, its window (k, v, phi_k [B, Hkv, C, .]), the
  window's first position [B], has_prev [B] and complete [B] (the chunk's last slot is real).
  """
  cache, linear_h, linear_s = carry
  q, phi_q, local, prev_k, prev_v, prev_phi, prev_start, has_prev, complete = x
  shift, s, n = _with_cache(config, q, local, cache)
  y = _mix_rows(config, gate_rows, shift, s, n, phi_q, linear_h, linear_s)
  window = _window_candidates(prev_k, prev_v, prev_phi, has_prev, prev_start)
  updated = _end_of_chunk(config, cache, window, linear_h, linear_s, None, prior_positions)
  return _select(complete, updated, carry), y


def _scan_step(config, gate_rows, prior_positions, carry, x):
  """One chunk of the in-scan form of the parallel path (`_prefill_parallel` with
  `local_in_scan`): the chunk's local softmax terms, the sparse cache, the linear read-out and
  the end-of-chunk update, all on one chunk's data (which stays in the CPU's caches).

  carry: (cache, linear_h, linear_s, window (k, v, phi_k) [B, Hkv, C, .], has_window [B]).
  x: the chunk's query rows q, phi_q [B, Hkv, R, .], its k, v, phi_k [B, Hkv, C, .] (heads
  first), real [B, C] and its index [B].
  """
  cache, linear_h, linear_s, win_k, win_v, win_phi, has_win = carry
  q, phi_q, k, v, phi_k, real, index = x
  c = config.chunk_size
  acc = linear_h.dtype
  bad = ~jnp.isfinite(v) & real[:, None, :, None]
  seen_bad = jnp.cumsum(bad, axis=-2, dtype=jnp.int32) > 0  # [B, Hkv, C, dv]
  v_local = jnp.where(bad, jnp.zeros((), v.dtype), v)
  scale = config.scale(q.shape[-1])
  local = _local_softmax(q, win_k, win_v, k, v_local, has_win, real, scale=scale, acc=acc)
  if config.cache_size:
    shift, s, n = _with_cache(config, q, local, cache)
  else:
    m, s, n = local
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
  y = _mix_rows(config, gate_rows, shift, s, n, phi_q, linear_h, linear_s)
  b, h, r, dv = y.shape
  y = jnp.where(seen_bad[:, :, None], jnp.nan, y.reshape(b, h, r // c, c, dv)).reshape(y.shape)
  complete = real[:, -1]
  window = _window_candidates(win_k, win_v, win_phi, has_win, (index - 1) * c)
  new_cache, new_h, new_s = _end_of_chunk(
    config, cache, window, linear_h, linear_s, None, prior_positions
  )
  updated = (new_cache, new_h, new_s, k, v, phi_k, jnp.ones_like(has_win))
  return _select(complete, updated, carry), y


def _linear_readout_no_cache(phi_q, prev_phi, prev_v, absorbed, linear_h, linear_s):
  """Cache size 0: every window pair is absorbed when its next chunk completes, so the state's
  increments of all chunks are one batched matmul ([D, C] x [C, dv] per chunk and kv head) and
  the scan only adds them up and reads the state out (a = phi_q H, z = phi_q s).

  phi_q [N, B, Hkv, R, D]; prev_phi [N, B, Hkv, C, D], prev_v [N, B, Hkv, C, dv]; absorbed
  [N, B] whether chunk n's window is absorbed at its end. Returns (a [N, B, Hkv, R, dv],
  z [N, B, Hkv, R, 1]) read from the state at the start of each chunk, and the final (H, s).
  """
  acc = linear_h.dtype
  mask = absorbed[:, :, None, None, None]  # by selection: a NaN never absorbed stays out
  phi = jnp.where(mask, prev_phi.astype(acc), 0.0)
  v = jnp.where(mask, prev_v.astype(acc), 0.0)
  dh = jnp.einsum("nbhcd,nbhce->nbhde", phi, v)
  ds = jnp.sum(phi, axis=-2)

  def step(carry, x):
    h, s = carry
    pq, dh_n, ds_n = x
    pq = pq.astype(acc)
    a = jnp.einsum("bhrf,bhfe->bhre", pq, h)
    z = jnp.einsum("bhrf,bhf->bhr", pq, s)[..., None]
    return (h + dh_n, s + ds_n), (a, z)

  (linear_h, linear_s), (a, z) = jax.lax.scan(step, (linear_h, linear_s), (phi_q, dh, ds))
  return a, z, linear_h, linear_s


def _prefill_parallel(config, gates, prior_positions, state, layout, local_in_scan=None):
  """The chunk-parallel XLA prefill: local softmax terms of all chunks at once, then a scan that
  keeps only what depends on the sparse cache (none at cache size 0).

  layout: the laid-out tokens (q, phi_q [B, P, Hq, .]; k, v, phi_k [B, P, Hkv, .]; real [B, P];
  first_chunk [B]). Returns (y [B, P, Hq, dv], cache Candidates, linear_h, linear_s, window
  (k, v, phi_k) [B, Hkv, C, .] after the call).
  """
  qp, phi_qp, kp, vp, phi_kp, real, first_chunk = layout
  c, lam = config.chunk_size, config.cache_size
  hkv, hq = kp.shape[2], qp.shape[2]
  acc = state.linear_h.dtype
  if local_in_scan is None:
    local_in_scan = LOCAL_IN_SCAN.get(jax.default_backend(), False)
  gate_rows = tuple(jnp.repeat(x.reshape(hkv, hq // hkv), c, axis=-1) for x in gates)
  if local_in_scan:
    return _prefill_in_scan(config, gate_rows, prior_positions, state, layout)
  q, phi_q = _query_rows(qp, hkv, c), _query_rows(phi_qp, hkv, c)
  k, v, phi_k = _to_chunks(kp, c), _to_chunks(vp, c), _to_chunks(phi_kp, c)
  num_chunks, b = k.shape[:2]
  real_c = real.reshape(b, num_chunks, c).transpose(1, 0, 2)  # [N, B, C]
  complete = real_c[:, :, -1]
  # Each chunk's window: the previous chunk, or the state's window for the first.
  prev_k, prev_v, prev_phi = (
    jnp.concatenate([w[None], x[:-1]]) for w, x in
    ((state.window_k, k), (state.window_v, v), (state.window_phi_k, phi_k))
  )  # fmt: skip
  has_prev = jnp.concatenate([(state.num_tokens >= c)[None], jnp.ones((num_chunks - 1, b), bool)])
  index = first_chunk[None, :] + jnp.arange(num_chunks, dtype=jnp.int32)[:, None]  # [N, B]
  # A non-finite value of a chunk reaches only the queries at or after it: attend with such
  # values zeroed, then mark each output component they feed (older pairs reach every query).
  bad = ~jnp.isfinite(v) & real_c[:, :, None, :, None]
  seen_bad = jnp.cumsum(bad, axis=-2, dtype=jnp.int32) > 0  # [N, B, Hkv, C, dv]
  v_local = jnp.where(bad, jnp.zeros((), v.dtype), v)
  local = _local_softmax(
    q, prev_k, prev_v, k, v_local, has_prev, real_c, scale=config.scale(q.shape[-1]), acc=acc
  )
  cache = _sparse_cache(state, False)
  if lam == 0:
    a, z, linear_h, linear_s = _linear_readout_no_cache(
      phi_q, prev_phi, prev_v, complete & has_prev, state.linear_h, state.linear_s
    )
    m, s, n = local
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    y = _mix(config, gate_rows, shift, s, n, a, z)
  else:
    step = functools.partial(_cache_step, config, gate_rows, prior_positions)
    xs = (q, phi_q, local, prev_k, prev_v, prev_phi, (index - 1) * c, has_prev, complete)
    (cache, linear_h, linear_s), y = jax.lax.scan(step, (cache, state.linear_h, state.linear_s), xs)
  g = hq // hkv
  n_, b_, h_, r_, dv = y.shape
  y = y.reshape(n_, b_, h_, g, c, dv)
  y = jnp.where(seen_bad[:, :, :, None], jnp.nan, y).reshape(n_, b_, h_, r_, dv)
  # The window after the call: each row's last complete chunk (or the state's window).
  done = jnp.sum(complete, axis=0)  # [B] complete chunks (a prefix of the blocks)
  last = jnp.clip(done - 1, 0, num_chunks - 1)

  def last_window(x, old):
    w = x[last, jnp.arange(b)]
    return jnp.where((done > 0)[:, None, None, None], w, old)

  window = (
    last_window(k, state.window_k),
    last_window(v, state.window_v),
    last_window(phi_k, state.window_phi_k),
  )
  return _rows_to_tokens(y, hq, c), cache, linear_h, linear_s, window


# Where `_prefill_parallel` computes the chunks' local softmax terms inside the scan, one chunk
# at a time, rather than for all chunks at once: on CPU the per-chunk intermediates stay in the
# caches (docs/benchmarks.md, "XLA LoLA path"); accelerators take the batched form.
LOCAL_IN_SCAN = {"cpu": True}


def _prefill_in_scan(config, gate_rows, prior_positions, state, layout):
  """`_prefill_parallel` with the local terms in the scan (`_scan_step`); same returns."""
  qp, phi_qp, kp, vp, phi_kp, real, first_chunk = layout
  c = config.chunk_size
  hkv, hq = kp.shape[2], qp.shape[2]
  b, padded_len = kp.shape[:2]
  num_chunks = padded_len // c
  g = hq // hkv

  def rows(x):  # [B, P, Hq, d] -> [N, B, C, Hkv, G, d]: a free reshape for B = 1
    return _blocks(x, c).reshape(num_chunks, b, c, hkv, g, x.shape[-1])

  def heads(x):  # [B, P, Hkv, d] -> [N, B, C, Hkv, d]
    return _blocks(x, c)

  def step(carry, x):
    q, phi_q, k, v, phi_k, real_n, index = x
    to_rows = lambda a: a.transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * c, a.shape[-1])
    xs = (to_rows(q), to_rows(phi_q), _heads_first(k), _heads_first(v), _heads_first(phi_k))
    return _scan_step(config, gate_rows, prior_positions, carry, xs + (real_n, index))

  index = first_chunk[None, :] + jnp.arange(num_chunks, dtype=jnp.int32)[:, None]  # [N, B]
  carry0 = (
    _sparse_cache(state, False), state.linear_h, state.linear_s,
    state.window_k, state.window_v, state.window_phi_k, state.num_tokens >= c,
  )  # fmt: skip
  xs = (rows(qp), rows(phi_qp), heads(kp), heads(vp), heads(phi_kp), _blocks(real, c), index)
  carry, y = jax.lax.scan(step, carry0, xs)
  cache, linear_h, linear_s, win_k, win_v, win_phi, _ = carry
  return _rows_to_tokens(y, hq, c), cache, linear_h, linear_s, (win_k, win_v, win_phi)


def _prefill_chunk_by_chunk(config, gates, prior_positions, state, lay_out, laid, r):
  """The one-chunk-at-a-time prefill (`_chunk_step` under `lax.scan`): the fused Pallas step and
  the "attention" policy. laid: (q, phi_q [B, T, Hq, .] as given; k, v, phi_k [B, P, Hkv, .]
  laid out; real [B, P]); r [B] the tokens buffered in the state. Returns (y [B, P, Hq, dv],
  cache, linear_h, linear_s, window (k, v, phi_k), window mass, per-block masses)."""
  q, phi_q, kp, vp, phi_kp, real = laid
  c, track = config.chunk_size, config.policy == "attention"
  b, padded_len, hkv = kp.shape[0], kp.shape[1], kp.shape[2]
  hq = q.shape[2]
  num_chunks = padded_len // c
  fresh = lay_out.keywords["fresh"]
  first_chunk = state.num_tokens // c
  slot = jnp.arange(padded_len, dtype=jnp.int32)
  new_query = real & (slot[None, :] >= r[:, None])  # excludes the re-laid buffered tokens
  # Mass already received by the buffered tokens of the first block (zero elsewhere).
  mass0 = jnp.zeros((num_chunks,) + state.chunk_mass.shape, state.chunk_mass.dtype)
  if not fresh:
    mass0 = mass0.at[0].set(state.chunk_mass)
  blocks = ChunkBlock(
    q=_blocks(lay_out(q, None), c),
    phi_q=_blocks(lay_out(phi_q, None), c),
    k=_blocks(kp, c),
    v=_blocks(vp, c),
    phi_k=_blocks(phi_kp, c),
    real=_blocks(real, c),
    new_query=_blocks(new_query, c),
    mass=mass0,
    index=first_chunk[None, :] + jnp.arange(num_chunks, dtype=jnp.int32)[:, None],  # [N, B]
  )
  carry0 = ChunkCarry(
    cache=_sparse_cache(state, track),
    window_k=state.window_k,
    window_v=state.window_v,
    window_phi_k=state.window_phi_k,
    window_mass=state.window_mass,
    has_window=state.num_tokens >= c,
    linear_h=state.linear_h,
    linear_s=state.linear_s,
  )
  grouped = tuple(x.reshape(hkv, hq // hkv) for x in gates)
  step = functools.partial(_chunk_step, config, grouped, prior_positions)
  carry, (ys, masses) = jax.lax.scan(step, carry0, blocks)

  ys = jnp.moveaxis(ys, 0, 1).reshape(b, padded_len, hq, -1)
  window = (carry.window_k, carry.window_v, carry.window_phi_k)
  return ys, carry.cache, carry.linear_h, carry.linear_s, window, carry.window_mass, masses


def lola_prefill(
  q,
  k,
  v,
  phi_q,
  phi_k,
  gate=None,
  *,
  gate_logit=None,
  config: LoLAConfig,
  state=None,
  lengths=None,
  prior_positions=None,
  key_feature_map=None,
):
  """Runs LoLA attention over a block of tokens, continuing from `state`.

  Args:
    q: [B, T, Hq, dk] queries.  k: [B, T, Hkv, dk] keys.  v: [B, T, Hkv, dv] values.
    phi_q: [B, T, Hq, D] feature-mapped queries.  phi_k: [B, T, Hkv, D] feature-mapped keys.
    gate: [Hq] mixing gate g in [0, 1]; or gate_logit: [Hq] its logits x (g = sigmoid(x)),
      from which the mix is computed in log space with finite gradients however saturated the
      gate (`pallas_kernels.equations`; a probability of exactly 0 or 1 has log g or log(1-g)
      = -inf and an infinite derivative there). Give exactly one.
    config: static LoLAConfig. `config.implementation` picks the chunk step: "pallas" runs the
      fused Pallas kernel (`pallas_kernels.lola_chunk`: softmax over [cache; window; chunk], the
      linear read-out, the mix and the self-recall errors in one kernel per chunk; interpret
      mode on CPU), "xla" the plain-JAX step, None Pallas on TPU and XLA on GPU/CPU, "reference"
      the XLA step (see `_uses_pallas`). Selection, absorption and compaction are XLA.
    state: a LoLAState to continue from (any number of tokens already seen per row), or None to
      start fresh.
    lengths: [B] int in [0, T], tokens t >= lengths[b] are right padding: they are ignored
      (their values never reach a real token), their outputs are zero and they leave the state
      untouched. None means all T tokens are real. Out-of-range values raise when concrete;
      under an outer `jax.jit`, where they cannot be inspected, they are clamped to [0, T].
    prior_positions: policy "sre_below" only: int [B, P], the positions the sparse cache of the
      layer below holds (-1 = empty), used at every chunk end of this call. Exact stacking
      needs the lower layer's cache at the same chunk end, which is what the model provides by
      calling with at most C tokens at a time (one chunk end per row); None = no prior.
    key_feature_map: with `config.window_features="recomputed"` and a given state, the map that
      produced phi_k, a `jax.tree_util.Partial` from keys [B, N, Hkv, dk] to [B, N, Hkv, D]: it
      recomputes phi_k of the state's window and chunk (`lola_jax.core.key_features`).

  Returns:
    y: [B, T, Hq, dv] in q.dtype, and the state after the real tokens.
  """
  fn = "lola_prefill"
  if not isinstance(config, LoLAConfig):
    raise ValueError(f"{fn}: config must be a LoLAConfig, got {type(config).__name__}")
  given = validation.check_gate_args(fn, gate, gate_logit)
  sizes = validation.check_attention_inputs(fn, q, k, v, phi_q, phi_k, *given, has_time=True)
  if state is not None:
    validation.check_state(fn, state, config, sizes, dtype=k.dtype)
  if lengths is not None:  # values are checked here, where they are still concrete
    validation.check_lengths(fn, lengths, sizes["B"], sizes["T"])
  validation.check_prior_positions(fn, prior_positions, config.policy, sizes["B"])
  check_key_feature_map(fn, key_feature_map, config, required=state is not None)
  return _lola_prefill(
    q,
    k,
    v,
    phi_q,
    phi_k,
    gate_terms(gate, gate_logit),
    config=config,
    state=state,
    lengths=lengths,
    prior_positions=prior_positions,
    key_feature_map=key_feature_map,
  )


@functools.partial(jax.jit, static_argnames=("config", "local_in_scan"))
def _lola_prefill(
  q,
  k,
  v,
  phi_q,
  phi_k,
  gates,
  *,
  config: LoLAConfig,
  state,
  lengths,
  prior_positions=None,
  key_feature_map=None,
  local_in_scan: bool | None = None,
):
  """The jitted body of `lola_prefill` (inputs already validated; `gates` the gate terms).
  `local_in_scan`: the XLA path's form (`_prefill_parallel`; None = `LOCAL_IN_SCAN` of the
  backend); tests run both. A state without window features is given them here and loses them
  again on return (`lola_jax.core.key_features`)."""
  sizes = validation.check_attention_inputs(
    "lola_prefill", q, k, v, phi_q, phi_k, gates[0], has_time=True
  )
  b, t, hkv, c = sizes["B"], sizes["T"], sizes["Hkv"], config.chunk_size
  fresh = state is None
  recompute = config.window_features == "recomputed"
  if fresh:
    state = init_state(
      dataclasses.replace(config, window_features="stored"),  # zeros: nothing to recompute
      batch=b,
      num_kv_heads=hkv,
      key_dim=sizes["dk"],
      value_dim=sizes["dv"],
      feature_dim=sizes["D"],
      dtype=k.dtype,
    )
  elif recompute:
    state = with_window_features(state, key_feature_map)
  if lengths is None:
    lengths = jnp.full((b,), t, jnp.int32)
  else:  # in range unless traced by an outer jit (docstring of lola_prefill)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, t)
    # Right padding may hold anything (NaN included): zero it so that none of it reaches a
    # real token through a masked product (0 x NaN = NaN).
    real_t = (jnp.arange(t)[None, :] < lengths[:, None])[:, :, None, None]
    q, k, v, phi_q, phi_k = (
      jnp.where(real_t, x, jnp.zeros((), x.dtype)) for x in (q, k, v, phi_q, phi_k)
    )
  store = state.cache_k.dtype
  track = config.policy == "attention"  # accumulate per-pair softmax mass

  # Lay the new tokens on the chunk grid after the r[b] tokens already buffered in the state.
  r = state.num_tokens % c
  first_chunk = state.num_tokens // c
  num_chunks = -(-t // c) if fresh else -(-(t + c - 1) // c)
  padded_len = num_chunks * c
  lay_out = functools.partial(_lay_out, first_slot=r, padded_len=padded_len, fresh=fresh)
  kp = lay_out(k.astype(store), state.chunk_k)
  vp = lay_out(v.astype(store), state.chunk_v)
  phi_kp = lay_out(phi_k.astype(store), state.chunk_phi_k)
  slot = jnp.arange(padded_len, dtype=jnp.int32)
  real = slot[None, :] < (r + lengths)[:, None]  # [B, P]
  if _parallel_path(config, state.linear_h.dtype):
    layout = (lay_out(q, None), lay_out(phi_q, None), kp, vp, phi_kp, real, first_chunk)
    y, cache, linear_h, linear_s, window = _prefill_parallel(
      config, gates, prior_positions, state, layout, local_in_scan
    )
    masses = None
    window_mass = state.window_mass
  else:
    y, cache, linear_h, linear_s, window, window_mass, masses = _prefill_chunk_by_chunk(
      config, gates, prior_positions, state, lay_out, (q, phi_q, kp, vp, phi_kp, real), r
    )

  # Outputs: the T new slots of each row.
  if not fresh:
    y = jax.vmap(lambda yi, ri: jax.lax.dynamic_slice_in_dim(yi, ri, t, axis=0))(y, r)
  else:
    y = y[:, :t]
  y = jnp.where((jnp.arange(t)[None, :] < lengths[:, None])[:, :, None, None], y, 0.0)

  # The current (incomplete) chunk: the block holding position num_tokens, first r' slots.
  num_tokens = state.num_tokens + lengths
  last_block = jnp.clip(num_tokens // c - first_chunk, 0, num_chunks - 1)
  keep = jnp.arange(c)[None, :] < (num_tokens % c)[:, None]  # [B, C]
  if track:
    chunk_mass = jnp.take_along_axis(
      jnp.moveaxis(masses, 0, 1), last_block[:, None, None, None], axis=1
    )[:, 0]
    chunk_mass = jnp.where(keep[:, None, :], chunk_mass, 0.0)
  else:
    chunk_mass = state.chunk_mass

  new_state = LoLAState(
    **_cache_fields(cache),
    window_k=window[0],
    window_v=window[1],
    window_phi_k=window[2],
    chunk_k=_current_chunk(kp, last_block, keep),
    chunk_v=_current_chunk(vp, last_block, keep),
    chunk_phi_k=_current_chunk(phi_kp, last_block, keep),
    linear_h=linear_h,
    linear_s=linear_s,
    num_tokens=num_tokens,
    cache_mass=cache.mass if track else state.cache_mass,
    window_mass=window_mass,
    chunk_mass=chunk_mass,
  )
  if recompute:
    new_state = without_window_features(new_state)
  return y.astype(q.dtype), new_state


def _softmax_parts(q, parts, *, scale: float, acc):
  """Softmax statistics of query rows over several key sets without concatenating them.

  q: [B, Hkv, R, dk]; parts: (keys [B, Hkv, Tk, dk], values [B, Hkv, Tk, dv], mask
  broadcastable to [B, Hkv, R, Tk]) each. Returns (shift [B, Hkv, R, 1] the max visible logit or
  0, S = sum e^{l-shift}, N = sum e^{l-shift} v) over the union.
  """
  parts = [part for part in parts if part[0].shape[-2] > 0]  # an empty cache (L = 0)
  logits = [
    jnp.where(
      mask, jnp.einsum("bhrd,bhkd->bhrk", q, k, preferred_element_type=acc) * scale, -jnp.inf
    )
    for k, _, mask in parts
  ]
  m = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in logits])
  shift = jnp.where(jnp.isfinite(m), m, 0.0)
  s, n = 0.0, 0.0
  for x, (_, vals, mask) in zip(logits, parts, strict=True):
    p = jnp.where(mask, jnp.exp(x - shift), 0.0)
    s = s + jnp.sum(p, axis=-1, keepdims=True)
    n = n + jnp.einsum("bhrk,bhkd->bhrd", p.astype(vals.dtype), vals, preferred_element_type=acc)
  return shift, s, n


def _decode_attend_concat(config, q, k, v, phi_q, phi_k, grouped, state, slot):
  """The "attention" policy's decode read-out over the concatenated [cache; window; chunk]
  (`_attend`, which also returns the softmax mass every key received). Returns (y [B, Hq, dv],
  the mass [B, Hkv, L + 2C], the chunk buffers with the token written)."""
  b, hkv, c = k.shape[0], k.shape[1], config.chunk_size
  store = state.cache_k.dtype
  r = state.num_tokens % c

  def write(buf, x):  # buf [B, Hkv, C, d], x [B, Hkv, d]
    return jnp.where(slot[:, None, :, None], x[:, :, None, :].astype(store), buf)

  chunk_k, chunk_v = write(state.chunk_k, k), write(state.chunk_v, v)
  chunk_phi = write(state.chunk_phi_k, phi_k) if state.stores_window_features else state.chunk_phi_k
  keys = jnp.concatenate([state.cache_k, state.window_k, chunk_k], axis=-2)
  values = jnp.concatenate([state.cache_v, state.window_v, chunk_v], axis=-2)
  has_window = state.num_tokens >= c
  mask = jnp.concatenate(
    [
      state.cache_valid,
      jnp.broadcast_to(has_window[:, None, None], (b, hkv, c)),
      jnp.broadcast_to((jnp.arange(c)[None, :] <= r[:, None])[:, None, :], (b, hkv, c)),
    ],
    axis=-1,
  )[:, :, None, :]
  y, key_mass = _attend(
    config,
    _group_queries(q[:, None], hkv),
    _group_queries(phi_q[:, None], hkv),
    keys,
    values,
    mask,
    state.linear_h,
    state.linear_s,
    grouped,
    mass_queries=jnp.ones((b, 1), bool),
  )
  return _ungroup(y)[:, 0], key_mass, (chunk_k, chunk_v, chunk_phi)


def lola_decode(
  q,
  k,
  v,
  phi_q,
  phi_k,
  gate=None,
  *,
  gate_logit=None,
  config: LoLAConfig,
  state: LoLAState,
  prior_positions=None,
  key_feature_map=None,
  end_chunk: bool = True,
):
  """Appends one token per row and returns its LoLA output.

  Args:
    q: [B, Hq, dk]  k: [B, Hkv, dk]  v: [B, Hkv, dv]  phi_q: [B, Hq, D]  phi_k: [B, Hkv, D]
    gate: [Hq] in [0, 1], or gate_logit: [Hq] its logits (as `lola_prefill`).
    config: static LoLAConfig.  state: the LoLAState so far (rows may have seen different
      numbers of tokens), in the inputs' dtype.

  Returns:
    y: [B, Hq, dv] in q.dtype, and the updated state. When a row's token completes its chunk,
    the sparse cache update runs (once per chunk, for all rows that complete together).
    With policy "sre_below", `prior_positions` [B, P] int are the positions the layer below
    holds after its own step for this token (see `lola_prefill`). With
    `config.window_features="recomputed"`, `key_feature_map` (as `lola_prefill`) recomputes
    phi_k of the window when a chunk completes. `end_chunk=False` defers the chunk-end update:
    a token that completes its row's chunk leaves the full chunk in place (num_tokens counts
    it), and `lola_end_chunk` must run for that row before its next token (a decode loop does
    it once per chunk, outside its per-token body: `lola_decode_steps`, `lola_jax.generate`).
  """
  fn = "lola_decode"
  if not isinstance(config, LoLAConfig):
    raise ValueError(f"{fn}: config must be a LoLAConfig, got {type(config).__name__}")
  given = validation.check_gate_args(fn, gate, gate_logit)
  sizes = validation.check_attention_inputs(fn, q, k, v, phi_q, phi_k, *given, has_time=False)
  validation.check_state(fn, state, config, sizes, dtype=k.dtype)
  validation.check_prior_positions(fn, prior_positions, config.policy, sizes["B"])
  check_key_feature_map(fn, key_feature_map, config)
  gates = gate_terms(gate, gate_logit)
  if not isinstance(end_chunk, bool):
    raise ValueError(f"{fn}: end_chunk must be a bool, got {end_chunk!r}")
  return _lola_decode(
    q, k, v, phi_q, phi_k, gates, config=config, state=state, prior_positions=prior_positions,
    key_feature_map=key_feature_map, roll=end_chunk,
  )  # fmt: skip


def lola_end_chunk(
  state: LoLAState,
  complete,
  *,
  config: LoLAConfig,
  prior_positions=None,
  key_feature_map=None,
) -> LoLAState:
  """The chunk-end update that `lola_decode(end_chunk=False)` deferred, for the rows in
  `complete`: the window's pairs and the cache compete for the cache, the losers are absorbed
  into (H, s), the chunk becomes the window and a new chunk starts.

  Args:
    state: the LoLAState after the deferred token.
    complete: bool [B], the rows whose last token completed their chunk and whose update is
      pending (a row whose num_tokens is not a multiple of C is left alone whatever it says;
      naming a row already updated would update it twice).
    config, prior_positions, key_feature_map: as `lola_decode`.

  Returns:
    The state with those rows' chunk ends done, every other row unchanged.
  """
  fn = "lola_end_chunk"
  if not isinstance(config, LoLAConfig):
    raise ValueError(f"{fn}: config must be a LoLAConfig, got {type(config).__name__}")
  if not isinstance(state, LoLAState):
    raise ValueError(f"{fn}: state must be a LoLAState, got {type(state).__name__}")
  sizes = {"B": state.batch, "Hkv": state.num_kv_heads, "dk": state.key_dim}
  sizes.update({"dv": state.value_dim, "D": state.feature_dim})
  validation.check_state(fn, state, config, sizes)
  dtype = getattr(complete, "dtype", None)
  if dtype != jnp.bool_ or complete.shape != (state.batch,):
    raise ValueError(
      f"{fn}: complete must be a bool array of shape [B]=[{state.batch}], got "
      f"{getattr(complete, 'shape', None)} {dtype}"
    )
  validation.check_prior_positions(fn, prior_positions, config.policy, state.batch)
  check_key_feature_map(fn, key_feature_map, config)
  return _lola_end_chunk(
    state, complete, config=config, prior_positions=prior_positions,
    key_feature_map=key_feature_map,
  )  # fmt: skip


@decode_jit(static_argnames=("config",))
def _lola_end_chunk(state, complete, *, config, prior_positions=None, key_feature_map=None):
  """The jitted body of `lola_end_chunk`: `_end_chunk` for rows at a chunk boundary only."""
  c = config.chunk_size
  complete = complete & (state.num_tokens % c == 0) & (state.num_tokens > 0)
  return _end_chunk(config, state, complete, prior_positions, key_feature_map)


def _end_chunk(config, st: LoLAState, complete, prior_positions, key_feature_map) -> LoLAState:
  """`_roll_chunk` under `lax.cond` (run only when some row completed): the one chunk end of
  `_lola_decode`, `_lola_end_chunk` and `_lola_decode_steps`. `st` holds the token that
  completed the chunk of the rows in `complete` [B]."""
  had_window = st.num_tokens - 1 >= config.chunk_size  # before that token
  roll = functools.partial(
    _roll_chunk, config, complete, had_window, prior_positions, key_feature_map
  )
  return jax.lax.cond(jnp.any(complete), roll, lambda x: x, st)


def _write_slot(buf, x, slot, *, rows: int):
  """buf [B, Hkv, C, d] with x [B, Hkv, d] written at slot[b] of each row b: one
  `dynamic_update_slice` per row (rows is B, static), which XLA updates in place in a loop
  carry."""
  for i in range(rows):
    start = (jnp.int32(i), jnp.int32(0), slot[i].astype(jnp.int32), jnp.int32(0))
    buf = jax.lax.dynamic_update_slice(buf, x[i : i + 1, :, None, :], start)
  return buf


def _roll_chunk(
  config, complete, has_window, prior_positions, key_feature_map, st: LoLAState
) -> LoLAState:
  """Decode's end of chunk for the rows whose token completed it: the cache update, then the
  chunk becomes the window and a new chunk starts.

  `st` already holds the token (num_tokens counts it); `complete` [B]: rows whose chunk it
  completed; `has_window` [B]: rows that had a window before it. Without stored window features
  phi_k of the window is recomputed here by `key_feature_map`.
  """
  c = config.chunk_size
  track = config.policy == "attention"
  if st.stores_window_features:
    window_phi = st.window_phi_k
  else:
    window_phi = key_features(
      key_feature_map, st.window_k, has_window[:, None, None], st.feature_dim
    )
  window = _window_candidates(
    st.window_k,
    st.window_v,
    window_phi,
    has_window,
    (st.num_tokens // c - 2) * c,
    st.window_mass if track else None,
  )
  cache, lin_h, lin_s = _end_of_chunk(
    config, _sparse_cache(st, track), window, st.linear_h, st.linear_s, prior=prior_positions
  )
  rolled = dataclasses.replace(
    st,
    **_cache_fields(cache),
    window_k=st.chunk_k,
    window_v=st.chunk_v,
    window_phi_k=st.chunk_phi_k,
    chunk_k=jnp.zeros_like(st.chunk_k),
    chunk_v=jnp.zeros_like(st.chunk_v),
    chunk_phi_k=jnp.zeros_like(st.chunk_phi_k),
    linear_h=lin_h,
    linear_s=lin_s,
    cache_mass=cache.mass if track else st.cache_mass,
    window_mass=st.chunk_mass,
    chunk_mass=jnp.zeros_like(st.chunk_mass),
  )
  return _select(complete, rolled, st)


@decode_jit(static_argnames=("config", "roll"))
def _lola_decode(
  q,
  k,
  v,
  phi_q,
  phi_k,
  gates,
  *,
  config: LoLAConfig,
  state: LoLAState,
  prior_positions=None,
  key_feature_map=None,
  roll: bool = True,
):
  """The jitted body of `lola_decode` (inputs already validated; `gates` the gate terms).
  roll=False leaves a completed chunk in place (num_tokens counts the token): the caller runs
  `_roll_chunk` for it (`_lola_decode_steps`, once per chunk outside its per-token loop)."""
  sizes = validation.check_attention_inputs(
    "lola_decode", q, k, v, phi_q, phi_k, gates[0], has_time=False
  )
  b, hq, hkv, c = sizes["B"], sizes["Hq"], sizes["Hkv"], config.chunk_size
  store = state.cache_k.dtype
  r = state.num_tokens % c
  slot = jnp.arange(c)[None, :] == r[:, None]  # [B, C]
  track = config.policy == "attention"
  grouped = tuple(x.reshape(hkv, hq // hkv) for x in gates)
  has_window = state.num_tokens >= c
  if track:
    y, key_mass, (chunk_k, chunk_v, chunk_phi) = _decode_attend_concat(
      config, q, k, v, phi_q, phi_k, grouped, state, slot
    )
  else:
    # The softmax over [cache; window; chunk so far; the token] is taken part by part, the
    # token's own key apart: the attention reads the chunk buffer as it was, and the only writer
    # of the buffer is the update of slot r (in place where the buffer is donated or a loop
    # carry). Reading the written buffer instead makes XLA:CPU fuse the update into both of
    # its readers and copy the buffer twice per token. Nothing of the state is concatenated.
    write = functools.partial(_write_slot, rows=b)
    k_new, v_new = k.astype(store), v.astype(store)
    chunk_k = write(state.chunk_k, k_new, r)
    chunk_v = write(state.chunk_v, v_new, r)
    chunk_phi = state.chunk_phi_k  # empty without stored window features
    if state.stores_window_features:
      chunk_phi = write(chunk_phi, phi_k.astype(store), r)
    q_rows = q.reshape(b, hkv, hq // hkv, q.shape[-1])  # [B, Hkv, G, dk]: one row per head
    before = (jnp.arange(c)[None, :] < r[:, None])[:, None, None, :]  # [B, 1, 1, C]
    shift, s_soft, n_soft = _softmax_parts(
      q_rows,
      [
        (state.cache_k, state.cache_v, state.cache_valid[:, :, None, :]),
        (state.window_k, state.window_v, has_window[:, None, None, None]),
        (state.chunk_k, state.chunk_v, before),
        (k_new[:, :, None, :], v_new[:, :, None, :], jnp.ones((1, 1, 1, 1), bool)),
      ],
      scale=config.scale(q.shape[-1]),
      acc=state.linear_h.dtype,
    )
    phi_rows = phi_q.reshape(b, hkv, hq // hkv, phi_q.shape[-1])
    y = _mix_rows(config, grouped, shift, s_soft, n_soft, phi_rows, state.linear_h, state.linear_s)
    y = y.reshape(b, hq, -1)
  cache_mass, window_mass, chunk_mass = state.cache_mass, state.window_mass, state.chunk_mass
  if track:
    lam = config.cache_size
    cache_mass = cache_mass + key_mass[..., :lam]
    window_mass = window_mass + key_mass[..., lam : lam + c]
    chunk_mass = jnp.where(slot[:, None, :], 0.0, chunk_mass) + key_mass[..., lam + c :]

  written = dataclasses.replace(
    state,
    chunk_k=chunk_k,
    chunk_v=chunk_v,
    chunk_phi_k=chunk_phi,
    num_tokens=state.num_tokens + 1,
    cache_mass=cache_mass,
    window_mass=window_mass,
    chunk_mass=chunk_mass,
  )
  if not roll:
    return y.astype(q.dtype), written
  new_state = _end_chunk(config, written, r == c - 1, prior_positions, key_feature_map)
  return y.astype(q.dtype), new_state


def lola_decode_steps(
  q,
  k,
  v,
  phi_q,
  phi_k,
  gate=None,
  *,
  gate_logit=None,
  config: LoLAConfig,
  state: LoLAState,
  key_feature_map=None,
):
  """`lola_decode` for n consecutive tokens per row inside one jitted loop (in-chunk decode steps
  in a loop, the chunk-end update once per chunk between them): one program for all n steps, no
  host round trip or dispatch between them. The outputs and the final state equal n calls of
  `lola_decode` (and one `lola_prefill`); it is the decode loop of the benchmarks
  (`lola_jax.generate` calls the model's decode, one token at a time, inside its own
  `lax.while_loop`).

  Args:
    q: [B, n, Hq, dk]  k: [B, n, Hkv, dk]  v: [B, n, Hkv, dv]  phi_q: [B, n, Hq, D]
    phi_k: [B, n, Hkv, D]; gate / gate_logit [Hq]; config; state; key_feature_map (as
    `lola_decode`).

  Returns:
    y [B, n, Hq, dv] in q.dtype, and the state after the n tokens.
  """
  fn = "lola_decode_steps"
  if not isinstance(config, LoLAConfig):
    raise ValueError(f"{fn}: config must be a LoLAConfig, got {type(config).__name__}")
  given = validation.check_gate_args(fn, gate, gate_logit)
  sizes = validation.check_attention_inputs(fn, q, k, v, phi_q, phi_k, *given, has_time=True)
  validation.check_state(fn, state, config, sizes, dtype=k.dtype)
  check_key_feature_map(fn, key_feature_map, config)
  return _lola_decode_steps(
    q, k, v, phi_q, phi_k, gate_terms(gate, gate_logit), config=config, state=state,
    key_feature_map=key_feature_map,
  )  # fmt: skip


@decode_jit(static_argnames=("config",))
def _lola_decode_steps(
  q, k, v, phi_q, phi_k, gates, *, config: LoLAConfig, state: LoLAState, key_feature_map=None
):
  """The jitted loop of `lola_decode_steps`, in segments that end where some row completes its
  chunk: a segment's tokens are in-chunk decode steps in a `lax.fori_loop` (no control flow per
  token, so the state stays in place), then the chunk-end update runs once, under `lax.cond`,
  for the rows that completed. A `lax.cond` on every token would make XLA copy the state around
  it each time (`core.compiler`)."""
  n, c = q.shape[1], config.chunk_size
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, phi_q, phi_k))  # [n, B, ...]

  def token(i, carry):
    st, ys = carry
    x = tuple(jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in xs)
    y, st = _lola_decode(
      *x, gates, config=config, state=st, key_feature_map=key_feature_map, roll=False
    )
    return st, jax.lax.dynamic_update_index_in_dim(ys, y, i, axis=0)

  def segment(carry):
    i, st, ys = carry
    phase = st.num_tokens % c  # [B]
    length = jnp.minimum(jnp.min(c - phase), n - i)
    st, ys = jax.lax.fori_loop(i, i + length, token, (st, ys))
    complete = phase + length == c  # the segment's last token completed these rows' chunks
    return i + length, _end_chunk(config, st, complete, None, key_feature_map), ys

  ys = jnp.zeros((n, q.shape[0], q.shape[2], v.shape[-1]), q.dtype)
  _, state, ys = jax.lax.while_loop(lambda x: x[0] < n, segment, (jnp.int32(0), state, ys))
  return jnp.moveaxis(ys, 0, 1), state
