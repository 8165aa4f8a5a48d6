"""The LoLA core: pure functions over a pytree state (docs/semantics.md for the equations).

config      LoLAConfig, the static hyper-parameters of one layer
state       LoLAState, init_state, cached_positions
mixing      the softmax-branch statistics and the mix with the linear branch
selection   the sparse-cache policies and the end-of-chunk cache update
scan        lola_prefill (the chunked scan) and lola_decode (one token)
reference   lola_reference, a float64 NumPy twin token by token (tests only)
validation  input checks shared by the entry points
"""

from lola_jax.core.config import LoLAConfig
from lola_jax.core.reference import lola_reference
from lola_jax.core.scan import lola_decode, lola_prefill
from lola_jax.core.state import LoLAState, cached_positions, init_state

__all__ = [
  "LoLAConfig",
  "LoLAState",
  "cached_positions",
  "init_state",
  "lola_decode",
  "lola_prefill",
  "lola_reference",
]
