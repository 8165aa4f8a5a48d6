"""Sizes of the recall pipeline: tiny (CI), quick (`make demo`), demo, full and gpu.

Each preset gives config overrides for the training binary (applied to both
experiments/configs/recall_teacher.py and recall_distill.py) and the evaluation grid.
"""

from __future__ import annotations

PRESETS = {
  "tiny": {
    "overrides": [
      "model.d_model=64",
      "model.num_heads=2",
      "model.num_kv_heads=1",
      "model.mlp_dim=128",
      "model.feature_dim=16",
      "task.seq_len=384",
      "train.batch_size=4",
      "train.eval_batch_size=4",
      "train.log_every=1",
      "train.eval_every=1000",
      "train.checkpoint_every=1000",
    ],
    "teacher_steps": 4,
    "distill_steps": 3,
    "finetune_steps": 2,
    "contexts": [512, 1024],
    "depths": [0.5],
    "samples": 1,
    "mqar_seq_len": 64,
    "mqar_pairs": [4, 8],
    "mqar_samples": 4,
    "caches": [16, 64],
    "wide_for": [64],
    "recency_cache": 64,
    "below_caches": [64, [16, 64]],
  },
  "demo": {
    "overrides": [],
    "teacher_steps": 450,
    "distill_steps": 100,
    "finetune_steps": 60,
    "contexts": [512, 1024, 2048, 4096, 8192],
    "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "samples": 2,
    "mqar_seq_len": 254,
    "mqar_pairs": [4, 8, 16, 32, 48],
    "mqar_samples": 32,
    "caches": [16, 64, 256],
    "wide_for": [64, 256],
    "recency_cache": 64,
    "below_caches": [16, 64, [16, 64]],
  },
}
PRESETS["full"] = dict(
  PRESETS["demo"], teacher_steps=1500, distill_steps=300, finetune_steps=200, samples=4
)
# `make demo`: the demo preset's model evaluated on a smaller grid (fewer compiles), from the
# parameters committed in experiments/recall/params (`--params_dir`), in about 5 minutes.
PRESETS["quick"] = dict(
  PRESETS["demo"],
  contexts=[512, 2048, 4096],
  depths=[0.1, 0.5, 0.9],
  samples=2,
  mqar_pairs=[4, 16, 32],
  mqar_samples=16,
  wide_for=[64],
)
# One GPU (an H200 here): the teacher committed in experiments/recall/params was trained this way
# (experiments/benchmarks/gpu_session.sh; its README says how the hybrid was made); the model is
# the same shape as every other preset's, only the batch and the number of steps grow. Pallas
# stays off in training (xla) so a kernel problem cannot cost the run; the kernels are tested
# separately on the same machine.
PRESETS["gpu"] = dict(
  PRESETS["demo"],
  overrides=[
    "train.batch_size=64",
    "train.eval_batch_size=64",
    "train.log_every=100",
    "train.eval_every=1000",
    "train.checkpoint_every=500",
    "lola.implementation=xla",
  ],
  teacher_steps=3000,
  distill_steps=400,
  finetune_steps=400,
  samples=4,
)
