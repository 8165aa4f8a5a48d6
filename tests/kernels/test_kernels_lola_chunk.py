"""The fused LoLA chunk step (pallas_kernels.lola_chunk) and lola_prefill's implementation switch.

lola_prefill(implementation="pallas") runs the kernel in interpret mode here (CPU); it must equal
implementation="xla" and the float64 lola_reference (relative RMS <= 1e-5 in float32, identical
cached positions). Gradients go through the kernel's custom VJP (an XLA recomputation of the step)
and must equal the XLA path's.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import make_inputs, rel_rms, time_slice
from kernel_helpers import BF16_RTOL, PRECISION, TPU_INTERPRET, assert_rel_rms

from lola_jax import LoLAConfig, cached_positions, lola_prefill, lola_reference
from pallas_kernels import BlockSizes, lola_chunk_step
from pallas_kernels.lola_chunk import lola_chunk_step_xla

TOL = 1e-5
# Tiny shapes: B=2, Hq=4 over Hkv=2 (GQA), T=13 with C=3 (T % C != 0), cache L=2 so the cache
# overflows from the third chunk on and both selection and absorption run.
SHAPE = dict(batch=2, time=13, q_heads=4, kv_heads=2, key_dim=4, value_dim=3, feature_dim=3)


def cfg(impl, **kw):
  base = dict(chunk_size=3, cache_size=2, mix="gated", policy="sre")
  base.update(kw)
  return LoLAConfig(implementation=impl, **base)


def sorted_positions(state):
  return np.sort(np.asarray(cached_positions(state)), axis=-1)


def check_against_xla_and_reference(inputs, **kw):
  yp, sp = lola_prefill(*inputs, config=cfg("pallas", **kw))
  yx, sx = lola_prefill(*inputs, config=cfg("xla", **kw))
  yr, cr = lola_reference(*inputs, config=cfg("xla", **kw), return_cache=True)
  assert_rel_rms(yp, yx, TOL, "pallas vs xla")
  assert_rel_rms(yp, yr, TOL, "pallas vs reference")
  np.testing.assert_array_equal(sorted_positions(sp), sorted_positions(sx))
  np.testing.assert_array_equal(sorted_positions(sp), np.sort(cr, axis=-1))
  for name in ("linear_h", "linear_s", "cache_k", "window_v", "chunk_phi_k"):
    if getattr(sx, name).size:  # the cache is empty with cache_size = 0
      assert_rel_rms(getattr(sp, name), getattr(sx, name), TOL, name)
  np.testing.assert_array_equal(sp.num_tokens, sx.num_tokens)


@pytest.mark.parametrize(
  "mix,policy",
  [
    ("gated", "sre"),  # lolcats + recency run from a state in the next test
    pytest.param("lolcats", "recency", marks=pytest.mark.slow),
    pytest.param("lolcats", "sre", marks=pytest.mark.slow),
    pytest.param("gated", "recency", marks=pytest.mark.slow),
  ],
)
def test_prefill_pallas_matches_xla_and_reference(mix, policy):
  check_against_xla_and_reference(make_inputs(0, **SHAPE), mix=mix, policy=policy)


@pytest.mark.slow
def test_prefill_pallas_cache_zero_and_large_cache():
  inputs = make_inputs(1, **SHAPE)
  check_against_xla_and_reference(inputs, cache_size=0)
  check_against_xla_and_reference(inputs, cache_size=16)  # never overflows: exact softmax


def test_prefill_pallas_continues_state_with_lengths():
  """lolcats + recency. Prompt of 5 tokens, then 8 more with row 1 padded after 6: pallas ==
  xla (outputs, cache, linear state), and row 0 equals the reference of the whole sequence."""
  kw = dict(mix="lolcats", policy="recency")
  inputs = tuple(np.asarray(x) for x in make_inputs(2, **SHAPE))  # NumPy slicing: no eager ops
  first, rest = time_slice(inputs, 0, 5), time_slice(inputs, 5, 13)
  lengths = np.array([8, 6], np.int32)
  _, st = lola_prefill(*first, config=cfg("xla", **kw))  # fresh pallas prefill: tested above
  outs = {
    impl: lola_prefill(*rest, config=cfg(impl, **kw), state=st, lengths=lengths)
    for impl in ("pallas", "xla")
  }
  (yp, sp), (yx, sx) = outs["pallas"], outs["xla"]
  assert_rel_rms(yp, yx, TOL, "y")
  np.testing.assert_array_equal(np.asarray(yp[1, 6:]), 0.0)
  np.testing.assert_array_equal(sorted_positions(sp), sorted_positions(sx))
  assert_rel_rms(sp.linear_h, sx.linear_h, TOL, "linear_h")
  np.testing.assert_array_equal(sp.num_tokens, sx.num_tokens)
  # Row 0 saw all 13 tokens: it equals the reference of the whole sequence.
  yr = lola_reference(*inputs, config=cfg("xla", **kw))
  assert_rel_rms(yp[0], yr[0, 5:], TOL, "row 0 vs reference")


def test_gradients_match_xla():
  inputs = make_inputs(3, batch=1, time=8, q_heads=2, kv_heads=1, key_dim=4, value_dim=3,
                       feature_dim=3)  # fmt: skip

  def loss(impl):
    f = lambda *xs: lola_prefill(*xs, config=cfg(impl, mix="lolcats"))[0]
    return lambda *xs: jnp.sum(jnp.sin(3.0 * f(*xs)))

  grads = jax.jit(jax.grad(loss("pallas"), argnums=range(6)))(*inputs)
  ref = jax.jit(jax.grad(loss("xla"), argnums=range(6)))(*inputs)
  for name, g, r in zip(["q", "k", "v", "phi_q", "phi_k", "gate"], grads, ref, strict=True):
    chex.assert_equal_shape((g, r))
    assert_rel_rms(g, r, TOL, f"d{name}")


def test_bf16_within_tolerance_of_f32():
  """bf16 inputs (cache stored in bf16) vs the f32 run: within BF16_RTOL (kernel_helpers)."""
  inputs = make_inputs(4, **SHAPE)
  y32, _ = lola_prefill(*inputs, config=cfg("pallas"))
  bf16 = [jnp.asarray(np.asarray(x).astype(jnp.bfloat16)) for x in inputs]
  y16, _ = lola_prefill(*bf16, config=cfg("pallas"))
  assert y16.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y16, np.float32)).all()
  assert_rel_rms(y16, y32, BF16_RTOL, "bf16 vs f32")


def kernel_inputs(seed, b=2, hkv=2, g=2, c=4, lam=3, dk=5, dv=3, d=6):
  """Inputs of one chunk step (NumPy RNG: eager jax.random ops compile one by one, slowly)."""
  rng = np.random.default_rng(seed)
  nk = lam + 2 * c
  key_mask = rng.uniform(size=(b, hkv, nk)) > 0.3
  key_mask[0, 0, : lam + c] = False  # row 0 of chunk sees only itself (if real)
  key_mask[0, 0, lam + c] = False  # ... and query 0 of that head sees no key at all
  args = (
    rng.normal(size=(b, hkv, g, c, dk)),
    np.exp(0.5 * rng.normal(size=(b, hkv, g, c, d))),
    rng.normal(size=(b, hkv, nk, dk)),
    rng.normal(size=(b, hkv, nk, dv)),
    key_mask,
    np.exp(0.5 * rng.normal(size=(b, hkv, lam + c, d))),
    rng.uniform(size=(b, hkv, d, dv)),
    rng.uniform(size=(b, hkv, d)) + 1.0,
    rng.uniform(0.2, 0.8, size=(hkv, g)),
  )
  return tuple(
    jnp.asarray(x) if x.dtype == bool else jnp.asarray(x, jnp.float32) for x in args
  ), lam


@pytest.mark.parametrize(
  "impl,block_sizes,interpret",
  [
    ("pallas_tpu", BlockSizes(), True),  # no padding, generic interpreter
    ("pallas_tpu", None, True),  # the TPU defaults: keys to 128 lanes, rows to 8 sublanes
    ("pallas_triton", None, None),  # powers of two >= 16; compiled on a GPU, else interpreted
    pytest.param(
      "pallas_tpu",
      BlockSizes(128, 128, 128, 8),  # the TPU padding, under the TPU (Mosaic) interpreter
      TPU_INTERPRET,
      marks=[
        pytest.mark.slow,
        pytest.mark.skipif(TPU_INTERPRET is None, reason="no TPU interpret mode in this JAX"),
      ],
    ),
  ],
  ids=["unpadded", "tpu_padding", "triton", "tpu_interpret"],
)
def test_kernel_matches_xla_step(impl, block_sizes, interpret):
  """y and the self-recall errors, with masked keys (rows seeing no key at all included)."""
  args, lam = kernel_inputs(5)
  kw = dict(cache_size=lam, mix="gated", softmax_scale=None, eps=1e-6, interpret=interpret)
  kw.update(implementation=impl, precision=PRECISION)
  step = jax.jit(lambda *a: lola_chunk_step(*a, **kw, block_sizes=block_sizes))
  y, sre = step(*args)
  scale = args[0].shape[-1] ** -0.5
  xla_step = jax.jit(
    lambda *a: lola_chunk_step_xla(
      *a, cache_size=lam, scale=scale, mix="gated", eps=1e-6, with_sre=True
    )
  )
  yx, srex = xla_step(*args)
  chex.assert_shape(y, (2, 2, 2, 4, 3))
  chex.assert_shape(sre, (2, 2, lam + 4))
  assert_rel_rms(y, yx, TOL, "y")
  assert_rel_rms(sre, srex, TOL, "sre")


def test_dispatch_none_is_xla_off_tpu_and_reference_is_xla():
  inputs = make_inputs(0, **SHAPE)

  def uses_pallas(impl):
    jaxpr = jax.make_jaxpr(lambda *xs: lola_prefill(*xs, config=cfg(impl)))(*inputs)
    return "pallas_call" in str(jaxpr)

  assert uses_pallas("pallas")
  assert not uses_pallas("xla")
  assert not uses_pallas("reference")
  assert uses_pallas(None) == (jax.default_backend() == "tpu")  # GPU: XLA until measured


def test_bad_kernel_shapes_raise():
  args, lam = kernel_inputs(6)
  with pytest.raises(ValueError, match="L \\+ 2C"):
    lola_chunk_step(*args, cache_size=lam + 1)
  with pytest.raises(ValueError, match="mix"):
    lola_chunk_step(*args, cache_size=lam, mix="softmax")


def test_large_logits_stay_finite():
  """Logits of a few hundred (gated mix in log space): finite and equal to the XLA path."""
  inputs = make_inputs(7, logit_scale=60.0, **SHAPE)
  yp, _ = lola_prefill(*inputs, config=cfg("pallas"))
  yx, _ = lola_prefill(*inputs, config=cfg("xla"))
  assert np.isfinite(np.asarray(yp)).all()
  assert rel_rms(yp, yx) <= TOL


@pytest.mark.slow
def test_prefill_pallas_sre_below_uses_the_kernels_scores_and_the_prior():
  """ "sre_below" ranks by the fused kernel's self-recall errors after the prior: pallas ==
  xla == reference with a prior of positions that leave the window."""
  inputs = make_inputs(3, **SHAPE)
  prior = np.array([[1, 6, -1], [4, 0, 2]], np.int32)
  kw = dict(policy="sre_below")
  yp, sp = lola_prefill(*inputs, config=cfg("pallas", **kw), prior_positions=jnp.asarray(prior))
  yx, sx = lola_prefill(*inputs, config=cfg("xla", **kw), prior_positions=jnp.asarray(prior))
  yr, cr = lola_reference(
    *inputs, config=cfg("xla", **kw), return_cache=True, prior_positions=prior
  )
  assert_rel_rms(yp, yx, TOL, "pallas vs xla")
  assert_rel_rms(yp, yr, TOL, "pallas vs reference")
  np.testing.assert_array_equal(sorted_positions(sp), sorted_positions(sx))
  np.testing.assert_array_equal(sorted_positions(sp), np.sort(cr, axis=-1))
  _, plain = lola_reference(*inputs, config=cfg("xla"), return_cache=True)
  assert not np.array_equal(np.sort(cr, axis=-1), np.sort(plain, axis=-1))  # the prior mattered
