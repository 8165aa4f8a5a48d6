"""Autoregressive generation with a state whose size does not depend on the number of tokens.

Legend: B batch rows, T prompt length (padded), V vocab, N tokens generated.

    out = generate(config, params, prompts, lengths, max_new_tokens=64,
                   sampling=Sampling(temperature=0.8, top_p=0.9), key=jax.random.key(0),
                   stop_tokens=(eos,))
    out.tokens        # int32 [B, N], pad_id after a row's stop token
    out.num_generated # int32 [B], the stop token included

    for block in generate_stream(...):   # int32 [B, n] numpy blocks as they are produced
      print(tokenizer.decode(block[0]), end="", flush=True)

How it runs (`params`: a pure parameter dict or an `nnx.State`, e.g. `nnx.state(model)`):
  1. `prefill` (jitted) runs the right-padded prompts [B, T] with their lengths [B] through the
     model once: every row's per-layer state holds exactly its own `lengths[b]` tokens, and the
     logits of each row's last real token are gathered.
  2. `decode_block` (jitted, a `lax.while_loop`) repeats: sample a token from the logits of each
     row, emit it, feed it to `LoLALM.decode` (one token per row, positions continue from each
     row's own token count). It stops after `block_size` steps or when every row has produced a
     stop token. The loop carry is (states, logits [B, V], done [B], count [B]); for LoLA/hybrid/
     linear the states have fixed shapes (window + sparse cache + linear state), so memory is
     the same after 10 or 10^6 tokens. Softmax attention's KV cache needs T + N slots and is
     allocated once at that size (the baseline the benchmark compares against).
  3. `decode_stream` calls the block repeatedly from given states and logits and yields each
     block to the host (streaming); `decode` collects the blocks. `generate_stream` / `generate`
     are `prefill` followed by them. Callers that build the states themselves (the recall
     evaluation reads them after the prompt, the cache-policy ablation prefills in segments)
     call `prefill` / `decode` directly: this is the one decode loop of the project.

Sampling (per row, `Sampling`): temperature 0 = greedy (argmax); otherwise logits / temperature,
then top-k (keep the k largest), then top-p (keep the smallest set of most likely tokens whose
probability reaches p), then a categorical draw. Row b's draw at its n-th generated token uses
`fold_in(keys[b], n)`: a row's samples depend only on its own key and history, so a batch row
equals that row generated alone with the same key (pass `key` [B] keys, or one key that is split
per row with `fold_in(key, b)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lola_jax import model as model_lib
from lola_jax import sharding
from lola_jax.core.compiler import decode_jit


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn from the logits (frozen, hashable: a static jit argument).

  temperature: 0 means greedy argmax; > 0 divides the logits.
  top_k: keep only the k most likely tokens (0 = all).
  top_p: nucleus sampling; keep the smallest set of most likely tokens with total mass >= p
    (1.0 = all).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"Sampling.top_k must be an int >= 0, got {self.top_k!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p!r}")


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """tokens: int32 [B, N] (pad_id after a stop); num_generated: int32 [B]; states: final."""

  tokens: np.ndarray
  num_generated: np.ndarray
  states: Any = None


@functools.partial(jax.jit, static_argnames=("sampling",))
def sample_logits(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
  """Draw one token per row.

  Args:
    logits: float [B, V].
    keys: [B] PRNG keys (one per row; unused when greedy).
    sampling: `Sampling`.

  Returns:
    int32 [B].
  """
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  neg = jnp.finfo(jnp.float32).min
  v = logits.shape[-1]
  if 0 < sampling.top_k < v:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, neg, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = before < sampling.top_p  # the most likely token is always kept
    keep = (
      jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    logits = jnp.where(keep, logits, neg)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def state_bytes(states) -> int:
  """Bytes held by a (per-layer) decode state pytree (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(states))


def _row_keys(key: jax.Array | None, batch: int) -> jax.Array:
  """[B] keys: `key` itself when it is [B] keys, else fold_in(key, b)."""
  if key is None:
    key = jax.random.key(0)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 1:
    if key.shape[0] != batch:
      raise ValueError(f"key must be one PRNG key or [{batch}] keys, got shape {key.shape}")
    return key
  return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def _mesh_of(state_sharding):
  """Traces under the mesh of the states' shardings (`jax.sharding.use_abstract_mesh`), as the
  trainer's steps do, so the model's attention kernels run inside `jax.shard_map` over it
  (`lola_jax.model.attention.kernel_call`; Mosaic kernels cannot be partitioned by XLA). A null
  context without shardings or with several meshes."""
  if state_sharding is None:
    return contextlib.nullcontext()
  meshes = {
    sh.mesh
    for sh in jax.tree_util.tree_leaves(state_sharding.shardings)
    if isinstance(sh, jax.sharding.NamedSharding)
  }
  if len(meshes) != 1:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(meshes.pop().abstract_mesh)


