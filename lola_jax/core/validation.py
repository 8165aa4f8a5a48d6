"""Input checks shared by the public entry points: every error names the argument."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lola_jax.core.config import LoLAConfig
from lola_jax.core.state import LoLAState, accumulation_dtype


def _shape_str(shape) -> str:
  return "[" + ",".join(str(d) for d in shape) + "]"


def check_float(fn: str, name: str, x) -> None:
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"{fn}: {name} must be a floating-point array, got "
      f"{type(x).__name__ if dtype is None else dtype}"
    )


def check_gate_args(fn: str, gate, gate_logit) -> tuple:
  """Exactly one of `gate` (values in [0, 1], checked if concrete) and `gate_logit`; returns
  (the given array, its name) for `check_attention_inputs`."""
  if (gate is None) == (gate_logit is None):
    raise ValueError(
      f"{fn}: give exactly one of gate ([Hq] in [0, 1]) and gate_logit ([Hq] logits), got "
      f"{'both' if gate is not None else 'neither'}"
    )
  if gate_logit is not None:
    return gate_logit, "gate_logit"
  check_gate_values(fn, gate)
  return gate, "gate"


def check_attention_inputs(
  fn, q, k, v, phi_q, phi_k, gate, gate_name="gate", *, has_time: bool
) -> dict:
  """Validates ranks, dtypes and the consistency of sizes; returns the sizes by letter. `gate`
  is the gate or its logits, named `gate_name` in the messages."""
  names = ("q", "k", "v", "phi_q", "phi_k", gate_name)
  for name, x in zip(names, (q, k, v, phi_q, phi_k, gate), strict=True):
    check_float(fn, name, x)
  lead = "B,T" if has_time else "B"
  legend = {
    "q": f"[{lead},Hq,dk]",
    "k": f"[{lead},Hkv,dk]",
    "v": f"[{lead},Hkv,dv]",
    "phi_q": f"[{lead},Hq,D]",
    "phi_k": f"[{lead},Hkv,D]",
  }
  rank = 4 if has_time else 3
  for name, x in zip(names[:5], (q, k, v, phi_q, phi_k), strict=True):
    if x.ndim != rank:
      raise ValueError(f"{fn}: {name} must have shape {legend[name]}, got {_shape_str(x.shape)}")
  sizes: dict = {}

  shapes = dict(zip(names, (q, k, v, phi_q, phi_k), strict=False))

  def bind(letter, value, name):
    if letter in sizes and sizes[letter][0] != value:
      prev_value, prev_name = sizes[letter]
      raise ValueError(
        f"{fn}: {name} has shape {_shape_str(shapes[name].shape)}, expected {legend[name]} with "
        f"{letter}={prev_value} as in {prev_name} ({_shape_str(shapes[prev_name].shape)})"
      )
    sizes.setdefault(letter, (value, name))

  for name, x in zip(names[:5], (q, k, v, phi_q, phi_k), strict=True):
    letters = legend[name][1:-1].split(",")
    for letter, dim in zip(letters, x.shape, strict=True):
      bind(letter, dim, name)
  out = {letter: value for letter, (value, _) in sizes.items()}
  if out["Hq"] % out["Hkv"] != 0:
    raise ValueError(
      f"{fn}: the number of query heads (q: Hq={out['Hq']}) must be a multiple of the number of "
      f"key/value heads (k: Hkv={out['Hkv']})"
    )
  if gate.shape != (out["Hq"],):
    raise ValueError(
      f"{fn}: {gate_name} must have shape [Hq]=[{out['Hq']}], got {_shape_str(gate.shape)}"
    )
  if has_time and out["T"] < 1:
    raise ValueError(f"{fn}: q must hold at least one token (T >= 1), got T={out['T']}")
  return out


# The state's leaves by role: stored pairs (the inputs' dtype), accumulators, integer counters.
_STORED = ("cache_k", "cache_v", "cache_phi_k", "window_k", "window_v", "window_phi_k",
           "chunk_k", "chunk_v", "chunk_phi_k")  # fmt: skip
_ACCUMULATED = ("linear_h", "linear_s", "cache_mass", "window_mass", "chunk_mass")
_COUNTERS = ("cache_positions", "num_tokens")


def check_state_dtypes(fn: str, state: LoLAState, dtype) -> None:
  """The state must hold the inputs' dtype: a state of another dtype would silently change the
  arithmetic (the new tokens would be cast to it). `dtype`: the dtype of k."""
  want = {name: jnp.dtype(dtype) for name in _STORED}
  want.update({name: accumulation_dtype(dtype) for name in _ACCUMULATED})
  want.update({name: jnp.dtype(jnp.int32) for name in _COUNTERS})
  for name, expected in want.items():
    got = getattr(state, name).dtype
    if got != expected:
      raise ValueError(
        f"{fn}: state.{name} has dtype {got}, expected {expected} for inputs of dtype "
        f"{jnp.dtype(dtype)} (k); a state is continued in the dtype it was built with "
        "(init_state(dtype=...) or the lola_prefill that returned it)"
      )


def check_state(fn: str, state, config: LoLAConfig, sizes: dict, dtype=None) -> None:
  """The state must have been built for this config, these sizes and (if given) this dtype."""
  if state is None and fn == "lola_decode":
    raise ValueError(
      f"{fn}: state is required (decode continues one: start it with lola_prefill or "
      "init_state), got None"
    )
  if not isinstance(state, LoLAState):
    raise ValueError(f"{fn}: state must be a LoLAState or None, got {type(state).__name__}")
  expected = {
    "batch": sizes["B"],
    "num_kv_heads": sizes["Hkv"],
    "key_dim": sizes["dk"],
    "value_dim": sizes["dv"],
    "feature_dim": sizes["D"],
    "cache_size": config.cache_size,
    "chunk_size": config.chunk_size,
    "tracks_attention_mass": config.policy == "attention",
    "stores_window_features": config.window_features == "stored",
  }
  for attr, want in expected.items():
    got = getattr(state, attr)
    if got != want:
      raise ValueError(
        f"{fn}: state was built for {attr}={got} but the inputs/config need {attr}={want} "
        f"(state.cache_k has shape {_shape_str(state.cache_k.shape)}, state.window_k "
        f"{_shape_str(state.window_k.shape)}, state.linear_h {_shape_str(state.linear_h.shape)})"
      )
  if dtype is not None:
    check_state_dtypes(fn, state, dtype)


def check_gate_values(fn: str, gate) -> None:
  """g must lie in [0, 1] (a sigmoid that saturates in float32 is fine); checked if concrete."""
  try:
    concrete = np.asarray(gate, np.float64)
  except Exception:  # A tracer: values are only known at run time.
    return
  if not ((concrete >= 0) & (concrete <= 1)).all():
    raise ValueError(f"{fn}: gate values must lie in [0, 1], got {concrete.tolist()}")


def check_lengths(fn: str, lengths, batch: int, time: int) -> None:
  """`lengths` [B] int in [0, T]; the values are checked when concrete (under an outer jit the
  jitted body clamps them to [0, T] instead: `lola_prefill`)."""
  dtype = getattr(lengths, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{fn}: lengths must be an integer array of shape [B]=[{batch}], got {dtype}")
  if lengths.shape != (batch,):
    raise ValueError(
      f"{fn}: lengths must have shape [B]=[{batch}], got {_shape_str(lengths.shape)}"
    )
  try:
    concrete = np.asarray(lengths)
  except Exception:  # A tracer: values are only known at run time.
    return
  if concrete.min() < 0 or concrete.max() > time:
    raise ValueError(f"{fn}: lengths must lie in [0, T={time}], got {concrete.tolist()}")


def check_prior_positions(fn: str, prior_positions, policy: str, batch: int) -> None:
  """`prior_positions` [B, P] int (P >= 0; -1 = none) is read by policy "sre_below" only."""
  if prior_positions is None:
    return
  if policy != "sre_below":
    raise ValueError(
      f"{fn}: prior_positions is only read by policy 'sre_below', got policy {policy!r}"
    )
  dtype = getattr(prior_positions, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{fn}: prior_positions must be an integer array [B, P], got {dtype}")
  if prior_positions.ndim != 2 or prior_positions.shape[0] != batch:
    raise ValueError(
      f"{fn}: prior_positions must have shape [B={batch}, P], got "
      f"{_shape_str(prior_positions.shape)}"
    )
