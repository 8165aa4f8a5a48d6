"""Scoring a pretrained-size language model through its constant-size (or KV) decode state.

Legend: B batch, T prompt tokens, S segment length, V vocabulary, K answer candidates, A answer
tokens.

Long prompts are prefilled `segment` tokens at a time (`segmented_prefill`): the state carries
everything between segments (the same state the decode path uses), and only the last position's
logits leave the jitted step, so an 8K-token prompt never materialises [T, V] logits (8K x 49K
floats are 1.6 GB). Segments must be multiples of the LoLA chunk; a prompt that is not a
multiple of the segment ends with a padded segment (`lengths`).

Two scores of a retrieval prompt (`score_prompt`):
  greedy   the greedily decoded continuation starts with the answer's digits (exact match);
  forced   teacher forcing: log p(candidate | prompt) summed over the candidate's tokens, for
           the true answer and every distractor; the prompt counts as retrieved when the true
           answer has the highest log-likelihood (chance: 1 / K).
`perplexity` is exp(mean next-token NLL) over windows, every position scored.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lola_jax import generate as gen
from lola_jax import model as model_lib
from lola_jax.core.compiler import decode_jit


@nnx.jit
def _embed(model, tokens):
  return model.embed(tokens)


@functools.partial(nnx.jit, static_argnames=("decode",))
def _block(block, x, positions, state, lengths, prior, decode):
  x, state, _ = block(x, positions, state, lengths, decode=decode, prior=prior)
  return x, state, block.attn.hand_up(state)


@nnx.jit
def _head(model, x):
  """x [B, T, E] -> float32 logits [B, T, V] (final norm, tied or separate output matrix)."""
  x = model.final_norm(x)
  if model.config.tie_embeddings:
    return model.embed.attend(x).astype(jnp.float32)
  return model.lm_head(x).astype(jnp.float32)


def layerwise(model, tokens, states, lengths, *, decode: bool = False):
  """`model.prefill` / `model.decode`, one jitted call per block: (hidden [B, T, E], states).

  Every block of a model whose layers share one configuration has the same graph, so a single
  compilation serves all of them (compiling the whole 30-layer model per attention kind and
  shape costs minutes on a CPU). `states` must be given (`model.init_states`). A model whose
  layers hand their cache up (LoLA "sre_below") is run C tokens at a time through all layers,
  as `LoLALM.prefill` does, so the prior each layer sees is the same.
  """
  b, t = tokens.shape
  chunk = model.config.lola.chunk_size
  step = chunk if (model.stacks_selection and not decode) else t
  states = list(states)
  outs = []
  for s0 in range(0, t, step):
    piece = tokens[:, s0 : s0 + step]
    seg_len = jnp.clip(lengths - s0, 0, piece.shape[1]).astype(jnp.int32)
    positions = states[0].num_tokens[:, None] + jnp.arange(piece.shape[1])[None, :]
    x = _embed(model, piece)
    prior = None
    for i, blk in enumerate(model.blocks):
      x, states[i], prior = _block(blk, x, positions, states[i], seg_len, prior, decode)
    outs.append(x)
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], tuple(states)


def _prefill_segment(model, tokens, lengths, states):
  """tokens [B, S] -> (logits at each row's last valid token [B, V], states)."""
  hidden, states = layerwise(model, tokens, states, lengths)
  last = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
  return _head(model, h)[:, 0], states


def _segment_nll(model, tokens, targets, states):
  """Teacher-forced NLL sum of one segment: tokens/targets [B, S] -> (nll [B], states)."""
  lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
  hidden, states = layerwise(model, tokens, states, lengths)
  return _nll(model, hidden, targets), states


@nnx.jit
def _nll(model, hidden, targets):
  logp = jax.nn.log_softmax(_head(model, hidden), axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], axis=1)


def _decode(model, token, states):
  """One token per row through the layer-wise runner: (logits [B, V], states)."""
  lengths = jnp.ones((token.shape[0],), jnp.int32)
  hidden, states = layerwise(model, token[:, None], states, lengths, decode=True)
  return _head(model, hidden)[:, 0], states


@decode_jit(static_argnames=("config",), donate_argnames=("states",))
def _decode_step(config, params, token, states):
  """One token per row, the whole model in one program: a pure jitted function of the
  parameter pytree (an `nnx.jit` of the module would re-split its graph in Python on every
  call, about 90 ms for SmolLM2's 30 layers: more than the step itself)."""
  return model_lib.bind(config, params).decode(token, states)


def _check_segment(model, segment: int) -> None:
  chunk = model.config.lola.chunk_size
  if segment < 1 or segment % chunk:
    raise ValueError(
      f"segment must be a positive multiple of the chunk size {chunk}, got {segment}"
    )


def segmented_prefill(model, tokens, *, segment: int = 512, max_len: int | None = None):
  """Prefill int tokens [B, T] in segments; returns (last logits [B, V] float32, states)."""
  _check_segment(model, segment)
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f"tokens must be [batch, time] with time >= 1, got shape {tokens.shape}")
  b, t = tokens.shape
  max_len = t if max_len is None else max_len
  states = model.init_states(b, max_len)
  logits = None
  for start in range(0, t, segment):
    piece = tokens[:, start : start + segment]
    n = piece.shape[1]
    if n < segment:
      piece = np.pad(piece, ((0, 0), (0, segment - n)))
    lengths = jnp.full((b,), n, jnp.int32)
    logits, states = _prefill_segment(model, jnp.asarray(piece), lengths, states)
  return logits, states


def _repeat_rows(states, k: int):
  return jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), states)


