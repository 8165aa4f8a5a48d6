"""Static configuration of one LoLA attention layer.

`LoLAConfig` is frozen and hashable so it can be passed as a static argument to `jax.jit`.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.common import IMPLEMENTATIONS
from pallas_kernels.equations import MIXES

POLICIES = ("sre", "recency", "energy", "energy_global", "attention", "random", "sre_below")
WINDOW_FEATURES = ("stored", "recomputed")


@dataclasses.dataclass(frozen=True)
class LoLAConfig:
  """Hyper-parameters of LoLA attention (see docs/semantics.md).

  Attributes:
    chunk_size: C, tokens per chunk. The sliding window is the previous complete chunk plus the
      current chunk so far, and the sparse cache is updated once per completed chunk.
    cache_size: lambda, capacity of the sparse cache in key/value pairs per kv head (0 = the
      LoLCATs hybrid of window + linear attention).
    mix: how the softmax branch (window + cache) and the linear branch are combined:
      "gated": y = (g*sum e^l v + (1-g)*phi_q^T H) / (g*sum e^l + (1-g)*phi_q^T s);
      "lolcats": y = (g*sum e^(l-c) v + phi_q^T H) / (g*sum e^(l-c) + phi_q^T s), c = max l.
    policy: which candidates stay in the sparse cache (`lola_jax.core.selection`). "sre" keeps the
      pairs with the largest self-recall error, "recency" the newest ones, "energy" the fewest
      pairs holding `energy_tau` of the squared self-recall error, "energy_global" shares
      `cache_budget` slots across the kv heads of a layer, "attention" the pairs that received
      the most softmax mass so far (H2O-style), "random" a seeded random choice, "sre_below"
      ranks first the pairs that more kv heads of the layer below hold in their sparse caches
      (`prior_positions` of `lola_prefill` / `lola_decode`), then by self-recall error; "sre"
      without a prior.
    softmax_scale: logit scale; None means 1/sqrt(key_dim).
    eps: added to the linear denominators phi^T s of the self-recall error.
    implementation: the prefill path's chunk step: None (automatic: the TPU kernel on TPU, XLA
      elsewhere), "xla", "pallas" (the local backend's kernels: TPU -> "pallas_tpu", GPU ->
      "pallas_triton", CPU -> "pallas_tpu" in interpret mode), "pallas_tpu" / "pallas_triton"
      (a forced kernel family: compiled on its device, interpreted on CPU, and lowerable for its
      platform from any machine, e.g. `jax.export(..., platforms=["tpu"])`) or "reference"
      (`pallas_kernels.common.resolve_implementation`).
    energy_tau: share of the candidates' squared self-recall error the "energy" policies keep,
      in (0, 1].
    min_cache: the "energy" policy keeps at least this many pairs (<= cache_size).
    energy_floor: pairs with squared error below energy_floor * mean ||v||^2 are never cached by
      the energy policies (a head whose pairs the linear state already predicts keeps nothing).
    cache_budget: total slots shared by all kv heads of a layer ("energy_global" only, required
      there); each head still holds at most cache_size.
    seed: seed of the "random" policy.
    window_features: what the state keeps of the window's and current chunk's feature-mapped
      keys phi_k(k). "stored": [B, Hkv, C, D] buffers next to their keys (the inputs' phi_k, no
      recomputation). "recomputed": nothing (empty [B, Hkv, 0, D] leaves); phi_k of the window
      is recomputed from its keys when it competes for the cache at a chunk end, by the
      `key_feature_map` that `lola_prefill` / `lola_decode` then require. It saves 2C D values
      per kv head (d = 64, D = 128, float32: 512 of the 1024 bytes a window token costs) at the
      price of one feature map of C keys per chunk end.
  """

  chunk_size: int = 64
  cache_size: int = 64
  mix: str = "gated"
  policy: str = "sre"
  softmax_scale: float | None = None
  eps: float = 1e-6
  implementation: str | None = None
  energy_tau: float = 0.9
  min_cache: int = 0
  energy_floor: float = 1e-3
  cache_budget: int | None = None
  seed: int = 0
  window_features: str = "stored"

  def __post_init__(self):
    if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
      raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
    if self.chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
    if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int):
      raise ValueError(f"cache_size must be an int >= 0, got {self.cache_size!r}")
    if self.cache_size < 0:
      raise ValueError(f"cache_size must be >= 0, got {self.cache_size}")
    if self.mix not in MIXES:
      raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
    if self.policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
    if self.softmax_scale is not None and not (
      isinstance(self.softmax_scale, (int, float)) and self.softmax_scale > 0
    ):
      raise ValueError(f"softmax_scale must be None or a float > 0, got {self.softmax_scale!r}")
    if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
      raise ValueError(f"eps must be a float >= 0, got {self.eps!r}")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}"
      )

    if not (isinstance(self.energy_tau, (int, float)) and 0 < self.energy_tau <= 1):
      raise ValueError(f"energy_tau must lie in (0, 1], got {self.energy_tau!r}")
    if (
      isinstance(self.min_cache, bool)
      or not isinstance(self.min_cache, int)
      or not 0 <= self.min_cache <= self.cache_size
    ):
      raise ValueError(
        f"min_cache must be an int in [0, cache_size={self.cache_size}], got {self.min_cache!r}"
      )
    if not (isinstance(self.energy_floor, (int, float)) and self.energy_floor >= 0):
      raise ValueError(f"energy_floor must be a float >= 0, got {self.energy_floor!r}")
    if self.cache_budget is not None and (
      isinstance(self.cache_budget, bool)
      or not isinstance(self.cache_budget, int)
      or self.cache_budget < 0
    ):
      raise ValueError(f"cache_budget must be None or an int >= 0, got {self.cache_budget!r}")
    if self.policy == "energy_global" and self.cache_budget is None:
      raise ValueError(
        "cache_budget is required with policy='energy_global' (total slots shared by the kv "
        "heads of a layer), got None"
      )
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise ValueError(f"seed must be an int, got {self.seed!r}")
    if self.window_features not in WINDOW_FEATURES:
      raise ValueError(
        f"window_features must be one of {WINDOW_FEATURES}, got {self.window_features!r}"
      )

  def scale(self, key_dim: int) -> float:
    """The logit scale for keys of width `key_dim`."""
    return self.softmax_scale if self.softmax_scale is not None else key_dim**-0.5
