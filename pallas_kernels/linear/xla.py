"""Plain-JAX (XLA) forms of causal linear attention: chunked, quadratic and per-token scan.

All three compute, per batch row and query head i reading kv head h = i // (Hq // Hkv):

    H_t = H_0 + sum_{j<=t} phi_k_j v_j^T      s_t = s_0 + sum_{j<=t} phi_k_j
    y_t = phi_q_t^T H_t / (phi_q_t^T s_t + eps)

in float32 and return `(y [B,T,Hq,dv] float32, (H_T [B,Hkv,D,dv], s_T [B,Hkv,D]))`. Gradients come
from JAX autodiff; the chunked form is the XLA path of `linear_attention` and the gradient reference
of the Pallas kernel, the per-token scan its "reference" implementation, the quadratic form a
third check (tests, benchmarks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import HIGHEST


def _grouped(phi_q, num_kv_heads):
  b, t, hq, d = phi_q.shape
  return phi_q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)


def _init(phi_k, v, initial_state):
  b, _, hkv, d = phi_k.shape
  if initial_state is None:
    return jnp.zeros((b, hkv, d, v.shape[-1]), jnp.float32), jnp.zeros((b, hkv, d), jnp.float32)
  h0, s0 = initial_state
  return h0.astype(jnp.float32), s0.astype(jnp.float32)


def linear_attention_chunked(phi_q, phi_k, v, *, chunk_size, initial_state=None, eps=1e-6):
  """Chunked form: a `lax.scan` over chunks, the intra-chunk part as a masked matmul."""
  b, t, hq, d = phi_q.shape
  hkv, dv = v.shape[2], v.shape[3]
  c = chunk_size
  n = -(-t // c)
  pad = n * c - t
  f32 = lambda x: jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad), (0, 0), (0, 0)])
  # [N, B, Hkv, G, C, D] / [N, B, Hkv, C, X]
  q = _grouped(f32(phi_q), hkv).reshape(b, n, c, hkv, hq // hkv, d).transpose(1, 0, 3, 4, 2, 5)
  k = f32(phi_k).reshape(b, n, c, hkv, d).transpose(1, 0, 3, 2, 4)
  vv = f32(v).reshape(b, n, c, hkv, dv).transpose(1, 0, 3, 2, 4)
  mask = jnp.tril(jnp.ones((c, c), jnp.float32))

  def step(carry, inp):
    h, s = carry
    qc, kc, vc = inp
    a = jnp.einsum("bhgcd,bhed->bhgce", qc, kc, precision=HIGHEST) * mask
    num = jnp.einsum("bhgcd,bhdv->bhgcv", qc, h, precision=HIGHEST)
    num = num + jnp.einsum("bhgce,bhev->bhgcv", a, vc, precision=HIGHEST)
    den = jnp.einsum("bhgcd,bhd->bhgc", qc, s, precision=HIGHEST) + a.sum(-1) + eps
    h = h + jnp.einsum("bhcd,bhcv->bhdv", kc, vc, precision=HIGHEST)
    s = s + kc.sum(2)
    return (h, s), num / den[..., None]

  (h, s), y = jax.lax.scan(step, _init(phi_k, v, initial_state), (q, k, vv))
  y = y.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * c, hq, dv)[:, :t]
  return y, (h, s)


def linear_attention_quadratic(phi_q, phi_k, v, *, initial_state=None, eps=1e-6):
  """Quadratic form: the full [T, T] causal score matrix (O(T^2) time and memory)."""
  b, t, hq, d = phi_q.shape
  hkv = v.shape[2]
  q = _grouped(phi_q.astype(jnp.float32), hkv)
  k, vv = phi_k.astype(jnp.float32), v.astype(jnp.float32)
  h0, s0 = _init(phi_k, v, initial_state)
  a = jnp.einsum("bthgd,bshd->bhgts", q, k, precision=HIGHEST) * jnp.tril(jnp.ones((t, t)))
  num = jnp.einsum("bhgts,bshv->bthgv", a, vv, precision=HIGHEST)
  num = num + jnp.einsum("bthgd,bhdv->bthgv", q, h0, precision=HIGHEST)
  den = a.sum(-1).transpose(0, 3, 1, 2) + jnp.einsum("bthgd,bhd->bthg", q, s0, precision=HIGHEST)
  y = (num / (den + eps)[..., None]).reshape(b, t, hq, -1)
  h = h0 + jnp.einsum("bshd,bshv->bhdv", k, vv, precision=HIGHEST)
  return y, (h, s0 + k.sum(1))


def linear_attention_scan(phi_q, phi_k, v, *, initial_state=None, eps=1e-6):
  """Naive recurrence: one `lax.scan` step per token (O(T) sequential steps)."""
  b, t, hq, d = phi_q.shape
  hkv = v.shape[2]
  q = _grouped(phi_q.astype(jnp.float32), hkv).swapaxes(0, 1)
  k, vv = phi_k.astype(jnp.float32).swapaxes(0, 1), v.astype(jnp.float32).swapaxes(0, 1)

  def step(carry, inp):
    h, s = carry
    qt, kt, vt = inp
    h = h + kt[..., :, None] * vt[..., None, :]
    s = s + kt
    num = jnp.einsum("bhgd,bhdv->bhgv", qt, h, precision=HIGHEST)
    den = jnp.einsum("bhgd,bhd->bhg", qt, s, precision=HIGHEST) + eps
    return (h, s), num / den[..., None]

  (h, s), y = jax.lax.scan(step, _init(phi_k, v, initial_state), (q, k, vv))
  return y.swapaxes(0, 1).reshape(b, t, hq, -1), (h, s)
