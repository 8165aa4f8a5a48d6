"""The LoLA equations every form of every op shares: the mix and the self-recall error.

Each formula lives here once. The Pallas kernel bodies (`hybrid`, `lola_chunk`), the XLA forms
(`hybrid.xla`, `lola_chunk.xla`) and the core's scan (`lola_jax.core`) all call these functions,
so a kernel and its XLA twin cannot drift apart. They are elementwise jnp code plus one matmul,
which Pallas (Mosaic, Triton, interpret mode) and XLA lower alike.

Row convention: every per-query quantity keeps a trailing axis of 1 (m, S, z: [..., R, 1]) so it
broadcasts against the per-query vectors (N, a: [..., R, dv]); kernels hold [R, 1] blocks.

The mix. With l_i the logits of the softmax set, its statistics m = max_i l_i, S = sum e^{l_i-m},
N = sum e^{l_i-m} v_i, and the linear read-out a = phi_q^T H, z = phi_q^T s:

  gated:    y = (g e^m N + (1-g) a) / (g e^m S + (1-g) z)
  lolcats:  y = (g N + a) / (g S + z)

Both are y = (w_s N + w_l a) / (w_s S + w_l z). The gated weights are shifted by
c = max(log g + m, log(1-g) + log|z|) (log space), so

  w_s = e^{log g + m - c} <= 1,    w_l = e^{log(1-g) - c}  (w_l |z| <= 1)

stay finite for logits of any size; the shift cancels in y and is not differentiated. The lolcats
weights are shifted likewise by c = max(log g, log|z|): w_s = g e^{-c}, w_l = e^{-c}. Where z = 0
(nothing absorbed yet, so a = 0) w_l is set to 0: y is the same, and the gradient does not form
w_l / den, which overflows when the gate is saturated.

The gate enters as three terms (g, log g, log(1-g)) (`gate_terms`), computed once from what
the caller has: g itself, or its logit x (g = sigmoid(x)), from which log g = log_sigmoid(x) and
log(1-g) = log_sigmoid(-x) are finite with finite derivatives (1 - g and -g) for every finite x.
So a saturated gate (x >= 17 rounds g to 1 in float32, x <= -88 to 0) keeps a finite gradient
when the logit is given (the model passes its logits), while from g the derivative of log g is
1/g, infinite at g = 0 (and of log(1-g) at g = 1). The gated weights use the logs, the lolcats
weight w_s = g uses g.

The self-recall error of a pair (k, v) against the linear state (H, s):

  sre(k, v) = || v - r ||_2,   r = phi_k^T H / (phi_k^T s + eps)   (r = 0 where phi_k^T s + eps = 0)

A state that has absorbed nothing (s = 0) recalls nothing, so with eps = 0 the error is ||v||
rather than 0/0 = NaN (which `lax.top_k` would rank below empty slots); with eps > 0 this is what
the formula gives anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import HIGHEST

MIXES = ("gated", "lolcats")

# Smallest |z| in the log of the linear mass (keeps w_l finite when the state is empty).
TINY = 1e-30


def gate_terms(gate=None, logit=None):
  """(g, log g, log(1-g)) from a gate g in [0, 1] or, in log space, from its logit x
  (sigmoid(x), log_sigmoid(x), log_sigmoid(-x)): module docstring. Exactly one of `gate` and
  `logit` is given (callers validate); the three arrays have its shape."""
  if logit is not None:
    return jax.nn.sigmoid(logit), jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)
  return gate, jnp.log(gate), jnp.log1p(-gate)


def mix_weights(m, z, gate, mix: str, *, log_gate=None, log_1m_gate=None):
  """The branch weights (w_s, w_l) of the mix (module docstring), elementwise.

  Args:
    m: [..., R, 1] max logit of each row's softmax set.
    z: [..., R, 1] linear mass phi_q^T s.
    gate: g in (0, 1), broadcastable to m.
    mix: "gated" or "lolcats".
    log_gate, log_1m_gate: log g and log(1-g) when the caller has them (kernels receive them
      precomputed); default jnp.log(gate), jnp.log1p(-gate).

  Returns:
    (w_s, w_l), each shaped like m.
  """
  if mix == "gated":
    log_gate = jnp.log(gate) if log_gate is None else log_gate
    log_1m_gate = jnp.log1p(-gate) if log_1m_gate is None else log_1m_gate
    log_ws = log_gate + m
    c = jnp.maximum(log_ws, log_1m_gate + jnp.log(jnp.maximum(jnp.abs(z), TINY)))
    c = jax.lax.stop_gradient(c)
    w_s, w_l = jnp.exp(log_ws - c), jnp.exp(log_1m_gate - c)
  elif mix == "lolcats":
    # Shifted by c = max(log g, log|z|) like the gated weights: (g N + a) / (g S + z) is the
    # same number, but den is not ~g S when g is tiny (den^2 underflows in the gradient).
    log_gate = jnp.log(gate) if log_gate is None else log_gate
    c = jnp.maximum(log_gate, jnp.log(jnp.maximum(jnp.abs(z), TINY)))
    scale = jnp.exp(-jax.lax.stop_gradient(c))
    w_s, w_l = gate * scale, jnp.broadcast_to(scale, m.shape)
  else:
    raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
  # A linear read-out without mass (z = 0: nothing absorbed yet, so a = 0 too) takes no part.
  # y is unchanged, but dy/da = w_l / den is not formed: with a saturated gate the softmax
  # weight in den is tiny, w_l / den overflows and inf x (H = 0) would make gradients NaN.
  return w_s, jnp.where(z == 0, jnp.zeros((), w_l.dtype), w_l)


def mix_branches(w_s, w_l, s, n, a, z):
  """y = (w_s N + w_l a) / den with the shared denominator den = w_s S + w_l z (0 -> 1).

  Args:
    w_s, w_l: [..., R, 1] branch weights (`mix_weights`).
    s: [..., R, 1] softmax mass S.  n: [..., R, dv] softmax numerator N.
    a: [..., R, dv] linear read-out phi_q^T H.  z: [..., R, 1] linear mass phi_q^T s.

  Returns:
    (y [..., R, dv], den [..., R, 1]).
  """
  den = w_s * s + w_l * z
  den = jnp.where(den == 0, 1.0, den)
  return (w_s * n + w_l * a) / den, den


def self_recall_error(phi_k, v, linear_h, linear_s, eps: float, *, reduce_by_dot: bool = False):
  """|| v - phi_k^T H / (phi_k^T s + eps) ||_2 for every pair, in the accumulation dtype (the
  recall is 0 where the denominator is 0: module docstring).

  Args:
    phi_k: [..., N, D] feature-mapped keys.  v: [..., N, dv] values.
    linear_h: [..., D, dv] float32 (float64 in float64 runs).  linear_s: [..., 1, D].
    reduce_by_dot: the two row reductions (phi_k^T s and the squared norm) as dot products
      instead of a product then a sum: the XLA paths' form (XLA:CPU runs the dot 3-8x faster
      on [N, D] rows); kernels keep the elementwise form, which every Pallas backend lowers.

  Returns:
    [..., N, 1] self-recall errors in linear_h.dtype.
  """
  acc = linear_h.dtype
  phi_k = phi_k.astype(acc)
  recalled = jnp.matmul(phi_k, linear_h, precision=HIGHEST, preferred_element_type=acc)
  if reduce_by_dot:
    s_col = jnp.swapaxes(linear_s, -1, -2)  # [..., D, 1]
    den = jnp.matmul(phi_k, s_col, precision=HIGHEST, preferred_element_type=acc) + eps
  else:
    den = jnp.sum(phi_k * linear_s, axis=-1, keepdims=True) + eps
  recalled = jnp.where(den == 0, 0.0, recalled / jnp.where(den == 0, 1.0, den))
  residual = v.astype(acc) - recalled
  if reduce_by_dot:
    sq = jnp.einsum("...nd,...nd->...n", residual, residual, precision=HIGHEST)[..., None]
  else:
    sq = jnp.sum(residual * residual, axis=-1, keepdims=True)
  return jnp.sqrt(sq)
