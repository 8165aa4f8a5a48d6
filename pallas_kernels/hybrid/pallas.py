"""The fused hybrid (LoLA with an empty cache) as one Pallas kernel, forward and backward.

Semantics: `pallas_kernels.hybrid.xla` (terraced window of chunk n-1 plus the causal part of chunk
n with exact softmax, linear state over chunks <= n-2, gated mix in log space or lolcats mix).

Forward, one program per (batch row, query head), walking the chunks with the linear state (H, s)
resident: for chunk n the [C, 2C] window logits, the softmax statistics (m, S, N), the read-out
a = phi_q H, z = phi_q s, the mix y = (w_s N + w_l a) / (w_s S + w_l z), then H, s absorb chunk
n-1. Saved per row: L = m - log w_s + log den (so the normalised softmax weight of key i is
P_i = e^{l_i - L}) and rho = w_l / den (the weight of the linear read-out: y = P V + rho a).

Backward, with delta = dy . y:

    dl_i = P_i (dy . v_i - delta)         (lolcats adds -[i = argmax] sum_j dl_j through m)
    dq = scale dl K_w        dK_w = scale dl^T q        dV_w = P^T dy
    dphi_q = rho dy H^T - rho delta s^T                  (forward walk, H before the chunk)
    dH_n = phi_q^T (rho dy),  ds_n = -phi_q^T (rho delta); chunk j's phi_k, v receive
    R_j = sum_{n >= j+2} dH_n:  dphi_k_j = v_j R_j^T + 1 r_j^T,  dv_j += phi_k_j R_j  (reverse walk)
    d log g_t = sum_i dl_i (lolcats: before the max term), d log(1-g)_t = -sum_i dl_i (gated,
    whose output depends on log g - log(1-g) only; 0 for lolcats): the cotangents of the gate's
    log terms, which a caller holding the gate's logit x turns into a finite dx however
    saturated the gate (`pallas_kernels.equations`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import F32, NEG, dot, head_outputs, head_specs
from pallas_kernels.equations import mix_branches, mix_weights


def _window(i, c, q_ref, k_ref, v_ref, scale):
  """Scaled logits of chunk i's queries against chunks i-1 (lp) and i (lc) and their masks."""
  cur = pl.ds(pl.multiple_of(i * c, c), c)
  prv = pl.ds(pl.multiple_of(jnp.maximum(i - 1, 0) * c, c), c)
  q = q_ref[cur, :].astype(F32)
  kp, kc = k_ref[prv, :].astype(F32), k_ref[cur, :].astype(F32)
  vp, vc = v_ref[prv, :].astype(F32), v_ref[cur, :].astype(F32)
  row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  okp = jnp.broadcast_to(i > 0, (c, c))
  okc = row >= col
  lp = jnp.where(okp, dot(q, kp, tb=True) * scale, NEG)
  lc = jnp.where(okc, dot(q, kc, tb=True) * scale, NEG)
  return cur, prv, q, kp, kc, vp, vc, lp, lc, okp, okc


def _fwd_kernel(
  q_ref, k_ref, v_ref, pq_ref, pk_ref, lg_ref, lg1_ref, y_ref, lse_ref, rho_ref,
  *, c, n, scale, mix,
):  # fmt: skip
  lg, lg1 = lg_ref[...], lg1_ref[...]  # [1, 1] log g, log(1-g)

  def body(i, carry):
    h, s = carry
    cur, prv, q, kp, kc, vp, vc, lp, lc, okp, okc = _window(i, c, q_ref, k_ref, v_ref, scale)
    m = jnp.maximum(jnp.max(lp, axis=1, keepdims=True), jnp.max(lc, axis=1, keepdims=True))
    pp = jnp.where(okp, jnp.exp(lp - m), 0.0)
    pc = jnp.where(okc, jnp.exp(lc - m), 0.0)
    s_soft = jnp.sum(pp, axis=1, keepdims=True) + jnp.sum(pc, axis=1, keepdims=True)
    n_soft = dot(pp, vp) + dot(pc, vc)
    pq = pq_ref[cur, :].astype(F32)
    a = dot(pq, h)
    z = jnp.sum(pq * s, axis=1, keepdims=True)
    w_s, w_l = mix_weights(m, z, jnp.exp(lg), mix, log_gate=lg, log_1m_gate=lg1)
    y, den = mix_branches(w_s, w_l, s_soft, n_soft, a, z)
    y_ref[cur, :] = y
    lse_ref[cur, :] = m - jnp.log(w_s) + jnp.log(den)
    rho_ref[cur, :] = w_l / den
    # Chunk n-1 leaves the window: absorb it (nothing to absorb at n = 0).
    keep = (i > 0).astype(F32)
    pk = pk_ref[prv, :].astype(F32) * keep
    return h + dot(pk, vp, ta=True), s + jnp.sum(pk, axis=0, keepdims=True)

  d, dv = pq_ref.shape[1], v_ref.shape[1]
  jax.lax.fori_loop(0, n, body, (jnp.zeros((d, dv), F32), jnp.zeros((1, d), F32)))


