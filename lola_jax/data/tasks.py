"""Training tasks behind one interface: `get_task(name, seq_len=, seed=, **options) -> Task`.

`Task.batch(step, batch_size)` returns numpy arrays

    inputs   int32   [B, T]   tokens fed to the model
    targets  int32   [B, T]   next tokens (targets[:, t] is predicted at position t)
    weights  float32 [B, T]   per-token loss weight (0 = ignored)

deterministic in (seed, step): row b of step s is drawn from its own generator seeded by
(seed, task, s, b), so the data position is just the step and a row does not depend on the batch
size. Tasks:

  lm       byte language modelling on the stdlib pydoc topics (split "train" | "eval").
  passkey  pass-key retrieval prompt of random length and depth, then the answer; weight 1 on the
           answer tokens, `context_weight` elsewhere.
  niah     single needle in natural text (pydoc topics), same layout as passkey.
  mqar     Zoology MQAR; `num_pairs` an int or an inclusive (lo, hi) range drawn per row.
  copy     induction: random alphanumeric segments, each followed by a separator and itself again;
           weight 1 on the repeats (the copying circuit that pass-key retrieval needs forms on
           this in far fewer steps than on pass-key answers alone, Olsson et al. 2022).
  mix      per row, one of the above drawn with probabilities `weights`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping

import numpy as np

from lola_jax.data import corpus, mqar, retrieval
from lola_jax.data.tokenizer import VOCAB_SIZE, ByteTokenizer

TASK_NAMES = ("lm", "passkey", "niah", "mqar", "copy", "mix")
DEFAULT_MIX = {"passkey": 0.35, "niah": 0.3, "mqar": 0.15, "lm": 0.2}
_TOKENIZER = ByteTokenizer()

# A row generator: (rng) -> (inputs [T], targets [T], weights [T]).
RowFn = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Task:
  """A seeded, deterministic stream of training batches.

  Attributes:
    name: one of TASK_NAMES.
    seq_len: T, tokens per row.
    seed: the data seed.
    vocab_size: V (256: byte tokens; MQAR ids also lie below 256).
    options: the options the task was built with (after defaults).
  """

  name: str
  seq_len: int
  seed: int
  vocab_size: int
  options: Mapping
  row_fn: RowFn = dataclasses.field(repr=False, compare=False)

  def batch(self, step: int, batch_size: int) -> dict:
    """Batch number `step`: {'inputs', 'targets', 'weights'}, each [batch_size, seq_len]."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    salt = zlib.crc32(self.name.encode())
    rows = [
      self.row_fn(np.random.default_rng([self.seed, salt, step, b])) for b in range(batch_size)
    ]
    return {
      "inputs": np.stack([r[0] for r in rows]).astype(np.int32),
      "targets": np.stack([r[1] for r in rows]).astype(np.int32),
      "weights": np.stack([r[2] for r in rows]).astype(np.float32),
    }

  def retrieval_example(self, context_len: int, depth: float, index: int = 0):
    """Evaluation prompt for passkey / niah tasks (see `retrieval.retrieval_example`)."""
    if self.name not in ("passkey", "niah"):
      raise ValueError(f"retrieval_example needs task 'passkey' or 'niah', not {self.name!r}")
    extra = {"instruction": self.options["instruction"]} if self.name == "passkey" else {}
    return retrieval.retrieval_example(self.name, context_len, depth, self.seed, index, **extra)


def _shift(tokens: np.ndarray, seq_len: int):
  """Splits T+1 tokens into (inputs [T], targets [T])."""
  return tokens[:seq_len].astype(np.int32), tokens[1 : seq_len + 1].astype(np.int32)


def _check_options(name: str, options: Mapping, allowed: Mapping) -> dict:
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for task {name!r}; allowed: {sorted(allowed)}")
  return {**allowed, **options}


def _lm_task(seq_len, options):
  opts = _check_options("lm", options, {"split": "train"})
  if opts["split"] not in corpus.SPLITS:
    raise ValueError(f"split must be one of {corpus.SPLITS}, got {opts['split']!r}")

  def row(rng):
    tokens = _TOKENIZER.encode(corpus.text_window(rng, seq_len + 1, opts["split"]))
    inputs, targets = _shift(tokens, seq_len)
    return inputs, targets, np.ones(seq_len, np.float32)

  return opts, row


