"""The fused hybrid (LoLA with an empty cache) as TPU Pallas kernels (Mosaic), forward and backward.

Semantics: `pallas_kernels.hybrid.xla` (terraced window of chunk n-1 plus the causal part of chunk
n with exact softmax, linear state over chunks <= n-2, gated mix in log space or lolcats mix).

Tiling (JAX's TPU flash attention pattern): grid (B, Hq, n_chunks), the chunk axis last and
"arbitrary", batch and heads "parallel". Each chunk is zero-padded to Cp rows (the dtype's sublane
tile; padded keys are masked, padded rows cropped), and every block is one chunk (Cp, X). What a
walk carries lives in VMEM scratch, zeroed under `pl.when(i == 0)`: the linear state (H, s) and
the previous chunk's keys, values and features (the window's first half, absorbed into the state
one chunk later), so each chunk is read from HBM once. VMEM per program (`hybrid_vmem_bytes`) is
independent of T.

Forward, for chunk n: the [Cp, 2Cp] window logits, the softmax statistics (m, S, N), the read-out
a = phi_q H, z = phi_q s, the mix y = (w_s N + w_l a) / (w_s S + w_l z), then H, s absorb chunk
n-1. Saved per row, 128 lanes wide: L = m - log w_s + log den (so the normalised softmax weight
of key i is P_i = e^{l_i - L}) and rho = w_l / den (the weight of the linear read-out:
y = P V + rho a).

Backward, with delta = dy . y:

    dl_i = P_i (dy . v_i - delta)         (lolcats adds -[i = argmax] sum_j dl_j through m)
    dq = scale dl K_w        dK_w = scale dl^T q        dV_w = P^T dy
    dphi_q = rho dy H^T - rho delta s^T
    dH_n = phi_q^T (rho dy),  ds_n = -phi_q^T (rho delta); chunk j's phi_k, v receive
    R_j = sum_{n >= j+2} dH_n:  dphi_k_j = v_j R_j^T + 1 r_j^T,  dv_j += phi_k_j R_j
    d log g_t = sum_i dl_i (lolcats: before the max term), d log(1-g)_t = -sum_i dl_i (gated,
    whose output depends on log g - log(1-g) only; 0 for lolcats).

Two kernels, as flash attention splits dq from dk/dv:
  - the forward walk (state H before the chunk in scratch): dq, dphi_q and the per-head sum of
    d log g;
  - the reverse walk (grid step i reads chunk j = n - 1 - i, and chunk j - 1's keys and values
    for the window): the keys of chunk j receive the gradient of the queries of chunk j now and of
    chunk j + 1 from the previous step (kept in scratch), and R_j, r_j, accumulated in scratch
    one chunk late (dH_{j+1} is added after chunk j has used R).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.common import F32, LANES, NEG, chunk_specs, dot, lanes
from pallas_kernels.equations import mix_branches, mix_weights

SEMANTICS = ("parallel", "parallel", "arbitrary")


def _logits(q, kp, kc, has_prev, c, scale, mm):
  """Scaled logits of a chunk's queries [Cp, dk] against the previous chunk (lp) and its own
  (lc), masked to NEG outside the window, with the masks. c: real tokens per chunk."""
  cp = q.shape[0]
  row = jax.lax.broadcasted_iota(jnp.int32, (cp, cp), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (cp, cp), 1)
  okp = col < c * jnp.asarray(has_prev, jnp.int32)  # a scalar limit, not a broadcast boolean
  okc = (col < c) & (row >= col)
  lp = jnp.where(okp, mm(q, kp, tb=True) * scale, NEG)
  lc = jnp.where(okc, mm(q, kc, tb=True) * scale, NEG)
  return lp, lc, okp, okc


def _row_max(lp, lc):
  return jnp.maximum(jnp.max(lp, axis=1, keepdims=True), jnp.max(lc, axis=1, keepdims=True))


def _fwd_kernel(q_ref, k_ref, v_ref, pq_ref, pk_ref, lg_ref, lg1_ref, y_ref, lse_ref, rho_ref,
                kp_scr, vp_scr, pkp_scr, h_scr, s_scr, *, c, scale, mix, precision):  # fmt: skip
  i = pl.program_id(2)
  mm = functools.partial(dot, precision=precision, dtype=q_ref.dtype)

  @pl.when(i == 0)
  def _():
    for ref in (kp_scr, vp_scr, pkp_scr, h_scr, s_scr):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  kp, vp = kp_scr[...], vp_scr[...]
  h, s = h_scr[...], s_scr[...]
  lp, lc, okp, okc = _logits(q, kp, k, i > 0, c, scale, mm)
  m = _row_max(lp, lc)
  pp = jnp.where(okp, jnp.exp(lp - m), 0.0)
  pc = jnp.where(okc, jnp.exp(lc - m), 0.0)
  s_soft = jnp.sum(pp, axis=1, keepdims=True) + jnp.sum(pc, axis=1, keepdims=True)
  n_soft = mm(pp, vp) + mm(pc, v)
  pq = pq_ref[...]
  a = mm(pq, h)
  z = jnp.sum(pq.astype(F32) * s, axis=1, keepdims=True)
  lg, lg1 = lg_ref[...], lg1_ref[...]  # [1, 1] log g, log(1-g)
  w_s, w_l = mix_weights(m, z, jnp.exp(lg), mix, log_gate=lg, log_1m_gate=lg1)
  y, den = mix_branches(w_s, w_l, s_soft, n_soft, a, z)
  y_ref[...] = y.astype(y_ref.dtype)
  lse_ref[...] = lanes(m - jnp.log(w_s) + jnp.log(den))
  rho_ref[...] = lanes(w_l / den)
  # Chunk n-1 leaves the window: absorb it (zeros at n = 0), then chunk n becomes the previous.
  pkp = pkp_scr[...]
  h_scr[...] = h + mm(pkp, vp, ta=True)
  s_scr[...] = s + jnp.sum(pkp.astype(F32), axis=0, keepdims=True)
  kp_scr[...] = k
  vp_scr[...] = v
  pkp_scr[...] = pk_ref[...]


def _softmax_grads(q, kp, kc, vp, vc, dy, y, lse, has_prev, c, scale, mix, mm):
  """Recomputes a chunk's window softmax and returns (pp, pc, dlp, dlc, tot): the normalised
  weights P, the logit cotangents (lolcats max term included) and sum_i dl_i (before it)."""
  lp, lc, okp, okc = _logits(q, kp, kc, has_prev, c, scale, mm)
  delta = jnp.sum(dy.astype(F32) * y.astype(F32), axis=1, keepdims=True)
  pp = jnp.where(okp, jnp.exp(lp - lse), 0.0)
  pc = jnp.where(okc, jnp.exp(lc - lse), 0.0)
  dlp = pp * (mm(dy, vp, tb=True) - delta)
  dlc = pc * (mm(dy, vc, tb=True) - delta)
  tot = jnp.sum(dlp, axis=1, keepdims=True) + jnp.sum(dlc, axis=1, keepdims=True)
  if mix == "lolcats":
    m = _row_max(lp, lc)
    ip = jnp.where(okp & (lp == m), 1.0, 0.0)
    ic = jnp.where(okc & (lc == m), 1.0, 0.0)
    share = tot / (jnp.sum(ip, axis=1, keepdims=True) + jnp.sum(ic, axis=1, keepdims=True))
    dlp, dlc = dlp - ip * share, dlc - ic * share
  return pp, pc, dlp, dlc, tot, delta


def _bwd_q_kernel(q_ref, k_ref, v_ref, pq_ref, pk_ref, dy_ref, y_ref, lse_ref, rho_ref,
                  dq_ref, dpq_ref, dg_ref, kp_scr, vp_scr, pkp_scr, h_scr, s_scr, dg_scr,
                  *, n, c, scale, mix, precision):  # fmt: skip
  """Forward walk: dq, dphi_q of chunk i and the head's sum of d log g."""
  i = pl.program_id(2)
  mm = functools.partial(dot, precision=precision, dtype=q_ref.dtype)

  @pl.when(i == 0)
  def _():
    for ref in (kp_scr, vp_scr, pkp_scr, h_scr, s_scr, dg_scr):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  kp, vp = kp_scr[...], vp_scr[...]
  h, s = h_scr[...], s_scr[...]
  dy, y = dy_ref[...], y_ref[...]
  lse, rho = lse_ref[...][:, :1], rho_ref[...][:, :1]
  _, _, dlp, dlc, tot, delta = _softmax_grads(q, kp, k, vp, v, dy, y, lse, i > 0, c, scale, mix, mm)
  dq_ref[...] = (scale * (mm(dlp, kp) + mm(dlc, k))).astype(dq_ref.dtype)
  dpq_ref[...] = (rho * (mm(dy, h, tb=True) - delta * s)).astype(dpq_ref.dtype)
  dg_scr[...] += jnp.sum(tot, axis=0, keepdims=True)
  pkp = pkp_scr[...]
  h_scr[...] = h + mm(pkp, vp, ta=True)
  s_scr[...] = s + jnp.sum(pkp.astype(F32), axis=0, keepdims=True)
  kp_scr[...] = k
  vp_scr[...] = v
  pkp_scr[...] = pk_ref[...]

  @pl.when(i == n - 1)
  def _():
    dg_ref[...] = dg_scr[...]


