"""lola_jax: LoLA (low-rank linear attention with sparse caching) in JAX."""

from lola_jax.config import LoLAConfig

__all__ = ["LoLAConfig"]
