"""`linear_attention`: validates its inputs, picks the implementation and runs it under jit.

The forms: `pallas.linear_attention_pallas` (the TPU kernel, "pallas_tpu"),
`triton.linear_attention_triton` (the chunk-parallel GPU kernels, "pallas_triton"),
`xla.linear_attention_chunked` (the chunked `lax.scan`, the XLA path) and
`xla.linear_attention_scan` (one step per token, the "reference" implementation). Equations in the
module docstring of `pallas`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.linear.pallas import linear_attention_pallas
from pallas_kernels.linear.triton import linear_attention_triton
from pallas_kernels.linear.xla import linear_attention_chunked, linear_attention_scan


def validate_linear_inputs(phi_q, phi_k, v, chunk_size, initial_state, eps):
  """Raises a ValueError naming the argument, what it got and the expected shape."""
  sizes = common.check_layouts(
    {
      "phi_q": (phi_q, "[B, T, Hq, D]"),
      "phi_k": (phi_k, "[B, T, Hkv, D]"),
      "v": (v, "[B, T, Hkv, dv]"),
    }
  )
  b, hq, hkv, d, dv = (sizes[a] for a in ("B", "Hq", "Hkv", "D", "dv"))
  common.check_heads_and_length("phi_q", "phi_k/v", hq, hkv, phi_q.shape)
  common.check_floats({"phi_q": phi_q, "phi_k": phi_k, "v": v})
  common.check_positive_int("chunk_size", chunk_size)
  if not (isinstance(eps, (int, float)) and eps >= 0):
    raise ValueError(f"eps must be a float >= 0, got {eps!r}")
  if initial_state is not None:
    if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
      raise ValueError("initial_state must be None or a pair (H0 [B,Hkv,D,dv], s0 [B,Hkv,D])")
    common.check_shape("initial_state[0]", initial_state[0], (b, hkv, d, dv), "[B, Hkv, D, dv]")
    common.check_shape("initial_state[1]", initial_state[1], (b, hkv, d), "[B, Hkv, D]")


@functools.partial(
  jax.jit,
  static_argnames=("chunk_size", "eps", "implementation", "block_sizes", "precision", "interpret"),
)
def _dispatch(phi_q, phi_k, v, initial_state, chunk_size, eps, implementation, block_sizes,
              precision, interpret):  # fmt: skip
  # A non-finite value component at position j reaches exactly that component of the outputs at
  # t >= j and of the final H (as the per-token sum does), never an earlier token: the forms run
  # with such values zeroed (inside a chunk the masked product would make 0 x NaN leak
  # backwards) and those components are set to NaN after.
  bad = ~jnp.isfinite(v)  # [B, T, Hkv, dv]
  seen_bad = jnp.cumsum(bad, axis=1, dtype=jnp.int32) > 0
  seen_bad = jnp.repeat(seen_bad, phi_q.shape[2] // v.shape[2], axis=2)
  v = jnp.where(bad, jnp.zeros((), v.dtype), v)
  if implementation in ("pallas_tpu", "pallas_triton"):
    run = linear_attention_pallas if implementation == "pallas_tpu" else linear_attention_triton
    y, state = run(
      phi_q, phi_k, v, chunk_size=chunk_size, initial_state=initial_state, eps=eps,
      block_sizes=block_sizes, precision=precision, interpret=interpret,
    )  # fmt: skip
  elif implementation == "xla":
    y, state = linear_attention_chunked(
      phi_q, phi_k, v, chunk_size=chunk_size, initial_state=initial_state, eps=eps
    )
  else:
    y, state = linear_attention_scan(phi_q, phi_k, v, initial_state=initial_state, eps=eps)
  h, s = state
  h = jnp.where(jnp.any(bad, axis=1)[:, :, None, :], jnp.nan, h)
  return jnp.where(seen_bad, jnp.nan, y).astype(phi_q.dtype), (h, s)


def linear_attention(
  phi_q,  # [B, T, Hq, D] feature-mapped queries
  phi_k,  # [B, T, Hkv, D] feature-mapped keys
  v,  # [B, T, Hkv, dv] values
  *,
  chunk_size: int = 64,
  initial_state=None,  # None or (H0 [B, Hkv, D, dv], s0 [B, Hkv, D])
  eps: float = 1e-6,
  implementation: str | None = None,
  block_sizes: common.BlockSizes | None = None,
  precision=common.DEFAULT,
  interpret=None,
):
  """Causal linear attention: `(y [B,T,Hq,dv] in phi_q.dtype, (H [B,Hkv,D,dv], s [B,Hkv,D]))`.

  `y_t = phi_q_t^T H_t / (phi_q_t^T s_t + eps)` with `H_t = H_0 + sum_{j<=t} phi_k_j v_j^T` and
  `s_t = s_0 + sum_{j<=t} phi_k_j`. The final state is float32, so calls chain: feeding it back as
  `initial_state` continues the sequence. Differentiable in all inputs, `initial_state` included,
  and through the returned state.

  implementation: None picks "pallas_tpu" on TPU and "xla" (chunked `lax.scan`) on GPU/CPU;
  "pallas" is the local backend's kernels (TPU: "pallas_tpu", GPU: "pallas_triton", CPU:
  "pallas_tpu" interpreted); "pallas_tpu" / "pallas_triton" force a kernel family: compiled on its
  device, interpreted on CPU, and lowerable for its platform from any machine (`jax.export`);
  "reference" is the per-token scan (`common.resolve_implementation`). `interpret` overrides the
  interpret mode (True, False, or e.g. `pltpu.InterpretParams()` for the TPU interpreter).
  block_sizes: padding (default `BlockSizes.for_target` of the family). precision: of the kernels'
  products (`lax.Precision`; DEFAULT, HIGHEST for full f32 on a device). The kernels' operands are
  in phi_q's dtype with float32 accumulation.
  """
  validate_linear_inputs(phi_q, phi_k, v, chunk_size, initial_state, eps)
  impl = common.resolve_implementation(implementation)
  if initial_state is not None:
    initial_state = tuple(initial_state)
  return _dispatch(
    phi_q,
    phi_k,
    v,
    initial_state,
    chunk_size,
    float(eps),
    impl,
    block_sizes,
    precision,
    interpret,
  )
