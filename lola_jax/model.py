"""The LoLA language model: a Llama-style decoder whose attention kind is a config choice.

Legend: B batch, T time, V vocab, E d_model, Hq query heads, Hkv key/value heads, d head_dim,
D feature width of phi, M mlp_dim, L num_layers.

Attention kinds (`ModelConfig.attention`):
  softmax  exact causal attention (decode state: a `KVCache` of `max_seq_len` slots);
  linear   normalised linear attention over every past token (decode state: `LinearState`);
  hybrid   LoLCATs: sliding window + linear attention, i.e. LoLA with cache_size 0 (`LoLAState`);
  lola     sliding window + sparse cache + linear attention (`LoLAState`), `ModelConfig.lola`.

Every kind owns the same parameters (feature maps and gates exist even when `softmax` ignores
them), so one set of weights can be evaluated under any kind: `LoLALM.with_lola_config`.

Entry points sharing one set of parameters:
  `LoLALM.__call__(tokens)`         training forward over whole sequences -> logits [B, T, V];
  `LoLALM.prefill(tokens, lengths)` -> (logits [B, T, V], states), states one per layer;
  `LoLALM.decode(tokens, states)`   one token per row -> (logits [B, V], states);
  `logits(config, params, tokens)`  pure function of a parameter pytree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lola_jax import layers
from lola_jax.core.config import LoLAConfig
from lola_jax.feature_maps import FEATURE_MAPS, FeatureMap, Gate, feature_width

ATTENTIONS = ("softmax", "linear", "hybrid", "lola")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of `LoLALM` (frozen, hashable; validated on construction).

  Attributes:
    vocab_size: V.
    num_layers: L decoder blocks.
    d_model: E residual width.
    num_heads: Hq query heads.
    num_kv_heads: Hkv key/value heads (GQA); num_heads % num_kv_heads == 0.
    head_dim: d, even (rotary).
    mlp_dim: M hidden width of the SwiGLU MLP.
    attention: "softmax" | "linear" | "hybrid" | "lola".
    feature_map: "hedgehog" | "elu" | "identity" (the linear branch's phi).
    feature_dim: Hedgehog's learned width per sign F (phi has D = 2F features); elu/identity use
      D = head_dim and ignore this.
    lola: LoLA settings (chunk = window size, cache size, mix, policy) for "lola"; "hybrid" uses
      the same with cache_size 0.
    tie_embeddings: output projection = embedding matrix transposed.
    dtype: compute dtype name; parameters are float32, attention states float32.
    max_seq_len: KV-cache slots of the softmax decode state.
    rope_theta: rotary base.
    norm_eps: RMSNorm epsilon.
    gate_init: initial gate logit (g = sigmoid(gate_init)).
    linear_eps: added to the linear-attention denominator of the "linear" kind.
    rope_scaling: optional `layers.RopeScaling` (Llama 3.1 "llama3" or "linear"); None = plain.
    scale_embeddings: multiply input embeddings by sqrt(E) (Gemma); False for Llama checkpoints.
    rope_fraction: share of each head's features that are rotated (`rotary_dim` = that share of
      d, rounded down to even, at least 2); the rest carry no position (1.0 = Llama).
    layer_cache_sizes: optional per-layer sparse-cache capacities (one int >= 0 per layer) that
      replace `lola.cache_size` layer by layer for the "lola" kind (None = the same everywhere);
      the other kinds ignore it. A per-layer budget: a layer whose linear state memorises well
      can hold fewer exact pairs than one that does the retrieval.
  """

  vocab_size: int = 256
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 512
  attention: str = "softmax"
  feature_map: str = "hedgehog"
  feature_dim: int = 32
  lola: LoLAConfig = dataclasses.field(default_factory=LoLAConfig)
  tie_embeddings: bool = True
  dtype: str = "float32"
  max_seq_len: int = 2048
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  gate_init: float = 0.0
  linear_eps: float = 1e-6
  rope_scaling: layers.RopeScaling | None = None
  scale_embeddings: bool = True
  rope_fraction: float = 1.0
  layer_cache_sizes: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in (
      "vocab_size",
      "num_layers",
      "d_model",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_dim",
      "feature_dim",
      "max_seq_len",
    ):
      val = getattr(self, name)
      if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"ModelConfig.{name} must be an int >= 1, got {val!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"ModelConfig.num_heads ({self.num_heads}) must be divisible by "
        f"ModelConfig.num_kv_heads ({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even (rotary), got {self.head_dim}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"ModelConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(
        f"ModelConfig.feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}"
      )
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
    if isinstance(self.rope_fraction, bool) or not (
      isinstance(self.rope_fraction, (int, float)) and 0.0 < self.rope_fraction <= 1.0
    ):
      raise ValueError(f"ModelConfig.rope_fraction must lie in (0, 1], got {self.rope_fraction!r}")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, layers.RopeScaling):
      raise ValueError(
        "ModelConfig.rope_scaling must be None or a layers.RopeScaling, got "
        f"{type(self.rope_scaling).__name__}"
      )
    if not isinstance(self.lola, LoLAConfig):
      raise ValueError(f"ModelConfig.lola must be a LoLAConfig, got {type(self.lola).__name__}")
    if self.layer_cache_sizes is not None:
      sizes = self.layer_cache_sizes
      if isinstance(sizes, list):  # from ml_collections / the command line; hashable from here on
        sizes = tuple(sizes)
        object.__setattr__(self, "layer_cache_sizes", sizes)
      if (
        not isinstance(sizes, tuple)
        or len(sizes) != self.num_layers
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes)
      ):
        raise ValueError(
          f"ModelConfig.layer_cache_sizes must be None or {self.num_layers} ints >= 0 (one per "
          f"layer), got {self.layer_cache_sizes!r}"
        )

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def rotary_dim(self) -> int:
    """r, the rotated features per head (even)."""
    return max(2, int(self.head_dim * self.rope_fraction) // 2 * 2)

  @property
  def phi_dim(self) -> int:
    """D, the width of the feature-mapped queries and keys."""
    return feature_width(self.feature_map, self.head_dim, self.feature_dim)

  @property
  def lola_config(self) -> LoLAConfig:
    """The LoLA config the "hybrid" / "lola" kinds run with (hybrid forces cache_size 0)."""
    if self.attention == "hybrid":
      return dataclasses.replace(self.lola, cache_size=0)
    return self.lola

  def layer_config(self, layer: int) -> ModelConfig:
    """The config block `layer` runs with: `lola.cache_size` from `layer_cache_sizes`, if set."""
    if self.layer_cache_sizes is None:
      return self
    lola = dataclasses.replace(self.lola, cache_size=self.layer_cache_sizes[layer])
    return dataclasses.replace(self, lola=lola, layer_cache_sizes=None)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)