def _bwd_kernel(
  q_ref, k_ref, v_ref, pq_ref, pk_ref, lg_ref, lg1_ref, dy_ref, y_ref, lse_ref, rho_ref,
  dq_ref, dk_ref, dv_ref, dpq_ref, dpk_ref, dg_ref, *, c, n, scale, mix,
):  # fmt: skip
  d, dvd = pq_ref.shape[1], v_ref.shape[1]

  def fwd_body(i, carry):
    h, s = carry
    cur, prv, q, kp, kc, vp, vc, lp, lc, okp, okc = _window(i, c, q_ref, k_ref, v_ref, scale)
    dy, y = dy_ref[cur, :].astype(F32), y_ref[cur, :]
    lse, rho = lse_ref[cur, :], rho_ref[cur, :]
    delta = jnp.sum(dy * y, axis=1, keepdims=True)
    pp = jnp.where(okp, jnp.exp(lp - lse), 0.0)
    pc = jnp.where(okc, jnp.exp(lc - lse), 0.0)
    dlp = pp * (dot(dy, vp, tb=True) - delta)
    dlc = pc * (dot(dy, vc, tb=True) - delta)
    tot = jnp.sum(dlp, axis=1, keepdims=True) + jnp.sum(dlc, axis=1, keepdims=True)
    dg_ref[cur, :] = tot  # d log g (d log(1-g) = -tot for gated, 0 for lolcats: _hybrid_bwd)
    if mix == "lolcats":
      m = jnp.maximum(jnp.max(lp, axis=1, keepdims=True), jnp.max(lc, axis=1, keepdims=True))
      ip = jnp.where(okp & (lp == m), 1.0, 0.0)
      ic = jnp.where(okc & (lc == m), 1.0, 0.0)
      share = tot / (jnp.sum(ip, axis=1, keepdims=True) + jnp.sum(ic, axis=1, keepdims=True))
      dlp, dlc = dlp - ip * share, dlc - ic * share
    dq_ref[cur, :] = scale * (dot(dlp, kp) + dot(dlc, kc))
    dk_ref[cur, :] = scale * dot(dlc, q, ta=True)
    dv_ref[cur, :] = dot(pc, dy, ta=True)
    dk_ref[prv, :] += scale * dot(dlp, q, ta=True)  # zero at i = 0 (pp, dlp are masked)
    dv_ref[prv, :] += dot(pp, dy, ta=True)
    dpq_ref[cur, :] = rho * (dot(dy, h, tb=True) - delta * s)
    keep = (i > 0).astype(F32)
    pk = pk_ref[prv, :].astype(F32) * keep
    return h + dot(pk, vp, ta=True), s + jnp.sum(pk, axis=0, keepdims=True)

  jax.lax.fori_loop(0, n, fwd_body, (jnp.zeros((d, dvd), F32), jnp.zeros((1, d), F32)))

  def rev_body(jj, carry):
    r, rs = carry  # cotangents of the state read by chunks >= j + 2
    j = n - 1 - jj
    cur = pl.ds(pl.multiple_of(j * c, c), c)
    pk, v = pk_ref[cur, :].astype(F32), v_ref[cur, :].astype(F32)
    dpk_ref[cur, :] = dot(v, r, tb=True) + rs
    dv_ref[cur, :] += dot(pk, r)
    # Add the state cotangent of chunk j + 1's queries for the next (earlier) chunk.
    nxt = pl.ds(pl.multiple_of(jnp.minimum(j + 1, n - 1) * c, c), c)
    keep = (j + 1 < n).astype(F32)
    pq = pq_ref[nxt, :].astype(F32) * keep
    dy, y, rho = dy_ref[nxt, :].astype(F32), y_ref[nxt, :], rho_ref[nxt, :]
    delta = jnp.sum(dy * y, axis=1, keepdims=True)
    return r + dot(pq, rho * dy, ta=True), rs - jnp.sum(pq * (rho * delta), axis=0, keepdims=True)

  jax.lax.fori_loop(0, n, rev_body, (jnp.zeros((d, dvd), F32), jnp.zeros((1, d), F32)))


def _in_specs(group, tp, dk, dv, d):
  """Specs of (q, k, v, phi_q, phi_k, log g, log(1-g)) over grid (B, Hq)."""
  return (
    head_specs(
      group,
      [("q", (tp, dk)), ("kv", (tp, dk)), ("kv", (tp, dv)), ("q", (tp, d)), ("kv", (tp, d))],
    )
    + [pl.BlockSpec((pl.squeezed, 1, 1), lambda b, h: (h, 0, 0))] * 2
  )


