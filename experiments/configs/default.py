"""Default config: a tiny byte-level softmax LM on the stdlib pydoc topics; trains on a CPU in
minutes. Every field is overridable: `--config.train.steps=200 --config.model.attention=lola`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 256  # the byte tokenizer; -1 = take it from the task
  c.model.num_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.mlp_dim = 384
  c.model.attention = "softmax"  # softmax | linear | hybrid | lola
  c.model.feature_map = "hedgehog"  # hedgehog | elu | identity
  c.model.feature_dim = 32  # Hedgehog width per sign (phi has 2x this many features)
  c.model.tie_embeddings = True
  c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
  c.model.max_seq_len = 2048
  c.model.rope_theta = 10_000.0
  c.model.rope_fraction = 1.0  # share of head features rotated (the rest carry no position)
  c.model.gate_init = 0.0

  c.lola = ml_collections.ConfigDict()
  c.lola.chunk_size = 32  # window = previous chunk + current chunk
  c.lola.cache_size = 32  # sparse cache slots per kv head ("hybrid" forces 0)
  c.lola.mix = "gated"
  c.lola.policy = "sre"
  c.lola.implementation = ml_collections.config_dict.placeholder(
    str
  )  # None=auto|xla|pallas|reference

  c.task = ml_collections.ConfigDict()
  c.task.name = "lm"  # lm | passkey | niah | mqar | mix
  c.task.seq_len = 128
  c.task.options = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict()
  c.train.mode = "lm"  # lm | distill
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.eval_batch_size = 16
  c.train.grad_accum_steps = 1
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 2
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.stop_at_step = 0  # > 0: save and stop at this step (as if preempted)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.end_lr_factor = 0.1
  c.optim.weight_decay = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0

  c.distill = ml_collections.ConfigDict()
  c.distill.teacher_workdir = ""  # a softmax run's workdir (its latest checkpoint is read)
  c.distill.teacher_params = ""  # or a .npz of its parameters (checkpoint.save_params_npz)
  c.distill.finetune_steps = 0
  c.distill.finetune_lr = 1e-3
  c.distill.finetune_warmup_steps = 10
  # What the finetune trains: "all" weights, or "feature_maps" (feature maps and gates only, so
  # the softmax path, and with it the teacher's retrieval through the window and sparse cache,
  # stays exactly the teacher's).
  c.distill.finetune_params = "all"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c
