"""Building blocks of the LoLA language model: norms, rotary positions, MLP, softmax attention
with its KV cache, and the linear-attention state.

Legend: B batch, T query time, S key time (cache slots), Hq query heads, Hkv key/value heads,
G = Hq // Hkv (query heads per kv head), d head_dim, D feature width, E d_model, M mlp_dim.

Modules hold parameters (float32) annotated with `logical_axes` metadata (the names
`lola_jax.model.logical_axes` collects and `lola_jax.sharding` maps onto a mesh); compute happens
in the module's `dtype`. Norms, softmax and all attention accumulators are float32. The linear
attention itself is the kernels' (`pallas_kernels.linear_attention`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# ------------------------------------------------------------------------------------------------
# Parameter modules.


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * (1 + scale), computed in float32, returned in `dtype`."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...])).astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding [V, E]; `attend` reuses it as the tied output projection.

  `scale=True` multiplies the looked-up vectors by sqrt(E) (Gemma); Llama uses `scale=False`.
  """

  def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs, scale: bool = True):
    self.embedding = nnx.Param(
      _normal(rngs.params(), (vocab_size, dim), dim**-0.5), logical_axes=("vocab", "embed")
    )
    self.dtype = dtype
    self.dim = dim
    self.scale = scale

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int [B, T] -> [B, T, E] (scaled by sqrt(E) when `scale`, as in Gemma)."""
    x = jnp.take(self.embedding[...], tokens, axis=0)
    if self.scale:
      x = x * jnp.sqrt(jnp.float32(self.dim))
    return x.astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """[B, T, E] -> float32 logits [B, T, V]."""
    return jnp.einsum(
      "bte,ve->btv", x, self.embedding[...].astype(self.dtype), preferred_element_type=jnp.float32
    )


class DenseGeneral(nnx.Module):
  """y = einsum(eqn, x, w) with a float32 kernel cast to `dtype` for the matmul."""

  def __init__(
    self,
    eqn: str,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    *,
    fan_in: int,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.eqn = eqn
    self.kernel = nnx.Param(_normal(rngs.params(), shape, fan_in**-0.5), logical_axes=axes)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum(self.eqn, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class SwiGLU(nnx.Module):
  """MLP: down(silu(x W_gate) * (x W_up)); [B, T, E] -> [B, T, E]."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.gate = DenseGeneral(
      "bte,em->btm", (dim, hidden), ("embed", "mlp"), fan_in=dim, dtype=dtype, rngs=rngs
    )
    self.up = DenseGeneral(
      "bte,em->btm", (dim, hidden), ("embed", "mlp"), fan_in=dim, dtype=dtype, rngs=rngs
    )
    self.down = DenseGeneral(
      "btm,me->bte", (hidden, dim), ("mlp", "embed"), fan_in=hidden, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


# ------------------------------------------------------------------------------------------------
# Rotary positions.


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling of long-context checkpoints (frozen, hashable).

  rope_type "linear": every frequency divided by `factor` (positions interpolated).
  rope_type "llama3" (Llama 3.1): with wavelength w_i = 2 pi / f_i and L0 the original context,
    w_i < L0 / high_freq_factor          keep f_i;
    w_i > L0 / low_freq_factor           f_i / factor;
    otherwise                            (1 - a) f_i / factor + a f_i,
                                         a = (L0 / w_i - low_freq_factor)
                                             / (high_freq_factor - low_freq_factor).
  """

  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise ValueError(
        f"RopeScaling.rope_type must be 'linear' or 'llama3', got {self.rope_type!r}"
      )
    if not self.factor > 0:
      raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor!r}")
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(
        "RopeScaling.high_freq_factor must exceed low_freq_factor, got "
        f"{self.high_freq_factor!r} <= {self.low_freq_factor!r}"
      )


def rope_frequencies(d: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
  """float32 [d/2] rotary frequencies f_i = theta^(-2i/d), optionally scaled."""
  freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  if scaling is None:
    return freq
  if scaling.rope_type == "linear":
    return freq / scaling.factor
  l0 = float(scaling.original_max_position_embeddings)
  wavelen = 2.0 * jnp.pi / freq
  scaled = jnp.where(wavelen > l0 / scaling.low_freq_factor, freq / scaling.factor, freq)
  a = (l0 / wavelen - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  smooth = (1.0 - a) * scaled / scaling.factor + a * scaled
  medium = (wavelen >= l0 / scaling.high_freq_factor) & (wavelen <= l0 / scaling.low_freq_factor)
  return jnp.where(medium, smooth, scaled)


def apply_rope(
  x: jax.Array,
  positions: jax.Array,
  theta: float,
  scaling: RopeScaling | None = None,
  rotary_dim: int | None = None,
) -> jax.Array:
  """Rotary position embedding (rotate-half form, as Hugging Face Llama), optionally partial.

  The first r = `rotary_dim` features are rotated with frequencies theta^(-2i/r), i < r/2; the
  other d - r features pass through unchanged (GPT-NeoX's partial rotary): their dot products do
  not depend on the distance between query and key, which lets a head match content at any range.

  Args:
    x: [B, T, H, d].
    positions: int [B, T] absolute positions.
    theta: base wavelength.
    scaling: optional long-context frequency scaling (`RopeScaling`).
    rotary_dim: r, even, 0 < r <= d; None = d (full rotary).

  Returns:
    [B, T, H, d] in x.dtype.
  """
  d = x.shape[-1]
  r = d if rotary_dim is None else rotary_dim
  if r % 2 or not 0 < r <= d:
    raise ValueError(f"rotary_dim must be even and in (0, {d}], got {rotary_dim!r}")
  freq = rope_frequencies(r, theta, scaling)  # [r/2]
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, r/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x[..., :r].astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return out if r == d else jnp.concatenate([out, x[..., r:]], axis=-1)


# ------------------------------------------------------------------------------------------------
# Softmax attention and its KV cache.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Exact key/value cache of softmax attention (one layer).

  k, v: [B, S, Hkv, d] cached keys/values in the compute dtype (slot s holds position s);
  num_tokens: int32 [B] tokens written so far per row.
  """

  k: jax.Array
  v: jax.Array
  num_tokens: jax.Array

  def logical_axes(self) -> KVCache:
    """The logical axis names of every leaf (a KVCache of tuples), for `lola_jax.sharding`."""
    slots = ("batch", None, "kv_heads", None)
    return KVCache(k=slots, v=slots, num_tokens=("batch",))


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
  """An empty cache of `max_len` slots per row."""
  z = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
  return KVCache(k=z, v=z, num_tokens=jnp.zeros((batch,), jnp.int32))


# Queries per block of `softmax_attention`: its float32 logits and probabilities are
# [B, Hq, QUERY_BLOCK, S] at a time instead of [B, Hq, T, S]. Without the blocks a 4K-token
# prompt batch (B x T = 16K tokens, the recall evaluation's) held 4.7 GB of them, 8K twice that.
QUERY_BLOCK = 512


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  k_pos: jax.Array,
  k_valid: jax.Array,
  scale: float,
  *,
  query_block: int | None = QUERY_BLOCK,
) -> jax.Array:
  """Causal GQA softmax attention: query at position p sees valid keys at positions <= p.

      y_t = sum_s softmax_s(scale q_t . k_s | k_pos[s] <= q_pos[t], k_valid[s]) v_s

  Each query's softmax is its own, so queries are taken `query_block` at a time (a `lax.map`
  over blocks, each under `jax.checkpoint`): memory [B, Hq, query_block, S] instead of
  [B, Hq, T, S], the same numbers. T <= query_block (or None) is one block.

  Args:
    q: [B, T, Hq, d]; k, v: [B, S, Hkv, d]; q_pos: int [B, T]; k_pos: int [B, S];
    k_valid: bool [B, S]; scale: logit scale; query_block: queries per block.

  Returns:
    [B, T, Hq, d] in q.dtype.
  """
  b, t = q.shape[:2]
  if query_block is None or t <= query_block:
    return _softmax_attention(q, k, v, q_pos, k_pos, k_valid, scale)
  n = -(-t // query_block)
  pad = n * query_block - t
  # Padded queries (zeros at position 0) are computed and dropped.
  q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, query_block, *q.shape[2:])
  pos_blocks = jnp.pad(q_pos, ((0, 0), (0, pad))).reshape(b, n, query_block)

  @jax.checkpoint
  def block(xs):
    qb, pb = xs
    return _softmax_attention(qb, k, v, pb, k_pos, k_valid, scale)

  out = jax.lax.map(block, (jnp.moveaxis(q_blocks, 1, 0), jnp.moveaxis(pos_blocks, 1, 0)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * query_block, *out.shape[3:])
  return out[:, :t]


def _softmax_attention(q, k, v, q_pos, k_pos, k_valid, scale):
  """`softmax_attention` on all of q at once."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [B, T, S]
  logits = jnp.where(mask[:, None, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum(
    "bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  return out.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)


def kv_cache_write(cache: KVCache, k: jax.Array, v: jax.Array, lengths: jax.Array) -> KVCache:
  """Append k, v [B, T, Hkv, d] at each row's `num_tokens`; tokens t >= lengths[b] are dropped."""
  b, t = k.shape[:2]
  slots = cache.num_tokens[:, None] + jnp.arange(t)[None, :]  # [B, T]
  slots = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], slots, cache.k.shape[1])
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  new_k = cache.k.at[rows, slots].set(k.astype(cache.k.dtype), mode="drop")
  new_v = cache.v.at[rows, slots].set(v.astype(cache.v.dtype), mode="drop")
  return KVCache(k=new_k, v=new_v, num_tokens=cache.num_tokens + lengths.astype(jnp.int32))