def _forward(q, k, v, pq, pk, lg, lg1, *, c, scale, mix, interpret):
  b, hq, tp, dk = q.shape
  hkv, dv, d = v.shape[1], v.shape[3], pq.shape[3]
  out_shape, out_specs = head_outputs(b, hq, [(tp, dv), (tp, 1), (tp, 1)])
  return pl.pallas_call(
    functools.partial(_fwd_kernel, c=c, n=tp // c, scale=scale, mix=mix),
    out_shape=out_shape,
    grid=(b, hq),
    in_specs=_in_specs(hq // hkv, tp, dk, dv, d),
    out_specs=out_specs,
    interpret=interpret,
    name="lola_hybrid_fwd",
  )(q, k, v, pq, pk, lg, lg1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _hybrid_core(q, k, v, pq, pk, lg, lg1, c, scale, mix, interpret):
  """q [B,Hq,Tp,dk] k [B,Hkv,Tp,dk] v [B,Hkv,Tp,dv] pq [B,Hq,Tp,D] pk [B,Hkv,Tp,D]; lg, lg1
  [Hq] log g and log(1-g) (the kernels take g = e^{lg} for lolcats)."""
  return _hybrid_fwd(q, k, v, pq, pk, lg, lg1, c, scale, mix, interpret)[0]


def _per_head(x):
  return x.astype(F32).reshape(-1, 1, 1)


def _hybrid_fwd(q, k, v, pq, pk, lg, lg1, c, scale, mix, interpret):
  y, lse, rho = _forward(
    q, k, v, pq, pk, _per_head(lg), _per_head(lg1), c=c, scale=scale, mix=mix,
    interpret=interpret,
  )  # fmt: skip
  return y, (q, k, v, pq, pk, lg, lg1, y, lse, rho)


def _hybrid_bwd(c, scale, mix, interpret, res, dy):
  q, k, v, pq, pk, lg_h, lg1_h, y, lse, rho = res
  b, hq, tp, dk = q.shape
  hkv, dv, d = v.shape[1], v.shape[3], pq.shape[3]
  lg, lg1 = _per_head(lg_h), _per_head(lg1_h)
  out_shape, out_specs = head_outputs(
    b, hq, [(tp, dk), (tp, dk), (tp, dv), (tp, d), (tp, d), (tp, 1)]
  )
  dq, dk_, dv_, dpq, dpk, dg = pl.pallas_call(
    functools.partial(_bwd_kernel, c=c, n=tp // c, scale=scale, mix=mix),
    out_shape=out_shape,
    grid=(b, hq),
    in_specs=_in_specs(hq // hkv, tp, dk, dv, d)
    + head_specs(1, [("q", (tp, dv)), ("q", (tp, dv)), ("q", (tp, 1)), ("q", (tp, 1))]),
    out_specs=out_specs,
    interpret=interpret,
    name="lola_hybrid_bwd",
  )(q, k, v, pq, pk, lg, lg1, dy.astype(F32), y, lse, rho)
  dlg = dg.sum(axis=(0, 2, 3))  # [Hq]
  return (
    dq.astype(q.dtype),
    common.group_sum(dk_, hkv).astype(k.dtype),
    common.group_sum(dv_, hkv).astype(v.dtype),
    dpq.astype(pq.dtype),
    common.group_sum(dpk, hkv).astype(pk.dtype),
    dlg.astype(lg_h.dtype),
    (-dlg if mix == "gated" else jnp.zeros_like(dlg)).astype(lg1_h.dtype),
  )


_hybrid_core.defvjp(_hybrid_fwd, _hybrid_bwd)


def hybrid_attention_pallas(
  q, k, v, phi_q, phi_k, gates, *, chunk_size, mix, softmax_scale, block_sizes=None, interpret=None
):
  """Pads (time to whole chunks, feature dims to the block sizes), runs the kernel, crops.
  `gates`: (g, log g, log(1-g)), each [Hq] (`equations.gate_terms`); the kernels read the logs
  (g = e^{log g} for lolcats)."""
  bs = block_sizes or common.BlockSizes.get_default()
  interpret = common.interpret_mode() if interpret is None else interpret
  t, dk, dv, d = q.shape[1], q.shape[3], v.shape[3], phi_q.shape[3]
  c = chunk_size
  tp = -(-t // c) * c
  scale = dk**-0.5 if softmax_scale is None else float(softmax_scale)
  dkp, dvp = bs.pad_dim(dk, bs.key_multiple), bs.pad_dim(dv, bs.value_multiple)
  dp = bs.pad_dim(d, bs.feature_multiple)
  y = _hybrid_core(
    common.to_heads(q, tp, dkp),
    common.to_heads(k, tp, dkp),
    common.to_heads(v, tp, dvp),
    common.to_heads(phi_q, tp, dp),
    common.to_heads(phi_k, tp, dp),
    gates[1],
    gates[2] if mix == "gated" else jax.lax.stop_gradient(gates[2]),  # lolcats: unread
    c,
    scale,
    mix,
    interpret,
  )
  return common.from_heads(y, t, dv)
