"""Causal linear attention: the Pallas kernel (`pallas`), its XLA forms (`xla`) and the entry point
`linear_attention` (`dispatch`)."""

from pallas_kernels.linear.dispatch import linear_attention

__all__ = ["linear_attention"]
