"""Which layers of the linearised SmolLM2 keep the pass key in their sparse cache, per policy.

  python -m experiments.smollm2.probe --workdir=runs/smollm2_probe
  python -m experiments.smollm2.probe --contexts=2048,4096 --policies=sre,energy --prompts=10

For each pass-key prompt (the recall benchmark's prompts, `subword_retrieval.prompt`) the model
with LoLA attention (chunk C, cache L, one policy) prefills the prompt once; the decode state
after it says, per layer and kv head, which token positions the sparse cache holds. The probe
reports, per layer, the share of the key's digit tokens that are held in the sparse cache of at
least one kv head of that layer (`held`), and the share that the window still holds (the needle
at depth 1.0 can sit there). Averaged over prompts, per (context, policy); written to
`probe.json` and drawn in `probe.png` (layer on x, share kept exactly: cache or window, on y).
`--replot=a.json,b.json` redraws `probe.png` from earlier runs' files (e.g. two cache sizes).

A key whose digits no layer caches can only come back through the linear state, which is what
the cache-0 hybrid has; comparing `held` at 2K and 4K says whether a recall drop at 4K is a
selection failure (fewer layers keep the digits) or a read-out failure (the digits are held but
the model no longer finds them).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from experiments.smollm2 import methods as methods_lib
from experiments.smollm2.report import held_shares, key_positions, plot_held
from lola_jax import model as model_lib
from lola_jax import pretrained
from lola_jax.data import subword_retrieval
from lola_jax.evaluation import lm_scoring

flags.DEFINE_string("workdir", "runs/smollm2_probe", "Where probe.json and probe.png go.")
flags.DEFINE_list("contexts", ["2048", "4096"], "Context lengths in tokens.")
flags.DEFINE_list("policies", ["sre", "energy"], f"Cache policies, of {methods_lib.POLICIES}.")
flags.DEFINE_integer("cache", 64, "Sparse-cache slots per kv head (L).")
flags.DEFINE_integer("chunk", 64, "Chunk size C (window of C+1..2C tokens).")
flags.DEFINE_integer("prompts", 10, "Prompts per context, over as many evenly spaced depths.")
flags.DEFINE_integer("segment", 512, "Prefill segment length (a multiple of the chunk).")
flags.DEFINE_integer("seed", 0, "Prompt seed (the recall benchmark's default: 0).")
flags.DEFINE_list("replot", None, "Only redraw probe.png in --workdir from these probe.json files.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/lola_jax_xla"))
  unknown = set(FLAGS.policies) - set(methods_lib.POLICIES)
  if unknown:
    raise app.UsageError(
      f"--policies: unknown {sorted(unknown)}; expected of {methods_lib.POLICIES}"
    )
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if FLAGS.replot:
    results = [r for path in FLAGS.replot for r in json.load(open(path))]
    print(f"wrote {plot_held(results, os.path.join(FLAGS.workdir, 'probe.png'))}")
    return
  maps = pretrained.committed_feature_maps(FLAGS.chunk)  # the maps fitted to this window
  base, params, tokenizer = pretrained.smollm2("softmax", feature_maps=maps)
  depths = np.linspace(0.0, 1.0, FLAGS.prompts) if FLAGS.prompts > 1 else np.asarray([0.5])
  results = []
  for ctx in (int(c) for c in FLAGS.contexts):
    for policy in FLAGS.policies:
      m = methods_lib.Method(policy, policy, "lola", FLAGS.chunk, FLAGS.cache, policy)
      model = model_lib.bind(m.model_config(base), params)
      held, window, per_prompt = [], [], []
      for i, depth in enumerate(depths):
        t0 = time.perf_counter()
        prompt = subword_retrieval.prompt(tokenizer, "passkey", ctx, float(depth), FLAGS.seed, i)
        pos = key_positions(tokenizer, prompt)
        _, states = lm_scoring.segmented_prefill(
          model, prompt.prompt_ids[None], segment=FLAGS.segment
        )
        h, w = held_shares(states, pos)
        held.append(h)
        window.append(w)
        per_prompt.append({"index": i, "depth": float(depth), "held": h.tolist()})
        print(
          f"{policy:8s} ctx {ctx} depth {depth:.2f}: layers holding the key "
          f"{int((h > 0).sum())}/{len(h)}, mean share {h.mean():.2f} "
          f"({time.perf_counter() - t0:.0f} s)",
          flush=True,
        )
      results.append(
        {
          "policy": policy,
          "context": ctx,
          "cache": FLAGS.cache,
          "chunk": FLAGS.chunk,
          "feature_maps": os.path.basename(maps),
          "prompts": len(depths),
          "held": np.mean(held, axis=0).tolist(),
          "window": np.mean(window, axis=0).tolist(),
          "per_prompt": per_prompt,
        }
      )
      with open(os.path.join(FLAGS.workdir, "probe.json"), "w") as f:
        json.dump(results, f, indent=1)
  print(f"wrote {plot_held(results, os.path.join(FLAGS.workdir, 'probe.png'))}")


if __name__ == "__main__":
  app.run(main)