@functools.partial(jax.jit, static_argnames=("config", "max_len", "state_sharding"))
def _prefill(config, params, prompts, lengths, *, max_len, state_sharding=None):
  lm = model_lib.bind(config, params)
  with _mesh_of(state_sharding):
    logits, states = lm.prefill(prompts, lengths, max_len=max_len)
  if state_sharding is not None:
    states = jax.lax.with_sharding_constraint(states, state_sharding.shardings)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return last, states


def prefill(config, params, prompts, lengths=None, *, max_len=None, state_sharding=None):
  """Runs the prompts through the model once (jitted).

  Args:
    config, params: the model (`model.ModelConfig`; a pure parameter dict or an `nnx.State`).
    prompts: int [B, T] right-padded prompts, ids in [0, V) (others raise ValueError: see
      `check_token_ids`); lengths: int [B] real tokens per row (default T).
    max_len: KV-cache slots of a fresh softmax state (default config.max_seq_len; the other
      kinds ignore it).
    state_sharding: optional `StateSharding` constraint of the decode states; the model is
      traced under their mesh, so its attention kernels run inside `jax.shard_map` over it.

  Returns:
    (logits of each row's last real token float32 [B, V], per-layer states).
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  check_token_ids(prompts, config.vocab_size)
  if lengths is None:
    lengths = jnp.full(prompts.shape[:1], prompts.shape[1], jnp.int32)
  return _prefill(
    config, params, prompts, jnp.asarray(lengths), max_len=max_len, state_sharding=state_sharding
  )


@decode_jit(
  static_argnames=("config", "sampling", "block_size", "state_sharding"),
  donate_argnames=("states",),
)
def decode_block(
  config,
  params,
  states,
  logits,
  done,
  count,
  keys,
  limit,
  stop_tokens,
  pad_id,
  *,
  sampling,
  block_size,
  state_sharding=None,
):
  """Up to `min(limit, block_size)` sample-and-feed steps, stopping early when all rows are done.

  With LoLA / hybrid layers the steps run in segments that end where a row completes its chunk:
  the tokens of a segment decode with the chunk-end update deferred (`LoLALM.decode(...,
  end_chunk=False)`, no control flow in the per-token loop), then `LoLALM.end_chunks` runs once
  for the rows that completed, under `lax.cond`. (A `lax.cond` in every token's step makes
  XLA:CPU copy the decode states around it on every token: `lola_jax.core.compiler`.)

  Args:
    states: per-layer decode states; logits: float32 [B, V] of the next token; done: bool [B];
    count: int32 [B] tokens generated so far per row; keys: [B] row keys; limit: int32 scalar;
    stop_tokens: int32 [S] (-1 pads, never produced); pad_id: int32 scalar.

  Returns:
    (tokens int32 [B, block_size] (pad_id where nothing was produced), states, logits, done,
    count, steps taken).
  """
  lm = model_lib.bind(config, params)
  b = logits.shape[0]
  stops = stop_tokens

  def constrain(st):
    if state_sharding is None:
      return st
    return jax.lax.with_sharding_constraint(st, state_sharding.shardings)

  stop = jnp.minimum(limit, block_size)
  windowed = config.kind.windowed

  def step(carry):  # one sampled token fed to every row
    i, out, states, logits, done, count = carry
    step_keys = jax.vmap(jax.random.fold_in)(keys, count)
    tok = sample_logits(logits, step_keys, sampling)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    count = count + (~done).astype(jnp.int32)
    done = done | jnp.any(tok[:, None] == stops[None, :], axis=-1)
    with _mesh_of(state_sharding):
      logits, states = lm.decode(tok, states, end_chunk=not windowed)
    return i + 1, out, constrain(states), logits.astype(jnp.float32), done, count

  def steps_until(end):
    return lambda carry: (carry[0] < end) & ~jnp.all(carry[4])

  out = jnp.full((b, block_size), pad_id, jnp.int32)
  carry = (jnp.int32(0), out, constrain(states), logits, done, count)
  if not windowed:
    carry = jax.lax.while_loop(steps_until(stop), step, carry)
  else:
    c = config.lola.chunk_size

    def segment(carry):
      i, states = carry[0], carry[2]
      phase = states[0].num_tokens % c  # every row advances each step, done rows included
      end = i + jnp.minimum(jnp.min(c - phase), stop - i)
      carry = jax.lax.while_loop(steps_until(end), step, carry)
      complete = phase + (carry[0] - i) == c
      with _mesh_of(state_sharding):
        states = jax.lax.cond(
          jnp.any(complete), lambda st: lm.end_chunks(st, complete), lambda st: st, carry[2]
        )
      return carry[:2] + (constrain(states),) + carry[3:]

    carry = jax.lax.while_loop(steps_until(stop), segment, carry)
  i, out, states, logits, done, count = carry
  return out, states, logits, done, count, i


@dataclasses.dataclass(frozen=True)
class StateSharding:
  """Hashable holder of the decode states' shardings (a static jit argument)."""

  shardings: Any

  def __hash__(self):
    return id(self.shardings)

  def __eq__(self, other):
    return isinstance(other, StateSharding) and other.shardings is self.shardings


