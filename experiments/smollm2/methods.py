"""The rows of the real-model evaluation: which attention, window, cache and policy each runs.

Byte accounting for equal-memory comparisons (per layer and kv head, float32, head dim d, feature
width D): a LoLA state holds a window of up to 2C keys and values (4 C d floats), L cached pairs
with their mapped keys (L (2d + D)) and the linear state (D d + D). A hybrid whose window has the
same bytes as LoLA's window plus cache has chunk C' = C + L (2d + D) / (4 d): for SmolLM2
(d = 64, D = 128), C = 64 and L = 64 give C' = 128.
"""

from __future__ import annotations

import dataclasses

from lola_jax.model import ModelConfig

POLICIES = ("sre", "recency", "sre_below", "energy")


@dataclasses.dataclass(frozen=True)
class Method:
  """One evaluated row.

  Attributes:
    name: short id (used on the command line and in the JSON).
    label: the report's label.
    attention: "softmax" | "hybrid" | "lola".
    chunk_size: C (window of C+1..2C tokens); unused by softmax.
    cache_size: L sparse-cache slots per kv head (0 for hybrid).
    policy: sparse-cache policy of "lola".
  """

  name: str
  label: str
  attention: str
  chunk_size: int = 64
  cache_size: int = 0
  policy: str = "sre"

  def model_config(self, base: ModelConfig) -> ModelConfig:
    """`base` (the pretrained architecture) under this row's attention."""
    lola = dataclasses.replace(
      base.lola, chunk_size=self.chunk_size, cache_size=self.cache_size, policy=self.policy
    )
    return base.replace(attention=self.attention, lola=lola)


def equal_bytes_chunk(chunk: int, cache: int, head_dim: int, phi_dim: int) -> int:
  """C' of a hybrid whose window holds as many bytes as LoLA's window plus cache."""
  extra = cache * (2 * head_dim + phi_dim)
  if extra % (4 * head_dim):
    raise ValueError(f"cache {cache} has no whole-chunk equal-bytes window (d={head_dim})")
  return chunk + extra // (4 * head_dim)


def all_methods(base: ModelConfig, chunk: int = 64) -> dict[str, Method]:
  """Every row: teacher, hybrid, hybrid with LoLA-64's bytes, LoLA {16, 64, 256} x policies."""
  wide = equal_bytes_chunk(chunk, 64, base.head_dim, base.phi_dim)
  rows = [
    Method("teacher", "teacher (full KV)", "softmax"),
    Method("hybrid", f"hybrid C{chunk} (cache 0)", "hybrid", chunk),
    Method("hybrid_wide", f"hybrid C{wide} (bytes of cache 64)", "hybrid", wide),
  ]
  for cache in (16, 64, 256):
    for policy in POLICIES:
      rows.append(
        Method(
          f"lola{cache}_{policy}",
          f"LoLA C{chunk} cache {cache} {policy}",
          "lola",
          chunk,
          cache,
          policy,
        )
      )
  return {m.name: m for m in rows}
