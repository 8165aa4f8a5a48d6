"""The attention kinds of the LoLA model: one module class per kind, chosen in one place.

Legend: B batch, T time, E d_model, Hq query heads, Hkv key/value heads, d head_dim, D feature
width of phi, P prior positions.

`ATTENTION_KINDS` maps `ModelConfig.attention` to its class; `ModelConfig.kind` looks it up, and
everything that depends on the kind asks the class (recurrentgemma's pattern: each block type
owns its cache and `init_cache`):

  kind     class              decode state                     mixing of q, k, v
  softmax  SoftmaxAttention   `KVCache` of max_len slots       exact causal softmax
  linear   LinearAttention    `LinearState` (H, s)             `pallas_kernels.linear_attention`
  hybrid   HybridAttention    `LoLAState`, cache_size 0        window + linear (LoLCATs); the
                                                               training forward is the fused
                                                               `pallas_kernels.hybrid_attention`
  lola     LoLAAttention      `LoLAState`                      window + sparse cache + linear

Every kind owns the same parameters (projections, feature maps and gates exist even when softmax
ignores them), so one set of weights can be evaluated under any kind. Traits for code that must
not compare kind names: `full_kv_cache` (the state holds every token), `windowed` (a `LoLAState`),
`uses_feature_maps` (the linear branch takes part: what distillation trains).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lola_jax import sharding
from lola_jax.core.scan import lola_decode, lola_end_chunk, lola_prefill
from lola_jax.core.state import init_state
from lola_jax.model import layers
from lola_jax.model.feature_maps import FeatureMap, Gate
from pallas_kernels import hybrid_attention, linear_attention


def _projection(eqn, shape, axes, fan_in, dtype, rngs):
  return layers.DenseGeneral(eqn, shape, axes, fan_in=fan_in, dtype=dtype, rngs=rngs)


# Logical axes of the kernels' operands.
Q_AXES = ("batch", None, "heads", None)  # q, phi_q, y: [B, T, Hq, .]
KV_AXES = ("batch", None, "kv_heads", None)  # k, v, phi_k: [B, T, Hkv, .]
GATE_AXES = ("heads",)  # the gate logits [Hq]
ROW_AXES = ("batch",)  # lengths [B]
PRIOR_AXES = ("batch", None)  # prior positions [B, P]
MAP_AXES = ("kv_heads", None, None)  # key feature-map parameters [Hkv, d, F]


def kernel_call(fn, args: tuple, in_axes: tuple, out_axes, *, batch: int, kv_heads: int):
  """`fn(*args)`: directly, or under the mesh in use inside `jax.shard_map` over rows and heads.

  Pallas kernels cannot be partitioned by XLA (a Mosaic kernel on a mesh of more than one
  device is refused), so under a mesh (`lola_jax.sharding.mesh_in_use`: the trainer's, or one
  set with `jax.set_mesh`) every attention kernel runs per device on its own rows and heads:
  batch over the rule of "batch" (("data", "fsdp")) and heads over the rule of "kv_heads"
  ("tensor"), query heads and key/value heads split alike so that query head i still reads kv
  head i // (Hq / Hkv) locally. A split that does not divide (B by data x fsdp, Hkv by tensor)
  is dropped, as `lola_jax.sharding.logical_to_spec` replicates such dimensions. Rows and heads
  are independent in every kind's mixing, so the numbers equal the unsharded call's.

  Args:
    fn: the kernel call; args: its array arguments; in_axes / out_axes: their logical axes
      (`lola_jax.sharding.shard_map_logical`); batch, kv_heads: B and Hkv.
  """
  mesh = sharding.mesh_in_use()
  if mesh is None:
    return fn(*args)
  rules = sharding.free_rules(mesh)
  split = sharding.logical_to_spec(("batch", "kv_heads"), (batch, kv_heads), mesh, rules)
  table = (("batch", split[0]), ("heads", split[1]), ("kv_heads", split[1]))
  return sharding.shard_map_logical(fn, args, in_axes, out_axes, mesh, table)


class Attention(nnx.Module):
  """GQA attention with rotary positions, feature maps and gates: what every kind shares.

  A kind subclasses it and defines `init_state`, `state_axes` and `attend` (the mixing of q, k,
  v); `config` is a `ModelConfig` whose `attention` names the kind.
  """

  full_kv_cache = False  # the decode state holds every token (sized by max_len)
  windowed = False  # the decode state is a LoLAState (window [+ sparse cache] + linear state)
  uses_feature_maps = True  # the linear branch (feature maps, gates) takes part

  def __init__(self, config, *, rngs: nnx.Rngs):
    c = config
    dt = c.compute_dtype
    self.config = c
    e, hq, hkv, d = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    kv_axes = ("embed", "kv_heads", "head_dim")
    self.q_proj = _projection(
      "bte,ehd->bthd", (e, hq, d), ("embed", "heads", "head_dim"), e, dt, rngs
    )
    self.k_proj = _projection("bte,ehd->bthd", (e, hkv, d), kv_axes, e, dt, rngs)
    self.v_proj = _projection("bte,ehd->bthd", (e, hkv, d), kv_axes, e, dt, rngs)
    self.o_proj = _projection(
      "bthd,hde->bte", (hq, d, e), ("heads", "head_dim", "embed"), hq * d, dt, rngs
    )
    self.phi_q = FeatureMap(c.feature_map, hq, d, c.feature_dim, heads_axis="heads", rngs=rngs)
    self.phi_k = FeatureMap(c.feature_map, hkv, d, c.feature_dim, heads_axis="kv_heads", rngs=rngs)
    self.gate = Gate(hq, init=c.gate_init)

  # What the kind is (class-level: asked with a ModelConfig, no module needed).

  @classmethod
  def lola_config(cls, config):
    """The `LoLAConfig` the kind runs with (`config.lola`; the hybrid forces cache_size 0)."""
    return config.lola

  @classmethod
  def stacks_selection(cls, config) -> bool:
    """Whether layers hand their sparse-cache positions to the layer above (`hand_up`)."""
    del config
    return False

  @staticmethod
  def state_axes(state):
    """Logical axis names of a decode state's leaves (same structure), for `lola_jax.sharding`."""
    return state.logical_axes()

  # The layer.

  def init_state(self, batch: int, max_len: int | None = None):
    """An empty decode state of this kind for `batch` rows."""
    raise NotImplementedError

  def hand_up(self, state):
    """What this layer hands to the layer above after a step: int [B, P] prior positions, or
    None (only LoLA with policy "sre_below" hands anything up)."""
    del state
    return None

  def qkv(self, x: jax.Array, positions: jax.Array):
    """x [B, T, E], positions int [B, T] -> q [B,T,Hq,d], k, v [B,T,Hkv,d] (rotary applied)."""
    c = self.config
    r = c.rotary_dim
    q = layers.apply_rope(self.q_proj(x), positions, c.rope_theta, c.rope_scaling, r)
    k = layers.apply_rope(self.k_proj(x), positions, c.rope_theta, c.rope_scaling, r)
    return q, k, self.v_proj(x)

  def attend(self, q, k, v, positions, state, lengths, *, decode: bool, prior, end_chunk=True):
    """The kind's mixing of q [B,T,Hq,d], k, v [B,T,Hkv,d]; returns (y [B,T,Hq,d], state).

    `state=None` means a fresh sequence in training mode: no state is built or returned.
    `lengths` int [B]: tokens t >= lengths[b] are padding. `prior`: what the layer below handed
    up (`hand_up`), or None. `end_chunk=False` (decode): a chunk the token completes is left
    for `end_chunk` (windowed kinds; the others have no chunks).
    """
    raise NotImplementedError

  def end_chunk(self, state, complete, prior):
    """The chunk-end update a decode with `end_chunk=False` deferred, for the rows in `complete`
    (bool [B]); `prior` as `attend`. Kinds without chunks return the state as it is."""
    del complete, prior
    return state

  def __call__(
    self,
    x,
    positions,
    state=None,
    lengths=None,
    *,
    decode=False,
    distill=False,
    prior=None,
    end_chunk=True,
  ):
    """x [B, T, E] -> (out [B, T, E], state, distill_mse or None).

    With `distill=True` the layer's output is the exact softmax attention (the teacher) and the
    third result is the mean squared error between this kind's output and it, on the same q, k,
    v: LoLCATs' attention transfer.
    """
    q, k, v = self.qkv(x, positions)
    b, t = x.shape[:2]
    if lengths is None:
      lengths = jnp.full((b,), t, jnp.int32)
    y, state = self.attend(
      q, k, v, positions, state, lengths, decode=decode, prior=prior, end_chunk=end_chunk
    )
    mse = None
    if distill:
      target = layers.softmax_attention(
        q, k, v, positions, positions, jnp.ones((b, t), bool), self.config.lola.scale(q.shape[-1])
      )
      mse = jnp.mean(jnp.square(y.astype(jnp.float32) - target.astype(jnp.float32)))
      y = target
    return self.o_proj(y), state, mse


