"""Pallas kernels for LoLA, one folder per op (each with its XLA form beside its Pallas form):

  linear/      causal linear attention               `linear_attention`
  hybrid/      LoLA with an empty sparse cache       `hybrid_attention`
  lola_chunk/  the fused LoLA chunk step             `lola_chunk_step`

Linear and hybrid have a TPU family (`pallas.py`: Mosaic, a sequential chunk walk with the state
in VMEM) and a GPU family (`triton.py`: chunk-parallel Triton); the fused LoLA step is one kernel
compiled by either. The family is chosen with `implementation=` (None, "xla",
"pallas", "pallas_tpu", "pallas_triton", "reference"; docs/kernels.md). `common` holds the backend
choice (`IMPLEMENTATIONS`, `resolve_implementation`, `pallas_call`), `BlockSizes` and the Pallas
helpers; `equations` the mix and the self-recall error every form shares. This
package is a leaf: it imports nothing from `lola_jax`.
"""

from pallas_kernels.common import IMPLEMENTATIONS, BlockSizes, resolve_implementation
from pallas_kernels.hybrid import hybrid_attention
from pallas_kernels.linear import linear_attention
from pallas_kernels.lola_chunk import lola_chunk_step

__all__ = [
  "IMPLEMENTATIONS",
  "BlockSizes",
  "hybrid_attention",
  "linear_attention",
  "lola_chunk_step",
  "resolve_implementation",
]
