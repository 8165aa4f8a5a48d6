"""`experiments.generate --gguf=...` streams the greedy continuation of the whole-model forward."""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import pytest
from cli_helpers import run_module

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "convert"))
from gguf_helpers import write_tiny_gguf  # noqa: E402

from lola_jax import model as model_lib  # noqa: E402
from lola_jax.convert import gguf_tokenizer, load_gguf_llama  # noqa: E402


@pytest.mark.slow  # a subprocess that loads and compiles a model: about a minute
def test_generate_from_a_gguf_equals_greedy_argmax_of_the_full_forward(tmp_path):
  path = write_tiny_gguf(str(tmp_path / "tiny.gguf"))
  config, params = load_gguf_llama(path)
  tok = gguf_tokenizer(path)
  ids = list(tok.encode("hello world", add_special_tokens=True).ids)
  prompt_len = len(ids)
  for _ in range(5):  # greedy by hand: argmax of model.logits over the whole sequence
    logits = model_lib.logits(config, params, jnp.asarray([ids], jnp.int32))
    ids.append(int(jnp.argmax(logits[0, -1])))
  want = tok.decode(ids[prompt_len:])
  proc = run_module(
    "experiments.generate",
    f"--gguf={path}",
    "--prompt=hello world",
    "--max_new_tokens=5",
    "--stop_tokens=-1",
  )
  assert want.strip() and want.strip() in proc.stdout
