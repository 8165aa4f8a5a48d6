"""Every kernel, forward and backward, f32 and bf16, at T = 8192 and head dim 128, lowers and
exports for TPU (implementation="pallas_tpu", Mosaic) and for CUDA ("pallas_triton", Triton) from
this CPU machine; and each TPU kernel's VMEM per program, computed from the block specs and
scratch shapes of its `pallas_call`, is independent of T and within the 16 MiB limit.

Lowering only (nothing is compiled for a device here): `jax.export` runs the Pallas lowering to
Mosaic / Triton IR, which checks block shapes, index maps and the kernel bodies' ops.
"""

import jax
import jax.numpy as jnp
import pytest

from lola_jax import LoLAConfig, lola_prefill
from pallas_kernels import common, hybrid_attention, linear_attention, lola_chunk_step
from pallas_kernels.hybrid.pallas import hybrid_vmem_bytes
from pallas_kernels.linear.pallas import linear_vmem_bytes
from pallas_kernels.lola_chunk.pallas import lola_chunk_vmem_bytes

T, HEAD, CHUNK, CACHE = 8192, 128, 64, 64
TRITON = "__gpu$xla.gpu.triton"
BACKENDS = [
  pytest.param("pallas_tpu", "tpu", "tpu_custom_call", id="tpu"),
  pytest.param("pallas_triton", "cuda", TRITON, id="cuda"),
]
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


def sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def linear_fn(impl, t, dt):
  """(function, argument shapes): linear attention y and final state, B=1, Hq=2, Hkv=1."""

  def f(q, k, v):
    y, (h, s) = linear_attention(q, k, v, chunk_size=CHUNK, implementation=impl)
    return y.astype(jnp.float32).sum() + h.sum() + s.sum()

  args = (sds((1, t, 2, HEAD), dt), sds((1, t, 1, HEAD), dt), sds((1, t, 1, HEAD), dt))
  return f, args, 3


def hybrid_fn(impl, t, dt):
  def f(q, k, v, pq, pk, x):
    y = hybrid_attention(q, k, v, pq, pk, gate_logit=x, chunk_size=CHUNK, implementation=impl)
    return y.astype(jnp.float32).sum()

  q, kv = sds((1, t, 2, HEAD), dt), sds((1, t, 1, HEAD), dt)
  return f, (q, kv, kv, q, kv, sds((2,), jnp.float32)), 6


def lola_prefill_fn(impl, t, dt):
  """lola_prefill with the fused chunk step (its backward is XLA) over T tokens."""
  config = LoLAConfig(chunk_size=CHUNK, cache_size=CACHE, implementation=impl)

  def f(q, k, v, pq, pk, g):
    return lola_prefill(q, k, v, pq, pk, g, config=config)[0].astype(jnp.float32).sum()

  q, kv = sds((1, t, 2, HEAD), dt), sds((1, t, 1, HEAD), dt)
  return f, (q, kv, kv, q, kv, sds((2,), jnp.float32)), 6


def chunk_step_fn(impl, t, dt):
  """One lola_chunk_step (C = 64, L = 64: its shapes do not depend on T)."""
  del t
  nk, nc = CACHE + 2 * CHUNK, CACHE + CHUNK

  def f(q, pq, keys, values, mask, cphi, h, s, g):
    y, sre = lola_chunk_step(
      q, pq, keys, values, mask, cphi, h, s, g, cache_size=CACHE, implementation=impl
    )
    return y.sum() + sre.sum()

  args = (
    sds((1, 1, 2, CHUNK, HEAD), dt), sds((1, 1, 2, CHUNK, HEAD), dt),
    sds((1, 1, nk, HEAD), dt), sds((1, 1, nk, HEAD), dt), sds((1, 1, nk), jnp.bool_),
    sds((1, 1, nc, HEAD), dt), sds((1, 1, HEAD, HEAD), jnp.float32),
    sds((1, 1, HEAD), jnp.float32), sds((1, 2), jnp.float32),
  )  # fmt: skip
  return f, args, 4


OPS = {
  "linear": linear_fn,
  "hybrid": hybrid_fn,
  "chunk_step": chunk_step_fn,
  "lola_prefill": lola_prefill_fn,
}


def export(fn, args, platform):
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


def exported_kernels(exp, marker):
  assert exp.platforms == (exp.platforms[0],)
  return exp.mlir_module().count(marker)


def _params():
  return [
    pytest.param(op, dt.values[0], *be.values, id=f"{op}-{dt.id}-{be.id}")
    for op in OPS
    for dt in DTYPES
    for be in BACKENDS
  ]


