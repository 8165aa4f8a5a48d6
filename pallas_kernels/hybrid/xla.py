"""Plain-JAX (XLA) form of the fused hybrid: LoLA with an empty sparse cache.

A query at position t in chunk n attends with exact softmax to the terraced window (all of chunk
n-1 plus chunk n up to t) and reads the linear state over chunks <= n-2,
H_n = sum_{j < (n-1)C} phi_k_j v_j^T, s_n = sum_{j < (n-1)C} phi_k_j. With l the scaled logits of
the window, m = max l, S = sum e^{l-m}, N = sum e^{l-m} v, a = phi_q^T H_n, z = phi_q^T s_n:

  gated:    y = (g e^m N + (1-g) a) / (g e^m S + (1-g) z), evaluated with weights shifted by
            c = max(log g + m, log(1-g) + log|z|) so logits of any size stay finite;
  lolcats:  y = (g N + a) / (g S + z)

(`pallas_kernels.equations`, shared with the kernel and the core).

The lolcats form depends on m itself (the branches are not rescaled together), so its gradient
flows through m = max l to the arg-max logit (ties split evenly, as `jnp.max` does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import HIGHEST, NEG
from pallas_kernels.equations import mix_branches, mix_weights


def hybrid_attention_xla(q, k, v, phi_q, phi_k, gates, *, chunk_size, mix_name, softmax_scale):
  """Chunk-parallel XLA form; returns y [B, T, Hq, dv] float32 (see module docstring).
  `gates`: (g, log g, log(1-g)), each [Hq] (`equations.gate_terms`)."""
  b, t, hq, dk = q.shape
  hkv, dv, d = v.shape[2], v.shape[3], phi_q.shape[3]
  grp, c = hq // hkv, chunk_size
  n = -(-t // c)
  scale = dk**-0.5 if softmax_scale is None else softmax_scale

  def chunks(x):  # [B, T, H, X] -> [B, H, N, C, X] float32
    x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, n * c - t), (0, 0), (0, 0)])
    return x.reshape(b, n, c, x.shape[2], x.shape[3]).transpose(0, 3, 1, 2, 4)

  def prev(x):  # chunk n-1 of every chunk n (zeros for n = 0)
    return jnp.pad(x, [(0, 0), (0, 0), (1, 0), (0, 0), (0, 0)])[:, :, :-1]

  qc = chunks(q).reshape(b, hkv, grp, n, c, dk)
  pq = chunks(phi_q).reshape(b, hkv, grp, n, c, d)
  kc, vc, pk = chunks(k), chunks(v), chunks(phi_k)
  kw = jnp.concatenate([prev(kc), kc], axis=3)  # [B, Hkv, N, 2C, dk]
  vw = jnp.concatenate([prev(vc), vc], axis=3)
  logits = jnp.einsum("bhgnqd,bhnkd->bhgnqk", qc, kw, precision=HIGHEST) * scale
  row = jnp.arange(c)[:, None]
  col = jnp.arange(2 * c)[None, :]
  has_prev = (jnp.arange(n) > 0)[:, None, None]
  valid = jnp.where(col < c, has_prev, (col - c) <= row)  # [N, C, 2C]
  masked = jnp.where(valid, logits, NEG)
  m = jnp.max(masked, axis=-1, keepdims=True)
  if mix_name == "gated":
    m = jax.lax.stop_gradient(m)  # the gated form is invariant to the shift
  p = jnp.where(valid, jnp.exp(masked - m), 0.0)
  s_soft = p.sum(-1, keepdims=True)
  n_soft = jnp.einsum("bhgnqk,bhnkv->bhgnqv", p, vw, precision=HIGHEST)
  # Linear state at the start of chunk n: chunks <= n-2.
  kv = jnp.einsum("bhncd,bhncv->bhndv", pk, vc, precision=HIGHEST)
  ks = pk.sum(3)
  shift2 = lambda x: jnp.cumsum(jnp.pad(x, [(0, 0), (0, 0), (2, 0)] + [(0, 0)] * (x.ndim - 3)), 2)
  h = shift2(kv)[:, :, :n]
  sv = shift2(ks)[:, :, :n]
  a = jnp.einsum("bhgnqd,bhndv->bhgnqv", pq, h, precision=HIGHEST)
  z = jnp.einsum("bhgnqd,bhnd->bhgnq", pq, sv, precision=HIGHEST)[..., None]
  g, lg, lg1 = (
    x.astype(jnp.float32).reshape(hkv, grp)[None, :, :, None, None, None] for x in gates
  )
  w_s, w_l = mix_weights(m, z, g, mix_name, log_gate=lg, log_1m_gate=lg1)
  y, _ = mix_branches(w_s, w_l, s_soft, n_soft, a, z)
  y = y.reshape(b, hq, n * c, dv)[:, :, :t]
  return jnp.swapaxes(y, 1, 2)