def candidate_logprobs(model, states, last_logits, candidates) -> np.ndarray:
  """[K] log p(candidate_k | prompt) for int candidates [K, A] after a one-row prefill."""
  candidates = np.asarray(candidates, np.int32)
  if candidates.ndim != 2:
    raise ValueError(f"candidates must be [K, A], got shape {candidates.shape}")
  k, a = candidates.shape
  first = jax.nn.log_softmax(last_logits[0].astype(jnp.float32))[candidates[:, 0]]
  total = np.asarray(first, np.float64)
  states = _repeat_rows(states, k)
  for i in range(a - 1):
    logits, states = _decode(model, jnp.asarray(candidates[:, i]), states)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    total += np.asarray(logp[np.arange(k), candidates[:, i + 1]], np.float64)
  return total


def greedy_tokens(model, states, last_logits, steps: int) -> np.ndarray:
  """int [B, steps]: the greedy continuation after a prefill."""
  token = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)
  out = [token]
  for _ in range(steps - 1):
    logits, states = _decode(model, token, states)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out.append(token)
  return np.asarray(jnp.stack(out, axis=1))


@dataclasses.dataclass(frozen=True)
class PromptScore:
  """Scores of one retrieval prompt (see module doc).

  Attributes:
    forced: the true answer ranks first among the candidates.
    greedy: the greedy continuation starts with the answer's digits.
    margin: log p(true) - max log p(distractor) (nats).
    generated: the greedy continuation's text (for reports).
    state_bytes: bytes of the decode state after the prompt.
    seconds: wall time of the prefill and scoring.
  """

  forced: bool
  greedy: bool
  margin: float
  generated: str
  state_bytes: int
  seconds: float


def score_prompt(model, tokenizer, prompt, *, segment: int = 512, max_new: int = 8) -> PromptScore:
  """Both scores of one `subword_retrieval.Prompt` (prefill once, then branch)."""
  t0 = time.perf_counter()
  max_len = prompt.prompt_ids.shape[0] + max(max_new, prompt.candidates.shape[1]) + 1
  last, states = segmented_prefill(model, prompt.prompt_ids[None], segment=segment, max_len=max_len)
  nbytes = gen.state_bytes(states)
  logp = candidate_logprobs(model, states, last, prompt.candidates)
  generated = tokenizer.decode(greedy_tokens(model, states, last, max_new)[0].tolist())
  digits = "".join(ch for ch in generated if ch.isdigit())
  return PromptScore(
    forced=bool(np.argmax(logp) == 0 and logp[0] > np.max(logp[1:])),
    greedy=digits.startswith(prompt.key),
    margin=float(logp[0] - np.max(logp[1:])),
    generated=generated,
    state_bytes=int(nbytes),
    seconds=time.perf_counter() - t0,
  )


def perplexity(model, windows, *, segment: int = 512) -> float:
  """exp(mean NLL) of int windows [N, T + 1] (inputs [:, :-1], targets [:, 1:]); T % segment = 0."""
  _check_segment(model, segment)
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or (windows.shape[1] - 1) % segment:
    raise ValueError(
      f"windows must be [N, T + 1] with T a multiple of segment {segment}, got {windows.shape}"
    )
  t = windows.shape[1] - 1
  total, count = 0.0, 0
  for row in windows:
    states = model.init_states(1, t)
    for start in range(0, t, segment):
      tokens = jnp.asarray(row[None, start : start + segment])
      targets = jnp.asarray(row[None, start + 1 : start + segment + 1])
      nll, states = _segment_nll(model, tokens, targets, states)
      total += float(nll[0])
      count += segment
  return float(np.exp(total / count))


def decode_latency(
  model, context: int, *, steps: int = 32, segment: int = 512, tokens=None
) -> dict:
  """Decode cost after a `context`-token prompt, measured two ways, and the state's bytes.

  The prompt is `tokens` (int [context]) or random ids. Returns a dict with
    prefill_s       seconds of the prompt's `segmented_prefill` (it includes compilation unless
                    a prefill of this segment length ran before);
    ms_per_token    median over 3 runs of `steps` greedy tokens inside generation's jitted
                    while loop (`generate.decode_stream`, one block): what generation pays;
    single_call_ms  median of `steps` single-token calls of one jitted decode program (the
                    whole model, states donated): a step plus one dispatch from Python;
    state_bytes     bytes of the decode state.
  """
  config, params = model.config, nnx.state(model)
  if tokens is None:
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, context)
  tokens = np.asarray(tokens, np.int32)
  if tokens.shape != (context,):
    raise ValueError(f"tokens must be int [context={context}], got shape {tokens.shape}")
  t0 = time.perf_counter()
  last, states = segmented_prefill(
    model, tokens[None], segment=segment, max_len=context + steps + 1
  )
  jax.block_until_ready(last)
  prefill_s = time.perf_counter() - t0
  nbytes = gen.state_bytes(states)

  def loop(states):
    t0 = time.perf_counter()
    for _ in gen.decode_stream(
      config, params, states, last, max_new_tokens=steps, block_size=steps
    ):
      pass
    return (time.perf_counter() - t0) / steps

  copy = functools.partial(jax.tree.map, jnp.copy)
  loop(copy(states))  # compile
  per_token = [loop(copy(states)) for _ in range(3)]

  token = jnp.argmax(last, axis=-1).astype(jnp.int32)
  logits, states = _decode_step(config, params, token, states)  # compile
  jax.block_until_ready(logits)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    logits, states = _decode_step(config, params, token, states)
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - t0)
  return {
    "context": context,
    "prefill_s": prefill_s,
    "ms_per_token": 1e3 * float(np.median(per_token)),
    "single_call_ms": 1e3 * float(np.median(times)),
    "state_bytes": nbytes,
  }
