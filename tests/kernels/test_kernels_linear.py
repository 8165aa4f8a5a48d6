"""pallas_kernels.linear_attention vs a float64 NumPy reference and the XLA path's gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import (
  BF16_RTOL,
  IMPLS,
  PRECISION,
  TPU_INTERPRET,
  assert_rel_rms,
  features,
  normal,
)

from pallas_kernels import BlockSizes, linear_attention, resolve_implementation


def numpy_linear(phi_q, phi_k, v, h0=None, s0=None, eps=1e-6):
  """Per-token float64 recurrence: y_t = phi_q_t^T H_t / (phi_q_t^T s_t + eps), H_t inclusive."""
  q, k, v = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v))
  b, t, hq, d = q.shape
  hkv, dv = v.shape[2], v.shape[3]
  h = np.zeros((b, hkv, d, dv)) if h0 is None else np.asarray(h0, np.float64).copy()
  s = np.zeros((b, hkv, d)) if s0 is None else np.asarray(s0, np.float64).copy()
  y = np.zeros((b, t, hq, dv))
  for i in range(t):
    h += k[:, i, :, :, None] * v[:, i, :, None, :]
    s += k[:, i]
    for qh in range(hq):
      kh = qh // (hq // hkv)
      num = np.einsum("bd,bdv->bv", q[:, i, qh], h[:, kh])
      den = np.einsum("bd,bd->b", q[:, i, qh], s[:, kh]) + eps
      y[:, i, qh] = num / den[:, None]
  return y, h, s


def make_inputs(seed, b, t, hq, hkv, d, dv, with_state):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  phi_q, phi_k = features(ks[0], (b, t, hq, d)), features(ks[1], (b, t, hkv, d))
  v = normal(ks[2], (b, t, hkv, dv))
  state = None
  if with_state:
    state = (normal(ks[3], (b, hkv, d, dv)), features(ks[4], (b, hkv, d)) * 3.0)
  return phi_q, phi_k, v, state


# (T, chunk, Hq, Hkv): T a multiple of the chunk, T not a multiple, T < chunk, GQA, T = 1.
CASES = [(8, 4, 2, 2, False), (11, 4, 4, 2, True), (3, 8, 2, 1, True), (1, 4, 2, 2, False)]


@pytest.mark.parametrize("impl,interpret", IMPLS)
class TestLinearAttention:
  def run(self, impl, interpret, *args, **kw):
    return linear_attention(
      *args, implementation=impl, interpret=interpret, precision=PRECISION, **kw
    )

  @pytest.mark.parametrize("t,c,hq,hkv,with_state", CASES)
  def test_forward_matches_numpy(self, impl, interpret, t, c, hq, hkv, with_state):
    phi_q, phi_k, v, state = make_inputs(0, 2, t, hq, hkv, 5, 3, with_state)
    y, (h, s) = self.run(impl, interpret, phi_q, phi_k, v, chunk_size=c, initial_state=state)
    chex.assert_shape(y, (2, t, hq, 3))
    chex.assert_shape((h, s), ((2, hkv, 5, 3), (2, hkv, 5)))
    assert h.dtype == s.dtype == jnp.float32
    y_ref, h_ref, s_ref = numpy_linear(phi_q, phi_k, v, *(state or (None, None)))
    assert_rel_rms(y, y_ref, 1e-5, "y")
    assert_rel_rms(h, h_ref, 1e-5, "H")
    assert_rel_rms(s, s_ref, 1e-5, "s")

  @pytest.mark.parametrize("t,c,hq,hkv", [(11, 4, 4, 2)])
  def test_gradients_match_xla(self, impl, interpret, t, c, hq, hkv):
    phi_q, phi_k, v, state = make_inputs(1, 2, t, hq, hkv, 4, 3, True)

    def loss(run, *xs):
      y, (h, s) = run(xs[0], xs[1], xs[2], chunk_size=c, initial_state=(xs[3], xs[4]))
      # Cotangents on y and on both parts of the final state.
      return jnp.sum(jnp.sin(2.0 * y)) + jnp.sum(jnp.cos(h)) + jnp.sum(s**2) * 0.1

    run = lambda *a, **kw: self.run(impl, interpret, *a, **kw)
    run_xla = lambda *a, **kw: linear_attention(*a, implementation="xla", **kw)
    args = (phi_q, phi_k, v, *state)
    grads = jax.grad(lambda *xs: loss(run, *xs), argnums=range(5))(*args)
    ref = jax.grad(lambda *xs: loss(run_xla, *xs), argnums=range(5))(*args)
    for name, g, r in zip(["phi_q", "phi_k", "v", "H0", "s0"], grads, ref, strict=True):
      chex.assert_equal_shape((g, r))
      assert_rel_rms(g, r, 1e-5, f"d{name}")

  def test_chaining_equals_one_call(self, impl, interpret):
    phi_q, phi_k, v, _ = make_inputs(2, 1, 10, 2, 2, 4, 3, False)
    y, state = self.run(impl, interpret, phi_q, phi_k, v, chunk_size=4)
    y1, st1 = self.run(impl, interpret, phi_q[:, :6], phi_k[:, :6], v[:, :6], chunk_size=4)
    y2, st2 = self.run(
      impl, interpret, phi_q[:, 6:], phi_k[:, 6:], v[:, 6:], chunk_size=4, initial_state=st1
    )
    assert_rel_rms(jnp.concatenate([y1, y2], axis=1), y, 1e-6, "y")
    chex.assert_trees_all_close(st2, state, rtol=1e-5, atol=1e-5)

  def test_bfloat16_close_to_float32(self, impl, interpret):
    phi_q, phi_k, v, _ = make_inputs(3, 1, 9, 2, 1, 4, 3, False)
    y32, st32 = self.run(impl, interpret, phi_q, phi_k, v, chunk_size=4)
    bf = lambda x: x.astype(jnp.bfloat16)
    y16, st16 = self.run(impl, interpret, bf(phi_q), bf(phi_k), bf(v), chunk_size=4)
    assert y16.dtype == jnp.bfloat16 and st16[0].dtype == jnp.float32
    assert_rel_rms(y16, y32, BF16_RTOL, "bf16 y")
    assert_rel_rms(st16[0], st32[0], BF16_RTOL, "bf16 H")


def test_padded_block_sizes_are_exact():
  """TPU-style padding (D, dv to 128, chunk to 8) runs in interpret mode and changes nothing."""
  phi_q, phi_k, v, state = make_inputs(4, 1, 7, 2, 1, 5, 3, True)
  bs = BlockSizes(feature_multiple=128, value_multiple=128, chunk_multiple=8)
  y, st = linear_attention(
    phi_q, phi_k, v, chunk_size=3, initial_state=state, implementation="pallas_tpu",
    block_sizes=bs, interpret=True,
  )  # fmt: skip
  y_ref, h_ref, s_ref = numpy_linear(phi_q, phi_k, v, *state)
  assert_rel_rms(y, y_ref, 1e-5, "y")
  assert_rel_rms(st[0], h_ref, 1e-5, "H")


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(phi_k=np.zeros((2, 5, 2, 3), np.float32)), "phi_k"),
    (dict(v=np.zeros((2, 5, 2))), "v must have shape"),
    (dict(phi_k=np.zeros((2, 5, 3, 4)), v=np.zeros((2, 5, 3, 3))), "multiple"),
    (dict(initial_state=(np.zeros((2, 2, 4, 3)), np.zeros((2, 2, 5)))), r"initial_state\[1\]"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(implementation="cuda"), "implementation"),
  ],
)
def test_bad_input_raises(kwargs, match):
  args = dict(
    phi_q=np.ones((2, 5, 4, 4), np.float32),
    phi_k=np.ones((2, 5, 2, 4), np.float32),
    v=np.ones((2, 5, 2, 3), np.float32),
  )
  args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
  with pytest.raises(ValueError, match=match):
    linear_attention(args["phi_q"], args["phi_k"], args["v"], **kwargs)


def test_block_sizes_validated():
  with pytest.raises(ValueError, match="feature_multiple"):
    BlockSizes(feature_multiple=0)
  assert BlockSizes.get_default("tpu").feature_multiple == 128
  assert BlockSizes.for_target("pallas_triton").pow2


@pytest.mark.slow  # Triton lowering is checked in the default suite by test_kernels_export
def test_triton_smoke():
  """The chunk-parallel Triton family interpreted on CPU (its full class run is slow): forward
  vs float64 and gradients vs XLA on one GQA case with T % C != 0 and an initial state."""
  phi_q, phi_k, v, state = make_inputs(6, 1, 21, 4, 2, 5, 3, True)
  run = lambda impl: (
    lambda *xs: linear_attention(
      xs[0], xs[1], xs[2], chunk_size=8, initial_state=(xs[3], xs[4]), implementation=impl
    )
  )
  args = (phi_q, phi_k, v, *state)
  y, (h, s) = run("pallas_triton")(*args)
  y_ref, h_ref, s_ref = numpy_linear(phi_q, phi_k, v, *state)
  assert_rel_rms(y, y_ref, 1e-5, "y")
  assert_rel_rms(h, h_ref, 1e-5, "H")
  assert_rel_rms(s, s_ref, 1e-5, "s")
  loss = lambda f: lambda *xs: jnp.sum(jnp.sin(f(*xs)[0])) + jnp.sum(f(*xs)[1][0] ** 2)
  g = jax.grad(loss(run("pallas_triton")), argnums=range(5))(*args)
  r = jax.grad(loss(run("xla")), argnums=range(5))(*args)
  for gi, ri in zip(g, r, strict=True):
    assert_rel_rms(gi, ri, 1e-5, "grad")


def test_pallas_means_the_local_family():
  """ "pallas" resolves to the local backend's family; forced families are kept as given."""
  local = {"tpu": "pallas_tpu", "gpu": "pallas_triton"}.get(jax.default_backend(), "pallas_tpu")
  assert resolve_implementation("pallas") == local
  assert resolve_implementation("pallas_triton") == "pallas_triton"
  on_tpu = jax.default_backend() == "tpu"
  assert resolve_implementation(None) == ("pallas_tpu" if on_tpu else "xla")


