"""lola_jax: LoLA (low-rank linear attention with sparse caching) in JAX.

The core is pure functions over a pytree state (see docs/semantics.md for the equations):

  y, state = lola_prefill(q, k, v, phi_q, phi_k, gate, config=config)
  y, state = lola_decode(q1, k1, v1, phi_q1, phi_k1, gate, config=config, state=state)

A decode loop of your own: jax.jit(loop, compiler_options=decode_compiler_options()) (on CPU
it lets XLA keep the state in place instead of copying it every token; lola_jax.core.compiler),
with lola_decode(..., end_chunk=False) per token and lola_end_chunk once per chunk so that the
loop body holds no control flow (lola_decode_steps is such a loop).
"""

from lola_jax.core.compiler import decode_compiler_options
from lola_jax.core.config import LoLAConfig
from lola_jax.core.reference import lola_reference
from lola_jax.core.scan import lola_decode, lola_decode_steps, lola_end_chunk, lola_prefill
from lola_jax.core.state import LoLAState, cached_positions, init_state

__all__ = [
  "LoLAConfig",
  "LoLAState",
  "cached_positions",
  "decode_compiler_options",
  "init_state",
  "lola_decode",
  "lola_decode_steps",
  "lola_end_chunk",
  "lola_prefill",
  "lola_reference",
]
