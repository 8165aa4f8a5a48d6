"""Combining the softmax branch (window + sparse cache) with the linear branch.

Both mixes share one denominator over the three memories. With `l_i` the logits of the keys in
the softmax set `U_t`, `a = phi_q^T H` and `z = phi_q^T s` the linear read-out:

  gated:    y = (g sum e^{l_i} v_i + (1-g) a) / (g sum e^{l_i} + (1-g) z)
  lolcats:  y = (g sum e^{l_i-m} v_i + a)     / (g sum e^{l_i-m} + z),      m = max_i l_i

The softmax branch is summarised by its running statistics `(m, S, N)` with `S = sum e^{l_i-m}`
and `N = sum e^{l_i-m} v_i`. The gated form has no max shift of its own, so it is evaluated in log
space: with `c = max(log g + m, log(1-g) + log|z|)` both weights

  w_s = e^{log g + m - c} <= 1,    w_l = e^{log(1-g) - c}  (w_l |z| <= 1)

stay finite for logits of any size, and y = (w_s N + w_l a) / (w_s S + w_l z) exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Smallest |z| used in the log of the linear mass (keeps w_l finite when the state is empty).
_TINY = 1e-30


def softmax_branch(logits: jax.Array, mask: jax.Array, values: jax.Array):
  """Masked softmax statistics of one block of queries.

  Args:
    logits: [..., Tq, Tk] float32 scaled logits.
    mask: [..., Tq, Tk] bool (broadcastable), True where the key is in the query's softmax set.
    values: [..., Tk, dv] values of the keys.

  Returns:
    m: [..., Tq] the max logit, 0 where no key is visible. It is differentiated like any
      other value: the lolcats mix depends on it (its linear branch is not shifted).
    s: [..., Tq] sum_i e^{l_i - m}.
    n: [..., Tq, dv] float32 sum_i e^{l_i - m} v_i.
  """
  masked = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(masked, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(masked - m[..., None]), 0.0)
  s = jnp.sum(p, axis=-1)
  n = jnp.einsum(
    "...qk,...kd->...qd", p.astype(values.dtype), values, preferred_element_type=logits.dtype
  )
  return m, s, n


def mix_branches(m, s, n, lin_num, lin_den, gate, mix: str) -> jax.Array:
  """One shared denominator over the softmax and linear branches (module docstring).

  Args:
    m, s: [..., Tq] softmax-branch max logit and shifted mass (from `softmax_branch`).
    n: [..., Tq, dv] shifted softmax numerator.
    lin_num: [..., Tq, dv] float32 linear read-out a = phi_q^T H.
    lin_den: [..., Tq] float32 linear mass z = phi_q^T s.
    gate: float32 in (0, 1), broadcastable to [..., Tq].
    mix: "gated" or "lolcats".

  Returns:
    [..., Tq, dv] float32 outputs.
  """
  gate = jnp.asarray(gate, lin_num.dtype)
  if mix == "gated":
    log_w_soft = jnp.log(gate) + m
    log_w_lin = jnp.log1p(-gate)
    c = jnp.maximum(log_w_soft, log_w_lin + jnp.log(jnp.maximum(jnp.abs(lin_den), _TINY)))
    c = jax.lax.stop_gradient(c)
    w_soft = jnp.exp(log_w_soft - c)
    w_lin = jnp.exp(log_w_lin - c)
  elif mix == "lolcats":
    w_soft = jnp.broadcast_to(gate, m.shape)
    w_lin = jnp.ones_like(m)
  else:
    raise ValueError(f"mix must be 'gated' or 'lolcats', got {mix!r}")
  num = w_soft[..., None] * n + w_lin[..., None] * lin_num
  den = w_soft * s + w_lin * lin_den
  den = jnp.where(den == 0, 1.0, den)
  return num / den[..., None]