@pytest.mark.parametrize("op,dtype,impl,platform,marker", _params())
def test_forward_and_backward_export(op, dtype, impl, platform, marker):
  fn, args, nargs = OPS[op](impl, T, dtype)
  fwd = export(fn, args, platform)
  assert fwd.platforms == (platform,)
  assert exported_kernels(fwd, marker) >= 1, f"{op}: no {marker} in the forward"
  grad = jax.grad(fn, argnums=tuple(i for i in range(nargs) if args[i].dtype != jnp.bool_))
  bwd = export(grad, args, platform)
  assert bwd.platforms == (platform,)
  if op in ("linear", "hybrid"):  # the forward kernels (residuals) and the backward's own
    n_fwd, n_bwd = exported_kernels(fwd, marker), exported_kernels(bwd, marker)
    assert n_bwd > n_fwd, (op, n_fwd, n_bwd)
  # (The fused LoLA step's backward differentiates its XLA form: nothing to count.)


def test_forced_family_for_another_platform_fails_clearly():
  """pallas_triton has no TPU lowering: exporting it for TPU fails at lowering, not silently."""
  fn, args, _ = linear_fn("pallas_triton", 256, jnp.float32)
  with pytest.raises(Exception, match="tpu"):
    export(fn, args, "tpu")


def pallas_calls(jaxpr):
  """Every pallas_call equation of a closed jaxpr, nested jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from pallas_calls(inner)


def vmem_from_specs(eqn):
  """VMEM of one program of a pallas_call from its block mappings and scratch operands
  (`common.vmem_bytes`: squeezed dims dropped, blocks double-buffered, scratch once)."""
  gm = eqn.params["grid_mapping"]
  blocks = []
  for bm in gm.block_mappings:
    dims = [getattr(d, "block_size", None) for d in bm.block_shape]  # None: squeezed
    shape = tuple(d for d in dims if d is not None)
    blocks.append((shape, bm.array_aval.dtype))
  n_scratch = gm.num_scratch_operands
  invars = eqn.params["jaxpr"].invars
  scratch = [(v.aval.shape, v.aval.dtype) for v in invars[len(invars) - n_scratch :]]
  return common.vmem_bytes(blocks, scratch)


def tpu_vmem(op, t, dtype):
  """{kernel name: VMEM bytes} of the TPU kernels of op (forward and backward) at length t."""
  fn, args, nargs = OPS[op]("pallas_tpu", t, dtype)
  grad = jax.grad(fn, argnums=tuple(i for i in range(nargs) if args[i].dtype != jnp.bool_))
  out = {}
  for eqn in pallas_calls(jax.make_jaxpr(grad)(*args).jaxpr):
    if eqn.params["interpret"] is False:  # the compiled branch of common.pallas_call
      out[eqn.params["name"]] = vmem_from_specs(eqn)
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("op", ["linear", "hybrid", "chunk_step"])
def test_tpu_vmem_is_independent_of_t_and_within_limit(op, dtype):
  short, long = tpu_vmem(op, 2048, dtype), tpu_vmem(op, T, dtype)
  assert short, f"{op}: no compiled TPU pallas_call found"
  assert short == long, f"{op}: VMEM depends on T: {short} vs {long}"
  assert max(long.values()) <= common.VMEM_LIMIT_BYTES, long
  # The kernel modules' own formulas (quoted in their docstrings) agree with the specs, at the
  # padded sizes: the linear chunk 64 -> 128 rows; the hybrid keeps its chunk (64: the window);
  # the LoLA step's keys L + 2C = 192 -> 256 lanes, its G*C = 128 query rows and L + C = 128
  # candidates already whole tiles.
  if op == "linear":
    expected = linear_vmem_bytes(128, HEAD, HEAD, dtype)
  elif op == "hybrid":
    expected = hybrid_vmem_bytes(CHUNK, HEAD, HEAD, HEAD, dtype)
  else:
    expected = {"step": lola_chunk_vmem_bytes(128, 256, 128, HEAD, HEAD, HEAD, dtype)}
  assert sorted(long.values()) == sorted(expected.values()), (long, expected)


def test_vmem_bytes_counts_tiles():
  """(8, 128) f32 tiles, (16, 128) bf16 tiles; blocks twice, scratch once."""
  assert common.vmem_bytes([((1, 1), jnp.float32)]) == 2 * 8 * 128 * 4
  assert common.vmem_bytes([((16, 128), jnp.bfloat16)], [((9, 129), jnp.float32)]) == (
    2 * 16 * 128 * 2 + 16 * 256 * 4
  )
  with pytest.raises(ValueError, match="VMEM"):
    common.check_vmem("k", common.VMEM_LIMIT_BYTES + 1)
