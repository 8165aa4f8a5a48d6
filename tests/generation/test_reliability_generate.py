"""Token ids outside the vocabulary are refused by name (issue 16, item 11): through the
`generate` / `prefill` API and the `experiments.generate` binary, whose empty --prompt_ids says
the prompt is empty."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lola_jax import generate as gen
from lola_jax import model
from lola_jax.core.config import LoLAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = model.ModelConfig(
  vocab_size=64,
  num_layers=1,
  d_model=32,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
  attention="lola",
  feature_dim=8,
  lola=LoLAConfig(chunk_size=4, cache_size=4),
)


@pytest.fixture(scope="module")
def params():
  return model.init_params(TINY, jax.random.key(0))


@pytest.mark.parametrize("row, bad", [([5000, 5001], 5000), ([3, -1, 4], -1), ([1, 2, 64], 64)])
def test_generate_refuses_ids_outside_the_vocabulary(params, row, bad):
  with pytest.raises(ValueError, match=rf"token id {bad} .*vocabulary of 64 .*\[0, 64\)"):
    gen.generate(TINY, params, np.asarray([row]), max_new_tokens=2)
  with pytest.raises(ValueError, match=rf"token id {bad} "):
    gen.prefill(TINY, params, np.asarray([row]))


def test_padding_past_lengths_is_checked_too(params):
  prompts = np.asarray([[1, 2, 3], [4, 99, 0]])  # row 1: one real token, then padding
  with pytest.raises(ValueError, match=r"token id 99 at \[1, 1\]"):
    gen.generate(TINY, params, prompts, [3, 1], max_new_tokens=2)


def test_ids_inside_the_vocabulary_still_generate(params):
  out = gen.generate(TINY, params, np.asarray([[0, 63, 5]]), max_new_tokens=3)
  assert out.tokens.shape == (1, 3) and ((out.tokens >= 0) & (out.tokens < 64)).all()


def _cli(hf_dir, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "experiments.generate", f"--hf_path={hf_dir}", *flags],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_prompt_ids_outside_the_vocabulary_and_empty(tmp_path):
  from hf_helpers import save_tiny_llama  # needs torch and transformers (test-only)

  save_tiny_llama(tmp_path, "gqa")  # vocabulary of 97, no tokenizer.json
  out = _cli(tmp_path, "--prompt_ids=5000,5001", "--max_new_tokens=4")
  assert out.returncode != 0
  assert "token id 5000" in out.stderr and "vocabulary of 97" in out.stderr
  out = _cli(tmp_path, "--prompt_ids=", "--max_new_tokens=4")
  assert out.returncode != 0 and "prompt is empty" in out.stderr
  assert "no tokenizer found" not in out.stderr
