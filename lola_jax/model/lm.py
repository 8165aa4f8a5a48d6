"""`LoLALM`, a Llama-style decoder, and its functional API over a parameter pytree.

Legend: B batch, T time, V vocab, E d_model, Hkv key/value heads, L num_layers, C chunk size.

Entry points sharing one set of parameters:
  `LoLALM.__call__(tokens)`         training forward over whole sequences -> logits [B, T, V];
  `LoLALM.prefill(tokens, lengths)` -> (logits [B, T, V], states), states one per layer;
  `LoLALM.decode(tokens, states)`   one token per row -> (logits [B, V], states);
  `logits(config, params, tokens)`  pure function of a parameter pytree (`init_params`, `bind`).
`logical_axes(config)` and `state_logical_axes(config, states)` declare the logical axis names
that `lola_jax.sharding` maps onto a mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lola_jax.core.config import LoLAConfig
from lola_jax.model import layers
from lola_jax.model.config import ModelConfig


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)); `attn` is of the config's
  attention kind (`ModelConfig.kind`)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dt = config.compute_dtype
    self.attn_norm = layers.RMSNorm(config.d_model, eps=config.norm_eps, dtype=dt)
    self.attn = config.kind(config, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(config.d_model, eps=config.norm_eps, dtype=dt)
    self.mlp = layers.SwiGLU(config.d_model, config.mlp_dim, dtype=dt, rngs=rngs)

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
    """x [B, T, E] -> (x [B, T, E], state, distill_mse or None); see `Attention.__call__`."""
    h, state, mse = self.attn(
      self.attn_norm(x), positions, state, lengths, decode=decode, distill=distill, prior=prior,
      end_chunk=end_chunk,
    )  # fmt: skip
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
    return self.config.kind.stacks_selection(self.config)

  def _run(
    self, tokens, positions, states, lengths, *, decode=False, distill=False, end_chunk=True
  ):
    x = self.embed(tokens)
    new_states, mses = [], []
    prior = None  # what the layer below handed up
    for i, block in enumerate(self.blocks):
      st = None if states is None else states[i]
      x, st, mse = block(
        x, positions, st, lengths, decode=decode, distill=distill, prior=prior,
        end_chunk=end_chunk,
      )  # fmt: skip
      prior = None if st is None else block.attn.hand_up(st)
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

  def decode(self, tokens: jax.Array, states, *, end_chunk: bool = True) -> tuple[jax.Array, Any]:
    """One token per row: int [B] -> (logits [B, V], states).

    `end_chunk=False` defers the chunk-end updates of a token that completes its row's chunk
    (LoLA / hybrid layers): `end_chunks` must run for those rows before their next token. A
    decode loop does so once per chunk, so that its per-token body holds no control flow
    (`lola_jax.generate`; `lola_jax.core.compiler` says why that matters on CPU).
    """
    positions = states[0].num_tokens[:, None]
    lengths = jnp.ones((tokens.shape[0],), jnp.int32)
    out, states, _ = self._run(
      tokens[:, None], positions, states, lengths, decode=True, end_chunk=end_chunk
    )
    return out[:, 0], states

  def end_chunks(self, states, complete: jax.Array) -> tuple[Any, ...]:
    """The chunk-end updates `decode(end_chunk=False)` deferred, layer by layer from the bottom
    (a "sre_below" layer ranks by what the layer below holds after its own update, as in
    `decode`), for the rows in `complete` (bool [B]); other rows and kinds without chunks are
    unchanged."""
    new_states, prior = [], None
    for block, st in zip(self.blocks, states, strict=True):
      st = block.attn.end_chunk(st, complete, prior)
      prior = block.attn.hand_up(st)
      new_states.append(st)
    return tuple(new_states)

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
  """Logical axis names of every parameter, a pure dict matching `init_params`'s structure
  (a tuple of names per array, from the `logical_axes` metadata of its `nnx.Param`)."""
  _, abs_state = abstract_model(config)
  names = jax.tree.map(
    lambda v: v.get_metadata().get("logical_axes"),
    abs_state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.to_pure_dict(names)


def state_logical_axes(config: ModelConfig, states) -> tuple[Any, ...]:
  """Logical axis names of per-layer decode states (one tree per layer, same structure), as the
  attention kind declares them: batch first, kv heads where the state keeps them."""
  return tuple(config.kind.state_axes(state) for state in states)
