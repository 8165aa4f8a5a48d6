"""XLA compiler options of the jitted decode programs.

A decode loop runs one token per iteration of a `lax.scan` / `lax.while_loop` whose carry is the
LoLA state, with the end-of-chunk cache update under `lax.cond`. XLA:CPU's default copy
insertion cannot prove that the conditional's results may live in the loop's own buffers, and
copies most of the state on every token (about 1.8 MiB for 8 heads at cache 64, against under
0.1 ms of arithmetic). Region-based live-range analysis
(`xla_cpu_copy_insertion_use_region_analysis`) removes most of those copies: the decode loop
runs about 1.7x faster (docs/benchmarks.md, "XLA LoLA path"). The option only affects which
copies XLA inserts, never a value: outputs are bit-identical (tests/core/test_core_xla_path.py).

Options apply to the outermost `jax.jit` only, so every jitted decode entry point of the project
(`lola_decode`, `lola_decode_steps`, `lola_jax.generate.decode_block`, the SmolLM2 decode
latency) is built with `decode_jit`; a user's own loop around `lola_decode` passes
`compiler_options=decode_compiler_options()` to its `jax.jit`.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"


@functools.cache
def decode_compiler_options(backend: str | None = None) -> dict[str, bool]:
  """The compiler options for a jitted decode loop on `backend` (default: JAX's default backend).

  {REGION_ANALYSIS: True} on CPU; {} elsewhere (GPU and TPU choose their own copy insertion),
  and {} with a warning on an XLA that no longer knows the option.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return {}
  options = {REGION_ANALYSIS: True}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.float32(0)).compile()
  except Exception as e:  # noqa: BLE001 - any refusal means: compile without the option
    warnings.warn(
      f"XLA refused the compiler option {REGION_ANALYSIS} ({type(e).__name__}: {e}); decode "
      "loops compile with the default copy insertion (slower on CPU, same outputs)",
      stacklevel=2,
    )
    return {}
  return options


def decode_jit(fun=None, **jit_kwargs):
  """`jax.jit(fun, **jit_kwargs)` with `decode_compiler_options()`, chosen at the first call
  (choosing initialises JAX's backends, which must not happen at import, e.g. before
  `jax.distributed.initialize`). Usable as `@decode_jit` or `@decode_jit(static_argnames=...)`.
  Called on tracers (under an outer `jax.jit`, `lax.scan`, ...) it is the plain nested jit:
  JAX takes compiler options from the outermost program only."""
  if fun is None:
    return functools.partial(decode_jit, **jit_kwargs)
  nested = jax.jit(fun, **jit_kwargs)
  built = {}

  def top_level():
    if "f" not in built:
      options = decode_compiler_options()
      built["f"] = jax.jit(fun, **jit_kwargs, compiler_options=options) if options else nested
    return built["f"]

  @functools.wraps(fun)
  def call(*args, **kwargs):
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
    return (nested if traced else top_level())(*args, **kwargs)

  call.lower = lambda *args, **kwargs: top_level().lower(*args, **kwargs)
  return call
