"""Pallas kernels for LoLA: chunked linear attention, the fused hybrid and the fused chunk step."""

from pallas_kernels.common import BlockSizes
from pallas_kernels.hybrid_attention import hybrid_attention
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.lola_chunk import lola_chunk_step

__all__ = ["BlockSizes", "hybrid_attention", "linear_attention", "lola_chunk_step"]
