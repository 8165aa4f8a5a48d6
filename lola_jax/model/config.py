"""`ModelConfig`: the static hyper-parameters of `LoLALM`, validated on construction."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lola_jax.core.config import LoLAConfig
from lola_jax.model.attention import ATTENTION_KINDS, Attention
from lola_jax.model.feature_maps import FEATURE_MAPS, feature_width
from lola_jax.model.layers import RopeScaling

DTYPES = ("float32", "bfloat16", "float16")
_POSITIVE_INTS = (
  "vocab_size",
  "num_layers",
  "d_model",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "mlp_dim",
  "feature_dim",
  "max_seq_len",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of `LoLALM` (frozen, hashable; validated on construction).

  Attributes:
    vocab_size: V.
    num_layers: L decoder blocks.
    d_model: E residual width.
    num_heads: Hq query heads.
    num_kv_heads: Hkv key/value heads (GQA); num_heads % num_kv_heads == 0.
    head_dim: d, even (rotary).
    mlp_dim: M hidden width of the SwiGLU MLP.
    attention: a name of `ATTENTION_KINDS`: "softmax" | "linear" | "hybrid" | "lola"
      (`kind` is its module class).
    feature_map: "hedgehog" | "elu" | "identity" (the linear branch's phi).
    feature_dim: Hedgehog's learned width per sign F (phi has D = 2F features); elu/identity use
      D = head_dim and ignore this.
    lola: LoLA settings (chunk = window size, cache size, mix, policy, implementation) for
      "lola"; "hybrid" uses the same with cache_size 0; "linear" takes its kernel's chunk and
      implementation from here.
    tie_embeddings: output projection = embedding matrix transposed.
    dtype: compute dtype name; parameters are float32, attention states float32.
    max_seq_len: KV-cache slots of the softmax decode state.
    rope_theta: rotary base.
    norm_eps: RMSNorm epsilon.
    gate_init: initial gate logit (g = sigmoid(gate_init)).
    linear_eps: added to the linear-attention denominator of the "linear" kind.
    rope_scaling: optional `RopeScaling` (Llama 3.1 "llama3" or "linear"); None = plain.
    scale_embeddings: multiply input embeddings by sqrt(E) (Gemma); False for Llama checkpoints.
    rope_fraction: share of each head's features that are rotated (`rotary_dim` = that share of
      d, rounded down to even, at least 2); the rest carry no position (1.0 = Llama).
    layer_cache_sizes: optional per-layer sparse-cache capacities (one int >= 0 per layer) that
      replace `lola.cache_size` layer by layer for the "lola" kind (None = the same everywhere);
      the other kinds ignore it. A per-layer budget: a layer whose linear state memorises well
      can hold fewer exact pairs than one that does the retrieval.
  """

  vocab_size: int = 256
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 512
  attention: str = "softmax"
  feature_map: str = "hedgehog"
  feature_dim: int = 32
  lola: LoLAConfig = dataclasses.field(default_factory=LoLAConfig)
  tie_embeddings: bool = True
  dtype: str = "float32"
  max_seq_len: int = 2048
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  gate_init: float = 0.0
  linear_eps: float = 1e-6
  rope_scaling: RopeScaling | None = None
  scale_embeddings: bool = True
  rope_fraction: float = 1.0
  layer_cache_sizes: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in _POSITIVE_INTS:
      val = getattr(self, name)
      if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"ModelConfig.{name} must be an int >= 1, got {val!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"ModelConfig.num_heads ({self.num_heads}) must be divisible by "
        f"ModelConfig.num_kv_heads ({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even (rotary), got {self.head_dim}")
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(
        f"ModelConfig.attention must be one of {tuple(ATTENTION_KINDS)}, got {self.attention!r}"
      )
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(
        f"ModelConfig.feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}"
      )
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
    if isinstance(self.rope_fraction, bool) or not (
      isinstance(self.rope_fraction, (int, float)) and 0.0 < self.rope_fraction <= 1.0
    ):
      raise ValueError(f"ModelConfig.rope_fraction must lie in (0, 1], got {self.rope_fraction!r}")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(
        "ModelConfig.rope_scaling must be None or a RopeScaling, got "
        f"{type(self.rope_scaling).__name__}"
      )
    if not isinstance(self.lola, LoLAConfig):
      raise ValueError(f"ModelConfig.lola must be a LoLAConfig, got {type(self.lola).__name__}")
    if self.layer_cache_sizes is not None:
      sizes = self.layer_cache_sizes
      if isinstance(sizes, list):  # from ml_collections / the command line; hashable from here on
        sizes = tuple(sizes)
        object.__setattr__(self, "layer_cache_sizes", sizes)
      if (
        not isinstance(sizes, tuple)
        or len(sizes) != self.num_layers
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes)
      ):
        raise ValueError(
          f"ModelConfig.layer_cache_sizes must be None or {self.num_layers} ints >= 0 (one per "
          f"layer), got {self.layer_cache_sizes!r}"
        )

  @property
  def kind(self) -> type[Attention]:
    """The attention kind's module class, `ATTENTION_KINDS[attention]`: what code that depends
    on the kind asks (its decode state, whether it uses the feature maps, ...)."""
    return ATTENTION_KINDS[self.attention]

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def rotary_dim(self) -> int:
    """r, the rotated features per head (even)."""
    return max(2, int(self.head_dim * self.rope_fraction) // 2 * 2)

  @property
  def phi_dim(self) -> int:
    """D, the width of the feature-mapped queries and keys."""
    return feature_width(self.feature_map, self.head_dim, self.feature_dim)

  @property
  def lola_config(self) -> LoLAConfig:
    """The LoLA config the kind runs with (the "hybrid" kind forces cache_size 0)."""
    return self.kind.lola_config(self)

  def layer_config(self, layer: int) -> ModelConfig:
    """The config block `layer` runs with: `lola.cache_size` from `layer_cache_sizes`, if set."""
    if self.layer_cache_sizes is None:
      return self
    lola = dataclasses.replace(self.lola, cache_size=self.layer_cache_sizes[layer])
    return dataclasses.replace(self, lola=lola, layer_cache_sizes=None)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)
