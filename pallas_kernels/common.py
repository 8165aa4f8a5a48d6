"""Shared pieces of the kernels: backend choice (`resolve_implementation`, `pallas_call`,
`compiler_params`), block sizes, padding, VMEM accounting (`vmem_bytes`), input validation and the
Pallas helpers every kernel uses (`dot`, `head_specs`, `chunk_specs`, `lanes`). docs/kernels.md
describes the backends and the tilings.

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
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# `implementation=` values of every op (and of `LoLAConfig`): None picks per backend,
# "pallas" is the local backend's Pallas (`resolve_implementation`), "pallas_tpu" / "pallas_triton"
# force a kernel family whatever the machine (for `jax.export` to a device this machine lacks),
# "reference" is the op's plain-JAX reference form.
IMPLEMENTATIONS = (None, "xla", "pallas", "pallas_tpu", "pallas_triton", "reference")
# The kernel families and the platform each compiles for (`lax.platform_dependent` keys).
TARGETS = {"pallas_tpu": ("tpu",), "pallas_triton": ("cuda", "rocm")}

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
# The kernels' default product precision: None, i.e. JAX's default (one bf16 MXU pass for f32 on
# TPU, TF32 on GPU) unless `jax_default_matmul_precision` says otherwise ("highest" in the
# compiled tests of experiments/benchmarks/gpu_session.sh).
DEFAULT = None
# The kernels' "minus infinity" for masked logits: finite, so e^{l - m} never sees inf - inf.
NEG = -1e30
# TPU: lanes of a vreg (statistics are stored this wide: a [T, 1] array pads 128x in VMEM) and
# the scoped-VMEM limit every TPU kernel declares (v2/v3 have 16 MiB per core, v5e's default).
LANES = 128
VMEM_LIMIT_BYTES = 16 * 2**20


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  p = 1
  while p < x:
    p *= 2
  return p


def sublanes(dtype) -> int:
  """Rows of a TPU (sublane x lane) tile for dtype: 8 for 32-bit, 16 for bf16, 32 for 8-bit."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Padding of the kernel tiles (the time block is the chunk; heads are grid axes).

  Attributes:
    feature_multiple: D is zero-padded to a multiple of this (zero features add nothing to
      phi_q^T H or phi_q^T s, so padding is exact).
    value_multiple: dv is zero-padded to a multiple of this (extra output columns are dropped).
    key_multiple: dk is zero-padded to a multiple of this (zero columns leave q.k unchanged).
    chunk_multiple: the linear-attention chunk is rounded up to a multiple of this (and to the
      dtype's sublane tile on TPU: 8 rows for f32, 16 for bf16), as are the fused LoLA step's
      query rows and keys. The hybrid's chunk is semantic (it defines the window) and is never
      changed: each chunk is zero-padded to the tile instead and the padding masked.
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
    """Defaults per backend ("tpu", "gpu"/"cuda"/"rocm"/"triton", None = the local one): TPU
    tiles are 8 x 128 (the chunk 128 rows: one MXU pass), Triton dots want >= 16 and powers of
    two; elsewhere (interpret mode) nothing is padded."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
      return cls(feature_multiple=128, value_multiple=128, key_multiple=128, chunk_multiple=128)
    if backend in ("gpu", "cuda", "rocm", "triton"):
      return cls(
        feature_multiple=16, value_multiple=16, key_multiple=16, chunk_multiple=16, pow2=True
      )
    return cls()

  @classmethod
  def for_target(cls, target: str) -> BlockSizes:
    """The defaults of a kernel family ("pallas_tpu" or "pallas_triton"), whatever the machine."""
    return cls.get_default("tpu" if target == "pallas_tpu" else "triton")

  def pad_dim(self, x: int, multiple: int) -> int:
    x = _round_up(x, multiple)
    return _next_pow2(x) if self.pow2 else x


def resolve_implementation(implementation: str | None) -> str:
  """The form an op runs: "xla", "reference", "pallas_tpu" or "pallas_triton".

  None -> "pallas_tpu" on TPU, "xla" on GPU and CPU. "pallas" -> the local backend's kernels:
  "pallas_tpu" on TPU, "pallas_triton" on GPU, and on CPU "pallas_tpu" in interpret mode (the
  family the project targets). A forced family ("pallas_tpu", "pallas_triton") is returned as is:
  it runs compiled on its device, in interpret mode on CPU, and lowers for its platform from any
  machine (`pallas_call`).

  None stays XLA on GPU until the chunk-parallel Triton kernels are measured faster than the XLA
  chunked form on a GPU (docs/kernels.md, experiments/benchmarks/gpu_session.sh).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  backend = jax.default_backend()
  if implementation is None:
    return "pallas_tpu" if backend == "tpu" else "xla"
  if implementation == "pallas":
    return "pallas_triton" if backend in ("gpu", "cuda", "rocm") else "pallas_tpu"
  return implementation


def is_pallas(implementation: str) -> bool:
  """Whether a resolved implementation is a Pallas kernel family."""
  return implementation in TARGETS


def compiler_params(target: str, *, dimension_semantics=None, num_warps=4, num_stages=2):
  """The backend's Pallas compiler parameters.

  pallas_tpu: `pltpu.CompilerParams` (named `TPUCompilerParams` in older JAX) with the grid's
  dimension semantics ("parallel" axes may be split across TensorCores, "arbitrary" ones run in
  order on one) and `vmem_limit_bytes = VMEM_LIMIT_BYTES`.
  pallas_triton: Triton's `CompilerParams(num_warps, num_stages)`; passing them is what makes a
  plain `pallas_call` on GPU compile with Triton rather than Mosaic GPU in JAX 0.10.
  """
  if target == "pallas_tpu":
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=tuple(dimension_semantics), vmem_limit_bytes=VMEM_LIMIT_BYTES)
  if target == "pallas_triton":
    cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)
  raise ValueError(f"target must be one of {tuple(TARGETS)}, got {target!r}")


