"""`hybrid_attention`: validates its inputs, picks the implementation and runs it under jit.

The forms: `pallas.hybrid_attention_pallas` (the TPU kernels, "pallas_tpu"),
`triton.hybrid_attention_triton` (the chunk-parallel GPU kernels, "pallas_triton") and
`xla.hybrid_attention_xla` (chunk-parallel XLA, also the "reference" implementation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.equations import MIXES, gate_terms
from pallas_kernels.hybrid.pallas import hybrid_attention_pallas
from pallas_kernels.hybrid.triton import hybrid_attention_triton
from pallas_kernels.hybrid.xla import hybrid_attention_xla


def validate_hybrid_inputs(
  q, k, v, phi_q, phi_k, gate, chunk_size, mix, softmax_scale, gate_name="gate"
):
  """Raises a ValueError naming the argument, what it got and the expected shape. `gate` is
  the gate or its logits, named `gate_name`."""
  sizes = common.check_layouts(
    {
      "q": (q, "[B, T, Hq, dk]"),
      "k": (k, "[B, T, Hkv, dk]"),
      "v": (v, "[B, T, Hkv, dv]"),
      "phi_q": (phi_q, "[B, T, Hq, D]"),
      "phi_k": (phi_k, "[B, T, Hkv, D]"),
      gate_name: (gate, "[Hq]"),
    }
  )
  hq, hkv = sizes["Hq"], sizes["Hkv"]
  common.check_heads_and_length("q", "k/v", hq, hkv, q.shape)
  common.check_floats({"q": q, "k": k, "v": v, "phi_q": phi_q, "phi_k": phi_k, gate_name: gate})
  common.check_positive_int("chunk_size", chunk_size)
  if mix not in MIXES:
    raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
  if softmax_scale is not None and not (
    isinstance(softmax_scale, (int, float)) and softmax_scale > 0
  ):
    raise ValueError(f"softmax_scale must be None or a float > 0, got {softmax_scale!r}")


@functools.partial(
  jax.jit,
  static_argnames=(
    "chunk_size",
    "mix",
    "softmax_scale",
    "impl",
    "block_sizes",
    "precision",
    "interpret",
  ),
)
def _dispatch(q, k, v, phi_q, phi_k, gates, chunk_size, mix, softmax_scale, impl, block_sizes,
              precision, interpret):  # fmt: skip
  # Every pair reaches every later query (window or linear state), so a non-finite value
  # component at position j makes exactly that component of the outputs at t >= j non-finite.
  # The forms compute with such values zeroed (in a masked product a future key's weight 0 times
  # NaN would be NaN for earlier queries too) and those components are set to NaN after.
  bad = ~jnp.isfinite(v)  # [B, T, Hkv, dv]
  seen_bad = jnp.repeat(jnp.cumsum(bad, axis=1, dtype=jnp.int32) > 0, q.shape[2] // v.shape[2], 2)
  v = jnp.where(bad, jnp.zeros((), v.dtype), v)
  if common.is_pallas(impl):
    run = hybrid_attention_pallas if impl == "pallas_tpu" else hybrid_attention_triton
    y = run(
      q, k, v, phi_q, phi_k, gates, chunk_size=chunk_size, mix=mix, softmax_scale=softmax_scale,
      block_sizes=block_sizes, precision=precision, interpret=interpret,
    )  # fmt: skip
  else:
    y = hybrid_attention_xla(
      q, k, v, phi_q, phi_k, gates, chunk_size=chunk_size, mix_name=mix,
      softmax_scale=softmax_scale,
    )  # fmt: skip
  return jnp.where(seen_bad, jnp.nan, y).astype(q.dtype)


def hybrid_attention(
  q,  # [B, T, Hq, dk]
  k,  # [B, T, Hkv, dk]
  v,  # [B, T, Hkv, dv]
  phi_q,  # [B, T, Hq, D]
  phi_k,  # [B, T, Hkv, D]
  gate=None,  # [Hq] in [0, 1], or None with gate_logit
  *,
  chunk_size: int = 64,
  mix: str = "gated",
  softmax_scale: float | None = None,
  implementation: str | None = None,
  block_sizes: common.BlockSizes | None = None,
  precision=common.DEFAULT,
  interpret=None,
  gate_logit=None,  # [Hq] the gate's logits x (g = sigmoid(x)), instead of gate
):
  """LoLA with an empty sparse cache (terraced window + linear attention): y [B, T, Hq, dv].

  Equals `lola_jax.lola_prefill(..., config=LoLAConfig(cache_size=0, chunk_size, mix))` from a
  fresh state (equations in the module docstrings of `hybrid.pallas` and `hybrid.xla`).
  Differentiable in q, k, v, phi_q, phi_k and gate. implementation: None = "pallas_tpu" on TPU,
  "xla" on GPU/CPU; "pallas" the local backend's kernels; "pallas_tpu" / "pallas_triton" force a
  family (compiled on its device, interpreted on CPU, exportable from anywhere:
  `common.resolve_implementation`); "reference" is the XLA form as well (the float64 reference is
  `lola_jax.lola_reference`). Any chunk_size works on every backend: the kernels pad each chunk
  to their tile and mask the padding. The gate is `gate` (g) or `gate_logit` (x): from the logit
  the gradient is finite however saturated the gate (`pallas_kernels.equations`). precision: of
  the kernels' products (operands in q's dtype, float32 accumulation).
  """
  if (gate is None) == (gate_logit is None):
    raise ValueError("hybrid_attention: give exactly one of gate and gate_logit")
  name = "gate" if gate_logit is None else "gate_logit"
  given = gate if gate_logit is None else gate_logit
  validate_hybrid_inputs(q, k, v, phi_q, phi_k, given, chunk_size, mix, softmax_scale, name)
  impl = common.resolve_implementation(implementation)
  gates = gate_terms(gate, gate_logit)
  return _dispatch(
    q,
    k,
    v,
    phi_q,
    phi_k,
    gates,
    chunk_size,
    mix,
    softmax_scale,
    impl,
    block_sizes,
    precision,
    interpret,
  )
