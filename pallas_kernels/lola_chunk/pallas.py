"""The fused LoLA chunk step (inference with a sparse cache) as one Pallas kernel.

One call handles one chunk n of `lola_jax.lola_prefill`'s scan, one program per (batch row, kv
head) with the G query heads of the group stacked on the row axis (R = G*C query rows). With the
softmax set of the chunk's queries laid out as Nk = L + 2C keys `[cache (L); window (C); chunk
(C)]` and the linear state (H, s) as it stood at the start of the chunk, the program computes,
with everything in fast memory:

  logits   l = scale * q K^T                                   [R, Nk]
  mask     key i visible to row r (query position t = r mod C) iff key_mask_i and
           (i < L + C  or  i - (L + C) <= t)                    (causal inside the chunk)
  softmax  m = max_visible l (0 if none), S = sum e^{l-m}, N = sum e^{l-m} v
  linear   a = phi_q H,  z = phi_q s
  gated    y = (w_s N + w_l a) / (w_s S + w_l z),  w_s = e^{log g + m - c}, w_l = e^{log(1-g) - c},
           c = max(log g + m, log(1-g) + log max(|z|, 1e-30))     (log space: any logit size)
  lolcats  y = (g N + a) / (g S + z)
  sre      e_j = || v_j - phi_k_j^T H / (phi_k_j^T s + eps) ||_2 for the L + C candidates
           [cache; window] (the pairs competing for the cache when the chunk completes), read
           against the same H, s as the queries (the state *before* the end-of-chunk update).

The mix and the self-recall error are `pallas_kernels.equations`, the functions the XLA form
(`lola_chunk.xla`) and the core call too.

Selection (top-L), absorption and compaction stay in XLA (`lola_jax.core.selection`): they are
gathers and a sort over L + C scores, cheap next to the matmuls above, and the policy boundary
stays open for policies other than "sre".

Gradients: `lola_chunk_step` has a custom VJP whose backward recomputes the step in XLA
(`lola_chunk.xla.lola_chunk_step_xla`, the core's XLA step) and differentiates it,
so gradients equal the XLA path's. The self-recall errors are selection scores and are not
differentiated (the core stops their gradient as well); their cotangent is ignored.

Backends: "pallas_tpu" (Mosaic; grid (B, Hkv) both "parallel", explicit `vmem_limit_bytes`,
VMEM per program `lola_chunk_vmem_bytes`, set by L and C, not T) and "pallas_triton" (explicit
num_warps / num_stages), chosen by `implementation=` and lowerable for either platform from any
machine (`common.pallas_call`). Operands stay in the input dtype with float32 accumulation.

Padding (exact): dk, dv, D are zero-padded to the block sizes; keys to `BlockSizes.chunk_multiple`
(128 lanes on TPU, powers of two >= 16 on GPU) with padded keys masked out, query rows to the
sublane tile on TPU (powers of two on GPU) with padded rows cropped; candidates are padded like
the rows and their errors cropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import F32, NEG, dot, head_outputs, head_specs
from pallas_kernels.equations import (
  MIXES,
  gate_terms,
  mix_branches,
  mix_weights,
  self_recall_error,
)
from pallas_kernels.lola_chunk.xla import lola_chunk_step_xla


def _chunk_kernel(
  q_ref, pq_ref, k_ref, v_ref, km_ref, qpos_ref, cphi_ref, h_ref, s_ref, lg_ref, lg1_ref,
  y_ref, *sre_refs, split, scale, mix, eps, precision,
):  # fmt: skip
  """One (batch row, kv head): q [Rp, dk], keys [Nkp, dk], candidates [Ncp, D] -> y, sre."""
  mm = functools.partial(dot, precision=precision, dtype=q_ref.dtype)
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  h, s = h_ref[...], s_ref[...]  # [D, dv], [1, D] float32
  logits = mm(q, k, tb=True) * scale  # [Rp, Nkp]
  col = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  visible = (km_ref[...] > 0) & ((col < split) | (col - split <= qpos_ref[...]))
  masked = jnp.where(visible, logits, NEG)
  m = jnp.max(masked, axis=1, keepdims=True)
  m = jnp.where(m > 0.5 * NEG, m, 0.0)
  p = jnp.where(visible, jnp.exp(masked - m), 0.0)
  s_soft = jnp.sum(p, axis=1, keepdims=True)
  n_soft = mm(p, v)
  pq = pq_ref[...]
  a = mm(pq, h)
  z = jnp.sum(pq.astype(F32) * s, axis=1, keepdims=True)
  lg, lg1 = lg_ref[...], lg1_ref[...]  # [Rp, 1] log g, log(1-g) of each row's query head
  w_s, w_l = mix_weights(m, z, jnp.exp(lg), mix, log_gate=lg, log_1m_gate=lg1)
  y, _ = mix_branches(w_s, w_l, s_soft, n_soft, a, z)
  y_ref[...] = y
  if sre_refs:
    (sre_ref,) = sre_refs
    ncp = cphi_ref.shape[0]
    phi = cphi_ref[...].astype(F32)  # [Ncp, D]
    vc = v_ref[pl.ds(0, ncp), :].astype(F32)  # candidates are the first L + C keys
    sre_ref[...] = self_recall_error(phi, vc, h, s, eps)


def lola_chunk_vmem_bytes(rp, nkp, ncp, dk, dv, d, dtype, with_sre=True) -> int:
  """VMEM bytes of one TPU program (`common.vmem_bytes`) for padded query rows rp = G*C, keys
  nkp = L + 2C, candidates ncp = L + C and dims: set by the chunk and the cache, not by T (one
  call per chunk)."""
  x = jnp.dtype(dtype)
  blocks = [
    ((rp, dk), x), ((rp, d), x), ((nkp, dk), x), ((nkp, dv), x), ((1, nkp), F32),
    ((rp, 1), jnp.int32), ((ncp, d), x), ((d, dv), F32), ((1, d), F32), ((rp, 1), F32),
    ((rp, 1), F32), ((rp, dv), F32),
  ]  # fmt: skip
  return common.vmem_bytes(blocks + ([((ncp, 1), F32)] if with_sre else []))


def _pad(x, shape):
  return jnp.pad(x, [(0, n - d) for d, n in zip(x.shape, shape, strict=True)])


def _forward_pallas(
  q, phi_q, keys, values, key_mask, cand_phi_k, linear_h, linear_s, lg, lg1,
  *, cache_size, scale, mix, eps, with_sre, target, block_sizes, precision, interpret,
):  # fmt: skip
  """Pads, runs the kernel over grid (B, Hkv), crops. Shapes as `lola_chunk_step`; lg, lg1:
  [Hkv, G] log g and log(1-g). Operands are cast to q's dtype."""
  bs = block_sizes or common.BlockSizes.for_target(target)
  b, hkv, g, c, dk = q.shape
  dt = q.dtype
  dv, d, nk = values.shape[-1], phi_q.shape[-1], keys.shape[-2]
  nc = cache_size + c
  rows = g * c
  dkp, dvp = bs.pad_dim(dk, bs.key_multiple), bs.pad_dim(dv, bs.value_multiple)
  dp = bs.pad_dim(d, bs.feature_multiple)
  # Query rows on the sublane axis (the dtype's tile on TPU), keys on the logits' lane axis (128).
  row_multiple = common.sublanes(dt) if target == "pallas_tpu" else bs.chunk_multiple
  rp, nkp = bs.pad_dim(rows, row_multiple), bs.pad_dim(nk, bs.chunk_multiple)
  ncp = min(bs.pad_dim(nc, row_multiple), nkp)
  if target == "pallas_tpu":
    nbytes = lola_chunk_vmem_bytes(rp, nkp, ncp, dkp, dvp, dp, dt, with_sre)
    common.check_vmem("lola_chunk_step", nbytes)

  qr = _pad(q.reshape(b, hkv, rows, dk), (b, hkv, rp, dkp))
  pqr = _pad(phi_q.reshape(b, hkv, rows, d).astype(dt), (b, hkv, rp, dp))
  kp = _pad(keys.astype(dt), (b, hkv, nkp, dkp))
  vp = _pad(values.astype(dt), (b, hkv, nkp, dvp))
  km = _pad(key_mask.astype(F32)[:, :, None, :], (b, hkv, 1, nkp))
  cphi = _pad(cand_phi_k.astype(dt), (b, hkv, ncp, dp))
  hp = _pad(linear_h.astype(F32), (b, hkv, dp, dvp))
  sp = _pad(linear_s.astype(F32)[:, :, None, :], (b, hkv, 1, dp))
  row = jnp.arange(rp, dtype=jnp.int32)
  qpos = jnp.where(row < rows, row % c, c - 1)[:, None]  # [Rp, 1] position in the chunk

  def per_row(x):  # [Hkv, G] -> [Hkv, Rp, 1]; padded rows get g = 1/2
    x = jnp.repeat(x.astype(F32), c, axis=1)
    return jnp.pad(x, ((0, 0), (0, rp - rows)), constant_values=-jnp.log(2.0))[..., None]

  lg, lg1 = per_row(lg), per_row(lg1)

  per_bh = lambda *tails: head_specs(1, [("q", tail) for tail in tails])
  per_h = pl.BlockSpec((pl.squeezed, rp, 1), lambda i, j: (j, 0, 0))  # one row block per kv head
  in_specs = [
    *per_bh((rp, dkp), (rp, dp), (nkp, dkp), (nkp, dvp), (1, nkp)),
    pl.BlockSpec((rp, 1), lambda i, j: (0, 0)),
    *per_bh((ncp, dp), (dp, dvp), (1, dp)),
    per_h,
    per_h,
  ]
  out_shape, out_specs = head_outputs(b, hkv, [(rp, dvp), (ncp, 1)] if with_sre else [(rp, dvp)])
  kernel = functools.partial(
    _chunk_kernel, split=cache_size + c, scale=scale, mix=mix, eps=float(eps), precision=precision
  )
  params = (
    common.compiler_params(target, dimension_semantics=("parallel", "parallel"))
    if target == "pallas_tpu"
    else common.compiler_params(target, num_warps=4, num_stages=1)
  )
  outs = common.pallas_call(
    kernel,
    target=target,
    interpret=interpret,
    compiler_params=params,
    out_shape=out_shape,
    grid=(b, hkv),
    in_specs=in_specs,
    out_specs=out_specs,
    name="lola_chunk_step",
  )(qr, pqr, kp, vp, km, qpos, cphi, hp, sp, lg, lg1)
  y = outs[0][:, :, :rows, :dv].reshape(b, hkv, g, c, dv)
  sre = outs[1][:, :, :nc, 0] if with_sre else None
  return y, sre


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12, 13, 14, 15, 16, 17))
def _step(q, pq, keys, values, key_mask, cand_phi_k, linear_h, linear_s, gates,
          cache_size, scale, mix, eps, with_sre, target, block_sizes, precision,
          interpret):  # fmt: skip
  return _forward_pallas(
    q, pq, keys, values, key_mask > 0, cand_phi_k, linear_h, linear_s, gates[1], gates[2],
    cache_size=cache_size, scale=scale, mix=mix, eps=eps, with_sre=with_sre, target=target,
    block_sizes=block_sizes, precision=precision, interpret=interpret,
  )  # fmt: skip


