"""Tiny random Hugging Face Llama checkpoints written by `transformers` itself (test-only)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}

VARIANTS = {
  "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
  "gqa": dict(num_key_value_heads=2, tie_word_embeddings=False),
  "gqa_llama3_rope": dict(
    num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE
  ),
}


def save_tiny_llama(path, variant: str = "gqa", seed: int = 0, max_shard_size: str | None = None):
  """Save a random 2-layer LlamaForCausalLM (V=97, E=64, 4 heads of 16) to `path`; returns it.

  Weights use std 0.2 (logits of order 1, so mismatches show) and the RMSNorm weights are
  perturbed away from 1 (so the w -> w - 1 mapping is exercised).
  """
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    **VARIANTS[variant],
  )
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(str(path), **kw)
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def hf_greedy(model, prompt: np.ndarray, n: int) -> np.ndarray:
  """transformers.generate greedy continuation (no stop token) of one prompt [T] -> [n]."""
  with torch.no_grad():
    out = model.generate(
      torch.tensor(np.asarray(prompt)[None], dtype=torch.long),
      max_new_tokens=n,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    )
  return out.numpy()[0, len(prompt) :]
