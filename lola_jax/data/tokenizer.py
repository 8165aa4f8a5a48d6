"""Byte-level tokenizer: one token per UTF-8 byte, vocabulary 256, nothing to download."""

from __future__ import annotations

import numpy as np

VOCAB_SIZE = 256


class ByteTokenizer:
  """Maps text to its UTF-8 bytes and back.

  `encode(text) -> int32 [L]` and `decode(ids) -> str`. Every id in [0, 256) is a valid token, so
  any model output decodes (invalid UTF-8 sequences become U+FFFD).
  """

  vocab_size: int = VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    """Returns the token ids of `text`, int32 [len(text.encode())]."""
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Returns the text of token ids (any int sequence with values in [0, 256))."""
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
      raise ValueError(f"ids must lie in [0, {VOCAB_SIZE}), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
