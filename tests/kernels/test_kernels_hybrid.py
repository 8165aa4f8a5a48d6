"""pallas_kernels.hybrid_attention vs a float64 NumPy reading of the spec and lola_prefill."""

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

from lola_jax import LoLAConfig, lola_prefill
from pallas_kernels import hybrid_attention


def numpy_hybrid(q, k, v, phi_q, phi_k, gate, c, mix):
  """Per-query float64 loop over the spec with cache_size = 0 (no log space: small logits)."""
  q, k, v, pq, pk, g = (np.asarray(x, np.float64) for x in (q, k, v, phi_q, phi_k, gate))
  b, t, hq, dk = q.shape
  hkv = k.shape[2]
  y = np.zeros((b, t, hq, v.shape[3]))
  for i in range(t):
    n = i // c
    lo = max(n - 1, 0) * c  # window: chunk n-1 and chunk n up to i
    absorbed = max(n - 1, 0) * c  # linear state: chunks <= n-2
    for h in range(hq):
      kh = h // (hq // hkv)
      logit = np.einsum("bd,bkd->bk", q[:, i, h], k[:, lo : i + 1, kh]) / np.sqrt(dk)
      hs = np.einsum("bkd,bkv->bdv", pk[:, :absorbed, kh], v[:, :absorbed, kh])
      a = np.einsum("bd,bdv->bv", pq[:, i, h], hs)
      z = np.einsum("bd,bkd->b", pq[:, i, h], pk[:, :absorbed, kh])
      shift = logit.max(-1, keepdims=True) if mix == "lolcats" else 0.0
      w = np.exp(logit - shift)
      ws, wl = g[h], (1 - g[h]) if mix == "gated" else 1.0
      num = ws * np.einsum("bk,bkv->bv", w, v[:, lo : i + 1, kh]) + wl * a
      y[:, i, h] = num / (ws * w.sum(-1) + wl * z)[:, None]
  return y