class SoftmaxAttention(Attention):
  """Exact causal softmax attention; decode state: a `KVCache` of max_len slots."""

  full_kv_cache = True
  uses_feature_maps = False

  def init_state(self, batch: int, max_len: int | None = None):
    c = self.config
    return layers.init_kv_cache(
      batch, max_len or c.max_seq_len, c.num_kv_heads, c.head_dim, c.compute_dtype
    )

  def attend(self, q, k, v, positions, state, lengths, *, decode: bool, prior, end_chunk=True):
    del decode, prior, end_chunk
    scale = self.config.lola.scale(self.config.head_dim)
    if state is None:
      valid = jnp.ones(q.shape[:2], bool)
      return layers.softmax_attention(q, k, v, positions, positions, valid, scale), None
    state = layers.kv_cache_write(state, k, v, lengths)
    return layers.kv_cache_attention(state, q, positions, scale), state


class LinearAttention(Attention):
  """Normalised linear attention over every past token; decode state: a `LinearState`.

      y_t = phi_q(q_t)^T (H0 + sum_{i<=t} phi_k(k_i) v_i^T)
          / (phi_q(q_t)^T (s0 + sum_{i<=t} phi_k(k_i)) + linear_eps)

  computed by `pallas_kernels.linear_attention` (chunk `lola.chunk_size`, `lola.implementation`);
  padding tokens (t >= lengths[b]) enter with phi_k = 0, so they leave the state untouched.
  """

  def init_state(self, batch: int, max_len: int | None = None):
    del max_len
    c = self.config
    return layers.init_linear_state(batch, c.num_kv_heads, c.phi_dim, c.head_dim)

  def attend(self, q, k, v, positions, state, lengths, *, decode: bool, prior, end_chunk=True):
    del positions, decode, prior, end_chunk
    c = self.config
    t = q.shape[1]
    valid = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)  # [B, T]
    phi_k = self.phi_k(k) * valid[:, :, None, None]

    def mix(phi_q, phi_k, v, *initial):
      return linear_attention(
        phi_q, phi_k, v, chunk_size=min(c.lola.chunk_size, t), eps=c.linear_eps,
        initial_state=initial or None, implementation=c.lola.implementation,
      )  # fmt: skip

    initial = () if state is None else (state.h, state.s)
    state_axes = (("batch", "kv_heads", None, None), ("batch", "kv_heads", None))
    y, (h, s) = kernel_call(
      mix,
      (self.phi_q(q), phi_k, v, *initial),
      (Q_AXES, KV_AXES, KV_AXES, *state_axes[: len(initial)]),
      (Q_AXES, state_axes),
      batch=v.shape[0],
      kv_heads=v.shape[2],
    )
    y = y.astype(v.dtype)
    if state is None:
      return y, None
    return y, layers.LinearState(h=h, s=s, num_tokens=state.num_tokens + lengths.astype(jnp.int32))