def check_token_ids(ids, vocab_size: int, name: str = "prompts") -> None:
  """Raises ValueError naming the first token id outside [0, vocab_size) and where it is.

  The embedding lookup would not: JAX gathers an id past the table as NaN (every logit NaN,
  greedy decoding then emits token 0) and wraps a negative one to the end of the table. Every
  position is checked, padding included (padding runs through the model too). Ids inside an
  outer `jax.jit` (tracers) cannot be inspected and are passed through.
  """
  if isinstance(ids, jax.core.Tracer):
    return
  a = np.asarray(ids)
  bad = (a < 0) | (a >= vocab_size)
  if bad.any():
    where = [int(i) for i in np.argwhere(bad)[0]]
    raise ValueError(
      f"{name}: token id {int(a[tuple(where)])} at {where} is outside the vocabulary of "
      f"{vocab_size} tokens, [0, {vocab_size}) ({int(bad.sum())} such id(s))"
    )


def _validate_prompts(prompts, lengths, vocab_size: int) -> np.ndarray:
  if prompts.ndim != 2:
    raise ValueError(f"prompts must be int [B, T], got shape {prompts.shape}")
  if not jnp.issubdtype(prompts.dtype, jnp.integer):
    raise ValueError(f"prompts must be integer tokens, got {prompts.dtype}")
  b, t = prompts.shape
  lengths = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
  if lengths.shape != (b,):
    raise ValueError(f"lengths must be int [{b}], got shape {lengths.shape}")
  if (lengths < 1).any() or (lengths > t).any():
    raise ValueError(f"lengths must be in [1, {t}] (every prompt needs a token), got {lengths}")
  check_token_ids(prompts, vocab_size)
  return lengths


def _validate_budget(max_new_tokens, block_size) -> None:
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
    raise ValueError(f"block_size must be None or an int >= 1, got {block_size!r}")


def decode_stream(
  config: model_lib.ModelConfig,
  params,
  states,
  logits,
  *,
  max_new_tokens: int,
  sampling: Sampling = Sampling(),
  key: jax.Array | None = None,
  stop_tokens: Sequence[int] = (),
  pad_id: int = 0,
  block_size: int | None = 64,
  state_sharding: StateSharding | None = None,
  final: dict | None = None,
) -> Iterator[np.ndarray]:
  """Yields int32 [B, n] numpy blocks of tokens (n <= block_size) generated from `states`.

  Args:
    config, params: the model (`model.ModelConfig`; a pure parameter dict or an `nnx.State`).
    states: per-layer decode states after the prompt (`prefill`, or the model's own `prefill`);
      donated to the loop.
    logits: float [B, V] of each row's next token (the last prompt token's).
    max_new_tokens: N, tokens generated per row at most (the stop token included).
    sampling: `Sampling` (greedy by default); key: one PRNG key or [B] keys.
    stop_tokens: a row stops after producing one of these; later positions hold pad_id.
    block_size: decode steps per jitted block (None = all N in one block).
    state_sharding: optional `StateSharding` constraint of the states inside the loop.
    final: optional dict that receives "states", "num_generated" when the stream ends.
  """
  _validate_budget(max_new_tokens, block_size)
  logits = jnp.asarray(logits, jnp.float32)
  b = logits.shape[0]
  block_size = block_size or max_new_tokens
  stops = jnp.asarray(tuple(int(s) for s in stop_tokens) or (-1,), jnp.int32)
  keys = _row_keys(key, b)
  block = functools.partial(
    decode_block,
    config,
    params,
    keys=keys,
    stop_tokens=stops,
    pad_id=jnp.int32(pad_id),
    sampling=sampling,
    block_size=block_size,
    state_sharding=state_sharding,
  )
  done = jnp.zeros((b,), bool)
  count = jnp.zeros((b,), jnp.int32)
  produced = 0
  while produced < max_new_tokens:
    limit = jnp.int32(max_new_tokens - produced)
    out, states, logits, done, count, steps = block(states, logits, done, count, limit=limit)
    steps = int(steps)
    produced += steps
    if steps:
      yield np.asarray(out[:, :steps])
    if steps < min(block_size, max_new_tokens - produced + steps):
      break  # every row has stopped
  if final is not None:
    final["states"] = states
    final["num_generated"] = np.asarray(count)


