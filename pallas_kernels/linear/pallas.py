"""Chunked causal linear attention as a TPU Pallas kernel (Mosaic) with a hand-written backward.

Per batch row and query head i (kv head h = i // (Hq // Hkv)):

    H_t = H_0 + sum_{j<=t} phi_k_j v_j^T      s_t = s_0 + sum_{j<=t} phi_k_j
    y_t = phi_q_t^T H_t / (phi_q_t^T s_t + eps)

Chunked algorithm (chunk c = [nC, (n+1)C), state (H, s) as it stood before the chunk, A the
causally masked [C, C] score matrix phi_q phi_k^T of the chunk):

    y_c = (phi_q_c H + A v_c) / (phi_q_c s + A 1 + eps)
    H <- H + phi_k_c^T v_c        s <- s + phi_k_c^T 1

Tiling (the pattern of JAX's TPU flash attention): grid (B, Hq, n_chunks), the chunk axis last
and "arbitrary" (sequential on one core), batch and heads "parallel" (split across TensorCores).
Each program reads one (C, X) block of each operand and writes one (C, dv) block of y; the state
(H, s) lives in VMEM scratch, set from (H_0, s_0) under `pl.when(i == 0)` and written out under
`pl.when(i == n - 1)`. The denominator is saved lane-wide ([C, 128]) for the backward. VMEM per
program (`linear_vmem_bytes`) depends on C, D, dv and the dtype, never on T.

Backward. With g_t = dy_t / den_t (dv) and gd_t = -(dy_t . y_t) / den_t (scalar) the gradient is
that of linear attention with value [v, 1] and output cotangent [g, gd]:

    dA = (g v_c^T + gd 1^T) * mask
    dphi_q_c = g H^T + gd s^T + dA phi_k_c                       (forward walk, H before chunk)
    dphi_k_c = v_c dH^T + 1 ds^T + dA^T phi_q_c                  (reverse walk, dH after chunk)
    dv_c     = phi_k_c dH + A^T g
    dH <- dH + phi_q_c^T g        ds <- ds + phi_q_c^T gd

starting from the cotangents of the returned final state; dH, ds at the start are the gradients of
the initial state. Two kernels: the forward walk (dphi_q) and the reverse walk, whose index maps
read chunk n - 1 - i at grid step i. Query heads of a kv group run as separate programs; their
dphi_k, dv, dH_0, ds_0 partials are summed outside the kernel.

Operands stay in the input dtype (bf16 feeds the MXU natively) with float32 accumulation; f32
intermediates (A, g, the state) are rounded to the input dtype where they enter a product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.common import F32, LANES, chunk_specs, dot, lanes

SEMANTICS = ("parallel", "parallel", "arbitrary")


def _causal_mask(c):
  row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return row >= col


def _fwd_kernel(q_ref, k_ref, v_ref, h0_ref, s0_ref, y_ref, den_ref, h_ref, s_ref, h_scr, s_scr,
                *, n, eps, precision):  # fmt: skip
  # q_ref, k_ref [C, D]  v_ref [C, dv]  h0_ref [D, dv]  s0_ref [1, D]; scratch h [D, dv], s [1, D]
  i = pl.program_id(2)
  cdt = q_ref.dtype
  mm = functools.partial(dot, precision=precision, dtype=cdt)

  @pl.when(i == 0)
  def _():
    h_scr[...] = h0_ref[...]
    s_scr[...] = s0_ref[...]

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  h, s = h_scr[...], s_scr[...]
  a = jnp.where(_causal_mask(q.shape[0]), mm(q, k, tb=True), 0.0)
  num = mm(q, h) + mm(a, v)
  den = jnp.sum(q.astype(F32) * s, axis=1, keepdims=True) + jnp.sum(a, axis=1, keepdims=True)
  den = den + eps
  y_ref[...] = (num / den).astype(y_ref.dtype)
  den_ref[...] = lanes(den)
  h_scr[...] = h + mm(k, v, ta=True)
  s_scr[...] = s + jnp.sum(k.astype(F32), axis=0, keepdims=True)

  @pl.when(i == n - 1)
  def _():
    h_ref[...] = h_scr[...]
    s_ref[...] = s_scr[...]


def _cotangents(dy_ref, y_ref, den_ref):
  """g = dy / den [C, dv] and gd = -(dy . y) / den [C, 1] (float32)."""
  dy, y = dy_ref[...].astype(F32), y_ref[...].astype(F32)
  den = den_ref[...][:, :1]
  return dy / den, -jnp.sum(dy * y, axis=1, keepdims=True) / den


def _bwd_dq_kernel(q_ref, k_ref, v_ref, h0_ref, s0_ref, dy_ref, y_ref, den_ref, dq_ref,
                   h_scr, s_scr, *, precision):  # fmt: skip
  """Forward walk: dphi_q of chunk i with the state before it."""
  i = pl.program_id(2)
  cdt = q_ref.dtype
  mm = functools.partial(dot, precision=precision, dtype=cdt)

  @pl.when(i == 0)
  def _():
    h_scr[...] = h0_ref[...]
    s_scr[...] = s0_ref[...]

  k, v = k_ref[...], v_ref[...]
  h, s = h_scr[...], s_scr[...]
  g, gd = _cotangents(dy_ref, y_ref, den_ref)
  da = jnp.where(_causal_mask(k.shape[0]), mm(g, v, tb=True) + gd, 0.0)
  dq_ref[...] = (mm(g, h, tb=True) + gd * s + mm(da, k)).astype(dq_ref.dtype)
  h_scr[...] = h + mm(k, v, ta=True)
  s_scr[...] = s + jnp.sum(k.astype(F32), axis=0, keepdims=True)


def _bwd_dkv_kernel(q_ref, k_ref, v_ref, dy_ref, y_ref, den_ref, dht_ref, dst_ref,
                    dk_ref, dv_ref, dh0_ref, ds0_ref, dh_scr, ds_scr, *, n, precision):  # fmt: skip
  """Reverse walk (grid step i reads chunk n - 1 - i): dphi_k, dv with the state cotangent after
  the chunk; the initial state's gradient at the end."""
  i = pl.program_id(2)
  cdt = q_ref.dtype
  mm = functools.partial(dot, precision=precision, dtype=cdt)

  @pl.when(i == 0)
  def _():
    dh_scr[...] = dht_ref[...]
    ds_scr[...] = dst_ref[...]

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  dh, ds = dh_scr[...], ds_scr[...]
  g, gd = _cotangents(dy_ref, y_ref, den_ref)
  mask = _causal_mask(q.shape[0])
  a = jnp.where(mask, mm(q, k, tb=True), 0.0)
  da = jnp.where(mask, mm(g, v, tb=True) + gd, 0.0)
  dk_ref[...] = mm(v, dh, tb=True) + ds + mm(da, q, ta=True)
  dv_ref[...] = mm(k, dh) + mm(a, g, ta=True)
  dh_scr[...] = dh + mm(q, g, ta=True)
  ds_scr[...] = ds + jnp.sum(q.astype(F32) * gd, axis=0, keepdims=True)

  @pl.when(i == n - 1)
  def _():
    dh0_ref[...] = dh_scr[...]
    ds0_ref[...] = ds_scr[...]


