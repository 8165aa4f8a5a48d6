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

# (implementation, interpret) pairs: the same test class runs once per entry. The TPU interpreter
# is ~10x slower than the generic one, so its full class run is marked slow; a smoke test of it
# stays in the default suite (TPU_INTERPRET below).
IMPLS = [
  pytest.param("xla", None, id="xla"),
  pytest.param("pallas", True, id="pallas_interpret"),
]
if _TPU_INTERPRET is not None:
  IMPLS.append(
    pytest.param("pallas", _TPU_INTERPRET, id="pallas_tpu_interpret", marks=pytest.mark.slow)
  )
if jax.default_backend() in ("gpu", "tpu"):  # compiled for real (Triton / Mosaic GPU, Mosaic TPU)
  IMPLS.append(pytest.param("pallas", False, id=f"pallas_{jax.default_backend()}"))
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
