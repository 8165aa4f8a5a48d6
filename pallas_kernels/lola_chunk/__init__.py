"""The LoLA chunk step with a sparse cache: the fused Pallas kernel (`pallas`, entry point
`lola_chunk_step`) and its XLA form (`xla`: `attend`, the core's XLA path, and
`lola_chunk_step_xla`, the kernel's oracle and backward)."""

from pallas_kernels.lola_chunk.pallas import lola_chunk_step
from pallas_kernels.lola_chunk.xla import attend, lola_chunk_step_xla

__all__ = ["attend", "lola_chunk_step", "lola_chunk_step_xla"]