def generate_stream(
  config: model_lib.ModelConfig,
  params,
  prompts,
  lengths=None,
  *,
  max_new_tokens: int,
  block_size: int | None = 64,
  mesh=None,
  **sample_options,
) -> Iterator[np.ndarray]:
  """`prefill` of the prompts, then `decode_stream`: yields int32 [B, n] numpy blocks.

  Args:
    config, params: the model (`model.ModelConfig`, a pure parameter dict).
    prompts: int [B, T] right-padded prompts; lengths: int [B] real tokens per row (default T).
    max_new_tokens, block_size: as `decode_stream`.
    mesh: optional `jax.sharding.Mesh`: parameters, prompts and decode states are sharded with
      `lola_jax.sharding`'s rules (batch over data/fsdp, heads over tensor).
    sample_options: `decode_stream`'s sampling, key, stop_tokens, pad_id and final.
  """
  prompts = jnp.asarray(prompts)
  lengths = _validate_prompts(prompts, lengths, config.vocab_size)
  _validate_budget(max_new_tokens, block_size)
  b, t = prompts.shape
  # KV-cache slots (a full KV cache only; fixed-size states ignore it, so no recompilation per
  # length).
  max_len = t + max_new_tokens if config.kind.full_kv_cache else None
  state_sharding = None
  lengths = jnp.asarray(lengths)
  if mesh is not None:
    params = jax.device_put(
      params, sharding.param_shardings(model_lib.logical_axes(config), params, mesh)
    )
    batch = sharding.batch_sharding(mesh)
    prompts = jax.device_put(prompts, batch)
    lengths = jax.device_put(lengths, batch)
    abstract = jax.eval_shape(lambda p: model_lib.bind(config, p).init_states(b, max_len), params)
    axes = model_lib.state_logical_axes(config, abstract)
    state_sharding = StateSharding(sharding.logical_shardings(axes, abstract, mesh))
  logits, states = prefill(
    config, params, prompts, lengths, max_len=max_len, state_sharding=state_sharding
  )
  yield from decode_stream(
    config,
    params,
    states,
    logits,
    max_new_tokens=max_new_tokens,
    block_size=block_size,
    state_sharding=state_sharding,
    **sample_options,
  )


def _collect(stream_fn, batch: int, callback, *, max_new_tokens, pad_id=0, block_size=None, **opts):
  """Runs `stream_fn` (`generate_stream` / `decode_stream` with the leading arguments bound) to
  its end; returns `GenerateOutput` with tokens [B, max_new_tokens] (pad_id past a row's end)."""
  final: dict = {}
  blocks = []
  for block in stream_fn(
    max_new_tokens=max_new_tokens, pad_id=pad_id, block_size=block_size, final=final, **opts
  ):
    if callback is not None:
      callback(block)
    blocks.append(block)
  tokens = np.full((batch, max_new_tokens), pad_id, np.int32)
  if blocks:
    cat = np.concatenate(blocks, axis=1)
    tokens[:, : cat.shape[1]] = cat
  return GenerateOutput(tokens=tokens, num_generated=final["num_generated"], states=final["states"])


def decode(
  config: model_lib.ModelConfig,
  params,
  states,
  logits,
  *,
  callback: Callable[[np.ndarray], None] | None = None,
  **options,
) -> GenerateOutput:
  """Up to `max_new_tokens` tokens per row from `states` and `logits` [B, V]: `decode_stream`
  collected. `options`: its keyword arguments (max_new_tokens required; block_size defaults to
  None here, all tokens in one jitted block). `callback`, when given, receives every block of
  tokens (int32 [B, n]) as it is produced. Returns `GenerateOutput` (tokens [B, max_new_tokens],
  pad_id past each row's end)."""
  stream = functools.partial(decode_stream, config, params, states, logits)
  return _collect(stream, np.shape(logits)[0], callback, **options)


def generate(
  config: model_lib.ModelConfig,
  params,
  prompts,
  lengths=None,
  *,
  callback: Callable[[np.ndarray], None] | None = None,
  **options,
) -> GenerateOutput:
  """Generate up to `max_new_tokens` per row: `generate_stream` collected. `options`: its keyword
  arguments (max_new_tokens required, sampling, key, stop_tokens, pad_id, mesh; block_size
  defaults to None here, all tokens in one jitted block). `callback`, when given, receives every
  block of tokens (int32 [B, n]) as it is produced. Returns `GenerateOutput` (tokens
  [B, max_new_tokens], pad_id past each row's end)."""
  stream = functools.partial(generate_stream, config, params, prompts, lengths)
  return _collect(stream, np.shape(prompts)[0], callback, **options)
