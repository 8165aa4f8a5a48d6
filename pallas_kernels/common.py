"""Shared pieces of the kernels: backend choice, block sizes, padding, input validation and the
Pallas helpers every kernel uses (`dot`, `head_specs`, `head_outputs`).

Shape legend used across `pallas_kernels`:
  B batch, T time, Hq query heads, Hkv key/value heads (Hq % Hkv == 0, query head i reads kv head
  i // (Hq // Hkv)), D feature dim of phi, dk key dim, dv value dim, C chunk size.
Kernels see head-major layouts `[B, H, T, X]`; the public functions take and return `[B, T, H, X]`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# `implementation=` values of every op (and of `LoLAConfig`): None picks per backend
# (`resolve_implementation`), "reference" is the op's plain-JAX reference form.
IMPLEMENTATIONS = (None, "xla", "pallas", "reference")

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
# The kernels' "minus infinity" for masked logits: finite, so e^{l - m} never sees inf - inf.
NEG = -1e30


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  p = 1
  while p < x:
    p *= 2
  return p


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Padding of the kernel tiles (the time block is the chunk; heads are grid axes).

  Attributes:
    feature_multiple: D is zero-padded to a multiple of this (zero features add nothing to
      phi_q^T H or phi_q^T s, so padding is exact).
    value_multiple: dv is zero-padded to a multiple of this (extra output columns are dropped).
    key_multiple: dk is zero-padded to a multiple of this (zero columns leave q.k unchanged).
    chunk_multiple: the linear-attention chunk is rounded up to a multiple of this. The hybrid's
      chunk is semantic (it defines the window) and is never changed; time is zero-padded instead.
    pow2: round every padded dim up to a power of two (Triton needs power-of-two tensor shapes).
  """

  feature_multiple: int = 1
  value_multiple: int = 1
  key_multiple: int = 1
  chunk_multiple: int = 1
  pow2: bool = False

  def __post_init__(self):
    for name in ("feature_multiple", "value_multiple", "key_multiple", "chunk_multiple"):
      val = getattr(self, name)
      if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"BlockSizes.{name} must be an int >= 1, got {val!r}")

  @classmethod
  def get_default(cls, backend: str | None = None) -> BlockSizes:
    """Defaults per backend: TPU tiles are 8 x 128, GPU dots want >= 16 and powers of two."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
      return cls(feature_multiple=128, value_multiple=128, key_multiple=128, chunk_multiple=8)
    if backend in ("gpu", "cuda", "rocm"):
      return cls(
        feature_multiple=16, value_multiple=16, key_multiple=16, chunk_multiple=16, pow2=True
      )
    return cls()

  def pad_dim(self, x: int, multiple: int) -> int:
    x = _round_up(x, multiple)
    return _next_pow2(x) if self.pow2 else x


def resolve_implementation(implementation: str | None) -> str:
  """None -> "pallas" on TPU, "xla" on GPU and CPU; otherwise validated and returned.

  Not Pallas on GPU: compiled with Triton on an H200 the kernels are correct but 15x slower than
  the XLA chunked form (docs/benchmarks.md), so the default takes XLA there until they are
  rewritten chunk-parallel.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation is None:
    return "pallas" if default_pallas() else "xla"
  return implementation


def default_pallas() -> bool:
  """Whether `implementation=None` means Pallas on the default backend (TPU only)."""
  return jax.default_backend() == "tpu"


def interpret_mode():
  """Pallas `interpret=` argument: False when a native backend compiles the kernel."""
  return jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")


def check_positive_int(name: str, val) -> None:
  if isinstance(val, bool) or not isinstance(val, int) or val < 1:
    raise ValueError(f"{name} must be an int >= 1, got {val!r}")


def check_rank(name: str, x, rank: int, expected: str) -> None:
  if not hasattr(x, "shape") or x.ndim != rank:
    shape = getattr(x, "shape", type(x).__name__)
    raise ValueError(f"{name} must have shape {expected}, got {shape}")


