"""MQAR (Zoology recipe) on the default tiny model; pick the attention kind by flag."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.task.name = "mqar"
  c.task.seq_len = 128
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.eval_batch_size = 32
  c.optim.lr = 1e-3
  return c