def linear_vmem_bytes(c: int, d: int, dv: int, dtype) -> dict[str, int]:
  """VMEM bytes of one program of each TPU kernel (`common.vmem_bytes`: blocks double-buffered,
  scratch once), for chunk c, feature dim d, value dim dv (padded sizes) and input dtype. T does
  not appear: every block is one chunk (or one head's state)."""
  x = jnp.dtype(dtype)
  state = [((d, dv), F32), ((1, d), F32)]
  stat = ((c, LANES), F32)
  qkv = [((c, d), x), ((c, d), x), ((c, dv), x)]
  return {
    "fwd": common.vmem_bytes(qkv + state + [((c, dv), x), stat] + state, state),
    "bwd_dq": common.vmem_bytes(
      qkv + state + [((c, dv), x), ((c, dv), x), stat, ((c, d), x)], state
    ),  # fmt: skip
    "bwd_dkv": common.vmem_bytes(
      qkv + [((c, dv), x), ((c, dv), x), stat] + state + [((c, d), F32), ((c, dv), F32)] + state,
      state,
    ),
  }


def _forward(q, k, v, h0, s0, *, c, eps, precision, interpret):
  """Runs the forward kernel on head-major padded inputs; returns per-query-head outputs."""
  b, hq, tp, d = q.shape
  hkv, dv = v.shape[1], v.shape[3]
  n = tp // c
  common.check_vmem("linear_attention", max(linear_vmem_bytes(c, d, dv, q.dtype).values()))
  fwd = lambda i: i
  in_specs = chunk_specs(
    hq // hkv, fwd,
    [("q", (c, d), True), ("kv", (c, d), True), ("kv", (c, dv), True), ("kv", (d, dv), False),
     ("kv", (1, d), False)],
  )  # fmt: skip
  out_specs = chunk_specs(
    1, fwd, [("q", (c, dv), True), ("q", (c, LANES), True), ("q", (d, dv), False),
             ("q", (1, d), False)],
  )  # fmt: skip
  out_shape = [
    jax.ShapeDtypeStruct((b, hq, tp, dv), q.dtype),
    jax.ShapeDtypeStruct((b, hq, tp, LANES), F32),
    jax.ShapeDtypeStruct((b, hq, d, dv), F32),
    jax.ShapeDtypeStruct((b, hq, 1, d), F32),
  ]
  return common.pallas_call(
    functools.partial(_fwd_kernel, n=n, eps=eps, precision=precision),
    target="pallas_tpu",
    interpret=interpret,
    compiler_params=common.compiler_params("pallas_tpu", dimension_semantics=SEMANTICS),
    out_shape=out_shape,
    grid=(b, hq, n),
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=[pltpu.VMEM((d, dv), F32), pltpu.VMEM((1, d), F32)],
    name="lola_linear_attention_fwd",
  )(q, k, v, h0, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _linear_core(q, k, v, h0, s0, c, eps, precision, interpret):
  """q [B,Hq,Tp,D]  k [B,Hkv,Tp,D]  v [B,Hkv,Tp,dv]  h0 [B,Hkv,D,dv]  s0 [B,Hkv,1,D]."""
  return _linear_fwd(q, k, v, h0, s0, c, eps, precision, interpret)[0]


def _linear_fwd(q, k, v, h0, s0, c, eps, precision, interpret):
  group = q.shape[1] // v.shape[1]
  y, den, h, s = _forward(q, k, v, h0, s0, c=c, eps=eps, precision=precision, interpret=interpret)
  out = (y, h[:, ::group], s[:, ::group])
  return out, (q, k, v, h0, s0, y, den)


def _linear_bwd(c, eps, precision, interpret, res, cts):
  del eps
  q, k, v, h0, s0, y, den = res
  dy, dht, dst = cts
  b, hq, tp, d = q.shape
  hkv, dv = v.shape[1], v.shape[3]
  group, n = hq // hkv, tp // c
  dy = dy.astype(y.dtype)
  # The final-state cotangent enters once per kv head: give it to the group's first query head.
  dht_q = jnp.zeros((b, hq, d, dv), F32).at[:, ::group].set(dht.astype(F32))
  dst_q = jnp.zeros((b, hq, 1, d), F32).at[:, ::group].set(dst.astype(F32))
  params = common.compiler_params("pallas_tpu", dimension_semantics=SEMANTICS)
  scratch = [pltpu.VMEM((d, dv), F32), pltpu.VMEM((1, d), F32)]
  fwd, rev = (lambda i: i), (lambda i: n - 1 - i)
  cot = lambda walk: chunk_specs(
    1, walk, [("q", (c, dv), True), ("q", (c, dv), True), ("q", (c, LANES), True)]
  )
  qkv = lambda walk: chunk_specs(
    group, walk, [("q", (c, d), True), ("kv", (c, d), True), ("kv", (c, dv), True)]
  )
  dq = common.pallas_call(
    functools.partial(_bwd_dq_kernel, precision=precision),
    target="pallas_tpu",
    interpret=interpret,
    compiler_params=params,
    out_shape=jax.ShapeDtypeStruct((b, hq, tp, d), q.dtype),
    grid=(b, hq, n),
    in_specs=qkv(fwd)
    + chunk_specs(group, fwd, [("kv", (d, dv), False), ("kv", (1, d), False)])
    + cot(fwd),
    out_specs=chunk_specs(1, fwd, [("q", (c, d), True)])[0],
    scratch_shapes=scratch,
    name="lola_linear_attention_bwd_dq",
  )(q, k, v, h0, s0, dy, y, den)
  dk, dvv, dh0, ds0 = common.pallas_call(
    functools.partial(_bwd_dkv_kernel, n=n, precision=precision),
    target="pallas_tpu",
    interpret=interpret,
    compiler_params=params,
    out_shape=[
      jax.ShapeDtypeStruct((b, hq, tp, d), F32),
      jax.ShapeDtypeStruct((b, hq, tp, dv), F32),
      jax.ShapeDtypeStruct((b, hq, d, dv), F32),
      jax.ShapeDtypeStruct((b, hq, 1, d), F32),
    ],
    grid=(b, hq, n),
    in_specs=qkv(rev)
    + cot(rev)
    + chunk_specs(1, rev, [("q", (d, dv), False), ("q", (1, d), False)]),
    out_specs=chunk_specs(
      1,
      rev,
      [("q", (c, d), True), ("q", (c, dv), True), ("q", (d, dv), False), ("q", (1, d), False)],
    ),  # fmt: skip
    scratch_shapes=scratch,
    name="lola_linear_attention_bwd_dkv",
  )(q, k, v, dy, y, den, dht_q, dst_q)
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


def tpu_chunk(chunk_size: int, dtype, bs: common.BlockSizes) -> int:
  """The kernel's chunk: chunk_size rounded up to the block multiple and the sublane tile."""
  return bs.pad_dim(chunk_size, max(bs.chunk_multiple, common.sublanes(dtype)))


def linear_attention_pallas(phi_q, phi_k, v, *, chunk_size, initial_state, eps, block_sizes=None,
                            precision=common.DEFAULT, interpret=None):  # fmt: skip
  """Pads to the block sizes, runs the TPU kernel, crops. Same contract as `linear_attention`.

  All of phi_q, phi_k, v are cast to phi_q's dtype (the kernel's operand dtype)."""
  bs = block_sizes or common.BlockSizes.for_target("pallas_tpu")
  b, t, hq, d = phi_q.shape
  hkv, dv = v.shape[2], v.shape[3]
  dt = phi_q.dtype
  c = tpu_chunk(chunk_size, dt, bs)
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