def _step_fwd(q, pq, keys, values, key_mask, cand_phi_k, linear_h, linear_s, gates,
              cache_size, scale, mix, eps, with_sre, target, block_sizes, precision,
              interpret):  # fmt: skip
  out = _step(
    q, pq, keys, values, key_mask, cand_phi_k, linear_h, linear_s, gates,
    cache_size, scale, mix, eps, with_sre, target, block_sizes, precision, interpret,
  )  # fmt: skip
  return out, (q, pq, keys, values, key_mask, cand_phi_k, linear_h, linear_s, gates)


def _step_bwd(cache_size, scale, mix, eps, with_sre, target, block_sizes, precision, interpret,
              res, cts):  # fmt: skip
  del block_sizes, interpret, with_sre, target, precision
  q, pq, keys, values, key_mask, cand_phi_k, linear_h, linear_s, gates = res
  dy = cts[0]  # the self-recall errors are selection scores: their cotangent is dropped

  def y_of(q, pq, keys, values, linear_h, linear_s, gates):
    return lola_chunk_step_xla(
      q, pq, keys, values, key_mask > 0, cand_phi_k, linear_h, linear_s, None,
      cache_size=cache_size, scale=scale, mix=mix, eps=eps, with_sre=False, gates=gates,
    )[0]  # fmt: skip

  _, vjp = jax.vjp(y_of, q, pq, keys, values, linear_h, linear_s, gates)
  dq, dpq, dk, dv, dh, ds, dg = vjp(dy.astype(F32))
  return (dq, dpq, dk, dv, jnp.zeros_like(key_mask), jnp.zeros_like(cand_phi_k), dh, ds, dg)