def pallas_call(kernel, *, target: str, interpret, compiler_params, **kwargs):
  """`pl.pallas_call` for a kernel family, runnable here and exportable anywhere.

  interpret: None (default) -> compiled on the family's platforms (Mosaic TPU, or Triton on
  CUDA/ROCm) and interpreted on CPU, chosen by `lax.platform_dependent` at lowering: so a jitted
  function lowers for `platforms=["tpu"]` / `["cuda"]` on a CPU-only machine (`jax.export`), runs
  its numerics in interpret mode on CPU, and compiles on the device. False: compiled only. True
  or an interpreter's params (`pltpu.InterpretParams()`): interpreted everywhere.

  Returns a function of the kernel's operands.
  """

  def make(interp):
    return pl.pallas_call(kernel, compiler_params=compiler_params, interpret=interp, **kwargs)

  if interpret is False:
    return make(False)
  if interpret is not None:
    return make(interpret)
  compiled, interpreted = make(False), make(True)
  branches = {platform: compiled for platform in TARGETS[target]}
  return lambda *args: jax.lax.platform_dependent(*args, cpu=interpreted, **branches)


def vmem_bytes(blocks, scratch=()) -> int:
  """VMEM one TPU kernel invocation (one grid step) holds: every pipelined block twice (double
  buffering) plus the scratch buffers once, each padded to whole (sublane, 128-lane) tiles.

  Args:
    blocks: (shape, dtype) of every in_spec / out_spec block (squeezed dims left out).
    scratch: (shape, dtype) of every VMEM scratch buffer.

  Returns:
    bytes. The grid has no say: blocks are (C, X), so the figure is independent of T.
  """

  def tile_bytes(shape, dtype):
    shape = tuple(shape)
    if len(shape) == 1:
      shape = (1,) + shape
    *lead, rows, cols = shape
    n = _round_up(rows, sublanes(dtype)) * _round_up(cols, LANES)
    for x in lead:
      n *= x
    return n * jnp.dtype(dtype).itemsize

  return 2 * sum(tile_bytes(*b) for b in blocks) + sum(tile_bytes(*s) for s in scratch)


def check_vmem(name: str, nbytes: int) -> None:
  """Raises a ValueError when a TPU kernel's blocks exceed `VMEM_LIMIT_BYTES`."""
  if nbytes > VMEM_LIMIT_BYTES:
    raise ValueError(
      f"{name}: blocks need {nbytes / 2**20:.1f} MiB of VMEM, over the "
      f"{VMEM_LIMIT_BYTES / 2**20:.0f} MiB limit; use a smaller chunk_size or head dims"
    )


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


