"""LoLA with an empty sparse cache (terraced window + linear attention): the fused Pallas kernel
(`pallas`), its XLA form (`xla`) and the entry point `hybrid_attention` (`dispatch`)."""

from pallas_kernels.hybrid.dispatch import hybrid_attention

__all__ = ["hybrid_attention"]
