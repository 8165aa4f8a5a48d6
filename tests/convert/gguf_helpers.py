"""Tiny Llama GGUF files written with `gguf.GGUFWriter`, as llama.cpp's converter lays them out.

Independent of `lola_jax.convert.gguf`: the q/k row permutation is llama.cpp's
(`convert_hf_to_gguf.py`, LlamaModel.permute), the weights are quantised with `gguf.quants`,
and the tokenizer is a small byte-level BPE trained here with `tokenizers`.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import regex
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

Q = gguf.GGMLQuantizationType

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
  "def add(x, y):\n    return x + y\n",
  "    for i in range(10):\n        total += i * 2\n",
  "the cat sat on the mat 12 times, then the dog ran 2024 laps.",
  "naïve café, Ünïcödé and 東京 are here; it's they're we'll",
]

# llama.cpp's "smollm" pre-tokeniser (llama-vocab.cpp): digits first, then GPT-2's regex.
LLAMA_CPP_SMOLLM_REGEXES = (
  r"\p{N}",
  r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
)

SIZES = dict(vocab=None, layers=2, d_model=64, heads=4, head_dim=16, mlp=128, context=256)


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
  """(tokens, merges "a b", token types) of a ~310-token byte-level BPE (3 control tokens)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  trainer = trainers.BpeTrainer(
    vocab_size=320,
    special_tokens=SPECIAL,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(CORPUS * 10, trainer)
  spec = json.loads(tok.to_str())["model"]
  vocab = spec["vocab"]
  tokens = sorted(vocab, key=vocab.get)
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
  types = [3 if t in SPECIAL else 1 for t in tokens]
  return tokens, merges, types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf's q/k permutation of an HF [H*d, E] projection (rotate-half -> GPT-J)."""
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _add(writer, name: str, w: np.ndarray, qtype) -> None:
  w = np.ascontiguousarray(w, np.float32)
  if qtype == Q.F32:
    writer.add_tensor(name, w)
  elif qtype == Q.F16:
    writer.add_tensor(name, w.astype(np.float16))
  else:
    writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def write_tiny_gguf(
  path: str,
  *,
  kv_heads: int = 2,
  tied: bool = True,
  arch: str = "llama",
  pre: str = "smollm",
  qtypes: dict[str, object] | None = None,
  extra_tensors: dict[str, np.ndarray] | None = None,
  seed: int = 0,
) -> str:
  """Write a random 2-layer Llama GGUF (E=64, 4 query heads of 16, SwiGLU 128) to `path`.

  Types: token_embd and ffn_down Q8_0, attention and ffn_gate/up Q4_1, blk.1.attn_v F16, norms
  F32, output.weight (untied) Q8_0; `qtypes` overrides by tensor name. Weights have std 0.2 and
  the norms 1 + 0.1 N(0, 1), so logits are of order 1 and a wrong mapping shows.
  """
  tokens, merges, types = tiny_vocab()
  v, e, h, d, m = len(tokens), SIZES["d_model"], SIZES["heads"], SIZES["head_dim"], SIZES["mlp"]
  rng = np.random.RandomState(seed)
  qtypes = dict(qtypes or {})
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(SIZES["layers"])
  writer.add_context_length(SIZES["context"])
  writer.add_embedding_length(e)
  writer.add_feed_forward_length(m)
  writer.add_head_count(h)
  writer.add_head_count_kv(kv_heads)
  writer.add_rope_freq_base(50_000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_dimension_count(d)
  writer.add_vocab_size(v)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_pad_token_id(2)
  writer.add_add_bos_token(False)
  writer.add_chat_template(CHAT_TEMPLATE)

  def normal(*shape):
    return 0.2 * rng.randn(*shape)

  tensors = {"token_embd.weight": (normal(v, e), Q.Q8_0)}
  for i in range(SIZES["layers"]):
    b = f"blk.{i}."
    tensors.update(
      {
        b + "attn_norm.weight": (1 + 0.1 * rng.randn(e), Q.F32),
        b + "attn_q.weight": (llama_cpp_permute(normal(h * d, e), h), Q.Q4_1),
        b + "attn_k.weight": (llama_cpp_permute(normal(kv_heads * d, e), kv_heads), Q.Q4_1),
        b + "attn_v.weight": (normal(kv_heads * d, e), Q.F16 if i == 1 else Q.Q4_1),
        b + "attn_output.weight": (normal(e, h * d), Q.Q4_1),
        b + "ffn_norm.weight": (1 + 0.1 * rng.randn(e), Q.F32),
        b + "ffn_gate.weight": (normal(m, e), Q.Q4_1),
        b + "ffn_up.weight": (normal(m, e), Q.Q4_1),
        b + "ffn_down.weight": (normal(e, m), Q.Q8_0),
      }
    )
  tensors["output_norm.weight"] = (1 + 0.1 * rng.randn(e), Q.F32)
  if not tied:
    tensors["output.weight"] = (normal(v, e), Q.Q8_0)
  for name, w in (extra_tensors or {}).items():
    tensors[name] = (w, Q.F32)
  for name, (w, qtype) in tensors.items():
    qtype = qtypes.get(name, qtype)
    if qtype == Q.Q8_1:  # gguf.quants cannot quantise it either: raw blocks of the right size.
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      raw = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
      writer.add_tensor(name, raw, raw_dtype=qtype)
    else:
      _add(writer, name, w, qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def llama_cpp_pieces(text: str, regexes=LLAMA_CPP_SMOLLM_REGEXES) -> list[str]:
  """llama.cpp's regex pre-tokenisation: each regex cuts every piece in turn; the matches and
  the text between them are pieces (`unicode_regex_split`)."""
  pieces = [text]
  for pattern in regexes:
    out = []
    for piece in pieces:
      start = 0
      for match in regex.finditer(pattern, piece):
        if match.start() > start:
          out.append(piece[start : match.start()])
        out.append(match.group())
        start = match.end()
      if start < len(piece):
        out.append(piece[start:])
    pieces = out
  return pieces


def hf_from_gguf(path: str):
  """(model, tokenizer) of transformers' own GGUF loading, dequantised to float32."""
  folder, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    folder,
    gguf_file=name,
    dtype=torch.float32,
    quantization_config=transformers.GgufConfig(gguf_file=name, dequantize=True),
  ).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  return model, tokenizer