def to_chunks(x, c: int, cp: int, last: int):
  """[B, T, H, X] -> [B, H, n * cp, X_pad]: time cut into n = ceil(T / c) chunks of c tokens,
  each zero-padded to cp rows (the kernel tile), the last dim zero-padded to X_pad."""
  b, t, h, xd = x.shape
  n = -(-t // c)
  x = jnp.pad(x, [(0, 0), (0, n * c - t), (0, 0), (0, 0)]).reshape(b, n, c, h, xd)
  x = jnp.pad(x, [(0, 0), (0, 0), (0, cp - c), (0, 0), (0, last - xd)])
  return x.transpose(0, 3, 1, 2, 4).reshape(b, h, n * cp, last)


def from_chunks(x, t: int, c: int, cp: int, last: int):
  """Inverse of `to_chunks`: [B, H, n * cp, X_pad] -> [B, T, H, X]."""
  b, h, ncp, xp = x.shape
  n = ncp // cp
  x = x.reshape(b, h, n, cp, xp)[:, :, :, :c, :last].reshape(b, h, n * c, last)
  return jnp.swapaxes(x[:, :, :t], 1, 2)


def dot(a, b, ta=False, tb=False, *, precision=HIGHEST, dtype=None):
  """a @ b with float32 accumulation and optional transposes (a^T: contract dim 0 of a; b^T:
  dim 1 of b).

  Kernel bodies use it for every 2-D product. dtype: the operand dtype both sides are cast to
  (the kernel's input dtype: bf16 operands feed the MXU / tensor cores natively, f32 intermediates
  such as softmax weights or the f32 state are rounded to it); None keeps them as they are.
  precision: `lax.Precision` of the product (None / DEFAULT: one MXU pass for f32 on TPU, TF32
  on GPU, unless `jax_default_matmul_precision` is set; HIGHEST: full f32). On CPU (interpret
  mode) f32 products are exact either way.
  """
  if dtype is not None:
    a, b = a.astype(dtype), b.astype(dtype)
  dims = (((0,) if ta else (1,)), ((1,) if tb else (0,)))
  return jax.lax.dot_general(
    a, b, (dims, ((), ())), precision=precision, preferred_element_type=F32
  )


def kv_head(h, group: int):
  """The kv head of query head h (a grid index): h // group, as `lax.div` (Mosaic lowers `//`
  through sign arithmetic)."""
  return h if group == 1 else jax.lax.div(h, group)


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
    grp = 1 if kind == "q" else group
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed) + tuple(tail), lambda b, h: (b, kv_head(h, grp)) + zeros
    )

  return [spec(kind, tail) for kind, tail in shapes]


def chunk_specs(group: int, chunk_of, shapes):
  """BlockSpecs over a grid (B, H, i) whose last axis walks chunks: operand blocks of one head.

  Args:
    group: as in `head_specs`.
    chunk_of: grid index i -> the chunk the program reads (identity for a forward walk,
      n - 1 - i for a reverse one).
    shapes: (kind, tail, per_chunk) per operand. kind "q" / "kv" as in `head_specs`; per_chunk
      True: a [B, H, n * rows, X] operand read one (rows, X) = tail block per chunk (offset
      chunk_of(i) - shift for kind "kv_prev": the chunk before); False: a per-head operand
      [B, H, *tail] read whole (the same block for every i: fetched once).
  """

  def spec(kind, tail, per_chunk):
    grp = 1 if kind == "q" else group
    if not per_chunk:
      zeros = (0,) * len(tail)
      return pl.BlockSpec(
        (pl.squeezed, pl.squeezed) + tuple(tail),
        lambda b, h, i: (b, kv_head(h, grp)) + zeros,
      )
    if kind == "kv_prev":
      idx = lambda b, h, i: (b, kv_head(h, group), jnp.maximum(chunk_of(i) - 1, 0), 0)
    else:
      idx = lambda b, h, i: (b, kv_head(h, grp), chunk_of(i), 0)
    return pl.BlockSpec((pl.squeezed, pl.squeezed) + tuple(tail), idx)

  return [spec(*s) for s in shapes]


def head_outputs(batch: int, heads: int, tails, dtype=F32):
  """(out_shape, out_specs) of outputs [batch, heads, *tail], one block per program of a grid
  (B, H). dtype: one dtype, or one per tail."""
  dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(tails)
  out_shape = [
    jax.ShapeDtypeStruct((batch, heads) + tuple(tail), dt)
    for tail, dt in zip(tails, dtypes, strict=True)
  ]
  return out_shape, head_specs(1, [("q", tail) for tail in tails])


def lanes(x):
  """[R, 1] statistic -> [R, 128]: stored lane-wide, as JAX's TPU flash attention stores l and m
  (a [R, 1] block pads to 128 lanes in VMEM anyway; this keeps stores unmasked)."""
  return jnp.broadcast_to(x, (x.shape[0], LANES))