def _core():
  """The LoLA core entry points (imported lazily: the model also works without them)."""
  from lola_jax.core.scan import lola_decode, lola_prefill
  from lola_jax.core.state import init_state

  return lola_prefill, lola_decode, init_state


def _hybrid_kernel():
  """`pallas_kernels.hybrid_attention` if it exists (training forward of "hybrid"), else None.

  It computes LoLA with cache_size 0 from a fresh state (Pallas on TPU, its XLA form on GPU/CPU)
  with a custom backward; `LoLAConfig.implementation="reference"` opts out (core scan instead).
  """
  try:
    from pallas_kernels import hybrid_attention
  except ImportError:
    return None
  return hybrid_attention


class Attention(nnx.Module):
  """GQA attention with rotary positions, feature maps and gates for the linear branch."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    dt = c.compute_dtype
    self.config = c
    e, hq, hkv, d = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    self.q_proj = layers.DenseGeneral(
      "bte,ehd->bthd", (e, hq, d), ("embed", "heads", "head_dim"), fan_in=e, dtype=dt, rngs=rngs
    )
    self.k_proj = layers.DenseGeneral(
      "bte,ehd->bthd",
      (e, hkv, d),
      ("embed", "kv_heads", "head_dim"),
      fan_in=e,
      dtype=dt,
      rngs=rngs,
    )
    self.v_proj = layers.DenseGeneral(
      "bte,ehd->bthd",
      (e, hkv, d),
      ("embed", "kv_heads", "head_dim"),
      fan_in=e,
      dtype=dt,
      rngs=rngs,
    )
    self.o_proj = layers.DenseGeneral(
      "bthd,hde->bte",
      (hq, d, e),
      ("heads", "head_dim", "embed"),
      fan_in=hq * d,
      dtype=dt,
      rngs=rngs,
    )
    self.phi_q = FeatureMap(c.feature_map, hq, d, c.feature_dim, heads_axis="heads", rngs=rngs)
    self.phi_k = FeatureMap(c.feature_map, hkv, d, c.feature_dim, heads_axis="kv_heads", rngs=rngs)
    self.gate = Gate(hq, init=c.gate_init)

  def init_state(self, batch: int, max_len: int | None = None):
    """An empty decode state of this layer's attention kind."""
    c = self.config
    if c.attention == "softmax":
      return layers.init_kv_cache(
        batch, max_len or c.max_seq_len, c.num_kv_heads, c.head_dim, c.compute_dtype
      )
    if c.attention == "linear":
      return layers.init_linear_state(batch, c.num_kv_heads, c.phi_dim, c.head_dim)
    init_state = _core()[2]
    return init_state(
      c.lola_config,
      batch=batch,
      num_kv_heads=c.num_kv_heads,
      key_dim=c.head_dim,
      value_dim=c.head_dim,
      feature_dim=c.phi_dim,
      dtype=c.compute_dtype,
    )

  def qkv(self, x: jax.Array, positions: jax.Array):
    """x [B, T, E], positions int [B, T] -> q [B,T,Hq,d], k, v [B,T,Hkv,d] (rotary applied)."""
    c = self.config
    r = c.rotary_dim
    q = layers.apply_rope(self.q_proj(x), positions, c.rope_theta, c.rope_scaling, r)
    k = layers.apply_rope(self.k_proj(x), positions, c.rope_theta, c.rope_scaling, r)
    return q, k, self.v_proj(x)

  def attend(self, q, k, v, positions, state, lengths, *, decode: bool = False, prior=None):
    """The attention kind's mixing of q, k, v [B, T, H, d]; returns (y [B,T,Hq,d], state).

    `state=None` means a fresh sequence in training mode: no state is built or returned.
    `prior`: int [B, P] positions the layer below holds in its sparse cache (policy
    "sre_below"; None for the first layer).
    """
    c = self.config
    b, t = q.shape[:2]
    scale = c.lola.scale(c.head_dim)
    if lengths is None:
      lengths = jnp.full((b,), t, jnp.int32)
    if c.attention == "softmax":
      if state is None:
        return layers.softmax_attention(
          q, k, v, positions, positions, jnp.ones((b, t), bool), scale
        ), None
      state = layers.kv_cache_write(state, k, v, lengths)
      return layers.kv_cache_attention(state, q, positions, scale), state
    phi_q, phi_k = self.phi_q(q), self.phi_k(k)
    if c.attention == "linear":
      fresh = state is None
      if fresh:
        state = layers.init_linear_state(b, c.num_kv_heads, c.phi_dim, c.head_dim)
      y, state = layers.linear_attention(phi_q, phi_k, v, state, lengths, c.linear_eps)
      return y, (None if fresh else state)
    lola_prefill, lola_decode, _ = _core()
    gate = self.gate()
    below = {"prior_positions": prior} if prior is not None else {}
    if decode:
      y, state = lola_decode(
        q[:, 0],
        k[:, 0],
        v[:, 0],
        phi_q[:, 0],
        phi_k[:, 0],
        gate,
        config=c.lola_config,
        state=state,
        **below,
      )
      return y[:, None], state
    if state is None:
      kernel = _hybrid_kernel() if c.attention == "hybrid" else None
      if kernel is not None and c.lola.implementation != "reference":
        y = kernel(
          q,
          k,
          v,
          phi_q,
          phi_k,
          gate,
          chunk_size=c.lola.chunk_size,
          mix=c.lola.mix,
          softmax_scale=c.lola.softmax_scale,
          implementation=c.lola.implementation,
        )
        return y, None
      y, _ = lola_prefill(q, k, v, phi_q, phi_k, gate, config=c.lola_config)
      return y, None
    y, state = lola_prefill(
      q, k, v, phi_q, phi_k, gate, config=c.lola_config, state=state, lengths=lengths, **below
    )
    return y, state

  def __call__(
    self, x, positions, state=None, lengths=None, *, decode=False, distill=False, prior=None
  ):
    """x [B, T, E] -> (out [B, T, E], state, distill_mse or None).

    With `distill=True` the layer's output is the exact softmax attention (the teacher) and the
    third result is the mean squared error between this kind's output and it, on the same q, k,
    v: LoLCATs' attention transfer.
    """
    q, k, v = self.qkv(x, positions)
    y, state = self.attend(q, k, v, positions, state, lengths, decode=decode, prior=prior)
    mse = None
    if distill:
      b, t = x.shape[:2]
      target = layers.softmax_attention(
        q, k, v, positions, positions, jnp.ones((b, t), bool), self.config.lola.scale(q.shape[-1])
      )
      mse = jnp.mean(jnp.square(y.astype(jnp.float32) - target.astype(jnp.float32)))
      y = target
    return self.o_proj(y), state, mse


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dt = config.compute_dtype
    self.attn_norm = layers.RMSNorm(config.d_model, eps=config.norm_eps, dtype=dt)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(config.d_model, eps=config.norm_eps, dtype=dt)
    self.mlp = layers.SwiGLU(config.d_model, config.mlp_dim, dtype=dt, rngs=rngs)

  def __call__(
    self, x, positions, state=None, lengths=None, *, decode=False, distill=False, prior=None
  ):
    h, state, mse = self.attn(
      self.attn_norm(x), positions, state, lengths, decode=decode, distill=distill, prior=prior
    )
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return x, state, mse