@pytest.mark.slow  # the Mosaic interpreter; generic interpret mode stays in the default suite
@pytest.mark.skipif(TPU_INTERPRET is None, reason="installed JAX has no pltpu.InterpretParams")
def test_tpu_interpret_smoke():
  """Mosaic-TPU interpret mode: forward and gradients on one GQA case with T % C != 0."""
  phi_q, phi_k, v, state = make_inputs(5, 1, 6, 2, 1, 4, 3, True)
  run = lambda impl, interp: lambda *xs: linear_attention(
    xs[0], xs[1], xs[2], chunk_size=4, initial_state=(xs[3], xs[4]), implementation=impl,
    interpret=interp,
  )  # fmt: skip
  args = (phi_q, phi_k, v, *state)
  y, (h, s) = run("pallas_tpu", TPU_INTERPRET)(*args)
  y_ref, h_ref, _ = numpy_linear(phi_q, phi_k, v, *state)
  assert_rel_rms(y, y_ref, 1e-5, "y")
  assert_rel_rms(h, h_ref, 1e-5, "H")
  loss = lambda f: lambda *xs: jnp.sum(jnp.sin(f(*xs)[0])) + jnp.sum(f(*xs)[1][0])
  g = jax.grad(loss(run("pallas_tpu", TPU_INTERPRET)), argnums=range(5))(*args)
  r = jax.grad(loss(run("xla", None)), argnums=range(5))(*args)
  for gi, ri in zip(g, r, strict=True):
    assert_rel_rms(gi, ri, 1e-5, "grad")