def make_inputs(seed, b, t, hq, hkv, dk=4, d=3, dv=3, logit_scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = normal(ks[0], (b, t, hq, dk)) * logit_scale
  k = normal(ks[1], (b, t, hkv, dk))
  v = normal(ks[2], (b, t, hkv, dv))
  phi_q, phi_k = features(ks[3], (b, t, hq, d)), features(ks[4], (b, t, hkv, d))
  gate = jax.nn.sigmoid(normal(ks[5], (hq,)))
  return q, k, v, phi_q, phi_k, gate


# (T, chunk, Hq, Hkv): several chunks with T % C != 0 and GQA, T < C, T a multiple of C.
CASES = [(11, 3, 4, 2), (3, 4, 2, 2), (8, 4, 2, 1)]


@pytest.mark.parametrize("impl,interpret", IMPLS)
class TestHybridAttention:
  def run(self, impl, interpret, *args, **kw):
    return hybrid_attention(
      *args, implementation=impl, interpret=interpret, precision=PRECISION, **kw
    )

  @pytest.mark.parametrize("mix", ["gated", "lolcats"])
  @pytest.mark.parametrize("t,c,hq,hkv", CASES)
  def test_forward_matches_numpy_and_core(self, impl, interpret, t, c, hq, hkv, mix):
    args = make_inputs(0, 2, t, hq, hkv)
    y = self.run(impl, interpret, *args, chunk_size=c, mix=mix)
    chex.assert_shape(y, (2, t, hq, 3))
    assert_rel_rms(y, numpy_hybrid(*args, c, mix), 1e-5, "y vs numpy")
    cfg = LoLAConfig(chunk_size=c, cache_size=0, mix=mix, implementation="xla")
    assert_rel_rms(y, lola_prefill(*args, config=cfg)[0], 1e-5, "y vs lola_prefill")

  @pytest.mark.parametrize("mix", ["gated", "lolcats"])
  def test_gradients_match_xla(self, impl, interpret, mix):
    args = make_inputs(1, 1, 10, 4, 2)

    def loss(impl_, interp):
      f = lambda *xs: hybrid_attention(
        *xs, chunk_size=4, mix=mix, implementation=impl_, interpret=interp, precision=PRECISION
      )
      return lambda *xs: jnp.sum(jnp.sin(3.0 * f(*xs)))

    grads = jax.grad(loss(impl, interpret), argnums=range(6))(*args)
    ref = jax.grad(loss("xla", None), argnums=range(6))(*args)
    for name, g, r in zip(["q", "k", "v", "phi_q", "phi_k", "gate"], grads, ref, strict=True):
      chex.assert_equal_shape((g, r))
      assert_rel_rms(g, r, 1e-5, f"d{name}")

  def test_large_logits_stay_finite(self, impl, interpret):
    args = make_inputs(2, 1, 9, 2, 2, logit_scale=150.0)  # logits of a few hundred
    y = self.run(impl, interpret, *args, chunk_size=4, mix="gated")
    assert bool(jnp.all(jnp.isfinite(y)))
    cfg = LoLAConfig(chunk_size=4, cache_size=0, mix="gated", implementation="xla")
    assert_rel_rms(y, lola_prefill(*args, config=cfg)[0], 1e-5, "y vs lola_prefill")

  def test_bfloat16_close_to_float32(self, impl, interpret):
    args = make_inputs(3, 1, 9, 2, 1)
    y32 = self.run(impl, interpret, *args, chunk_size=4)
    y16 = self.run(impl, interpret, *(x.astype(jnp.bfloat16) for x in args[:5]), args[5],
                   chunk_size=4)  # fmt: skip
    assert y16.dtype == jnp.bfloat16
    assert_rel_rms(y16, y32, BF16_RTOL, "bf16 y")


def test_gated_gradients_match_core():
  """The gated hybrid's gradients equal autodiff of lola_prefill(cache_size=0)."""
  args = make_inputs(4, 1, 10, 2, 1)
  cfg = LoLAConfig(chunk_size=4, cache_size=0, mix="gated", implementation="xla")
  f = lambda *xs: jnp.sum(
    jnp.sin(3.0 * hybrid_attention(*xs, chunk_size=4, implementation="pallas"))
  )
  r = lambda *xs: jnp.sum(jnp.sin(3.0 * lola_prefill(*xs, config=cfg)[0]))
  for g, gr in zip(
    jax.grad(f, argnums=range(6))(*args), jax.grad(r, argnums=range(6))(*args), strict=True
  ):
    assert_rel_rms(g, gr, 1e-5, "grad")


def test_bad_input_raises():
  q, k, v, pq, pk, g = make_inputs(5, 1, 4, 2, 1)
  with pytest.raises(ValueError, match="gate"):
    hybrid_attention(q, k, v, pq, pk, g[:1])
  with pytest.raises(ValueError, match="phi_k"):
    hybrid_attention(q, k, v, pq, pk[..., :2], g)
  with pytest.raises(ValueError, match="mix"):
    hybrid_attention(q, k, v, pq, pk, g, mix="sum")


@pytest.mark.slow  # Triton lowering is checked in the default suite by test_kernels_export
@pytest.mark.parametrize("mix", ["gated", "lolcats"])
def test_triton_smoke(mix):
  """The chunk-parallel Triton family interpreted on CPU (its full class run is slow), with a
  chunk of 3 (padded to 16 rows per chunk, the padding masked): forward vs float64 and
  gradients vs XLA."""
  args = make_inputs(6, 1, 11, 4, 2)
  y = hybrid_attention(*args, chunk_size=3, mix=mix, implementation="pallas_triton")
  assert_rel_rms(y, numpy_hybrid(*args, 3, mix), 1e-5, "y vs numpy")
  loss = lambda impl: (
    lambda *xs: jnp.sum(
      jnp.sin(3.0 * hybrid_attention(*xs, chunk_size=3, mix=mix, implementation=impl))
    )
  )
  grads = jax.grad(loss("pallas_triton"), argnums=range(6))(*args)
  ref = jax.grad(loss("xla"), argnums=range(6))(*args)
  for name, g, r in zip(["q", "k", "v", "phi_q", "phi_k", "gate"], grads, ref, strict=True):
    assert_rel_rms(g, r, 1e-5, f"d{name}")


@pytest.mark.slow  # the Mosaic interpreter; generic interpret mode stays in the default suite
@pytest.mark.skipif(TPU_INTERPRET is None, reason="installed JAX has no pltpu.InterpretParams")
def test_tpu_interpret_smoke():
  """The TPU kernels under the Mosaic-TPU interpreter (scratch carried across the chunk axis,
  the reverse walk's index maps): lolcats forward vs float64 and gradients vs XLA, GQA, a chunk
  of 3 padded to 8 rows, T % C != 0."""
  args = make_inputs(7, 1, 8, 2, 1)
  run = lambda impl, interp: (
    lambda *xs: hybrid_attention(
      *xs, chunk_size=3, mix="lolcats", implementation=impl, interpret=interp
    )
  )
  y = run("pallas_tpu", TPU_INTERPRET)(*args)
  assert_rel_rms(y, numpy_hybrid(*args, 3, "lolcats"), 1e-5, "y vs numpy")
  loss = lambda f: lambda *xs: jnp.sum(jnp.sin(3.0 * f(*xs)))
  grads = jax.grad(loss(run("pallas_tpu", TPU_INTERPRET)), argnums=range(6))(*args)
  ref = jax.grad(loss(run("xla", None)), argnums=range(6))(*args)
  for name, g, r in zip(["q", "k", "v", "phi_q", "phi_k", "gate"], grads, ref, strict=True):
    assert_rel_rms(g, r, 1e-5, f"d{name}")