def _bwd_kv_kernel(q_ref, k_ref, v_ref, pq_ref, pk_ref, dy_ref, y_ref, lse_ref, rho_ref,
                   kp_ref, vp_ref, dk_ref, dv_ref, dpk_ref, dkn_scr, dvn_scr, r_scr, rs_scr,
                   ph_scr, ps_scr, *, c, scale, mix, precision):  # fmt: skip
  """Reverse walk: step i handles chunk j = n - 1 - i (kp_ref, vp_ref: chunk j - 1)."""
  i = pl.program_id(2)
  j = pl.num_programs(2) - 1 - i
  mm = functools.partial(dot, precision=precision, dtype=q_ref.dtype)

  @pl.when(i == 0)
  def _():
    for ref in (dkn_scr, dvn_scr, r_scr, rs_scr, ph_scr, ps_scr):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  dy, y = dy_ref[...], y_ref[...]
  lse, rho = lse_ref[...][:, :1], rho_ref[...][:, :1]
  pp, pc, dlp, dlc, _, delta = _softmax_grads(
    q, kp_ref[...], k, vp_ref[...], v, dy, y, lse, j > 0, c, scale, mix, mm
  )
  r, rs = r_scr[...], rs_scr[...]  # cotangents of the state read by chunks >= j + 2
  pk = pk_ref[...]
  # Keys of chunk j: from this chunk's queries, from chunk j + 1's (scratch), from the state.
  dk_ref[...] = scale * mm(dlc, q, ta=True) + dkn_scr[...]
  dv_ref[...] = mm(pc, dy, ta=True) + dvn_scr[...] + mm(pk, r)
  dpk_ref[...] = mm(v, r, tb=True) + rs
  dkn_scr[...] = scale * mm(dlp, q, ta=True)  # for chunk j - 1 (zero at j = 0: dlp masked)
  dvn_scr[...] = mm(pp, dy, ta=True)
  # R_{j-1} = R_j + dH_{j+1}; dH_j waits one step.
  r_scr[...] = r + ph_scr[...]
  rs_scr[...] = rs + ps_scr[...]
  pq = pq_ref[...]
  ph_scr[...] = mm(pq, rho * dy.astype(F32), ta=True)
  ps_scr[...] = -jnp.sum(pq.astype(F32) * (rho * delta), axis=0, keepdims=True)