def _prompt_row(rng, seq_len, make_example, min_context, context_weight):
  """Prompt of random length + answer, padded with filler text (weight 0) to T+1 tokens."""
  answer_len = 8  # upper bound on " NNNNNNN"
  max_context = seq_len + 1 - answer_len
  context = int(rng.integers(min_context, max_context + 1))
  ex = make_example(rng, context, float(rng.uniform(0.0, 1.0)))
  body = np.concatenate([ex.prompt_ids, ex.answer_ids])
  tail = _TOKENIZER.encode(". " + corpus.text_window(rng, seq_len + 1, "train"))
  tokens = np.concatenate([body, tail])[: seq_len + 1]
  inputs, targets = _shift(tokens, seq_len)
  weights = np.full(seq_len, context_weight, np.float32)
  weights[len(body) - 1 :] = 0.0
  weights[ex.context_len - 1 : len(body) - 1] = 1.0
  return inputs, targets, weights


def _check_fraction(name, value):
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _passkey_task(seq_len, options):
  opts = _check_options("passkey", options, {"instruction": True, "context_weight": 0.0})
  _check_fraction("context_weight", opts["context_weight"])
  min_context = retrieval.passkey_min_context(opts["instruction"])
  if seq_len + 1 - 8 < min_context:
    raise ValueError(f"seq_len must be >= {min_context + 7} for passkey, got {seq_len}")

  def make(rng, context, depth):
    return retrieval.passkey_example(rng, context, depth, instruction=opts["instruction"])

  return opts, lambda rng: _prompt_row(rng, seq_len, make, min_context, opts["context_weight"])


def _niah_task(seq_len, options):
  opts = _check_options("niah", options, {"split": "train", "context_weight": 0.0})
  _check_fraction("context_weight", opts["context_weight"])
  min_context = retrieval.niah_min_context()
  if seq_len + 1 - 8 < min_context:
    raise ValueError(f"seq_len must be >= {min_context + 7} for niah, got {seq_len}")

  def make(rng, context, depth):
    return retrieval.niah_example(rng, context, depth, split=opts["split"])

  return opts, lambda rng: _prompt_row(rng, seq_len, make, min_context, opts["context_weight"])


def _pairs_range(num_pairs):
  if isinstance(num_pairs, (int, np.integer)) and not isinstance(num_pairs, bool):
    return int(num_pairs), int(num_pairs)
  if isinstance(num_pairs, (tuple, list)) and len(num_pairs) == 2:
    return int(num_pairs[0]), int(num_pairs[1])
  raise ValueError(f"num_pairs must be an int or a (lo, hi) pair, got {num_pairs!r}")


def _mqar_task(seq_len, options):
  defaults = {
    "num_pairs": 8,
    "vocab_size": VOCAB_SIZE,
    "power_a": 0.01,
    "random_non_queries": True,
    "segment_len": None,
  }
  opts = _check_options("mqar", options, defaults)
  vocab = opts["vocab_size"]
  if not isinstance(vocab, int) or not 4 <= vocab <= VOCAB_SIZE:
    raise ValueError(f"vocab_size must be an int in [4, {VOCAB_SIZE}], got {vocab!r}")
  segment = seq_len if opts["segment_len"] is None else opts["segment_len"]
  if not isinstance(segment, int) or not 0 < segment <= seq_len:
    raise ValueError(f"segment_len must be an int in [1, seq_len={seq_len}], got {segment!r}")
  lo, hi = _pairs_range(opts["num_pairs"])
  if lo > hi:
    raise ValueError(f"num_pairs range must have lo <= hi, got {opts['num_pairs']!r}")
  mqar.validate_mqar(segment, vocab, lo)
  mqar.validate_mqar(segment, vocab, hi)
  if opts["power_a"] <= 0:
    raise ValueError(f"power_a must be > 0, got {opts['power_a']}")

  def row(rng):
    n = int(rng.integers(lo, hi + 1))
    inputs, targets, weights = mqar.mqar_row(
      rng, segment, vocab, n, opts["power_a"], opts["random_non_queries"]
    )
    pad = seq_len - segment
    if pad:  # unweighted random tokens after the segment
      inputs = np.concatenate([inputs, rng.integers(0, vocab, pad).astype(np.int32)])
      targets = np.concatenate([targets, np.zeros(pad, np.int32)])
      weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    return inputs, targets, weights

  return opts, row