# Cache slots per block of `kv_cache_attention` for a block of queries.
KEY_BLOCK = 512


def kv_cache_attention(
  cache: KVCache, q: jax.Array, q_pos: jax.Array, scale: float, *, key_block: int | None = KEY_BLOCK
) -> jax.Array:
  """Queries [B, T, Hq, d] at q_pos [B, T] against an (already updated) cache of S slots.

  With T > 1 queries (a prompt prefilled in segments) and S > key_block, the slots are read
  `key_block` at a time and the softmax is accumulated online, and a block beyond every row's
  filled slots is skipped (`lax.cond`, so the loop stays differentiable):

      m' = max(m, max_s l_s),  S' = S e^{m - m'} + sum_s e^{l_s - m'},
      N' = N e^{m - m'} + sum_s e^{l_s - m'} v_s,  y = N / S

  so segment i of a prompt attends to the (i + 1) segments written so far, not to all S slots,
  one [B, Hq, T, key_block] block of logits at a time. A query that sees no slot gets zeros.
  Single-token decode (T = 1) reads the whole cache in one product.
  """
  b, t = q.shape[:2]
  s = cache.k.shape[1]
  if t == 1 or key_block is None or s <= key_block:
    k_pos = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
    k_valid = k_pos < cache.num_tokens[:, None]
    return softmax_attention(q, cache.k, cache.v, q_pos, k_pos, k_valid, scale)
  hkv, dv = cache.k.shape[2], cache.v.shape[-1]
  qg = q.reshape(b, t, hkv, q.shape[2] // hkv, q.shape[-1])
  filled = jnp.max(cache.num_tokens)
  num_blocks = -(-s // key_block)

  def block(j, carry):
    m, total, acc = carry
    first = j * key_block
    start = jnp.minimum(first, s - key_block)  # the last block overlaps the one before it
    k = jax.lax.dynamic_slice_in_dim(cache.k, start, key_block, axis=1)
    v = jax.lax.dynamic_slice_in_dim(cache.v, start, key_block, axis=1)
    pos = start + jnp.arange(key_block)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    seen = (
      (pos[None, None, :] <= q_pos[:, :, None])
      & (pos[None, None, :] < cache.num_tokens[:, None, None])
      & (pos >= first)[None, None, :]
    )  # [B, T, key_block]
    logits = jnp.where(seen[:, None, None], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1, keepdims=True))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(logits - shift)
    rescale = jnp.exp(m - shift)
    total = total * rescale + jnp.sum(p, axis=-1, keepdims=True)
    pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, total, acc * rescale + pv

  def maybe_block(j, carry):
    return jax.lax.cond(j * key_block < filled, block, lambda j, c: c, j, carry)

  rows = qg.shape[:1] + (hkv, qg.shape[3], t)
  init = (
    jnp.full(rows + (1,), -jnp.inf, jnp.float32),
    jnp.zeros(rows + (1,), jnp.float32),
    jnp.zeros(rows + (dv,), jnp.float32),
  )
  _, total, acc = jax.lax.fori_loop(0, num_blocks, maybe_block, init)
  y = jnp.where(total > 0, acc / jnp.where(total > 0, total, 1.0), 0.0)
  return y.transpose(0, 3, 1, 2, 4).reshape(b, t, -1, dv).astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# Linear attention and its state.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearState:
  """Linear-attention memory (one layer), always float32.

  h: [B, Hkv, D, d] = sum_i phi_k(k_i) v_i^T;  s: [B, Hkv, D] = sum_i phi_k(k_i);
  num_tokens: int32 [B].
  """

  h: jax.Array
  s: jax.Array
  num_tokens: jax.Array

  def logical_axes(self) -> LinearState:
    """The logical axis names of every leaf (a LinearState of tuples), for `lola_jax.sharding`."""
    return LinearState(
      h=("batch", "kv_heads", None, None), s=("batch", "kv_heads", None), num_tokens=("batch",)
    )


def init_linear_state(batch: int, num_kv_heads: int, feature_dim: int, value_dim: int):
  """An empty `LinearState` (H = 0, s = 0, no tokens)."""
  return LinearState(
    h=jnp.zeros((batch, num_kv_heads, feature_dim, value_dim), jnp.float32),
    s=jnp.zeros((batch, num_kv_heads, feature_dim), jnp.float32),
    num_tokens=jnp.zeros((batch,), jnp.int32),
  )
