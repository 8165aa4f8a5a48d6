"""The tokenizer and chat template a GGUF file describes, as a `tokenizers.Tokenizer`.

    tokenizer = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tokenizer.encode("def f(x):\\n    return 2 * x").ids
    chat = gguf_chat_template("SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = chat.render([{"role": "user", "content": "Hi"}])   # ChatML text, then encode it

A GGUF carries no tokenizer.json; llama.cpp stores the tokenizer as metadata:

  tokenizer.ggml.model        "gpt2" (byte-level BPE; the only kind supported here)
  tokenizer.ggml.tokens       the vocabulary, id order, in GPT-2's byte-to-unicode spelling
  tokenizer.ggml.merges       "a b" merge rules, highest priority first
  tokenizer.ggml.token_type   1 normal, 3 control (special), 4 user-defined, ...
  tokenizer.ggml.pre          the pre-tokeniser preset (how text is cut before BPE)
  tokenizer.ggml.bos/eos/unknown/padding_token_id, add_bos_token, add_eos_token
  tokenizer.chat_template     the Jinja chat template

Pre-tokenisers follow llama.cpp's presets (`llama-vocab.cpp`): the text is cut by each regex in
turn, then every piece is spelled in bytes and merged by BPE:

  default, gpt2, ...            GPT-2's regex ('s|'t|...| ?\\p{L}+| ?\\p{N}+|...)
  smollm, starcoder, refact,    every digit on its own (\\p{N}), then GPT-2's regex; the same as
  codeshell, ...                SmolLM2's own tokenizer.json (Digits(individual) + ByteLevel)
  llama-bpe, llama3, ...        Llama 3's regex (numbers in groups of up to three)
  qwen2, deepseek-r1-qwen       Qwen 2's regex (single digits)

transformers' own GGUF converter (5.24) has no entry for "smollm" and falls back to GPT-2's regex
alone. The two agree except where two or more whitespace characters precede a digit: "x =  1"
is [x, Ġ=, Ġ, Ġ, 1] there (the last space joins the digit under GPT-2's regex and is then split
from it, as no "Ġ1" merge exists) and [x, Ġ=, ĠĠ, 1] here, as in llama.cpp and SmolLM2's
tokenizer.json.

Control tokens (type 3, e.g. <|im_start|>) become special added tokens, user-defined ones
(type 4) plain added tokens, so both are matched whole in the text and keep their ids.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.sandbox
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from lola_jax.convert.gguf import gguf_metadata, open_gguf

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> the regexes llama.cpp cuts the text with, in order.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
  **{name: (_GPT2_SPLIT,) for name in ("default", "gpt2", "gpt-2", "olmo", "jais")},
  **{
    name: (r"\p{N}", _GPT2_SPLIT)
    for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
  },
  **{
    name: (_LLAMA3_SPLIT,)
    for name in ("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx", "pixtral")
  },
  **{name: (_QWEN2_SPLIT,) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}

CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (bytes that print stay themselves)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _pre_tokenizer(pre: str):
  """The `tokenizers` pre-tokeniser of llama.cpp's preset `pre` (module docstring)."""
  if pre not in PRE_TOKENIZER_SPLITS:
    raise ValueError(
      f"GGUF tokenizer.ggml.pre={pre!r} is not supported (supported: "
      f"{sorted(PRE_TOKENIZER_SPLITS)})"
    )
  splits = PRE_TOKENIZER_SPLITS[pre]
  if splits == (_GPT2_SPLIT,):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  steps = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
  return pre_tokenizers.Sequence(
    [*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  )


def gguf_tokenizer(path: str | os.PathLike | GGUFReader) -> Tokenizer:
  """The byte-level BPE tokenizer of a GGUF (`tokenizer.ggml.model` "gpt2").

  Args:
    path: the .gguf file (or an open `gguf.GGUFReader`).

  Returns:
    a `tokenizers.Tokenizer`: vocabulary and merges from the file, llama.cpp's pre-tokeniser for
    `tokenizer.ggml.pre`, byte-level decoding, control tokens as special added tokens, and the
    BOS / EOS the file asks to add (`tokenizer.ggml.add_bos_token` / `add_eos_token`).

  Raises:
    ValueError naming the tokenizer model or pre-tokeniser preset that is not supported, or a
    malformed merge.
  """
  reader = open_gguf(path)
  model = gguf_metadata(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(
      f"GGUF tokenizer.ggml.model={model!r} is not supported (supported: 'gpt2', byte-level BPE)"
    )
  pre = _pre_tokenizer(gguf_metadata(reader, "tokenizer.ggml.pre", "default"))
  tokens = list(gguf_metadata(reader, "tokenizer.ggml.tokens"))
  types = list(gguf_metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  # Tokens outside the byte alphabet (mislabelled added tokens) are re-spelled byte by byte.
  spelled = [
    t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens
  ]
  merges = []
  for merge in gguf_metadata(reader, "tokenizer.ggml.merges"):
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(f"GGUF tokenizer.ggml.merges entry {merge!r} is not two tokens")
    merges.append((parts[0], parts[1]))
  vocab = {t: i for i, t in enumerate(spelled)}
  tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  tokenizer.pre_tokenizer = pre
  tokenizer.decoder = decoders.ByteLevel()
  control = [
    AddedToken(t, special=True, normalized=False)
    for t, kind in zip(spelled, types, strict=True)
    if kind == CONTROL_TOKEN and set(t) <= alphabet
  ]
  user = [
    AddedToken(t, special=False, normalized=False)
    for t, kind in zip(spelled, types, strict=True)
    if kind == USER_DEFINED_TOKEN
  ]
  tokenizer.add_special_tokens(control)
  tokenizer.add_tokens(user)
  tokenizer.post_processor = _post_processor(reader, spelled)
  return tokenizer


def _post_processor(reader: GGUFReader, tokens: Sequence[str]):
  """TemplateProcessing that adds BOS and / or EOS when the file asks for it, else None."""
  ends = {}
  for what in ("bos", "eos"):
    if gguf_metadata(reader, f"tokenizer.ggml.add_{what}_token", False):
      token_id = int(gguf_metadata(reader, f"tokenizer.ggml.{what}_token_id"))
      ends[what] = (tokens[token_id], token_id)
  if not ends:
    return None
  bos = [ends["bos"][0]] if "bos" in ends else []
  eos = [ends["eos"][0]] if "eos" in ends else []
  return processors.TemplateProcessing(
    single=[*bos, "$A", *eos],
    pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
    special_tokens=sorted(set(ends.values())),
  )


# ------------------------------------------------------------------------------------------------
# Chat template.


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A GGUF's `tokenizer.chat_template` (Jinja) with the special tokens it may refer to.

  Attributes:
    source: the Jinja template text.
    bos_token, eos_token: the BOS / EOS token strings (template variables), or None.
  """

  source: str
  bos_token: str | None = None
  eos_token: str | None = None

  def render(
    self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
  ) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

    Rendered as transformers' `apply_chat_template` does: a sandboxed Jinja environment with
    trim_blocks and lstrip_blocks, variables `messages`, `add_generation_prompt`, `bos_token`,
    `eos_token`, and `raise_exception(message)`. For SmolLM2 this is ChatML:
    "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n".
    """
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"messages[{i}] must be a mapping with 'role' and 'content', got {m!r}")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    return env.from_string(self.source).render(
      messages=[dict(m) for m in messages],
      add_generation_prompt=add_generation_prompt,
      bos_token=self.bos_token or "",
      eos_token=self.eos_token or "",
    )


def _raise_template_error(message: str):
  raise ValueError(f"chat template: {message}")


def gguf_chat_template(path: str | os.PathLike | GGUFReader) -> ChatTemplate | None:
  """The file's chat template (`tokenizer.chat_template`) or None when it has none."""
  reader = open_gguf(path)
  source = gguf_metadata(reader, "tokenizer.chat_template", None)
  if source is None:
    return None
  tokens = reader.fields.get("tokenizer.ggml.tokens")

  def token(key: str) -> str | None:
    token_id = gguf_metadata(reader, key, None)
    if token_id is None or tokens is None:
      return None
    return tokens.contents(int(token_id))

  return ChatTemplate(
    source=str(source),
    bos_token=token("tokenizer.ggml.bos_token_id"),
    eos_token=token("tokenizer.ggml.eos_token_id"),
  )
