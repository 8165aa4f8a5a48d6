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
from lola_jax.core.config import LoLAConfig
from lola_jax.core.selection import SRE_POLICIES, Candidates, update_sparse_cache
from lola_jax.core.state import LoLAState, init_state
from pallas_kernels.common import resolve_implementation
from pallas_kernels.equations import gate_terms
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
  out = jnp.zeros((b, padded_len) + x.shape[2:], x.dtype)
  if fresh:
    return out.at[:, : x.shape[1]].set(x)
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
  )


@functools.partial(jax.jit, static_argnames=("config",))
def _lola_prefill(
  q, k, v, phi_q, phi_k, gates, *, config: LoLAConfig, state, lengths, prior_positions=None
):
  """The jitted body of `lola_prefill` (inputs already validated; `gates` the gate terms)."""
  sizes = validation.check_attention_inputs(
    "lola_prefill", q, k, v, phi_q, phi_k, gates[0], has_time=True
  )
  b, t, hq, hkv, c = sizes["B"], sizes["T"], sizes["Hq"], sizes["Hkv"], config.chunk_size
  fresh = state is None
  if fresh:
    state = init_state(
      config,
      batch=b,
      num_kv_heads=hkv,
      key_dim=sizes["dk"],
      value_dim=sizes["dv"],
      feature_dim=sizes["D"],
      dtype=k.dtype,
    )
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

  # Outputs: back to [B, P, Hq, dv], then the T new slots of each row.
  y = jnp.moveaxis(ys, 0, 1).reshape(b, padded_len, hq, -1)
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

  cache = carry.cache
  new_state = LoLAState(
    **_cache_fields(cache),
    window_k=carry.window_k,
    window_v=carry.window_v,
    window_phi_k=carry.window_phi_k,
    chunk_k=_current_chunk(kp, last_block, keep),
    chunk_v=_current_chunk(vp, last_block, keep),
    chunk_phi_k=_current_chunk(phi_kp, last_block, keep),
    linear_h=carry.linear_h,
    linear_s=carry.linear_s,
    num_tokens=num_tokens,
    cache_mass=cache.mass if track else state.cache_mass,
    window_mass=carry.window_mass,
    chunk_mass=chunk_mass,
  )
  return y.astype(q.dtype), new_state


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
    holds after its own step for this token (see `lola_prefill`).
  """
  fn = "lola_decode"
  if not isinstance(config, LoLAConfig):
    raise ValueError(f"{fn}: config must be a LoLAConfig, got {type(config).__name__}")
  given = validation.check_gate_args(fn, gate, gate_logit)
  sizes = validation.check_attention_inputs(fn, q, k, v, phi_q, phi_k, *given, has_time=False)
  validation.check_state(fn, state, config, sizes, dtype=k.dtype)
  validation.check_prior_positions(fn, prior_positions, config.policy, sizes["B"])
  gates = gate_terms(gate, gate_logit)
  return _lola_decode(
    q, k, v, phi_q, phi_k, gates, config=config, state=state, prior_positions=prior_positions
  )


def _roll_chunk(config, complete, has_window, prior_positions, st: LoLAState) -> LoLAState:
  """Decode's end of chunk for the rows whose token completed it: the cache update, then the
  chunk becomes the window and a new chunk starts.

  `st` already holds the token (num_tokens counts it); `complete` [B]: rows whose chunk it
  completed; `has_window` [B]: rows that had a window before it.
  """
  c = config.chunk_size
  track = config.policy == "attention"
  window = _window_candidates(
    st.window_k,
    st.window_v,
    st.window_phi_k,
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


@functools.partial(jax.jit, static_argnames=("config",))
def _lola_decode(
  q, k, v, phi_q, phi_k, gates, *, config: LoLAConfig, state: LoLAState, prior_positions=None
):
  """The jitted body of `lola_decode` (inputs already validated; `gates` the gate terms)."""
  sizes = validation.check_attention_inputs(
    "lola_decode", q, k, v, phi_q, phi_k, gates[0], has_time=False
  )
  b, hq, hkv, c = sizes["B"], sizes["Hq"], sizes["Hkv"], config.chunk_size
  store = state.cache_k.dtype
  r = state.num_tokens % c
  slot = jnp.arange(c)[None, :] == r[:, None]  # [B, C]

  def write(buf, x):  # buf [B, Hkv, C, d], x [B, Hkv, d]
    return jnp.where(slot[:, None, :, None], x[:, :, None, :].astype(store), buf)

  chunk_k, chunk_v, chunk_phi = (
    write(state.chunk_k, k),
    write(state.chunk_v, v),
    write(state.chunk_phi_k, phi_k),
  )
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
  grouped = tuple(x.reshape(hkv, hq // hkv) for x in gates)
  track = config.policy == "attention"
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
    mass_queries=jnp.ones((b, 1), bool) if track else None,
  )
  y = _ungroup(y)[:, 0]
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
  complete = r == c - 1
  roll = functools.partial(_roll_chunk, config, complete, has_window, prior_positions)
  new_state = jax.lax.cond(jnp.any(complete), roll, lambda st: st, written)
  return y.astype(q.dtype), new_state
