"""Training: optimizer, sharded steps, Orbax checkpoints, metrics and the loop."""

from lola_jax.training.trainer import model_config_from, setup, train_and_evaluate

__all__ = ["model_config_from", "setup", "train_and_evaluate"]