_step.defvjp(_step_fwd, _step_bwd)


def lola_chunk_step(
  q,  # [B, Hkv, G, C, dk]
  phi_q,  # [B, Hkv, G, C, D]
  keys,  # [B, Hkv, L + 2C, dk]   [cache; window; chunk]
  values,  # [B, Hkv, L + 2C, dv]
  key_mask,  # [B, Hkv, L + 2C] bool
  cand_phi_k,  # [B, Hkv, L + C, D]  phi_k of [cache; window]
  linear_h,  # [B, Hkv, D, dv] float32
  linear_s,  # [B, Hkv, D] float32
  gate,  # [Hkv, G] in [0, 1], or None with gate_logit
  *,
  cache_size: int,
  mix: str = "gated",
  softmax_scale: float | None = None,
  eps: float = 1e-6,
  with_sre: bool = True,
  implementation: str = "pallas",
  block_sizes: common.BlockSizes | None = None,
  precision=common.DEFAULT,
  interpret=None,
  gate_logit=None,  # [Hkv, G] the gate's logits x (g = sigmoid(x)), instead of gate
  gates=None,  # (g, log g, log(1-g)) [Hkv, G] each (`equations.gate_terms`), instead of both
):
  """One LoLA chunk step fused in a Pallas kernel (module docstring for the equations).

  The gate is given as g (`gate`), as its logit (`gate_logit`: finite gradients however
  saturated, `pallas_kernels.equations`) or as the terms both become (`gates`); the kernel reads
  log g and log(1-g), its backward differentiates the XLA form in all three terms.

  implementation: the kernel family, "pallas" (the local backend's:
  `common.resolve_implementation`), "pallas_tpu" or "pallas_triton" (forced: compiled on its
  device, interpreted on CPU, exportable from any machine). block_sizes: padding (default
  `BlockSizes.for_target`; on TPU the keys are padded to 128 lanes, the query rows to the
  dtype's sublane tile). precision: of the products (operands in q's dtype, float32
  accumulation).

  `key_mask` says which keys exist (cache slots in use, the window once one chunk is complete,
  the chunk's real tokens); the causal structure inside the chunk is applied by the kernel.
  Row t of the chunk sees key L + C + j of the chunk only for j <= t.

  Returns:
    y: [B, Hkv, G, C, dv] float32 outputs of the chunk's queries.
    sre: [B, Hkv, L + C] float32 self-recall errors of the candidates [cache; window] against
      (H, s), or None when `with_sre` is False.
  """
  b, hkv, g, c, dk = q.shape
  nk = keys.shape[-2]
  if nk != cache_size + 2 * c:
    raise ValueError(f"keys must have L + 2C = {cache_size + 2 * c} rows, got {nk}")
  if cand_phi_k.shape[-2] != cache_size + c:
    raise ValueError(f"cand_phi_k must have L + C = {cache_size + c} rows, got {cand_phi_k.shape}")
  if mix not in MIXES:
    raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
  if not (isinstance(eps, (int, float)) and eps >= 0):
    raise ValueError(f"eps must be a float >= 0, got {eps!r}")
  if sum(x is not None for x in (gate, gate_logit, gates)) != 1:
    raise ValueError("give exactly one of gate, gate_logit and gates")
  target = common.resolve_implementation(implementation)
  if not common.is_pallas(target):
    raise ValueError(
      f"implementation must be one of ('pallas', 'pallas_tpu', 'pallas_triton'), got "
      f"{implementation!r}"
    )
  scale = dk**-0.5 if softmax_scale is None else float(softmax_scale)
  g, lg, lg1 = gate_terms(gate, gate_logit) if gates is None else gates
  # The backward returns a concrete zero for the terms the mix does not read (gated: g,
  # lolcats: the logs); stopping them keeps 0 x (d log g / dg = inf at g = 0) out of the chain.
  if mix == "gated":
    gates = (jax.lax.stop_gradient(g), lg, lg1)
  else:
    gates = (g, jax.lax.stop_gradient(lg), jax.lax.stop_gradient(lg1))
  return _step(
    q, phi_q, keys, values, key_mask.astype(F32), cand_phi_k, linear_h, linear_s, gates,
    cache_size, scale, mix, float(eps), bool(with_sre), target, block_sizes, precision, interpret,
  )  # fmt: skip
