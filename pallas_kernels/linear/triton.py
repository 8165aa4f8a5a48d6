"""Chunk-parallel causal linear attention for GPUs: Triton Pallas kernels between XLA prefixes.

Same function as `linear.pallas` (equations there). A GPU wants every chunk in flight at once, not
a sequential walk, so the chunked algorithm is split at its one sequential step, the prefix of the
state over chunks (the "chunk" form of flash-linear-attention):

  1. per-chunk increments   dH_n = phi_k_n^T v_n,  ds_n = phi_k_n^T 1        (XLA, batched)
  2. exclusive prefix       H_n = H_0 + sum_{m<n} dH_m,  s_n likewise          (XLA cumsum)
  3. every chunk's output   y_n = (phi_q_n H_n + A_n v_n) / (phi_q_n s_n + A_n 1 + eps)
                            (Pallas, grid B x Hq x n_chunks x value tiles of `VALUE_TILE`)

The backward mirrors it: g = dy / den and gd = -(dy . y) / den, the state cotangent after each
chunk by a reverse exclusive prefix of phi_q_m^T g_m (XLA), then one kernel per (chunk, value
tile) computes dphi_q, dphi_k (partial sums over value tiles, added in XLA) and dv.

Compiled with explicit Triton parameters (`common.compiler_params("pallas_triton")`): with them a
plain `pallas_call` compiles with Triton in JAX 0.10 (without, it goes to Mosaic GPU). Block dims
are powers of two >= 16 (`BlockSizes.get_default("triton")`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import F32, HIGHEST, dot

SQ = pl.squeezed
VALUE_TILE = 64  # value columns per program (H_n tile [D, 64] f32 stays in registers)


def _causal_mask(c):
  row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return row >= col


def _fwd_kernel(q_ref, k_ref, v_ref, h_ref, s_ref, y_ref, den_ref, *, eps, precision):
  # q_ref, k_ref [C, D]  v_ref [C, bv]  h_ref [D, bv] (state before the chunk)  s_ref [1, D]
  cdt = q_ref.dtype
  mm = functools.partial(dot, precision=precision, dtype=cdt)
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  a = jnp.where(_causal_mask(q.shape[0]), mm(q, k, tb=True), 0.0)
  den = jnp.sum(q.astype(F32) * s_ref[...], axis=1, keepdims=True)
  den = den + jnp.sum(a, axis=1, keepdims=True) + eps
  y_ref[...] = ((mm(q, h_ref[...]) + mm(a, v)) / den).astype(y_ref.dtype)
  den_ref[...] = den  # the same in every value tile


def _bwd_kernel(q_ref, k_ref, v_ref, dy_ref, dyt_ref, yt_ref, den_ref, h_ref, s_ref, dh_ref,
                ds_ref, dq_ref, dk_ref, dv_ref, *, precision):  # fmt: skip
  # value tile j: v_ref, dy_ref [C, bv]; dyt_ref, yt_ref [C, dv] whole rows (for dy . y);
  # h_ref [D, bv] state before the chunk, dh_ref [D, bv] its cotangent after the chunk.
  cdt = q_ref.dtype
  mm = functools.partial(dot, precision=precision, dtype=cdt)
  first = (pl.program_id(3) == 0).astype(F32)  # the scalar column [.., 1] counts once
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  den = den_ref[...]
  g = dy_ref[...].astype(F32) / den
  delta = jnp.sum(dyt_ref[...].astype(F32) * yt_ref[...].astype(F32), axis=1, keepdims=True)
  gd = -first * delta / den
  mask = _causal_mask(q.shape[0])
  a = jnp.where(mask, mm(q, k, tb=True), 0.0)
  da = jnp.where(mask, mm(g, v, tb=True) + gd, 0.0)
  dq_ref[...] = mm(g, h_ref[...], tb=True) + gd * s_ref[...] + mm(da, k)
  dk_ref[...] = mm(v, dh_ref[...], tb=True) + first * ds_ref[...] + mm(da, q, ta=True)
  dv_ref[...] = mm(k, dh_ref[...]) + mm(a, g, ta=True)


def _chunked(x, c):  # [B, H, n * c, X] -> [B, H, n, c, X]
  b, h, tp, xd = x.shape
  return x.reshape(b, h, tp // c, c, xd)


def _states(k, v, h0, s0, c):
  """Exclusive prefix of the per-chunk increments: H_n [B,Hkv,n,D,dv], s_n [B,Hkv,n,1,D] (state
  before chunk n) and the final state."""
  kc, vc = _chunked(k, c).astype(F32), _chunked(v, c).astype(F32)
  inc_h = jnp.einsum("bhncd,bhncv->bhndv", kc, vc, precision=HIGHEST)
  inc_s = kc.sum(3)[:, :, :, None, :]
  cum_h = jnp.cumsum(inc_h, axis=2)
  cum_s = jnp.cumsum(inc_s, axis=2)
  hn = h0[:, :, None] + cum_h - inc_h
  sn = s0[:, :, None] + cum_s - inc_s
  return hn, sn, h0 + cum_h[:, :, -1], s0 + cum_s[:, :, -1]


def _specs(group, c, d, bv, dvp, with_tile=True):
  """BlockSpecs over the grid (B, Hq, n, value tiles)."""
  kvh = lambda h: common.kv_head(h, group)
  return dict(
    q=pl.BlockSpec((SQ, SQ, c, d), lambda b, h, i, j: (b, h, i, 0)),
    k=pl.BlockSpec((SQ, SQ, c, d), lambda b, h, i, j: (b, kvh(h), i, 0)),
    v=pl.BlockSpec((SQ, SQ, c, bv), lambda b, h, i, j: (b, kvh(h), i, j)),
    y=pl.BlockSpec((SQ, SQ, c, bv), lambda b, h, i, j: (b, h, i, j)),
    rows=pl.BlockSpec((SQ, SQ, c, dvp), lambda b, h, i, j: (b, h, i, 0)),
    den=pl.BlockSpec((SQ, SQ, c, 1), lambda b, h, i, j: (b, h, i, 0)),
    h=pl.BlockSpec((SQ, SQ, SQ, d, bv), lambda b, h, i, j: (b, kvh(h), i, 0, j)),
    s=pl.BlockSpec((SQ, SQ, SQ, 1, d), lambda b, h, i, j: (b, kvh(h), i, 0, 0)),
    dh=pl.BlockSpec((SQ, SQ, SQ, d, bv), lambda b, h, i, j: (b, h, i, 0, j)),
    ds=pl.BlockSpec((SQ, SQ, SQ, 1, d), lambda b, h, i, j: (b, h, i, 0, 0)),
    part=pl.BlockSpec((SQ, SQ, SQ, c, d), lambda b, h, i, j: (b, h, j, i, 0)),
  )


def _forward(q, k, v, hn, sn, *, c, eps, precision, interpret):
  b, hq, tp, d = q.shape
  hkv, dvp = v.shape[1], v.shape[3]
  bv = min(dvp, VALUE_TILE)
  sp = _specs(hq // hkv, c, d, bv, dvp)
  return common.pallas_call(
    functools.partial(_fwd_kernel, eps=eps, precision=precision),
    target="pallas_triton",
    interpret=interpret,
    compiler_params=common.compiler_params("pallas_triton", num_warps=4, num_stages=2),
    out_shape=[
      jax.ShapeDtypeStruct((b, hq, tp, dvp), q.dtype),
      jax.ShapeDtypeStruct((b, hq, tp, 1), F32),
    ],
    grid=(b, hq, tp // c, dvp // bv),
    in_specs=[sp["q"], sp["k"], sp["v"], sp["h"], sp["s"]],
    out_specs=[sp["y"], sp["den"]],
    name="lola_linear_attention_triton_fwd",
  )(q, k, v, hn, sn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _linear_core(q, k, v, h0, s0, c, eps, precision, interpret):
  """q [B,Hq,Tp,D]  k [B,Hkv,Tp,D]  v [B,Hkv,Tp,dv]  h0 [B,Hkv,D,dv]  s0 [B,Hkv,1,D]."""
  return _linear_fwd(q, k, v, h0, s0, c, eps, precision, interpret)[0]


def _linear_fwd(q, k, v, h0, s0, c, eps, precision, interpret):
  hn, sn, h, s = _states(k, v, h0, s0, c)
  y, den = _forward(q, k, v, hn, sn, c=c, eps=eps, precision=precision, interpret=interpret)
  return (y, h, s), (q, k, v, hn, sn, y, den)


def _linear_bwd(c, eps, precision, interpret, res, cts):
  del eps
  q, k, v, hn, sn, y, den = res
  dy, dht, dst = cts
  b, hq, tp, d = q.shape
  hkv, dvp = v.shape[1], v.shape[3]
  group, n = hq // hkv, tp // c
  bv = min(dvp, VALUE_TILE)
  dy = dy.astype(y.dtype)
  g = dy.astype(F32) / den
  gd = -jnp.sum(dy.astype(F32) * y.astype(F32), axis=-1, keepdims=True) / den
  qc = _chunked(q, c).astype(F32)
  inc_h = jnp.einsum("bhncd,bhncv->bhndv", qc, _chunked(g, c), precision=HIGHEST)
  inc_s = jnp.einsum("bhncd,bhnc->bhnd", qc, _chunked(gd, c)[..., 0], precision=HIGHEST)
  inc_s = inc_s[:, :, :, None, :]
  # The final-state cotangent enters once per kv head: give it to the group's first query head.
  dht_q = jnp.zeros((b, hq, d, dvp), F32).at[:, ::group].set(dht.astype(F32))
  dst_q = jnp.zeros((b, hq, 1, d), F32).at[:, ::group].set(dst.astype(F32))
  rev_h = jnp.flip(jnp.cumsum(jnp.flip(inc_h, 2), axis=2), 2)  # sum over m >= n
  rev_s = jnp.flip(jnp.cumsum(jnp.flip(inc_s, 2), axis=2), 2)
  dhn = dht_q[:, :, None] + rev_h - inc_h  # cotangent of the state after chunk n
  dsn = dst_q[:, :, None] + rev_s - inc_s
  sp = _specs(group, c, d, bv, dvp)
  nvt = dvp // bv
  dq, dk, dvv = common.pallas_call(
    functools.partial(_bwd_kernel, precision=precision),
    target="pallas_triton",
    interpret=interpret,
    compiler_params=common.compiler_params("pallas_triton", num_warps=4, num_stages=2),
    out_shape=[
      jax.ShapeDtypeStruct((b, hq, nvt, tp, d), F32),
      jax.ShapeDtypeStruct((b, hq, nvt, tp, d), F32),
      jax.ShapeDtypeStruct((b, hq, tp, dvp), F32),
    ],
    grid=(b, hq, n, nvt),
    in_specs=[
      sp["q"],
      sp["k"],
      sp["v"],
      sp["y"],
      sp["rows"],
      sp["rows"],
      sp["den"],
      sp["h"],
      sp["s"],
      sp["dh"],
      sp["ds"],
    ],  # fmt: skip
    out_specs=[sp["part"], sp["part"], sp["y"]],
    name="lola_linear_attention_triton_bwd",
  )(q, k, v, dy, dy, y, den, hn, sn, dhn, dsn)
  dq, dk = dq.sum(2), dk.sum(2)
  # Gradients of the initial state: the cotangent of the state before chunk 0.
  dh0 = common.group_sum(dht_q + rev_h[:, :, 0], hkv)
  ds0 = common.group_sum(dst_q + rev_s[:, :, 0], hkv)
  return (
    dq.astype(q.dtype),
    common.group_sum(dk, hkv).astype(k.dtype),
    common.group_sum(dvv, hkv).astype(v.dtype),
    dh0,
    ds0,
  )


_linear_core.defvjp(_linear_fwd, _linear_bwd)


def linear_attention_triton(phi_q, phi_k, v, *, chunk_size, initial_state, eps, block_sizes=None,
                            precision=common.DEFAULT, interpret=None):  # fmt: skip
  """Pads to powers of two, runs the chunk-parallel kernels, crops. Same contract as
  `linear_attention`; phi_k and v are cast to phi_q's dtype."""
  bs = block_sizes or common.BlockSizes.for_target("pallas_triton")
  b, t, hq, d = phi_q.shape
  hkv, dv = v.shape[2], v.shape[3]
  dt = phi_q.dtype
  c = bs.pad_dim(chunk_size, max(bs.chunk_multiple, 16))
  tp = -(-t // c) * c
  dp, dvp = bs.pad_dim(d, bs.feature_multiple), bs.pad_dim(dv, bs.value_multiple)
  q = common.to_heads(phi_q, tp, dp)
  k = common.to_heads(phi_k.astype(dt), tp, dp)
  vv = common.to_heads(v.astype(dt), tp, dvp)
  if initial_state is None:
    h0 = jnp.zeros((b, hkv, dp, dvp), F32)
    s0 = jnp.zeros((b, hkv, 1, dp), F32)
  else:
    h0 = jnp.pad(initial_state[0].astype(F32), [(0, 0), (0, 0), (0, dp - d), (0, dvp - dv)])
    s0 = jnp.pad(initial_state[1].astype(F32), [(0, 0), (0, 0), (0, dp - d)])[:, :, None, :]
  y, h, s = _linear_core(q, k, vv, h0, s0, c, float(eps), precision, interpret)
  return common.from_heads(y, t, dv), (h[:, :, :d, :dv], s[:, :, 0, :d])