def hybrid_vmem_bytes(cp: int, dk: int, dv: int, d: int, dtype) -> dict[str, int]:
  """VMEM bytes of one program of each TPU kernel (`common.vmem_bytes`) for padded chunk cp and
  dims, input dtype; independent of T (every block is one chunk or one head's scalars)."""
  x = jnp.dtype(dtype)
  ins = [((cp, dk), x), ((cp, dk), x), ((cp, dv), x), ((cp, d), x), ((cp, d), x)]
  stat = ((cp, LANES), F32)
  gate = ((1, 1), F32)
  prev = [((cp, dk), x), ((cp, dv), x), ((cp, d), x)]
  state = [((d, dv), F32), ((1, d), F32)]
  cot = [((cp, dv), x), ((cp, dv), x), stat, stat]
  return {
    "fwd": common.vmem_bytes(ins + [gate, gate, ((cp, dv), x), stat, stat], prev + state),
    "bwd_q": common.vmem_bytes(
      ins + cot + [((cp, dk), x), ((cp, d), x), ((1, LANES), F32)],
      prev + state + [((1, LANES), F32)],
    ),
    "bwd_kv": common.vmem_bytes(
      ins + cot + [((cp, dk), x), ((cp, dv), x), ((cp, dk), F32), ((cp, dv), F32), ((cp, d), F32)],
      [((cp, dk), F32), ((cp, dv), F32)] + state + state,
    ),  # fmt: skip
  }


def _check(cp, q, v, pq):
  nbytes = hybrid_vmem_bytes(cp, q.shape[3], v.shape[3], pq.shape[3], q.dtype)
  common.check_vmem("hybrid_attention", max(nbytes.values()))


