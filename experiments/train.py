"""Train a LoLA language model.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/lola \
      --config.train.steps=200 --config.model.attention=lola

Multi-host (one command per process; JAX's own runtime, no launcher):
  python -m experiments.train ... --coordinator_address=10.0.0.1:1234 --num_processes=2 \
      --process_id=0
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from lola_jax import sharding
from lola_jax.training import checkpoint, train_and_evaluate, workdir_lock

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # First: importing lola_jax creates no backend, and jax.distributed must precede any.
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (workdir_lock.WorkdirLockedError, checkpoint.ConfigMismatchError) as e:
    sys.exit(f"error: {e}")  # a refusal, nothing went wrong: the message says what to do
  if result["preempted"]:
    print(f"Preempted at step {result['step']}; checkpoint saved. Rerun to resume.", flush=True)


if __name__ == "__main__":
  app.run(main)