class LoLALM(nnx.Module):
  """Decoder-only language model; see the module docstring for the entry points."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt = config.compute_dtype
    self.embed = layers.Embed(
      config.vocab_size, config.d_model, dtype=dt, rngs=rngs, scale=config.scale_embeddings
    )
    self.blocks = nnx.List(
      [Block(config.layer_config(i), rngs=rngs) for i in range(config.num_layers)]
    )
    self.final_norm = layers.RMSNorm(config.d_model, eps=config.norm_eps, dtype=dt)
    if not config.tie_embeddings:
      self.lm_head = layers.DenseGeneral(
        "bte,ev->btv",
        (config.d_model, config.vocab_size),
        ("embed", "vocab"),
        fan_in=config.d_model,
        dtype=dt,
        rngs=rngs,
      )

  def _head(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      return self.embed.attend(x)
    return self.lm_head(x).astype(jnp.float32)

  @property
  def stacks_selection(self) -> bool:
    """Whether layers pass their sparse-cache positions up (LoLA with policy "sre_below")."""
    return self.config.attention == "lola" and self.config.lola.policy == "sre_below"

  def _run(self, tokens, positions, states, lengths, *, decode=False, distill=False):
    x = self.embed(tokens)
    new_states, mses = [], []
    prior = None
    for i, block in enumerate(self.blocks):
      st = None if states is None else states[i]
      x, st, mse = block(x, positions, st, lengths, decode=decode, distill=distill, prior=prior)
      if self.stacks_selection and st is not None:
        prior = st.cache_positions.reshape(st.cache_positions.shape[0], -1)  # [B, Hkv * L]
      new_states.append(st)
      mses.append(mse)
    return self._head(x), tuple(new_states), mses

  def _run_stacked(self, tokens, states, lengths):
    """Prefill for "sre_below": C tokens at a time through every layer (`lax.scan`).

    Each row completes at most one chunk per C-token segment, so the cache a layer hands up
    after a segment is the one it holds right after that chunk end: the same prior the decode
    path gives token by token, which makes prefill and decode agree exactly.
    """
    b, t = tokens.shape
    c = self.config.lola.chunk_size
    n = -(-t // c)
    tokens = jnp.pad(tokens, ((0, 0), (0, n * c - t)))
    segments = jnp.moveaxis(tokens.reshape(b, n, c), 1, 0)  # [N, B, C]
    starts = jnp.arange(n, dtype=jnp.int32) * c
    graphdef, params = nnx.split(self)

    def step(states, xs):
      seg, start = xs
      model = nnx.merge(graphdef, params)
      seg_lengths = jnp.clip(lengths - start, 0, c).astype(jnp.int32)
      positions = states[0].num_tokens[:, None] + jnp.arange(c)[None, :]
      logits, states, _ = model._run(seg, positions, states, seg_lengths)
      return states, logits

    states, logits = jax.lax.scan(step, states, (segments, starts))
    return jnp.moveaxis(logits, 0, 1).reshape(b, n * c, -1)[:, :t], states

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Training forward: int tokens [B, T] -> float32 logits [B, T, V]."""
    if self.stacks_selection:
      return self.prefill(tokens)[0]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return self._run(tokens, positions, None, None)[0]

  def distill(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention transfer: (logits of the softmax teacher [B, T, V], per-layer MSE [L]).

    Every layer runs exact softmax attention for the residual stream and reports the MSE of its
    own kind's output against it on the same queries, keys and values.
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    out, _, mses = self._run(tokens, positions, None, None, distill=True)
    return out, jnp.stack(mses)

  def init_states(self, batch: int, max_len: int | None = None) -> tuple[Any, ...]:
    """Empty per-layer decode states (KVCache / LinearState / LoLAState by attention kind)."""
    return tuple(block.attn.init_state(batch, max_len) for block in self.blocks)

  def prefill(
    self,
    tokens: jax.Array,
    lengths: jax.Array | None = None,
    states=None,
    *,
    max_len: int | None = None,
  ):
    """Process prompts; returns (logits [B, T, V], per-layer states).

    Args:
      tokens: int [B, T]; positions continue from `states` (fresh when None).
      lengths: int [B] valid tokens per row (t >= lengths[b] is padding); default T.
      states: per-layer states from `init_states`/`prefill`/`decode`, or None.
      max_len: KV-cache slots for a fresh softmax state (default config.max_seq_len).
    """
    b, t = tokens.shape
    if states is None:
      states = self.init_states(b, max_len)
    start = states[0].num_tokens
    positions = start[:, None] + jnp.arange(t)[None, :]
    if lengths is None:
      lengths = jnp.full((b,), t, jnp.int32)
    if self.stacks_selection:
      return self._run_stacked(tokens, states, jnp.asarray(lengths, jnp.int32))
    out, states, _ = self._run(tokens, positions, states, jnp.asarray(lengths, jnp.int32))
    return out, states

  def decode(self, tokens: jax.Array, states) -> tuple[jax.Array, Any]:
    """One token per row: int [B] -> (logits [B, V], states)."""
    positions = states[0].num_tokens[:, None]
    lengths = jnp.ones((tokens.shape[0],), jnp.int32)
    out, states, _ = self._run(tokens[:, None], positions, states, lengths, decode=True)
    return out[:, 0], states

  def with_lola_config(
    self, attention: str | None = None, lola: LoLAConfig | None = None, **changes
  ) -> LoLALM:
    """The same parameters (shared arrays, no copy) under another attention kind / LoLAConfig."""
    if attention is not None:
      changes["attention"] = attention
    if lola is not None:
      changes["lola"] = lola
    config = self.config.replace(**changes)
    graphdef, _ = abstract_model(config)
    return nnx.merge(graphdef, nnx.state(self))


@functools.lru_cache(maxsize=64)
def abstract_model(config: ModelConfig):
  """(graphdef, abstract state) of `LoLALM(config)`, without allocating parameters."""
  model = nnx.eval_shape(lambda: LoLALM(config, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def init_params(config: ModelConfig, key: jax.Array) -> dict:
  """Fresh float32 parameters as a pure nested dict (the pytree `logits` takes)."""
  return nnx.to_pure_dict(nnx.state(LoLALM(config, rngs=nnx.Rngs(params=key))))


def bind(config: ModelConfig, params) -> LoLALM:
  """A `LoLALM` view of a parameter pytree (pure dict or nnx.State); works under `jax.jit`."""
  graphdef, abs_state = abstract_model(config)
  if isinstance(params, nnx.State):
    return nnx.merge(graphdef, params)
  state = jax.tree.map(lambda x: x, abs_state)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def logits(config: ModelConfig, params, tokens: jax.Array) -> jax.Array:
  """Pure training forward: params (pure dict) and int tokens [B, T] -> float32 [B, T, V]."""
  return bind(config, params)(tokens)


def logical_axes(config: ModelConfig) -> dict:
  """Logical axis names of every parameter, a pure dict matching `init_params`'s structure."""
  _, abs_state = abstract_model(config)
  names = jax.tree.map(
    lambda v: v.get_metadata().get("logical_axes"),
    abs_state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.to_pure_dict(names)


def trainable_mask(config: ModelConfig, params, which: str = "all") -> dict:
  """Pure dict of bools: which parameters a stage trains.

  which: "all" (everything the attention kind uses; softmax freezes feature maps and gates),
  "feature_maps" (only feature maps and gates: attention-transfer distillation).
  """
  if which not in ("all", "feature_maps"):
    raise ValueError(f"which must be 'all' or 'feature_maps', got {which!r}")

  def leaf(path, _):
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    # The attention's mixing gate is attn/gate; the SwiGLU MLP's mlp/gate is an ordinary weight.
    is_fm = any(k in ("phi_q", "phi_k") for k in keys) or any(
      a == "attn" and b == "gate" for a, b in zip(keys, keys[1:], strict=False)
    )
    if which == "feature_maps":
      return is_fm
    return not (is_fm and config.attention == "softmax")

  return jax.tree_util.tree_map_with_path(leaf, params)
