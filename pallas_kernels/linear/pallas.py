"""Chunked causal linear attention as a Pallas kernel with a hand-written backward pass.

Per batch row and query head i (kv head h = i // (Hq // Hkv)):

    H_t = H_0 + sum_{j<=t} phi_k_j v_j^T      s_t = s_0 + sum_{j<=t} phi_k_j
    y_t = phi_q_t^T H_t / (phi_q_t^T s_t + eps)

Chunked algorithm (chunk c = [nC, (n+1)C), state (H, s) as it stood before the chunk, A the
causally masked [C, C] score matrix phi_q phi_k^T of the chunk):

    y_c = (phi_q_c H + A v_c) / (phi_q_c s + A 1 + eps)
    H <- H + phi_k_c^T v_c        s <- s + phi_k_c^T 1

One kernel program per (batch row, query head) walks all chunks with (H, s) resident in fast
memory (a `fori_loop` carry), so HBM traffic is one read of the inputs and one write of y.

Backward. With g_t = dy_t / den_t (dv) and gd_t = -(dy_t . y_t) / den_t (scalar) the gradient is
that of linear attention with value [v, 1] and output cotangent [g, gd]:

    dA = (g v_c^T + gd 1^T) * mask
    dphi_q_c = g H^T + gd s^T + dA phi_k_c                       (forward walk, H before chunk)
    dphi_k_c = v_c dH^T + 1 ds^T + dA^T phi_q_c                  (reverse walk, dH after chunk)
    dv_c     = phi_k_c dH + A^T g
    dH <- dH + phi_q_c^T g        ds <- ds + phi_q_c^T gd

starting from the cotangents of the returned final state; dH, ds at the start are the gradients of
the initial state. Query heads of a kv group run as separate programs (the state update is done
once per query head); their dphi_k, dv, dH_0, ds_0 partials are summed outside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import F32, dot, head_outputs, head_specs


def _causal_mask(c):
  row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return row >= col


def _fwd_kernel(q_ref, k_ref, v_ref, h0_ref, s0_ref, y_ref, den_ref, h_ref, s_ref, *, c, n, eps):
  # q_ref [Tp, D]  k_ref [Tp, D]  v_ref [Tp, dv]  h0_ref [D, dv]  s0_ref [1, D]
  mask = _causal_mask(c)

  def body(i, carry):
    h, s = carry
    sl = pl.ds(pl.multiple_of(i * c, c), c)
    q, k, v = q_ref[sl, :].astype(F32), k_ref[sl, :].astype(F32), v_ref[sl, :].astype(F32)
    a = jnp.where(mask, dot(q, k, tb=True), 0.0)
    num = dot(q, h) + dot(a, v)
    den = jnp.sum(q * s, axis=1, keepdims=True) + jnp.sum(a, axis=1, keepdims=True) + eps
    y_ref[sl, :] = num / den
    den_ref[sl, :] = den
    return h + dot(k, v, ta=True), s + jnp.sum(k, axis=0, keepdims=True)

  h, s = jax.lax.fori_loop(0, n, body, (h0_ref[...].astype(F32), s0_ref[...].astype(F32)))
  h_ref[...] = h
  s_ref[...] = s


def _bwd_kernel(
  q_ref, k_ref, v_ref, h0_ref, s0_ref, g_ref, gd_ref, dht_ref, dst_ref,
  dq_ref, dk_ref, dv_ref, dh0_ref, ds0_ref, *, c, n,
):  # fmt: skip
  mask = _causal_mask(c)

  def load(i):
    sl = pl.ds(pl.multiple_of(i * c, c), c)
    q, k, v = q_ref[sl, :].astype(F32), k_ref[sl, :].astype(F32), v_ref[sl, :].astype(F32)
    g, gd = g_ref[sl, :], gd_ref[sl, :]
    da = jnp.where(mask, dot(g, v, tb=True) + gd, 0.0)
    return sl, q, k, v, g, gd, da

  def fwd_body(i, carry):
    h, s = carry
    sl, q, k, v, g, gd, da = load(i)
    dq_ref[sl, :] = (dot(g, h, tb=True) + gd * s + dot(da, k)).astype(dq_ref.dtype)
    return h + dot(k, v, ta=True), s + jnp.sum(k, axis=0, keepdims=True)

  jax.lax.fori_loop(0, n, fwd_body, (h0_ref[...].astype(F32), s0_ref[...].astype(F32)))

  def rev_body(j, carry):
    dh, ds = carry
    sl, q, k, v, g, gd, da = load(n - 1 - j)
    a = jnp.where(mask, dot(q, k, tb=True), 0.0)
    dk_ref[sl, :] = dot(v, dh, tb=True) + ds + dot(da, q, ta=True)
    dv_ref[sl, :] = dot(k, dh) + dot(a, g, ta=True)
    return dh + dot(q, g, ta=True), ds + jnp.sum(q * gd, axis=0, keepdims=True)

  dh, ds = jax.lax.fori_loop(0, n, rev_body, (dht_ref[...], dst_ref[...]))
  dh0_ref[...] = dh
  ds0_ref[...] = ds


def _input_specs(group, tp, d, dv):
  """Specs of (phi_q, phi_k, v, H0, s0) over grid (B, Hq)."""
  return head_specs(
    group, [("q", (tp, d)), ("kv", (tp, d)), ("kv", (tp, dv)), ("kv", (d, dv)), ("kv", (1, d))]
  )


def _forward(q, k, v, h0, s0, *, c, eps, interpret):
  """Runs the forward kernel on head-major padded inputs; returns per-query-head outputs."""
  b, hq, tp, d = q.shape
  hkv, dv = v.shape[1], v.shape[3]
  out_shape, out_specs = head_outputs(b, hq, [(tp, dv), (tp, 1), (d, dv), (1, d)])
  return pl.pallas_call(
    functools.partial(_fwd_kernel, c=c, n=tp // c, eps=eps),
    out_shape=out_shape,
    grid=(b, hq),
    in_specs=_input_specs(hq // hkv, tp, d, dv),
    out_specs=out_specs,
    interpret=interpret,
    name="lola_linear_attention_fwd",
  )(q, k, v, h0, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _linear_core(q, k, v, h0, s0, c, eps, interpret):
  """q [B,Hq,Tp,D]  k [B,Hkv,Tp,D]  v [B,Hkv,Tp,dv]  h0 [B,Hkv,D,dv]  s0 [B,Hkv,1,D]."""
  return _linear_fwd(q, k, v, h0, s0, c, eps, interpret)[0]


def _linear_fwd(q, k, v, h0, s0, c, eps, interpret):
  group = q.shape[1] // v.shape[1]
  y, den, h, s = _forward(q, k, v, h0, s0, c=c, eps=eps, interpret=interpret)
  out = (y, h[:, ::group], s[:, ::group])
  return out, (q, k, v, h0, s0, y, den)


def _linear_bwd(c, eps, interpret, res, cts):
  del eps
  q, k, v, h0, s0, y, den = res
  dy, dht, dst = cts
  b, hq, tp, d = q.shape
  hkv, dv = v.shape[1], v.shape[3]
  group = hq // hkv
  dy = dy.astype(F32)
  g = dy / den
  gd = -jnp.sum(dy * y, axis=-1, keepdims=True) / den
  # The final-state cotangent enters once per kv head: give it to the group's first query head.
  dht_q = jnp.zeros((b, hq, d, dv), F32).at[:, ::group].set(dht.astype(F32))
  dst_q = jnp.zeros((b, hq, 1, d), F32).at[:, ::group].set(dst.astype(F32))
  cotangent_specs = head_specs(1, [("q", (tp, dv)), ("q", (tp, 1)), ("q", (d, dv)), ("q", (1, d))])
  out_shape, out_specs = head_outputs(b, hq, [(tp, d), (tp, d), (tp, dv), (d, dv), (1, d)])
  dq, dk, dvv, dh0, ds0 = pl.pallas_call(
    functools.partial(_bwd_kernel, c=c, n=tp // c),
    out_shape=out_shape,
    grid=(b, hq),
    in_specs=_input_specs(group, tp, d, dv) + cotangent_specs,
    out_specs=out_specs,
    interpret=interpret,
    name="lola_linear_attention_bwd",
  )(q, k, v, h0, s0, g, gd, dht_q, dst_q)
  dk, dvv = common.group_sum(dk, hkv), common.group_sum(dvv, hkv)
  dh0, ds0 = common.group_sum(dh0, hkv), common.group_sum(ds0, hkv)
  return (
    dq.astype(q.dtype),
    dk.astype(k.dtype),
    dvv.astype(v.dtype),
    dh0.astype(h0.dtype),
    ds0.astype(s0.dtype),
  )


_linear_core.defvjp(_linear_fwd, _linear_bwd)


def linear_attention_pallas(
  phi_q, phi_k, v, *, chunk_size, initial_state, eps, block_sizes=None, interpret=None
):
  """Pads to the block sizes, runs the kernel, crops. Same contract as `linear_attention`."""
  bs = block_sizes or common.BlockSizes.get_default()
  interpret = common.interpret_mode() if interpret is None else interpret
  b, t, hq, d = phi_q.shape
  hkv, dv = v.shape[2], v.shape[3]
  c = bs.pad_dim(chunk_size, bs.chunk_multiple)
  tp = -(-t // c) * c
  dp, dvp = bs.pad_dim(d, bs.feature_multiple), bs.pad_dim(dv, bs.value_multiple)
  q = common.to_heads(phi_q, tp, dp)
  k = common.to_heads(phi_k, tp, dp)
  vv = common.to_heads(v, tp, dvp)
  if initial_state is None:
    h0 = jnp.zeros((b, hkv, dp, dvp), F32)
    s0 = jnp.zeros((b, hkv, 1, dp), F32)
  else:
    h0 = jnp.pad(initial_state[0].astype(F32), [(0, 0), (0, 0), (0, dp - d), (0, dvp - dv)])
    s0 = jnp.pad(initial_state[1].astype(F32), [(0, 0), (0, 0), (0, dp - d)])[:, :, None, :]
  y, h, s = _linear_core(q, k, vv, h0, s0, c, float(eps), interpret)
  return common.from_heads(y, t, dv), (h[:, :, :d, :dv], s[:, :, 0, :d])
