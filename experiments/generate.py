"""Generate text with a LoLA model, streaming it as it is produced.

From a training run (byte tokenizer; the run's config file gives the model):
  python -m experiments.generate --config=experiments/configs/default.py --workdir=/tmp/lola \
      --prompt="Once upon a time" --max_new_tokens=200 --temperature=0.8 --top_p=0.9

From a Hugging Face Llama directory (tokenizer.json is used when present, else --prompt_ids):
  python -m experiments.generate --hf_path=/path/to/Llama-3.2-1B --attention=lola \
      --chunk_size=64 --cache_size=64 --prompt="The capital of France is" --max_new_tokens=64

SmolLM2-135M-Instruct (the installed GGUF, with the committed linearised feature maps), or any
Llama GGUF (--gguf; linearised kinds then start from fresh feature maps unless --feature_maps):
  python -m experiments.generate --model=smollm2-135m --attention=lola --chat \
      --prompt="Write a haiku about the sea." --max_new_tokens=64
  python -m experiments.generate --gguf=/path/to/model.gguf --prompt="The capital of France is"

The decode state of lola/hybrid has a fixed size: --max_new_tokens can be as large as you like.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lola_jax import generate as gen
from lola_jax import model as model_lib
from lola_jax import pretrained
from lola_jax.convert import load_gguf_llama, load_hf_llama
from lola_jax.convert.gguf import gguf_metadata, open_gguf
from lola_jax.convert.gguf_tokenizer import gguf_chat_template, gguf_tokenizer
from lola_jax.data.tokenizer import ByteTokenizer
from lola_jax.training.checkpoint import restore_params
from lola_jax.training.trainer import model_config_from

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file of --workdir's run.")
flags.DEFINE_string("workdir", None, "Training workdir (reads its newest checkpoint).")
flags.DEFINE_string("hf_path", None, "Hugging Face Llama directory (config.json, *.safetensors).")
flags.DEFINE_string("lolcats_path", None, "LoLCATs feature maps / window factors (.safetensors).")
flags.DEFINE_enum("model", None, ["smollm2-135m"], "A packaged pretrained model.")
flags.DEFINE_string("gguf", None, "A Llama GGUF file (llama.cpp format).")
flags.DEFINE_string("feature_maps", None, "Linearised feature maps (.safetensors) for --gguf.")
flags.DEFINE_bool("chat", False, "Wrap --prompt in the model's chat template (GGUF models).")
flags.DEFINE_enum("attention", None, ["softmax", "linear", "hybrid", "lola"], "Override kind.")
flags.DEFINE_integer("chunk_size", None, "LoLA chunk (window) size override.")
flags.DEFINE_integer("cache_size", None, "LoLA sparse-cache size override.")
flags.DEFINE_enum(
  "window_features",
  None,
  ["stored", "recomputed"],
  "LoLA state: keep phi(k) of the window (stored) or recompute it at chunk ends (a smaller state).",
)
flags.DEFINE_string("prompt", "", "Prompt text.")
flags.DEFINE_string("prompt_ids", None, "Comma-separated prompt token ids (instead of --prompt).")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = all).")
flags.DEFINE_integer("seed", 0, "PRNG seed of the sampler.")
flags.DEFINE_list("stop_tokens", [], "Token ids that end generation (default: the EOS ids).")
flags.DEFINE_integer("block_size", 16, "Tokens per jitted decode block (the streaming grain).")


class _Ids:
  """Fallback 'tokenizer' when no text tokenizer exists: ids in, ids out."""

  def encode(self, text):
    raise app.UsageError("no tokenizer found: pass --prompt_ids")

  def decode(self, ids):
    return " ".join(str(int(i)) for i in ids) + " "


class _HFTokenizer:
  """A `tokenizers.Tokenizer` (from a tokenizer.json path, or given) with ids as numpy arrays."""

  def __init__(self, path=None, tokenizer=None):
    if tokenizer is None:
      from tokenizers import Tokenizer  # optional: only Hugging Face directories need it

      tokenizer = Tokenizer.from_file(path)
    self.tok = tokenizer

  def encode(self, text):
    return np.asarray(self.tok.encode(text).ids, np.int32)

  def decode(self, ids):
    return self.tok.decode([int(i) for i in ids])


def load_workdir(config, workdir: str):
  """(ModelConfig, params) of the newest checkpoint of a training run."""
  mc = model_config_from(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
    jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.key(0))),
  )
  params, _ = restore_params(os.path.join(workdir, "checkpoints"), abstract)
  return mc, params


def _gguf_stops(reader, tokenizer) -> tuple[int, ...]:
  """The GGUF's EOS id and the chat end-of-turn token (ChatML's <|im_end|>) when present."""
  stops = []
  eos = gguf_metadata(reader, "tokenizer.ggml.eos_token_id", None)
  if eos is not None:
    stops.append(int(eos))
  end_of_turn = tokenizer.token_to_id("<|im_end|>")
  if end_of_turn is not None and end_of_turn not in stops:
    stops.append(int(end_of_turn))
  return tuple(stops)


def load_gguf_model(*, model=None, gguf=None, feature_maps=None, attention=None, **lola):
  """(ModelConfig, params, tokenizer, stop ids, chat template) of a packaged model or a GGUF."""
  attention = attention or ("lola" if model else "softmax")
  path = pretrained.smollm2_gguf_path() if model else gguf
  reader = open_gguf(path)
  if model:
    mc, params, tok = pretrained.smollm2(attention, feature_maps=feature_maps, **lola)
  else:
    maps = pretrained.load_feature_maps(feature_maps) if feature_maps else None
    mc, params = load_gguf_llama(reader, attention, feature_maps=maps, **lola)
    tok = gguf_tokenizer(reader)
  return (
    mc,
    params,
    _HFTokenizer(tokenizer=tok),
    _gguf_stops(reader, tok),
    gguf_chat_template(reader),
  )


def load_model(
  *, config=None, workdir=None, hf_path=None, lolcats_path=None, attention=None, **lola
):
  """(ModelConfig, params, tokenizer, default stop ids) from a workdir or an HF directory."""
  lola = {k: v for k, v in lola.items() if v is not None}
  if hf_path:
    kw = dict(attention=attention or "softmax", lolcats_path=lolcats_path)
    kw.update(lola)
    mc, params = load_hf_llama(hf_path, **kw)
    tok_file = os.path.join(hf_path, "tokenizer.json")
    tokenizer = _HFTokenizer(tok_file) if os.path.exists(tok_file) else _Ids()
    with open(os.path.join(hf_path, "config.json")) as fh:
      eos = json.load(fh).get("eos_token_id")
    stops = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return mc, params, tokenizer, stops
  if not (config and workdir):
    raise app.UsageError("pass --hf_path, or --config and --workdir")
  mc, params = load_workdir(config, workdir)
  if attention or lola:
    mc = mc.replace(attention=attention or mc.attention, lola=dataclasses.replace(mc.lola, **lola))
  return mc, params, ByteTokenizer(), ()


def stream_text(mc, params, tokenizer, prompt_ids, *, out=sys.stdout, **kwargs) -> np.ndarray:
  """Generates for one prompt, writing the text to `out` block by block; returns the ids."""
  ids: list[int] = []
  shown = ""
  for block in gen.generate_stream(mc, params, np.asarray(prompt_ids, np.int32)[None], **kwargs):
    ids.extend(int(i) for i in block[0])
    text = tokenizer.decode(ids)
    # Print only the stable prefix (a multi-byte character may still be incomplete).
    stable = text.rstrip("\ufffd")
    out.write(stable[len(shown) :])
    out.flush()
    shown = stable
  out.write(tokenizer.decode(ids)[len(shown) :] + "\n")
  return np.asarray(ids, np.int32)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  template = None
  if FLAGS.model and FLAGS.gguf:
    raise app.UsageError("pass --model or --gguf, not both")
  if FLAGS.model or FLAGS.gguf:
    if FLAGS.gguf and not os.path.isfile(FLAGS.gguf):
      raise app.UsageError(f"--gguf: no such file {FLAGS.gguf!r}")
    lola = {"chunk_size": FLAGS.chunk_size, "cache_size": FLAGS.cache_size}
    mc, params, tokenizer, stops, template = load_gguf_model(
      model=FLAGS.model,
      gguf=FLAGS.gguf,
      feature_maps=FLAGS.feature_maps,
      attention=FLAGS.attention,
      **{k: v for k, v in lola.items() if v is not None},
    )
  else:
    mc, params, tokenizer, stops = load_model(
      config=FLAGS.config,
      workdir=FLAGS.workdir,
      hf_path=FLAGS.hf_path,
      lolcats_path=FLAGS.lolcats_path,
      attention=FLAGS.attention,
      chunk_size=FLAGS.chunk_size,
      cache_size=FLAGS.cache_size,
    )
  if FLAGS.window_features:
    mc = mc.replace(lola=dataclasses.replace(mc.lola, window_features=FLAGS.window_features))
  if FLAGS.chat:
    if template is None:
      raise app.UsageError("--chat needs a model with a chat template (--model or a chat --gguf)")
    if FLAGS.prompt_ids is not None:
      raise app.UsageError("--chat wraps --prompt text; it cannot take --prompt_ids")
  if FLAGS.prompt_ids is not None:  # given, even empty: an empty list is an empty prompt
    try:
      prompt = [int(x) for x in FLAGS.prompt_ids.split(",") if x.strip()]
    except ValueError as e:
      raise app.UsageError(
        f"--prompt_ids must be comma-separated integers, got {FLAGS.prompt_ids!r}"
      ) from e
  elif FLAGS.chat:
    text = template.render([{"role": "user", "content": FLAGS.prompt}])
    prompt = list(tokenizer.encode(text))
  else:
    prompt = list(tokenizer.encode(FLAGS.prompt))
  if not prompt:
    raise app.UsageError("the prompt is empty: pass --prompt or --prompt_ids")
  try:
    gen.check_token_ids(prompt, mc.vocab_size, "--prompt_ids" if FLAGS.prompt_ids else "prompt")
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if FLAGS.stop_tokens:
    stops = tuple(int(s) for s in FLAGS.stop_tokens)
  sampling = gen.Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  print(f"[{mc.attention}, {mc.num_layers} layers, prompt {len(prompt)} tokens]", file=sys.stderr)
  t0 = time.perf_counter()
  ids = stream_text(
    mc,
    params,
    tokenizer,
    prompt,
    max_new_tokens=FLAGS.max_new_tokens,
    sampling=sampling,
    key=jax.random.key(FLAGS.seed),
    stop_tokens=stops,
    block_size=FLAGS.block_size,
  )
  dt = time.perf_counter() - t0
  print(f"[{len(ids)} tokens in {dt:.1f}s incl. compilation]", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
