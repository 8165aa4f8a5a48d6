"""Shared helpers of the kernel tests: implementations to parametrise over, inputs, metrics."""

import jax
import jax.numpy as jnp
import pytest
from core_helpers import rel_rms

try:  # TPU interpret mode (Mosaic semantics on CPU), present in recent JAX.
  from jax.experimental.pallas import tpu as pltpu

  _TPU_INTERPRET = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else None
except ImportError:  # pragma: no cover
  _TPU_INTERPRET = None

# (implementation, interpret) pairs: the same test class runs once per entry. On CPU each kernel
# family runs in interpret mode (interpret=None: `common.pallas_call` interprets on CPU and
# compiles on the family's device). The TPU family is the one "pallas" means here and runs the
# whole class; the Triton family's full class run and the Mosaic-TPU interpreter (~10x slower)
# are marked slow, with smoke tests of both in the default suite (test_*_triton_smoke,
# test_tpu_interpret_smoke).
_BACKEND = jax.default_backend()
IMPLS = [pytest.param("xla", None, id="xla")]
if _BACKEND == "cpu":
  IMPLS += [
    pytest.param("pallas_tpu", None, id="pallas_tpu_interpret"),
    pytest.param("pallas_triton", None, id="pallas_triton_interpret", marks=pytest.mark.slow),
  ]
if _TPU_INTERPRET is not None:
  IMPLS.append(
    pytest.param(
      "pallas_tpu", _TPU_INTERPRET, id="pallas_tpu_mosaic_interpret", marks=pytest.mark.slow
    )  # fmt: skip
  )
if _BACKEND == "gpu":  # compiled for real with Triton
  IMPLS.append(pytest.param("pallas_triton", False, id="pallas_gpu"))
if _BACKEND == "tpu":  # compiled for real with Mosaic
  IMPLS.append(pytest.param("pallas_tpu", False, id="pallas_tpu"))
# Compiled kernels take f32 products at full precision in the tests (DEFAULT is one bf16 MXU
# pass on TPU, TF32 on GPU); in interpret mode on CPU f32 products are exact either way.
PRECISION = jax.lax.Precision.HIGHEST
TPU_INTERPRET = _TPU_INTERPRET

# bf16 inputs vs the f32 result: bf16 has an 8-bit mantissa (rel. step 2^-8 ~ 4e-3); inputs are
# rounded once and the kernels accumulate in f32, so the output error stays near that step.
BF16_RTOL = 2e-2


def assert_rel_rms(x, ref, tol, what=""):
  err = rel_rms(x, ref)
  assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.1e}"


def features(key, shape):
  return jax.nn.softplus(jax.random.normal(key, shape)) + 0.1


def normal(key, shape):
  return jax.random.normal(key, shape, jnp.float32)
