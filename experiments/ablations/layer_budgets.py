r"""Which layer's cache selection limits pass-key recall, and what a memory would need to fix it.

Two measurements on the distilled recall hybrid (experiments/recall/params):

1. **Per-layer budgets, end to end.** LoLA with a different sparse-cache capacity per layer
   (`ModelConfig.layer_cache_sizes`): pass-key accuracy by greedy decoding, the share of the pass
   key's digits each layer's cache holds after the prompt, and the decode-state bytes. "all" is a
   cache larger than the prompt (that layer is exact softmax attention, the spec's limit).

2. **Selection probe, per layer.** The cache rule of LOLA_SPEC.md (score the pairs leaving the
   window against the memory of everything absorbed so far, keep the `cache` worst-recalled,
   absorb the rest) replayed in float64 NumPy on one layer's keys and values from the softmax
   teacher, with the recall replaced by other memories:

   - `phi_k` (the model's own Hedgehog features: this is the spec's self-recall error exactly);
   - `kernel(key, beta)`: exact kernel regression over the absorbed pairs,
     v_hat = sum_i softmax_i(beta * <k_hat, k_hat_i>) v_i on unit keys (an unbounded feature map);
   - `kernel(residual, beta)`: the same with the layer's input (the residual stream) as the key.

   It reports the share of the pass key's digits (after the first) whose pair the cache holds
   after the prompt in at least one of the needle's two copies: the pairs an induction-style
   copying head needs. If even exact kernel regression on the layer's keys cannot tell the filler
   from the needle, no feature map of those keys can; if the residual stream can, the keys are
   what is missing.

  python -m experiments.ablations.layer_budgets --out=docs/results/layer_budgets.json

Prints two markdown tables (for docs/results.md) and writes both as JSON.
"""

from __future__ import annotations

import json
import os
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.recall import nets
from lola_jax.core.config import LoLAConfig
from lola_jax.core.state import cached_positions
from lola_jax.data import retrieval_example
from lola_jax.evaluation import (
  evaluate_retrieval,
  model_generate,
  model_state_bytes,
  retrieval_cache_coverage,
)
from lola_jax.evaluation.selection_probe import (
  copy_pairs_held,
  kernel_recall,
  linear_recall,
  parse_layer_caches,
  replay_selection,
  secret_occurrences,
)

# allow_override: the recall pipeline and cache_policies define --params_dir too, and a process
# may import several binaries.
_PARAMS_DIR = flags.DEFINE_string(
  "params_dir", "experiments/recall/params", "teacher.npz / hybrid.npz", allow_override=True
)
_CONTEXTS = flags.DEFINE_list("contexts", ["512", "1024", "2048"], "Pass-key prompt lengths.")
_DEPTHS = flags.DEFINE_list("depths", ["0.1", "0.5", "0.9"], "Needle depths.")
_SAMPLES = flags.DEFINE_integer("samples", 2, "Prompts per depth and context.")
_BUDGETS = flags.DEFINE_list(
  "budgets",
  ["64:64", "16:all", "64:all", "all:64", "16:128", "16:256", "16:512"],
  "Per-layer cache sizes, layers separated by ':' ('all' = larger than the prompt).",
)
_POLICY = flags.DEFINE_string("policy", "sre", "Selection policy of the LoLA rows.")
_PROBE_CONTEXT = flags.DEFINE_integer("probe_context", 1024, "Prompt length of the probe.")
_PROBE_CACHE = flags.DEFINE_integer("probe_cache", 64, "Cache size of the probe.")
_PROBE_PROMPTS = flags.DEFINE_integer("probe_prompts", 6, "Prompts (depths 0.1/0.5/0.9 x n/3).")
_BETAS = flags.DEFINE_list("betas", ["5", "20", "80"], "Kernel sharpness values of the probe.")
_OUT = flags.DEFINE_string("out", "docs/results/layer_budgets.json", "JSON output ('' = none).")


def layer_inputs(teacher, hybrid, tokens):
  """Per layer (residual input x [T, E], keys [T, Hkv, d], values, phi_k [T, Hkv, D]), float64.

  The residual stream is the teacher's (exact softmax everywhere), the projections and feature
  maps the hybrid's (its attention weights are the teacher's; only phi and the gates differ).
  """
  tokens = jnp.asarray(tokens)[None]
  positions = jnp.arange(tokens.shape[1])[None]
  x = teacher.embed(tokens)
  out = []
  for block, hblock in zip(teacher.blocks, hybrid.blocks, strict=True):
    h = hblock.attn_norm(x)
    _, k, v = hblock.attn.qkv(h, positions)
    phi_k = hblock.attn.phi_k(k)
    out.append(tuple(np.asarray(a[0], np.float64) for a in (h, k, v, phi_k)))
    x, _, _ = block(x, positions)
  return out