class _WindowedAttention(Attention):
  """The kinds whose decode state is a `LoLAState`: the core's `lola_prefill` / `lola_decode`."""

  windowed = True

  @staticmethod
  def state_axes(state):
    # Every LoLAState leaf is [B, Hkv, ...] except num_tokens [B].
    def axes(x):
      return ("batch",) if x.ndim == 1 else ("batch", "kv_heads") + (None,) * (x.ndim - 2)

    return jax.tree.map(axes, state)

  def init_state(self, batch: int, max_len: int | None = None):
    del max_len
    c = self.config
    return init_state(
      c.lola_config,
      batch=batch,
      num_kv_heads=c.num_kv_heads,
      key_dim=c.head_dim,
      value_dim=c.head_dim,
      feature_dim=c.phi_dim,
      dtype=c.compute_dtype,
    )

  def fresh_mix(self, q, k, v, phi_q, phi_k, gate_logit) -> jax.Array:
    """The training forward's mixing from an empty state (no state built), on whatever rows and
    heads it is given (`kernel_call`): y [B, T, Hq, d]."""
    config = self.config.lola_config
    return lola_prefill(q, k, v, phi_q, phi_k, gate_logit=gate_logit, config=config)[0]

  def fresh_forward(self, q, k, v, phi_q, phi_k, gate_logit) -> jax.Array:
    """The training forward from an empty state (no state built): y [B, T, Hq, d]."""
    return kernel_call(
      self.fresh_mix,
      (q, k, v, phi_q, phi_k, gate_logit),
      (Q_AXES, KV_AXES, KV_AXES, Q_AXES, KV_AXES, GATE_AXES),
      Q_AXES,
      batch=k.shape[0],
      kv_heads=k.shape[2],
    )

  def attend(self, q, k, v, positions, state, lengths, *, decode: bool, prior, end_chunk=True):
    del positions
    config = self.config.lola_config
    phi_q, phi_k, gate_logit = self.phi_q(q), self.phi_k(k), self.gate.logits()
    below = {} if prior is None else {"prior_positions": prior}
    key_map = self.key_feature_map()
    recompute = key_map is not None
    if decode:
      xs = (x[:, 0] for x in (q, k, v, phi_q, phi_k))
      y, state = lola_decode(
        *xs, gate_logit=gate_logit, config=config, state=state, key_feature_map=key_map,
        end_chunk=end_chunk, **below,
      )  # fmt: skip
      return y[:, None], state
    if state is None:
      return self.fresh_forward(q, k, v, phi_q, phi_k, gate_logit), None

    map_args = tuple(key_map.args) if recompute else ()
    prior_args = () if prior is None else (prior,)

    def mix(q, k, v, phi_q, phi_k, gate_logit, state, lengths, *extra):
      maps, prior = extra[: len(map_args)], extra[len(map_args) :]
      below = {"prior_positions": prior[0]} if prior else {}
      if recompute:
        below["key_feature_map"] = jax.tree_util.Partial(key_map.func, *maps)
      return lola_prefill(
        q, k, v, phi_q, phi_k, gate_logit=gate_logit, config=config, state=state,
        lengths=lengths, **below,
      )  # fmt: skip

    return kernel_call(
      mix,
      (q, k, v, phi_q, phi_k, gate_logit, state, lengths, *map_args, *prior_args),
      (Q_AXES, KV_AXES, KV_AXES, Q_AXES, KV_AXES, GATE_AXES, self.state_axes(state), ROW_AXES)
      + (MAP_AXES,) * len(map_args)
      + (PRIOR_AXES,) * len(prior_args),
      (Q_AXES, self.state_axes(state)),
      batch=k.shape[0],
      kv_heads=k.shape[2],
    )

  def key_feature_map(self):
    """The layer's key map as the core's `key_feature_map` when its state recomputes window
    features (`LoLAConfig.window_features`), else None. Its parameters are the Partial's
    leaves: under `kernel_call` they travel as arguments, split by kv head."""
    if self.config.lola_config.window_features != "recomputed":
      return None
    return self.phi_k.partial()

  def end_chunk(self, state, complete, prior):
    below = {} if prior is None else {"prior_positions": prior}
    return lola_end_chunk(
      state, complete, config=self.config.lola_config, key_feature_map=self.key_feature_map(),
      **below,
    )  # fmt: skip