def _operand_specs(group, walk, cp, dk, dv, d):
  return chunk_specs(
    group, walk,
    [("q", (cp, dk), True), ("kv", (cp, dk), True), ("kv", (cp, dv), True),
     ("q", (cp, d), True), ("kv", (cp, d), True)],
  )  # fmt: skip


def _forward(q, k, v, pq, pk, lg, lg1, *, c, cp, scale, mix, precision, interpret):
  b, hq, tp, dk = q.shape
  hkv, dv, d = v.shape[1], v.shape[3], pq.shape[3]
  _check(cp, q, v, pq)
  fwd = lambda i: i
  gate = pl.BlockSpec((pl.squeezed, 1, 1), lambda b, h, i: (h, 0, 0))
  out_specs = chunk_specs(
    1, fwd, [("q", (cp, dv), True), ("q", (cp, LANES), True), ("q", (cp, LANES), True)]
  )
  return common.pallas_call(
    functools.partial(_fwd_kernel, c=c, scale=scale, mix=mix, precision=precision),
    target="pallas_tpu",
    interpret=interpret,
    compiler_params=common.compiler_params("pallas_tpu", dimension_semantics=SEMANTICS),
    out_shape=[
      jax.ShapeDtypeStruct((b, hq, tp, dv), q.dtype),
      jax.ShapeDtypeStruct((b, hq, tp, LANES), F32),
      jax.ShapeDtypeStruct((b, hq, tp, LANES), F32),
    ],
    grid=(b, hq, tp // cp),
    in_specs=_operand_specs(hq // hkv, fwd, cp, dk, dv, d) + [gate, gate],
    out_specs=out_specs,
    scratch_shapes=[
      pltpu.VMEM((cp, dk), q.dtype),
      pltpu.VMEM((cp, dv), q.dtype),
      pltpu.VMEM((cp, d), q.dtype),
      pltpu.VMEM((d, dv), F32),
      pltpu.VMEM((1, d), F32),
    ],  # fmt: skip
    name="lola_hybrid_fwd",
  )(q, k, v, pq, pk, lg, lg1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _hybrid_core(q, k, v, pq, pk, lg, lg1, c, cp, scale, mix, precision, interpret):
  """q [B,Hq,Tp,dk] k [B,Hkv,Tp,dk] v [B,Hkv,Tp,dv] pq [B,Hq,Tp,D] pk [B,Hkv,Tp,D] (chunks of c
  tokens padded to cp rows); lg, lg1 [Hq] log g and log(1-g) (lolcats reads g = e^{lg})."""
  return _hybrid_fwd(q, k, v, pq, pk, lg, lg1, c, cp, scale, mix, precision, interpret)[0]


def _per_head(x):
  return x.astype(F32).reshape(-1, 1, 1)


def _hybrid_fwd(q, k, v, pq, pk, lg, lg1, c, cp, scale, mix, precision, interpret):
  y, lse, rho = _forward(
    q, k, v, pq, pk, _per_head(lg), _per_head(lg1), c=c, cp=cp, scale=scale, mix=mix,
    precision=precision, interpret=interpret,
  )  # fmt: skip
  return y, (q, k, v, pq, pk, lg, lg1, y, lse, rho)


def _hybrid_bwd(c, cp, scale, mix, precision, interpret, res, dy):
  q, k, v, pq, pk, lg_h, lg1_h, y, lse, rho = res
  b, hq, tp, dk = q.shape
  hkv, dv, d = v.shape[1], v.shape[3], pq.shape[3]
  group, n = hq // hkv, tp // cp
  dy = dy.astype(y.dtype)
  params = common.compiler_params("pallas_tpu", dimension_semantics=SEMANTICS)
  kw = dict(c=c, scale=scale, mix=mix, precision=precision)
  fwd, rev = (lambda i: i), (lambda i: n - 1 - i)
  cot = lambda walk: chunk_specs(
    1, walk,
    [("q", (cp, dv), True), ("q", (cp, dv), True), ("q", (cp, LANES), True),
     ("q", (cp, LANES), True)],
  )  # fmt: skip
  xs = (q, k, v, pq, pk, dy, y, lse, rho)
  dq, dpq, dg = common.pallas_call(
    functools.partial(_bwd_q_kernel, n=n, **kw),
    target="pallas_tpu",
    interpret=interpret,
    compiler_params=params,
    out_shape=[
      jax.ShapeDtypeStruct((b, hq, tp, dk), q.dtype),
      jax.ShapeDtypeStruct((b, hq, tp, d), q.dtype),
      jax.ShapeDtypeStruct((b, hq, 1, LANES), F32),
    ],
    grid=(b, hq, n),
    in_specs=_operand_specs(group, fwd, cp, dk, dv, d) + cot(fwd),
    out_specs=chunk_specs(
      1, fwd, [("q", (cp, dk), True), ("q", (cp, d), True), ("q", (1, LANES), False)]
    ),
    scratch_shapes=[
      pltpu.VMEM((cp, dk), q.dtype),
      pltpu.VMEM((cp, dv), q.dtype),
      pltpu.VMEM((cp, d), q.dtype),
      pltpu.VMEM((d, dv), F32),
      pltpu.VMEM((1, d), F32),
      pltpu.VMEM((1, LANES), F32),
    ],  # fmt: skip
    name="lola_hybrid_bwd_q",
  )(*xs)
  dk_, dv_, dpk = common.pallas_call(
    functools.partial(_bwd_kv_kernel, **kw),
    target="pallas_tpu",
    interpret=interpret,
    compiler_params=params,
    out_shape=[
      jax.ShapeDtypeStruct((b, hq, tp, dk), F32),
      jax.ShapeDtypeStruct((b, hq, tp, dv), F32),
      jax.ShapeDtypeStruct((b, hq, tp, d), F32),
    ],
    grid=(b, hq, n),
    in_specs=_operand_specs(group, rev, cp, dk, dv, d)
    + cot(rev)
    + chunk_specs(group, rev, [("kv_prev", (cp, dk), True), ("kv_prev", (cp, dv), True)]),
    out_specs=chunk_specs(
      1, rev, [("q", (cp, dk), True), ("q", (cp, dv), True), ("q", (cp, d), True)]
    ),
    scratch_shapes=[
      pltpu.VMEM((cp, dk), F32),
      pltpu.VMEM((cp, dv), F32),
      pltpu.VMEM((d, dv), F32),
      pltpu.VMEM((1, d), F32),
      pltpu.VMEM((d, dv), F32),
      pltpu.VMEM((1, d), F32),
    ],  # fmt: skip
    name="lola_hybrid_bwd_kv",
  )(*xs, k, v)
  dlg = dg[:, :, 0, 0].sum(axis=0)  # [Hq]
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
  q, k, v, phi_q, phi_k, gates, *, chunk_size, mix, softmax_scale, block_sizes=None,
  precision=common.DEFAULT, interpret=None,
):  # fmt: skip
  """Pads (each chunk to the sublane tile, feature dims to the block sizes), runs the TPU kernels,
  crops. `gates`: (g, log g, log(1-g)), each [Hq] (`equations.gate_terms`); the kernels read the
  logs (g = e^{log g} for lolcats). All operands are cast to q's dtype."""
  bs = block_sizes or common.BlockSizes.for_target("pallas_tpu")
  cp = bs.pad_dim(chunk_size, common.sublanes(q.dtype))
  return _run(_hybrid_core, q, k, v, phi_q, phi_k, gates, chunk_size=chunk_size, mix=mix,
              softmax_scale=softmax_scale, bs=bs, cp=cp, precision=precision,
              interpret=interpret)  # fmt: skip


def _run(core, q, k, v, phi_q, phi_k, gates, *, chunk_size, mix, softmax_scale, bs, cp,
         precision, interpret):  # fmt: skip
  """Shared by the TPU and Triton forms: per-chunk padding to cp rows, the core, cropping."""
  t, dk, dv, d = q.shape[1], q.shape[3], v.shape[3], phi_q.shape[3]
  dt = q.dtype
  c = chunk_size
  scale = dk**-0.5 if softmax_scale is None else float(softmax_scale)
  dkp, dvp = bs.pad_dim(dk, bs.key_multiple), bs.pad_dim(dv, bs.value_multiple)
  dp = bs.pad_dim(d, bs.feature_multiple)
  y = core(
    common.to_chunks(q, c, cp, dkp),
    common.to_chunks(k.astype(dt), c, cp, dkp),
    common.to_chunks(v.astype(dt), c, cp, dvp),
    common.to_chunks(phi_q.astype(dt), c, cp, dp),
    common.to_chunks(phi_k.astype(dt), c, cp, dp),
    gates[1],
    gates[2] if mix == "gated" else jax.lax.stop_gradient(gates[2]),  # lolcats: unread
    c,
    cp,
    scale,
    mix,
    precision,
    interpret,
  )
  return common.from_chunks(y, t, c, cp, dv)
