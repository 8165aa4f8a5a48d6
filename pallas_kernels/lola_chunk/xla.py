"""Plain-JAX (XLA) form of the LoLA chunk step: the core's XLA path and the kernel's oracle.

`attend` is LoLA's read-out for a block of queries of one chunk, against a softmax set given by a
mask and the linear state (H, s) as it stood at the start of the chunk:

  logits   l = scale q K^T                    (masked keys are out of the softmax set)
  softmax  m = max_visible l (0 if none), S = sum e^{l-m}, N = sum e^{l-m} v
  linear   a = phi_q^T H,  z = phi_q^T s
  mix      y = (w_s N + w_l a) / (w_s S + w_l z)  (`pallas_kernels.equations`)

`lola_jax.core.scan` calls it for every chunk of `lola_prefill` and every token of `lola_decode`
on the XLA path. `lola_chunk_step_xla` is the same step with the kernel's signature (the causal
mask built from key validity, the self-recall errors of the candidates added): it is the oracle
of `lola_chunk_step` and its backward pass.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.equations import gate_terms, mix_branches, mix_weights, self_recall_error


def softmax_statistics(logits, mask, values):
  """Masked softmax statistics of one block of queries.

  Args:
    logits: [..., Tq, Tk] float32 scaled logits.
    mask: [..., Tq, Tk] bool (broadcastable), True where the key is in the query's softmax set.
    values: [..., Tk, dv] values of the keys.

  Returns:
    m: [..., Tq, 1] the max logit, 0 where no key is visible. It is differentiated like any
      other value: the lolcats mix depends on it (its linear branch is not shifted).
    s: [..., Tq, 1] sum_i e^{l_i - m}.
    n: [..., Tq, dv] float32 sum_i e^{l_i - m} v_i.
    p: [..., Tq, Tk] e^{l_i - m} (0 for masked keys).
  """
  masked = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(masked, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(masked - m), 0.0)
  s = jnp.sum(p, axis=-1, keepdims=True)
  n = jnp.einsum(
    "...qk,...kd->...qd", p.astype(values.dtype), values, preferred_element_type=logits.dtype
  )
  return m, s, n, p


def attend(q, phi_q, keys, values, mask, linear_h, linear_s, gates, *, scale: float, mix: str):
  """LoLA outputs of a block of queries against the softmax set and the linear state.

  Args:
    q: [B, Hkv, G, Tq, dk]  phi_q: [B, Hkv, G, Tq, D]
    keys: [B, Hkv, Tk, dk]  values: [B, Hkv, Tk, dv]
    mask: bool, broadcastable to [B, Hkv, Tq, Tk]: key i is in query t's softmax set.
    linear_h: [B, Hkv, D, dv] float32  linear_s: [B, Hkv, D] float32 (float64 in float64 runs).
    gates: (g, log g, log(1-g)), each [Hkv, G] (`equations.gate_terms`).
    scale: the logit scale.  mix: "gated" or "lolcats".

  Returns:
    y [B, Hkv, G, Tq, dv] in linear_h.dtype; p [B, Hkv, G, Tq, Tk] the shifted softmax weights
    e^{l_i - m} and s [B, Hkv, G, Tq, 1] their sum (the softmax of query t is p / s).
  """
  acc = linear_h.dtype  # float32 (float64 for float64 inputs)
  logits = jnp.einsum("bhgqd,bhkd->bhgqk", q, keys, preferred_element_type=acc) * scale
  m, s, n, p = softmax_statistics(logits, mask[:, :, None], values[:, :, None])
  phi_q = phi_q.astype(acc)
  a = jnp.einsum("bhgqf,bhfe->bhgqe", phi_q, linear_h)
  z = jnp.einsum("bhgqf,bhf->bhgq", phi_q, linear_s)[..., None]
  g, lg, lg1 = (jnp.asarray(x, acc)[None, :, :, None, None] for x in gates)
  w_s, w_l = mix_weights(m, z, g, mix, log_gate=lg, log_1m_gate=lg1)
  y, _ = mix_branches(w_s, w_l, s, n, a, z)
  return y, p, s


def chunk_mask(key_mask, cache_size: int, chunk_size: int):
  """[B, Hkv, L + 2C] key validity -> [B, Hkv, C, L + 2C] softmax mask with the causal chunk."""
  c, split = chunk_size, cache_size + chunk_size
  col = jnp.arange(key_mask.shape[-1])
  causal = (col[None, :] < split) | (col[None, :] - split <= jnp.arange(c)[:, None])
  return key_mask[:, :, None, :] & causal


def lola_chunk_step_xla(
  q, phi_q, keys, values, key_mask, cand_phi_k, linear_h, linear_s, gate,
  *, cache_size, scale, mix, eps, with_sre, gate_logit=None, gates=None,
):  # fmt: skip
  """`lola_chunk_step` in plain JAX (shapes and returns as there): its oracle and backward. The
  gate is `gate` in [0, 1], its logit `gate_logit`, or the terms `gates` (then `gate` is None).
  """
  c = q.shape[-2]
  gates = gate_terms(gate, gate_logit) if gates is None else gates
  y, _, _ = attend(
    q, phi_q, keys, values, chunk_mask(key_mask, cache_size, c), linear_h, linear_s, gates,
    scale=scale, mix=mix,
  )  # fmt: skip
  sre = None
  if with_sre:
    cand_v = values[:, :, : cache_size + c]
    sre = self_recall_error(
      cand_phi_k, cand_v, linear_h, linear_s[..., None, :], eps, reduce_by_dot=True
    )[..., 0]
  return y, sre