class HybridAttention(_WindowedAttention):
  """LoLCATs: sliding window + linear attention, i.e. LoLA with cache_size 0.

  Its training forward is `pallas_kernels.hybrid_attention` (Pallas on TPU, its XLA form on
  GPU/CPU, a custom backward); `lola.implementation="reference"` runs the core scan instead.
  """

  @classmethod
  def lola_config(cls, config):
    return dataclasses.replace(config.lola, cache_size=0)

  def fresh_mix(self, q, k, v, phi_q, phi_k, gate_logit) -> jax.Array:
    lola = self.config.lola
    if lola.implementation == "reference":
      return super().fresh_mix(q, k, v, phi_q, phi_k, gate_logit)
    return hybrid_attention(
      q,
      k,
      v,
      phi_q,
      phi_k,
      gate_logit=gate_logit,
      chunk_size=lola.chunk_size,
      mix=lola.mix,
      softmax_scale=lola.softmax_scale,
      implementation=lola.implementation,
    )


class LoLAAttention(_WindowedAttention):
  """Sliding window + sparse cache + linear attention (`ModelConfig.lola`).

  With policy "sre_below" a layer hands its cached positions up (`hand_up`): the layer above
  ranks them first when it selects its own cache.
  """

  @classmethod
  def stacks_selection(cls, config) -> bool:
    return config.lola.policy == "sre_below"

  def hand_up(self, state):
    if not self.stacks_selection(self.config):
      return None
    positions = state.cache_positions  # [B, Hkv, L]
    return positions.reshape(positions.shape[0], -1)  # [B, Hkv * L]


ATTENTION_KINDS: dict[str, type[Attention]] = {
  "softmax": SoftmaxAttention,
  "linear": LinearAttention,
  "hybrid": HybridAttention,
  "lola": LoLAAttention,
}
