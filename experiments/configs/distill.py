"""Attention transfer (LoLCATs stage 1 + optional finetune) from a softmax run of default.py.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/softmax
  python -m experiments.train --config=experiments/configs/distill.py --workdir=/tmp/hybrid \
      --config.distill.teacher_workdir=/tmp/softmax
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.attention = "hybrid"
  c.train.mode = "distill"
  c.train.steps = 200
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.distill.finetune_steps = 50
  return c