def check_shape(name: str, x, shape: tuple[int, ...], expected: str) -> None:
  if not hasattr(x, "shape") or tuple(x.shape) != tuple(shape):
    got = getattr(x, "shape", type(x).__name__)
    raise ValueError(f"{name} must have shape {expected} = {tuple(shape)}, got {got}")


def check_float(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")


def check_layouts(arrays: dict) -> dict:
  """Checks arrays against letter layouts, e.g. {"q": (q, "[B, T, Hq, dk]"), ...}.

  The first array naming a letter binds its size; every later one must agree (ranks first, then
  shapes, in the order given). Returns the sizes by letter.
  """
  sizes = {}
  for name, (x, layout) in arrays.items():
    letters = layout[1:-1].split(", ")
    check_rank(name, x, len(letters), layout)
    expected = tuple(sizes.setdefault(a, n) for a, n in zip(letters, x.shape, strict=True))
    check_shape(name, x, expected, layout)
  return sizes


def check_heads_and_length(q_name: str, kv_name: str, hq: int, hkv: int, shape) -> None:
  """Hq must be a positive multiple of Hkv and there must be at least one token (T >= 1)."""
  if hkv < 1 or hq % hkv:
    raise ValueError(f"{q_name} heads ({hq}) must be a multiple of {kv_name} heads ({hkv})")
  if shape[1] < 1:
    raise ValueError(f"{q_name} must have T >= 1, got shape {shape}")


def check_floats(arrays: dict) -> None:
  """check_float on every (name, array) of `arrays`."""
  for name, x in arrays.items():
    check_float(name, x)


def to_heads(x, t_pad: int, last: int):
  """[B, T, H, X] -> [B, H, T_pad, X_pad], zero-padded on time and the last dim."""
  x = jnp.swapaxes(x, 1, 2)
  pad = [(0, 0), (0, 0), (0, t_pad - x.shape[2]), (0, last - x.shape[3])]
  return jnp.pad(x, pad)


def from_heads(x, t: int, last: int):
  """[B, H, T_pad, X_pad] -> [B, T, H, X]."""
  return jnp.swapaxes(x[:, :, :t, :last], 1, 2)


def group_sum(x, num_kv_heads: int):
  """Sums per-query-head partial results of a kv head: [B, Hq, ...] -> [B, Hkv, ...]."""
  b, hq = x.shape[:2]
  return x.reshape(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).sum(axis=2)


def dot(a, b, ta=False, tb=False):
  """a @ b in float32 with optional transposes (a^T: contract dim 0 of a; b^T: dim 1 of b).

  Kernel bodies use it for every 2-D product: full float32 precision, float32 accumulation.
  """
  dims = (((0,) if ta else (1,)), ((1,) if tb else (0,)))
  return jax.lax.dot_general(a, b, (dims, ((), ())), precision=HIGHEST, preferred_element_type=F32)


def head_specs(group: int, shapes):
  """BlockSpecs over a grid (B, H): one [B, H, ...] operand block per program, leading dims
  squeezed.

  Args:
    group: query heads per kv head, for the grid over query heads (Hq); 1 when the grid walks
      the operand's own heads.
    shapes: (kind, tail) per operand: kind "q" indexes the operand's head axis with the grid's
      head (h), "kv" with h // group; tail is the block shape after the two squeezed dims.
  """

  def spec(kind, tail):
    zeros = (0,) * len(tail)
    div = 1 if kind == "q" else group
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed) + tuple(tail), lambda b, h: (b, h // div) + zeros
    )

  return [spec(kind, tail) for kind, tail in shapes]


def head_outputs(batch: int, heads: int, tails):
  """(out_shape, out_specs) of float32 outputs [batch, heads, *tail], one block per program."""
  out_shape = [jax.ShapeDtypeStruct((batch, heads) + tuple(tail), F32) for tail in tails]
  return out_shape, head_specs(1, [("q", tail) for tail in tails])
