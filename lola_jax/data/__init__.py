"""Tokenizer and seeded, deterministic tasks (no downloads): LM, pass-key, needle, MQAR, mix."""

from lola_jax.data.mqar import mqar_row, validate_mqar
from lola_jax.data.retrieval import (
  RetrievalExample,
  niah_example,
  passkey_example,
  retrieval_example,
)
from lola_jax.data.tasks import DEFAULT_MIX, TASK_NAMES, Task, get_task
from lola_jax.data.tokenizer import VOCAB_SIZE, ByteTokenizer

__all__ = [
  "DEFAULT_MIX",
  "TASK_NAMES",
  "VOCAB_SIZE",
  "ByteTokenizer",
  "RetrievalExample",
  "Task",
  "get_task",
  "mqar_row",
  "niah_example",
  "passkey_example",
  "retrieval_example",
  "validate_mqar",
]
