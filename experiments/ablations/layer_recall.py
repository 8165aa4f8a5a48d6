r"""Layer-level recall ablation of the sparse-cache policies (synthetic, no trained model).

One LoLA attention layer reads a sequence of repetitive "filler" pairs (a handful of key/value
patterns repeated, which the linear state learns to recall) with a few random "needle" pairs
hidden at spread depths. At the end, each needle's key is presented as the query; the needle is
recalled when the output's nearest neighbour among all values in the sequence is that needle's
value. This isolates the mechanism LoLA relies on (self-recall error keeps the surprising pairs)
from whether a trained model can use it.

  python -m experiments.ablations.layer_recall --out=docs/results/layer_recall.json

Prints a markdown table: recall and mean cache occupancy (over heads, at the end of the prompt)
per policy, for several contexts.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lola_jax import LoLAConfig, cached_positions, lola_decode, lola_prefill

_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096"], "Prompt lengths.")
_TRIALS = flags.DEFINE_integer("trials", 8, "Random sequences per context (batch rows).")
_NEEDLES = flags.DEFINE_integer("needles", 4, "Needle pairs per sequence.")
_OUT = flags.DEFINE_string("out", "docs/results/layer_recall.json", "JSON output.")

DK, DV, FEAT, HEADS, PATTERNS, CHUNK, SHARPNESS = 32, 32, 64, 2, 8, 64, 40.0


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(context, trials, needles, seed):
  """Filler made of a few repeated patterns; needles at depths spread over (0.05, 0.85)."""
  rng = np.random.default_rng(seed)
  pat_k = _unit(rng.normal(size=(trials, HEADS, PATTERNS, DK)))
  pat_v = rng.normal(size=(trials, HEADS, PATTERNS, DV))
  ids = rng.integers(0, PATTERNS, size=(trials, context))
  k = np.take_along_axis(pat_k[:, :, None], ids[:, None, :, None, None], axis=3)[:, :, :, 0]
  v = np.take_along_axis(pat_v[:, :, None], ids[:, None, :, None, None], axis=3)[:, :, :, 0]
  k = k + 0.05 * rng.normal(size=k.shape)  # [trials, heads, T, dk]
  v = v + 0.05 * rng.normal(size=v.shape)
  depths = np.linspace(0.05, 0.85, needles)
  pos = (depths * context).astype(int)
  nk = _unit(rng.normal(size=(trials, HEADS, needles, DK)))
  nv = rng.normal(size=(trials, HEADS, needles, DV))
  k[:, :, pos], v[:, :, pos] = nk, nv
  return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), nk, nv, pos


def feature_map(x, w):
  """Hedgehog-style positive features [softmax(xW), softmax(-xW)] with a fixed random W."""
  z = jnp.einsum("...d,df->...f", x, w)
  return jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1)


def run(config, k, v, nk, nv, pos, w):
  """Prefill (queries = keys), then query each needle key.

  Returns (recall [trials], mean cache occupancy in slots per head, share of needles cached).
  """
  trials = k.shape[0]
  k, v = jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32)
  q = SHARPNESS * k  # self-similar queries during the prompt
  gate = jnp.full((HEADS,), 0.5, jnp.float32)
  _, state = lola_prefill(q, k, v, feature_map(q, w), feature_map(k, w), gate, config=config)
  cached = np.asarray(cached_positions(state))  # [trials, heads, L]
  occupancy = float(np.sum(cached >= 0) / (cached.shape[0] * cached.shape[1]))
  in_cache = float(
    np.mean([[np.isin(pos, cached[b, h]).mean() for h in range(HEADS)] for b in range(len(k))])
  )
  hits = np.zeros(trials)
  for j in range(nk.shape[2]):
    # The query token itself carries a neutral pair (zero key and value).
    qj = SHARPNESS * jnp.asarray(nk[:, :, j], jnp.float32)  # [trials, heads, dk]
    zero = jnp.zeros((trials, HEADS, DK), jnp.float32)
    y, _ = lola_decode(
      qj,
      zero,
      zero,
      feature_map(qj, w),
      feature_map(zero, w),
      gate,
      config=config,
      state=state,
    )
    # Nearest value among every value in the sequence (per head): is it the needle's?
    dist = np.linalg.norm(np.asarray(v)[:, :, :, :] - np.asarray(y)[:, None], axis=-1)
    nearest = np.argmin(dist, axis=1)  # [trials, heads]
    target = np.argmin(np.linalg.norm(np.asarray(v) - nv[:, :, j][:, None], axis=-1), axis=1)
    hits += np.mean(nearest == target, axis=1)
  return hits / nk.shape[2], occupancy, in_cache


def policies():
  out = [("hybrid (cache 0)", LoLAConfig(chunk_size=CHUNK, cache_size=0))]
  for lam in (16, 64):
    out.append((f"sre {lam}", LoLAConfig(chunk_size=CHUNK, cache_size=lam, policy="sre")))
    out.append((f"recency {lam}", LoLAConfig(chunk_size=CHUNK, cache_size=lam, policy="recency")))
    out.append((f"random {lam}", LoLAConfig(chunk_size=CHUNK, cache_size=lam, policy="random")))
    out.append(
      (f"attention {lam}", LoLAConfig(chunk_size=CHUNK, cache_size=lam, policy="attention"))
    )
  for tau in (0.5, 0.8, 0.95):
    out.append(
      (
        f"energy tau={tau} (max 64)",
        LoLAConfig(chunk_size=CHUNK, cache_size=64, policy="energy", energy_tau=tau),
      )
    )
  out.append(
    (
      "energy_global budget 32 (max 64/head)",
      LoLAConfig(chunk_size=CHUNK, cache_size=64, policy="energy_global", cache_budget=32),
    )
  )
  return out


def main(argv):
  del argv
  w = jax.random.normal(jax.random.key(0), (DK, FEAT // 2)) * 2.0
  rows = []
  for context in map(int, _CONTEXTS.value):
    k, v, nk, nv, pos = make_batch(context, _TRIALS.value, _NEEDLES.value, seed=context)
    for label, config in policies():
      recall, occ, in_cache = run(config, k, v, nk, nv, pos, w)
      rows.append(
        dict(
          policy=label,
          context=context,
          recall=float(recall.mean()),
          needles_cached=in_cache,
          mean_cache_occupancy=occ,
          cache_size=config.cache_size,
        )
      )
      print(
        f"  T={context:>5} {label:40s} recall {100 * recall.mean():5.1f}%  needles cached "
        f"{100 * in_cache:5.1f}%  occupancy {occ:5.1f}",
        flush=True,
      )
  contexts = sorted({r["context"] for r in rows})
  print(
    "\n| policy | " + " | ".join(f"@{c}: recall / needles cached / occupancy" for c in contexts)
  )
  print("|---|" + "---|" * len(contexts))
  for label, _ in policies():
    cells = [next(r for r in rows if r["policy"] == label and r["context"] == c) for c in contexts]
    print(
      f"| {label} | "
      + " | ".join(
        f"{100 * r['recall']:.0f}% / {100 * r['needles_cached']:.0f}% / "
        f"{r['mean_cache_occupancy']:.1f}"
        for r in cells
      )
      + " |"
    )
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
