"""Linearise SmolLM2-135M-Instruct (its GGUF) by attention transfer (LoLCATs stage 1).

Every layer's hybrid attention (sliding window + Hedgehog linear attention, LoLA with cache 0)
is trained to reproduce that layer's softmax attention output on the teacher's own inputs
(the residual stream follows the softmax model), on docstring text from the installed packages
(`lola_jax.data.text`); only the feature maps and gates are trained, every pretrained weight
stays as it is. Presets (`--config=experiments/configs/smollm2_linearise.py:PRESET`):

  cpu     about an hour on a 2-core CPU: T=1024, batch 1.
  accel   an accelerator: T=2048, batch 8, bf16 compute, plus a short next-token finetune of
          the same parameters.
  cpu_c128, cpu_c256
          the committed (C64) maps re-fitted to a C128 / C256 window (129..256 / 257..512
          tokens) on the 2-core CPU: warm start, T=2048 (so the linear term sees distances
          beyond the window), batch 1, 160 steps (about 35 minutes).

  python -m experiments.train --config=experiments/configs/smollm2_linearise.py:cpu \
      --workdir=runs/smollm2_linearise
  python -m experiments.smollm2.export --workdir=runs/smollm2_linearise

The architecture comes from the GGUF (`pretrained.gguf`); `model.*` here only overrides the
attention settings. Rerunning resumes from the newest checkpoint.
"""

import ml_collections

from experiments.configs import default

PRESETS = ("cpu", "accel", "cpu_c128", "cpu_c256")


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
  c = default.get_config()
  c.pretrained = ml_collections.ConfigDict()
  c.pretrained.gguf = "smollm2-135m"  # an alias of lola_jax.pretrained, or a path to a .gguf
  c.pretrained.feature_maps = ""  # warm start: "", "committed" or a save_feature_maps file
  # Only attention settings: everything else (sizes, rope, norms, vocabulary) is the GGUF's.
  c.model = ml_collections.ConfigDict()
  c.model.attention = "hybrid"
  c.model.feature_map = "hedgehog"
  c.model.feature_dim = 64  # Hedgehog width per sign, as LoLCATs (phi has 128 features)
  c.model.gate_init = 0.0
  c.model.dtype = "float32"
  c.model.max_seq_len = 8192
  c.lola.chunk_size = 64  # window of 65..128 tokens
  c.lola.cache_size = 0
  c.lola.mix = "gated"
  c.task.name = "text"
  c.task.seq_len = 1024
  c.train.mode = "distill"
  c.train.steps = 900
  c.train.batch_size = 1
  c.train.eval_batch_size = 1
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.eval_batches = 4
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.distill.finetune_steps = 0
  c.distill.finetune_params = "feature_maps"
  c.distill.finetune_lr = 1e-3
  c.mesh.data = -1
  if preset == "accel":
    c.model.dtype = "bfloat16"
    c.task.seq_len = 2048
    c.train.steps = 2000
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.checkpoint_every = 200
    c.distill.finetune_steps = 200
  if preset in ("cpu_c128", "cpu_c256"):
    c.pretrained.feature_maps = "committed"
    c.lola.chunk_size = int(preset[len("cpu_c") :])
    c.task.seq_len = 2048
    c.train.steps = 160
    c.train.checkpoint_every = 10
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
  return c