_COPY_ALPHABET = np.frombuffer(b"0123456789abcdefghijklmnopqrstuvwxyz", np.uint8)
_COPY_SEPARATOR = ord("|")


def _copy_task(seq_len, options):
  opts = _check_options("copy", options, {"segment_len": (4, 32)})
  try:
    lo, hi = _pairs_range(opts["segment_len"])
  except (TypeError, ValueError):
    lo, hi = 0, 0  # reported below
  if not 1 <= lo <= hi or 2 * hi + 2 > seq_len + 1:
    raise ValueError(
      f"segment_len must be an int or (lo, hi) range with 1 <= lo <= hi <= (seq_len - 1) // 2 = "
      f"{(seq_len - 1) // 2}, got {opts['segment_len']!r}"
    )

  def row(rng):
    tokens, weights = [], []
    while len(tokens) < seq_len + 1:
      n = int(rng.integers(lo, hi + 1))
      segment = list(rng.choice(_COPY_ALPHABET, size=n))
      # " seg|seg": the target of '|' and of each repeated token but the last is a copy.
      tokens += [ord(" ")] + segment + [_COPY_SEPARATOR] + segment
      weights += [0.0] * (n + 1) + [1.0] * n + [0.0]
    tokens = np.asarray(tokens[: seq_len + 1])
    inputs, targets = _shift(tokens, seq_len)
    return inputs, targets, np.asarray(weights[:seq_len], np.float32)

  return opts, row


def _mix_task(seq_len, options):
  defaults = {
    "weights": dict(DEFAULT_MIX),
    "lm_token_weight": 0.02,
    "context_weight": 0.0,
    "mqar_num_pairs": (4, 32),
    "mqar_segment_len": None,
    "copy_segment_len": (4, 32),
    "instruction": True,
  }
  opts = _check_options("mix", options, defaults)
  weights = dict(opts["weights"])
  bad = sorted(set(weights) - {"lm", "passkey", "niah", "mqar", "copy"})
  if bad or not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
    raise ValueError(
      f"weights must map a subset of ['copy', 'lm', 'mqar', 'niah', 'passkey'] to "
      f"non-negative probabilities with a positive sum, got {weights!r}"
    )
  _check_fraction("lm_token_weight", opts["lm_token_weight"])
  segment = opts["mqar_segment_len"]
  if segment is None:  # Zoology needs V > T: the longest even length below the vocabulary
    segment = min(seq_len, VOCAB_SIZE - 2) // 2 * 2
  subtasks = {
    "lm": _lm_task(seq_len, {})[1],
    "passkey": _passkey_task(
      seq_len, {"context_weight": opts["context_weight"], "instruction": opts["instruction"]}
    )[1],
    "niah": _niah_task(seq_len, {"context_weight": opts["context_weight"]})[1],
    "mqar": _mqar_task(seq_len, {"num_pairs": opts["mqar_num_pairs"], "segment_len": segment})[1],
    "copy": _copy_task(seq_len, {"segment_len": opts["copy_segment_len"]})[1],
  }
  names = sorted(weights)
  probs = np.asarray([weights[n] for n in names], np.float64)
  probs /= probs.sum()

  def row(rng):
    name = names[int(rng.choice(len(names), p=probs))]
    inputs, targets, w = subtasks[name](rng)
    if name == "lm":
      w = w * np.float32(opts["lm_token_weight"])
    return inputs, targets, w

  opts["weights"] = weights
  opts["mqar_segment_len"] = segment
  return opts, row


_BUILDERS = {
  "lm": _lm_task,
  "passkey": _passkey_task,
  "niah": _niah_task,
  "mqar": _mqar_task,
  "copy": _copy_task,
  "mix": _mix_task,
}


def get_task(name: str, *, seq_len: int, seed: int = 0, **options) -> Task:
  """Builds task `name` (one of TASK_NAMES) producing rows of `seq_len` tokens.

  Raises:
    ValueError: naming `name`, `seq_len`, `seed` or the offending option.
  """
  if name not in _BUILDERS:
    raise ValueError(f"name must be one of {TASK_NAMES}, got {name!r}")
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}")
  opts, row_fn = _BUILDERS[name](int(seq_len), options)
  return Task(
    name=name,
    seq_len=int(seq_len),
    seed=int(seed),
    vocab_size=VOCAB_SIZE,
    options=opts,
    row_fn=row_fn,
  )
