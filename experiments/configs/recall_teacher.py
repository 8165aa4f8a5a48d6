"""Recall pipeline, stage 1: a small softmax teacher on the task mix at a short context.

  python -m experiments.train --config=experiments/configs/recall_teacher.py \
      --workdir=runs/demo/teacher

Mix (lola_jax.data "mix"): pass-key and needle-in-pydoc prompts of random length and depth (loss
on the answer, a little on the context), repeated random segments (`copy`, loss on the repeats:
the induction circuit that retrieval needs forms there first), MQAR segments (Zoology recipe, 4 to
32 pairs), and byte LM on the stdlib pydoc topics.
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.num_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.mlp_dim = 384
  c.model.attention = "softmax"
  c.model.feature_map = "hedgehog"
  c.model.feature_dim = 32
  c.model.max_seq_len = 8192 + 64
  # A small rotary base: every rotary frequency completes a full turn within the 512 training
  # tokens (longest wavelength 2*pi*100^(30/32) ~ 470), so relative angles at 4K-8K are not out of
  # distribution (Liu et al. 2023, "Scaling laws of RoPE-based extrapolation"). With the default
  # 10_000 a 512-token teacher emits garbage beyond ~600 tokens.
  c.model.rope_theta = 100.0
  # Half of each head's features carry no position (partial rotary): a query can match a key's
  # content at any distance. With every feature rotated at base 100 (the first version) the
  # teacher never learned retrieval: no feature is slow enough to compare content 500 tokens away.
  c.model.rope_fraction = 0.5
  c.lola.chunk_size = 64
  c.lola.cache_size = 64
  c.task.name = "mix"
  c.task.seq_len = 512
  c.task.options.weights = {"passkey": 0.35, "copy": 0.25, "mqar": 0.2, "niah": 0.1, "lm": 0.1}
  c.task.options.context_weight = 0.05
  c.task.options.lm_token_weight = 0.02
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.eval_batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 150
  c.train.async_checkpoint = False  # the pipeline reads the checkpoints right after training
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 40
  return c
