"""Chunk-parallel fused hybrid (LoLA with an empty cache) for GPUs: Triton Pallas kernels.

Same function and notation as `hybrid.pallas` (equations there). Every chunk's window is
independent once the linear state at its start is known, so the GPU form computes that state for
all chunks first and then every chunk at once:

  1. increments and prefix (XLA)   H_n = sum_{m <= n-2} phi_k_m^T v_m,  s_n likewise
  2. outputs (Pallas)              grid B x Hq x n_chunks x value tiles: window softmax over
                                   chunks n-1 and n, read-out phi_q H_n, the mix; saves
                                   L = m - log w_s + log den and rho = w_l / den per row

Backward: one kernel per (batch row, query head, chunk) recomputes the window softmax and writes
dq, sum_i dl_i (for d log g) and the window's key/value cotangents split by the chunk they belong
to (its own, and the previous one: added one chunk shifted in XLA). The linear branch's
cotangents are batched matmuls over chunks in XLA: dphi_q_n = rho (dy H_n^T - delta s_n^T),
dH_n = phi_q_n^T (rho dy), R_j = sum_{n >= j+2} dH_n, dphi_k_j = v_j R_j^T + 1 r_j^T,
dv_j += phi_k_j R_j.

Triton parameters are explicit (`common.compiler_params("pallas_triton")`); each chunk is padded
to a power of two >= 16 rows (padded keys masked, rows cropped), so any chunk size compiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import F32, HIGHEST, dot
from pallas_kernels.equations import mix_branches, mix_weights
from pallas_kernels.hybrid.pallas import _logits, _row_max, _run, _softmax_grads

VALUE_TILE = 64
SQ = pl.squeezed


def _fwd_kernel(q_ref, k_ref, kp_ref, v_ref, vp_ref, pq_ref, h_ref, s_ref, lg_ref, lg1_ref,
                y_ref, lse_ref, rho_ref, *, c, scale, mix, precision):  # fmt: skip
  i = pl.program_id(2)
  mm = functools.partial(dot, precision=precision, dtype=q_ref.dtype)
  q = q_ref[...]
  lp, lc, okp, okc = _logits(q, kp_ref[...], k_ref[...], i > 0, c, scale, mm)
  m = _row_max(lp, lc)
  pp = jnp.where(okp, jnp.exp(lp - m), 0.0)
  pc = jnp.where(okc, jnp.exp(lc - m), 0.0)
  s_soft = jnp.sum(pp, axis=1, keepdims=True) + jnp.sum(pc, axis=1, keepdims=True)
  n_soft = mm(pp, vp_ref[...]) + mm(pc, v_ref[...])
  pq = pq_ref[...]
  a = mm(pq, h_ref[...])
  z = jnp.sum(pq.astype(F32) * s_ref[...], axis=1, keepdims=True)
  lg, lg1 = lg_ref[...], lg1_ref[...]
  w_s, w_l = mix_weights(m, z, jnp.exp(lg), mix, log_gate=lg, log_1m_gate=lg1)
  y, den = mix_branches(w_s, w_l, s_soft, n_soft, a, z)
  y_ref[...] = y.astype(y_ref.dtype)
  lse_ref[...] = m - jnp.log(w_s) + jnp.log(den)  # the same in every value tile
  rho_ref[...] = w_l / den


def _bwd_kernel(q_ref, k_ref, kp_ref, v_ref, vp_ref, dy_ref, y_ref, lse_ref, dq_ref, dg_ref,
                dkc_ref, dkp_ref, dvc_ref, dvp_ref, *, c, scale, mix, precision):  # fmt: skip
  i = pl.program_id(2)
  mm = functools.partial(dot, precision=precision, dtype=q_ref.dtype)
  q, k, kp = q_ref[...], k_ref[...], kp_ref[...]
  dy = dy_ref[...]
  pp, pc, dlp, dlc, tot, _ = _softmax_grads(
    q, kp, k, vp_ref[...], v_ref[...], dy, y_ref[...], lse_ref[...], i > 0, c, scale, mix, mm
  )
  dq_ref[...] = (scale * (mm(dlp, kp) + mm(dlc, k))).astype(dq_ref.dtype)
  dg_ref[...] = tot
  dkc_ref[...] = scale * mm(dlc, q, ta=True)
  dkp_ref[...] = scale * mm(dlp, q, ta=True)
  dvc_ref[...] = mm(pc, dy, ta=True)
  dvp_ref[...] = mm(pp, dy, ta=True)


def _chunked(x, cp):  # [B, H, n * cp, X] -> [B, H, n, cp, X]
  b, h, tp, xd = x.shape
  return x.reshape(b, h, tp // cp, cp, xd)


def _shift(x, k):
  """x[:, :, n - k] along the chunk axis (zeros for n < k)."""
  pad = [(0, 0), (0, 0), (k, 0)] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(x, pad)[:, :, : x.shape[2]]


def _states(pk, v, cp):
  """Linear state at the start of every chunk: chunks <= n-2. [B,Hkv,n,D,dv], [B,Hkv,n,1,D]."""
  pkc, vc = _chunked(pk, cp).astype(F32), _chunked(v, cp).astype(F32)
  inc_h = jnp.einsum("bhncd,bhncv->bhndv", pkc, vc, precision=HIGHEST)
  inc_s = pkc.sum(3)[:, :, :, None, :]
  return _shift(jnp.cumsum(inc_h, axis=2), 2), _shift(jnp.cumsum(inc_s, axis=2), 2)


def _specs(group, cp, dk, dv, d, bv):
  kvh = lambda h: common.kv_head(h, group)
  prev = lambda i: jnp.maximum(i - 1, 0)
  return dict(
    q=pl.BlockSpec((SQ, SQ, cp, dk), lambda b, h, i, *j: (b, h, i, 0)),
    k=pl.BlockSpec((SQ, SQ, cp, dk), lambda b, h, i, *j: (b, kvh(h), i, 0)),
    kp=pl.BlockSpec((SQ, SQ, cp, dk), lambda b, h, i, *j: (b, kvh(h), prev(i), 0)),
    v=pl.BlockSpec((SQ, SQ, cp, bv), lambda b, h, i, *j: (b, kvh(h), i, j[0] if j else 0)),
    vp=pl.BlockSpec((SQ, SQ, cp, bv), lambda b, h, i, *j: (b, kvh(h), prev(i), j[0] if j else 0)),
    pq=pl.BlockSpec((SQ, SQ, cp, d), lambda b, h, i, *j: (b, h, i, 0)),
    h=pl.BlockSpec((SQ, SQ, SQ, d, bv), lambda b, h, i, *j: (b, kvh(h), i, 0, j[0] if j else 0)),
    s=pl.BlockSpec((SQ, SQ, SQ, 1, d), lambda b, h, i, *j: (b, kvh(h), i, 0, 0)),
    gate=pl.BlockSpec((SQ, 1, 1), lambda b, h, i, *j: (h, 0, 0)),
    y=pl.BlockSpec((SQ, SQ, cp, bv), lambda b, h, i, *j: (b, h, i, j[0] if j else 0)),
    row=pl.BlockSpec((SQ, SQ, cp, 1), lambda b, h, i, *j: (b, h, i, 0)),
    ok=pl.BlockSpec((SQ, SQ, cp, dk), lambda b, h, i, *j: (b, h, i, 0)),
    ov=pl.BlockSpec((SQ, SQ, cp, dv), lambda b, h, i, *j: (b, h, i, 0)),
  )


def _forward(q, k, v, pq, lg, lg1, hn, sn, *, c, cp, scale, mix, precision, interpret):
  b, hq, tp, dk = q.shape
  hkv, dv, d = v.shape[1], v.shape[3], pq.shape[3]
  bv = min(dv, VALUE_TILE)
  sp = _specs(hq // hkv, cp, dk, dv, d, bv)
  return common.pallas_call(
    functools.partial(_fwd_kernel, c=c, scale=scale, mix=mix, precision=precision),
    target="pallas_triton",
    interpret=interpret,
    compiler_params=common.compiler_params("pallas_triton", num_warps=4, num_stages=2),
    out_shape=[
      jax.ShapeDtypeStruct((b, hq, tp, dv), q.dtype),
      jax.ShapeDtypeStruct((b, hq, tp, 1), F32),
      jax.ShapeDtypeStruct((b, hq, tp, 1), F32),
    ],
    grid=(b, hq, tp // cp, dv // bv),
    in_specs=[sp[x] for x in ("q", "k", "kp", "v", "vp", "pq", "h", "s", "gate", "gate")],
    out_specs=[sp["y"], sp["row"], sp["row"]],
    name="lola_hybrid_triton_fwd",
  )(q, k, k, v, v, pq, hn, sn, lg, lg1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _hybrid_core(q, k, v, pq, pk, lg, lg1, c, cp, scale, mix, precision, interpret):
  """Shapes as `hybrid.pallas._hybrid_core`."""
  return _hybrid_fwd(q, k, v, pq, pk, lg, lg1, c, cp, scale, mix, precision, interpret)[0]


def _per_head(x):
  return x.astype(F32).reshape(-1, 1, 1)


def _hybrid_fwd(q, k, v, pq, pk, lg, lg1, c, cp, scale, mix, precision, interpret):
  hn, sn = _states(pk, v, cp)
  y, lse, rho = _forward(
    q, k, v, pq, _per_head(lg), _per_head(lg1), hn, sn, c=c, cp=cp, scale=scale, mix=mix,
    precision=precision, interpret=interpret,
  )  # fmt: skip
  return y, (q, k, v, pq, pk, lg, lg1, hn, sn, y, lse, rho)


def _hybrid_bwd(c, cp, scale, mix, precision, interpret, res, dy):
  q, k, v, pq, pk, lg_h, lg1_h, hn, sn, y, lse, rho = res
  b, hq, tp, dk = q.shape
  hkv, dv, d = v.shape[1], v.shape[3], pq.shape[3]
  group, n = hq // hkv, tp // cp
  dy = dy.astype(y.dtype)
  sp = _specs(group, cp, dk, dv, d, dv)
  dq, dg, dkc, dkp, dvc, dvp = common.pallas_call(
    functools.partial(_bwd_kernel, c=c, scale=scale, mix=mix, precision=precision),
    target="pallas_triton",
    interpret=interpret,
    compiler_params=common.compiler_params("pallas_triton", num_warps=4, num_stages=2),
    out_shape=[
      jax.ShapeDtypeStruct((b, hq, tp, dk), q.dtype),
      jax.ShapeDtypeStruct((b, hq, tp, 1), F32),
    ]
    + [jax.ShapeDtypeStruct((b, hq, tp, x), F32) for x in (dk, dk, dv, dv)],  # fmt: skip
    grid=(b, hq, n),
    in_specs=[sp[x] for x in ("q", "k", "kp", "v", "vp")] + [sp["ov"], sp["ov"], sp["row"]],
    out_specs=[sp["ok"], sp["row"], sp["ok"], sp["ok"], sp["ov"], sp["ov"]],
    name="lola_hybrid_triton_bwd",
  )(q, k, k, v, v, dy, y, lse)
  # Window keys: their own chunk's queries, and the next chunk's (shifted back by one chunk).
  nxt = lambda x: jnp.pad(_chunked(x, cp)[:, :, 1:], [(0, 0), (0, 0), (0, 1), (0, 0), (0, 0)])
  dk_ = _chunked(dkc, cp) + nxt(dkp)
  dv_ = _chunked(dvc, cp) + nxt(dvp)
  # The linear branch, batched over chunks.
  grouped = lambda x: x.reshape(b, hkv, group, *x.shape[2:])
  dyc = grouped(_chunked(dy, cp).astype(F32))  # [B, Hkv, G, n, Cp, dv]
  yc = grouped(_chunked(y, cp).astype(F32))
  rhoc = grouped(_chunked(rho, cp))
  pqc = grouped(_chunked(pq, cp).astype(F32))
  delta = jnp.sum(dyc * yc, axis=-1, keepdims=True)
  dpq = rhoc * (
    jnp.einsum("bhgncv,bhndv->bhgncd", dyc, hn, precision=HIGHEST) - delta * sn[:, :, None]
  )
  inc_h = jnp.einsum("bhgncd,bhgncv->bhndv", pqc, rhoc * dyc, precision=HIGHEST)
  inc_s = -jnp.einsum("bhgncd,bhgnc->bhnd", pqc, (rhoc * delta)[..., 0], precision=HIGHEST)
  rev = lambda x: jnp.flip(jnp.cumsum(jnp.flip(x, 2), axis=2), 2)  # sum over m >= n
  r = jnp.pad(rev(inc_h)[:, :, 2:], [(0, 0), (0, 0), (0, 2), (0, 0), (0, 0)])  # m >= j + 2
  rs = jnp.pad(rev(inc_s)[:, :, 2:], [(0, 0), (0, 0), (0, 2), (0, 0)])
  pkc, vc = _chunked(pk, cp).astype(F32), _chunked(v, cp).astype(F32)
  dpk = jnp.einsum("bhncv,bhndv->bhncd", vc, r, precision=HIGHEST) + rs[:, :, :, None, :]
  dv_lin = jnp.einsum("bhncd,bhndv->bhncv", pkc, r, precision=HIGHEST)
  unchunk = lambda x: x.reshape(x.shape[0], x.shape[1], tp, x.shape[-1])
  dlg = dg.sum(axis=(0, 2, 3))  # [Hq]
  return (
    dq,
    common.group_sum(unchunk(dk_), hkv).astype(k.dtype),
    (common.group_sum(unchunk(dv_), hkv) + unchunk(dv_lin)).astype(v.dtype),
    dpq.reshape(b, hq, tp, d).astype(pq.dtype),
    unchunk(dpk).astype(pk.dtype),
    dlg.astype(lg_h.dtype),
    (-dlg if mix == "gated" else jnp.zeros_like(dlg)).astype(lg1_h.dtype),
  )


_hybrid_core.defvjp(_hybrid_fwd, _hybrid_bwd)


def hybrid_attention_triton(
  q, k, v, phi_q, phi_k, gates, *, chunk_size, mix, softmax_scale, block_sizes=None,
  precision=common.DEFAULT, interpret=None,
):  # fmt: skip
  """Pads each chunk to a power of two >= 16 rows and the dims to powers of two, runs the
  chunk-parallel kernels, crops. Arguments as `hybrid.pallas.hybrid_attention_pallas`."""
  bs = block_sizes or common.BlockSizes.for_target("pallas_triton")
  cp = max(16, common._next_pow2(chunk_size))
  return _run(_hybrid_core, q, k, v, phi_q, phi_k, gates, chunk_size=chunk_size, mix=mix,
              softmax_scale=softmax_scale, bs=bs, cp=cp, precision=precision,
              interpret=interpret)  # fmt: skip