def probe(teacher, hybrid, chunk, *, context, cache, prompts, betas):
  """Rows {layer, memory, beta, copy_pairs_held} averaged over prompts and kv heads."""
  depths = (0.1, 0.5, 0.9)
  examples = [
    retrieval_example("passkey", context, depths[i % 3], 0, i // 3) for i in range(prompts)
  ]
  scores: dict[tuple, list] = {}
  for ex in examples:
    occ = secret_occurrences(ex)
    for layer, (x, k, v, phi_k) in enumerate(layer_inputs(teacher, hybrid, ex.prompt_ids)):
      for head in range(k.shape[1]):
        memories = [
          ("phi_k (spec sre)", None, phi_k[:, head], linear_recall(phi_k[:, head], v[:, head]))
        ]
        for beta in betas:
          memories.append(("kernel(key)", beta, *kernel_recall(k[:, head], v[:, head], beta)))
          memories.append(("kernel(residual)", beta, *kernel_recall(x, v[:, head], beta)))
        for name, beta, keys, recall in memories:
          kept = replay_selection(
            keys, v[:, head], recall, prompt_len=context, chunk=chunk, cache=cache
          )
          scores.setdefault((layer, name, beta), []).append(copy_pairs_held(kept, occ))
  return [
    {"layer": layer, "memory": name, "beta": beta, "copy_pairs_held": float(np.mean(s))}
    for (layer, name, beta), s in scores.items()
  ]


def budget_rows(hybrid, budgets, contexts, depths, samples, policy, log=print):
  """End-to-end pass-key rows, one per (budget, context)."""
  cfg = hybrid.config
  rows = []
  for text, sizes in budgets:
    model = hybrid.with_lola_config(
      attention="lola",
      lola=LoLAConfig(chunk_size=cfg.lola.chunk_size, cache_size=max(sizes), policy=policy),
      layer_cache_sizes=sizes,
    )
    recorded = []

    def record(states, recorded=recorded, windowed=model.config.kind.windowed):
      if windowed:  # a LoLAState: which positions its sparse cache holds
        recorded.append([np.asarray(cached_positions(s)) for s in states])

    start = time.time()
    for context in contexts:
      recorded.clear()
      cells = evaluate_retrieval(
        model_generate(model, on_prefill=record),
        "passkey",
        [context],
        depths,
        samples,
        batch_size=max(1, 16384 // context),
        label=f"budget {text}",
      )
      coverage = retrieval_cache_coverage(recorded, "passkey", context, depths, samples)
      coverage = coverage.mean(axis=(0, 2))  # per layer
      rows.append(
        {
          "budget": text,
          "layer_cache_sizes": list(sizes),
          "context": int(context),
          "accuracy": sum(c.correct for c in cells) / sum(c.num for c in cells),
          "secret_in_cache_per_layer": [float(c) for c in coverage],
          "state_bytes": model_state_bytes(model.config, context),
        }
      )
    log(f"  budget {text}: {time.time() - start:.0f}s", flush=True)
  return rows


def budget_table(rows, contexts) -> str:
  lines = [
    "| layer caches | "
    + " | ".join(f"acc @{c}" for c in contexts)
    + " | digits in cache per layer (mean over contexts) | state @"
    + str(contexts[-1])
    + " |",
    "|---" * (len(contexts) + 3) + "|",
  ]
  for budget in dict.fromkeys(r["budget"] for r in rows):
    sel = [r for r in rows if r["budget"] == budget]
    acc = {r["context"]: r["accuracy"] for r in sel}
    cov = np.mean([r["secret_in_cache_per_layer"] for r in sel], axis=0)
    lines.append(
      f"| {budget} | "
      + " | ".join(f"{100 * acc[c]:.0f}%" for c in contexts)
      + " | "
      + " / ".join(f"{100 * x:.0f}%" for x in cov)
      + f" | {sel[-1]['state_bytes'] / 1024:,.0f} KiB |"
    )
  return "\n".join(lines)


def probe_table(rows) -> str:
  layers = sorted({r["layer"] for r in rows})
  memories = list(dict.fromkeys((r["memory"], r["beta"]) for r in rows))
  lines = [
    "| memory the pairs are scored against | " + " | ".join(f"layer {i}" for i in layers) + " |",
    "|---" * (len(layers) + 1) + "|",
  ]
  for name, beta in memories:
    cells = {
      r["layer"]: r["copy_pairs_held"] for r in rows if (r["memory"], r["beta"]) == (name, beta)
    }
    label = name if beta is None else f"{name}, beta {beta:g}"
    lines.append(f"| {label} | " + " | ".join(f"{100 * cells[i]:.0f}%" for i in layers) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  contexts = [int(c) for c in _CONTEXTS.value]
  depths = [float(d) for d in _DEPTHS.value]
  teacher, cfg, hybrid = nets.load_nets("", [], _PARAMS_DIR.value)
  all_size = max(contexts + [_PROBE_CONTEXT.value]) + 64
  budgets = [(b, parse_layer_caches(b, cfg.num_layers, all_size)) for b in _BUDGETS.value]
  print("== per-layer cache budgets (pass-key, greedy decoding) ==", flush=True)
  rows = budget_rows(hybrid, budgets, contexts, depths, _SAMPLES.value, _POLICY.value)
  print(budget_table(rows, contexts), flush=True)
  prow = []
  if _PROBE_PROMPTS.value > 0:
    print(f"\n== selection probe ({_PROBE_PROMPTS.value} prompts of {_PROBE_CONTEXT.value}) ==")
    prow = probe(
      teacher,
      hybrid,
      cfg.lola.chunk_size,
      context=_PROBE_CONTEXT.value,
      cache=_PROBE_CACHE.value,
      prompts=_PROBE_PROMPTS.value,
      betas=[float(b) for b in _BETAS.value],
    )
    print(probe_table(prow), flush=True)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    settings = {
      "params_dir": _PARAMS_DIR.value,
      "depths": depths,
      "samples": _SAMPLES.value,
      "policy": _POLICY.value,
      "probe": {"context": _PROBE_CONTEXT.value, "cache": _PROBE_CACHE.value},
    }
    with open(_OUT.value, "w") as f:
      json.dump({"settings": settings, "budgets": rows, "probe": prow}, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
