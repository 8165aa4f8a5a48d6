"""Evaluation: state-size accounting and the recall harness (pass-key, needle, MQAR); the
selection probe (`selection_probe`). Tables and figures live with the experiments
(`experiments/reporting`)."""

from lola_jax.evaluation.memory import (
  equal_memory_chunk,
  full_kv_bytes,
  lola_state_bytes,
  model_state_bytes,
)
from lola_jax.evaluation.recall import (
  Cell,
  Progress,
  accuracy_by_context,
  evaluate_mqar,
  evaluate_retrieval,
  exact_match,
  model_cache_coverage,
  model_generate,
  model_predict,
  needle_cache_coverage,
  needle_positions,
  retrieval_cache_coverage,
  retrieval_examples,
)

__all__ = [
  "Cell",
  "Progress",
  "accuracy_by_context",
  "equal_memory_chunk",
  "evaluate_mqar",
  "evaluate_retrieval",
  "exact_match",
  "full_kv_bytes",
  "lola_state_bytes",
  "model_cache_coverage",
  "model_generate",
  "model_predict",
  "model_state_bytes",
  "needle_cache_coverage",
  "needle_positions",
  "retrieval_cache_coverage",
  "retrieval_examples",
]
