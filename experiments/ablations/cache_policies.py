r"""Model-level ablation of the sparse-cache policies: accuracy against mean cache occupancy.

The distilled recall `hybrid` (experiments/recall/params) runs as LoLA (chunk 64, sparse cache)
under each policy row: `energy` at several tau (cache_size `--cap`, default 64, as the cap),
`energy_global` with cap / 2 slots per kv head shared by the heads of a layer, fixed `sre` at
`--sre_sizes` (default 8/16/32/64, for matched sizes), and `attention`, `recency`, `random` at the
cap. For pass-key and needle-in-pydoc prompts the
prompt is prefilled in segments of `--segment` tokens (the state carried, which is exact because
LoLA's prefill/decode splits are), the valid sparse-cache slots per layer and kv head are counted
after every segment, and the answer is then decoded greedily from the final states. MQAR is
teacher-forced (argmax at every query position) through the same segmented prefill.

  python -m experiments.ablations.cache_policies --context=2048 \
      --out=docs/results/cache_policies.json --fig_dir=docs/figures

Writes the JSON rows (one per policy config x task [x MQAR pairs]), `cache_policies_pareto.png`
(accuracy vs mean occupancy, one panel per task) and `cache_policies_occupancy_hist.png` (kept
slots per prompt, layer and head after the prompt), and prints a markdown table for
docs/results.md. Occupancy is in slots per kv head: the time average over the segment ends,
averaged over layers, heads and prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from matplotlib.figure import Figure

from experiments.recall import nets
from experiments.recall.presets import PRESETS
from lola_jax import generate as gen
from lola_jax.core.config import LoLAConfig
from lola_jax.core.state import cached_positions
from lola_jax.data import retrieval_example
from lola_jax.evaluation import evaluate_mqar, exact_match

FAMILIES = ("energy", "energy_global", "sre", "attention", "recency", "random")
TASKS = ("passkey", "niah", "mqar")
ENERGY_TAUS = (0.5, 0.7, 0.8, 0.9, 0.95)
SRE_SIZES = (8, 16, 32, 64)
CAP = 64  # cache_size of the adaptive policies and of attention / recency / random
# --quick (and the test): a tiny setting.
QUICK = dict(
  context=256,
  depths=(0.5,),
  samples=1,
  segment=64,
  tasks=("passkey", "mqar"),
  mqar_pairs=(4,),
  mqar_seq_len=128,
  mqar_samples=1,
)
QUICK_ROWS = (("sre", 8), ("energy", 0.9), ("energy_global", None))  # (policy, size or tau)

_CONTEXT = flags.DEFINE_integer("context", 2048, "Prompt length of pass-key / niah (tokens).")
_DEPTHS = flags.DEFINE_list("depths", ["0.1", "0.3", "0.5", "0.7", "0.9"], "Needle depths.")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Prompts per depth.")
_SEGMENT = flags.DEFINE_integer(
  "segment", 256, "Prefill segment (tokens) between occupancy reads; a multiple of the chunk."
)
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "LoLA chunk (= window) size.")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), f"Tasks, of {', '.join(TASKS)}.")
_MQAR_PAIRS = flags.DEFINE_list("mqar_pairs", ["8", "16", "32"], "MQAR key/value pair counts.")
_MQAR_SEQ_LEN = flags.DEFINE_integer("mqar_seq_len", 254, "MQAR sequence length T.")
_MQAR_SAMPLES = flags.DEFINE_integer("mqar_samples", 32, "MQAR sequences per pair count.")
_FAMILIES = flags.DEFINE_list("families", list(FAMILIES), f"Policy families, of {FAMILIES}.")
_CAP = flags.DEFINE_integer(
  "cap", CAP, "cache_size of energy / energy_global / attention / recency / random."
)
_SRE_SIZES = flags.DEFINE_list(
  "sre_sizes", [str(x) for x in SRE_SIZES], "Fixed sre cache sizes (matched sizes)."
)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Prompts per batch (0: max(1, 16384 // context)).")
_OUT = flags.DEFINE_string("out", "docs/results/cache_policies.json", "JSON output ('' = none).")
_FIG_DIR = flags.DEFINE_string("fig_dir", "docs/figures", "Figure directory ('' = no figures).")
# allow_override: the recall pipeline and layer_budgets define --params_dir / --preset too, and a
# process (the test suite) may import several binaries.
_PARAMS_DIR = flags.DEFINE_string(
  "params_dir",
  "experiments/recall/params",
  "Directory holding hybrid.npz (the distilled recall hybrid).",
  allow_override=True,
)
_PRESET = flags.DEFINE_enum(
  "preset",
  "demo",
  sorted(PRESETS),
  "Recall preset whose model overrides built the parameters.",
  allow_override=True,
)
_QUICK = flags.DEFINE_bool("quick", False, f"Tiny smoke setting (overrides the grid): {QUICK}.")


@dataclasses.dataclass(frozen=True)
class Setting:
  """The evaluation grid of one ablation run."""

  context: int = 2048
  depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
  samples: int = 4
  segment: int = 256
  tasks: tuple[str, ...] = TASKS
  mqar_pairs: tuple[int, ...] = (8, 16, 32)
  mqar_seq_len: int = 254
  mqar_samples: int = 32
  batch_size: int = 0

  @property
  def batch(self) -> int:
    return self.batch_size or max(1, 16384 // self.context)


def policy_rows(
  num_kv_heads: int,
  chunk_size: int = 64,
  families=FAMILIES,
  cap: int = CAP,
  sre_sizes: tuple[int, ...] = SRE_SIZES,
):
  """[(label, LoLAConfig)] of every policy row of the ablation, in table order.

  `cap`: cache_size of the adaptive policies and of attention / recency / random; energy_global
  shares cap / 2 slots per kv head (cache_budget = cap / 2 * Hkv).
  """
  rows = []
  if "energy" in families:
    for tau in ENERGY_TAUS:
      cfg = LoLAConfig(chunk_size=chunk_size, cache_size=cap, policy="energy", energy_tau=tau)
      rows.append((f"energy tau={tau} (max {cap})", cfg))
  if "energy_global" in families:
    budget = cap // 2 * num_kv_heads
    cfg = LoLAConfig(
      chunk_size=chunk_size, cache_size=cap, policy="energy_global", cache_budget=budget
    )
    rows.append((f"energy_global budget {budget} (max {cap}/head)", cfg))
  if "sre" in families:
    for lam in sre_sizes:
      rows.append((f"sre {lam}", LoLAConfig(chunk_size=chunk_size, cache_size=lam, policy="sre")))
  for family in ("attention", "recency", "random"):
    if family in families:
      rows.append(
        (f"{family} {cap}", LoLAConfig(chunk_size=chunk_size, cache_size=cap, policy=family))
      )
  return rows


@nnx.jit
def _prefill_step(model, tokens, states):
  """One prefill segment: (logits [B, S, V], states, valid cache slots int [B, layers, Hkv])."""
  logits, states = model.prefill(tokens, states=states)
  occupancy = jnp.stack([jnp.sum(cached_positions(s) >= 0, axis=-1) for s in states], axis=1)
  return logits, states, occupancy


def segmented_prefill(model, tokens, segment: int):
  """Prefill `tokens` int [B, T] in segments of `segment` tokens, carrying the states.

  Returns:
    (logits float32 [B, T, V], per-layer states, occupancy int [num_segments, B, layers, Hkv]:
    valid sparse-cache slots after each segment).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  states = model.init_states(tokens.shape[0])
  logits, occupancy = [], []
  for start in range(0, tokens.shape[1], segment):
    out, states, occ = _prefill_step(model, tokens[:, start : start + segment], states)
    logits.append(out)
    occupancy.append(np.asarray(occ))
  return jnp.concatenate(logits, axis=1), states, np.stack(occupancy)


def generate(model, prompts, num_new: int, segment: int):
  """Greedy continuation after a segmented prefill (`lola_jax.generate.decode`).

  Returns:
    (tokens int [B, num_new], occupancy int [num_segments, B, layers, Hkv]).
  """
  logits, states, occupancy = segmented_prefill(model, prompts, segment)
  out = gen.decode(model.config, nnx.state(model), states, logits[:, -1], max_new_tokens=num_new)
  return out.tokens, occupancy


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Repeats the last row up to `rows` rows (one compiled shape for every batch)."""
  return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)]) if len(x) < rows else x


def _occupancy_fields(occupancy: np.ndarray) -> dict:
  """Summary of occupancy int [segments, prompts, layers, Hkv] for a JSON row."""
  final = occupancy[-1]
  return dict(
    mean_occupancy=float(occupancy.mean()),
    occupancy_over_time=[float(x) for x in occupancy.mean(axis=(1, 2, 3))],
    occupancy_per_head=final.mean(axis=0).round(3).tolist(),
    final_occupancy=final.astype(int).tolist(),
  )


def _retrieval(model, task: str, setting: Setting) -> tuple[float, np.ndarray]:
  """(exact-match accuracy, occupancy [segments, prompts, layers, Hkv]) on one task."""
  examples = [
    retrieval_example(task, setting.context, d, 0, i)
    for d in setting.depths
    for i in range(setting.samples)
  ]
  num_new = max(len(e.answer_ids) for e in examples)
  hits, occupancy = [], []
  b = min(setting.batch, len(examples))
  for s in range(0, len(examples), b):
    chunk = examples[s : s + b]
    prompts = _pad_rows(np.stack([e.prompt_ids for e in chunk]), b)
    out, occ = generate(model, prompts, num_new, setting.segment)
    hits += [exact_match(o, e.answer_ids) for o, e in zip(out, chunk, strict=False)]
    occupancy.append(occ[:, : len(chunk)])
  return float(np.mean(hits)), np.concatenate(occupancy, axis=1)


def _mqar(model, num_pairs: int, setting: Setting) -> tuple[float, np.ndarray]:
  """(teacher-forced MQAR accuracy, occupancy [segments, sequences, layers, Hkv])."""
  occupancy = []

  def predict(inputs):
    logits, _, occ = segmented_prefill(model, inputs, setting.segment)
    occupancy.append(occ)
    return np.asarray(jnp.argmax(logits, -1))

  acc = evaluate_mqar(predict, [num_pairs], setting.mqar_seq_len, setting.mqar_samples, seed=0)
  return acc[num_pairs], np.concatenate(occupancy, axis=1)


def evaluate_policy(model, label: str, lola: LoLAConfig, setting: Setting, log=print) -> list:
  """JSON rows of one policy config on every task of `setting` (model: the hybrid)."""
  lola_model = model.with_lola_config(attention="lola", lola=lola)
  common = dict(
    label=label,
    policy=lola.policy,
    energy_tau=lola.energy_tau if lola.policy == "energy" else None,
    cache_size=lola.cache_size,
    cache_budget=lola.cache_budget,
  )
  rows = []
  for task in setting.tasks:
    if task == "mqar":
      runs = [(n, _mqar(lola_model, n, setting)) for n in setting.mqar_pairs]
      context = setting.mqar_seq_len
    else:
      runs = [(None, _retrieval(lola_model, task, setting))]
      context = setting.context
    for n, (acc, occ) in runs:
      row = dict(common, task=task, context=context, accuracy=acc, num_prompts=occ.shape[1])
      if n is not None:
        row["num_pairs"] = n
      rows.append(dict(row, **_occupancy_fields(occ)))
      log(
        f"    {task}{'' if n is None else f' N={n}'}: accuracy {100 * acc:.0f}%, "
        f"mean occupancy {rows[-1]['mean_occupancy']:.1f}"
      )
  return rows


def run_ablation(model, policies, setting: Setting, log=print) -> list:
  """Every (label, LoLAConfig) in `policies` on `setting`; returns the JSON rows."""
  rows, start = [], time.time()
  for i, (label, lola) in enumerate(policies):
    rows += evaluate_policy(model, label, lola, setting, log=log)
    log(f"[{i + 1}/{len(policies)}] {label} done ({time.time() - start:.0f}s elapsed)")
  return rows


def _task_key(row) -> str:
  return row["task"] if row.get("num_pairs") is None else f"mqar N={row['num_pairs']}"


def markdown_table(rows) -> str:
  """policy | occupancy and accuracy per task (retrieval at the context, MQAR per pair count)."""
  labels = list(dict.fromkeys(r["label"] for r in rows))
  keys = list(dict.fromkeys(_task_key(r) for r in rows))
  by = {(r["label"], _task_key(r)): r for r in rows}
  retrieval = [k for k in keys if not k.startswith("mqar")]
  mqar = [k for k in keys if k.startswith("mqar")]
  header, cols = ["policy"], []
  if retrieval:
    ctx = by[(labels[0], retrieval[0])]["context"]
    header.append(f"occupancy @{ctx}")
    cols.append(("occ", retrieval))
    header += [f"{k} @{ctx}" for k in retrieval]
    cols += [("acc", [k]) for k in retrieval]
  if mqar:
    t = by[(labels[0], mqar[0])]["context"]
    header.append(f"occupancy @{t} (MQAR)")
    cols.append(("occ", mqar))
    header += [f"MQAR N={by[(labels[0], k)]['num_pairs']}" for k in mqar]
    cols += [("acc", [k]) for k in mqar]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for label in labels:
    cells = [label]
    for kind, ks in cols:
      sel = [by[(label, k)] for k in ks if (label, k) in by]
      if kind == "occ":
        cells.append(f"{np.mean([r['mean_occupancy'] for r in sel]):.1f}" if sel else "-")
      else:
        cells.append(f"{100 * sel[0]['accuracy']:.0f}%" if sel else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


_MARKERS = {
  "energy": ("o", "tab:blue"),
  "energy_global": ("*", "tab:purple"),
  "sre": ("s", "tab:green"),
  "attention": ("^", "tab:orange"),
  "recency": ("x", "tab:red"),
  "random": ("D", "tab:gray"),
}


def plot_pareto(rows, path):
  """Accuracy vs mean occupancy, one panel per task; energy and fixed sre joined by lines."""
  keys = list(dict.fromkeys(_task_key(r) for r in rows))
  cols = min(3, len(keys))
  nrows = math.ceil(len(keys) / cols)
  fig = Figure(figsize=(5 * cols, 4 * nrows))
  axes = fig.subplots(nrows, cols, squeeze=False)
  for ax in axes.flat[len(keys) :]:
    ax.axis("off")
  for ax, key in zip(axes.flat, keys, strict=False):
    sel = [r for r in rows if _task_key(r) == key]
    for family in FAMILIES:
      pts = [r for r in sel if r["policy"] == family]
      if not pts:
        continue
      marker, color = _MARKERS[family]
      pts.sort(key=lambda r: (r["energy_tau"] or 0, r["cache_size"]))
      x = [r["mean_occupancy"] for r in pts]
      y = [r["accuracy"] for r in pts]
      line = "-" if family in ("energy", "sre") else "none"
      ax.plot(x, y, marker=marker, color=color, linestyle=line, label=family, ms=7)
      for r in pts:
        note = {"energy": f"{r['energy_tau']}", "sre": f"{r['cache_size']}"}.get(family)
        if note:
          ax.annotate(
            note,
            (r["mean_occupancy"], r["accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
          )
    ax.set_xlabel("mean cache occupancy (slots per kv head, time average)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{key} @ {sel[0]['context']}")
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def _hist_labels(rows):
  """Rows of the histogram: energy tau 0.8 / 0.9, energy_global, the largest fixed sre."""
  want = []
  max_sre = max([r["cache_size"] for r in rows if r["policy"] == "sre"], default=None)
  for r in rows:
    keep = (
      (r["policy"] == "energy" and r["energy_tau"] in (0.8, 0.9))
      or r["policy"] == "energy_global"
      or (r["policy"] == "sre" and r["cache_size"] == max_sre)
    )
    if keep and r["label"] not in want:
      want.append(r["label"])
  return want


def plot_occupancy_hist(rows, path):
  """Histogram of kept slots per (prompt, layer, kv head) after the prompt, one panel per task."""
  labels = _hist_labels(rows) or list(dict.fromkeys(r["label"] for r in rows))
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig = Figure(figsize=(5.5 * len(tasks), 4))
  axes = fig.subplots(1, len(tasks), squeeze=False)
  cap = max(r["cache_size"] for r in rows)
  width = max(1, math.ceil((cap + 1) / 33))
  bins = -0.5 + width * np.arange(math.ceil((cap + 1) / width) + 1)  # last edge > cap
  for ax, task in zip(axes[0], tasks, strict=True):
    for label in labels:
      counts = [
        np.ravel(r["final_occupancy"]) for r in rows if r["task"] == task and r["label"] == label
      ]
      if counts:
        ax.hist(np.concatenate(counts), bins=bins, histtype="step", linewidth=1.5, label=label)
    ax.set_xlabel("kept slots per kv head after the prompt")
    ax.set_ylabel("count (prompts x layers x heads)")
    ax.set_title(task + (" (all pair counts)" if task == "mqar" else ""))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def quick_rows(policies):
  """The policy rows of --quick (QUICK_ROWS) out of `policy_rows(...)`."""

  def pick(cfg):
    key = {"sre": cfg.cache_size, "energy": cfg.energy_tau}.get(cfg.policy)
    return (cfg.policy, key) in QUICK_ROWS

  return [(label, cfg) for label, cfg in policies if pick(cfg)]


def _setting_from_flags() -> Setting:
  """The evaluation grid from the flags (validated); --quick replaces it by QUICK."""
  if _QUICK.value:
    return Setting(**QUICK, batch_size=_BATCH.value)
  try:
    depths = tuple(float(d) for d in _DEPTHS.value)
    pairs = tuple(int(n) for n in _MQAR_PAIRS.value)
  except ValueError as e:
    raise app.UsageError(f"--depths must be floats and --mqar_pairs ints: {e}") from e
  if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
    raise app.UsageError(f"--depths must be a non-empty list in [0, 1], got {_DEPTHS.value}")
  unknown = sorted(set(_TASKS.value) - set(TASKS))
  if unknown or not _TASKS.value:
    raise app.UsageError(f"--tasks: unknown {unknown} (expected a subset of {TASKS})")
  if "mqar" in _TASKS.value:
    if not pairs or any(n < 1 or 4 * n > _MQAR_SEQ_LEN.value for n in pairs):
      raise app.UsageError(
        f"--mqar_pairs must lie in [1, mqar_seq_len/4 = {_MQAR_SEQ_LEN.value // 4}], got {pairs}"
      )
    if _MQAR_SEQ_LEN.value % 2 or _MQAR_SEQ_LEN.value < 4:
      raise app.UsageError(f"--mqar_seq_len must be even and >= 4, got {_MQAR_SEQ_LEN.value}")
    if _MQAR_SAMPLES.value < 1:
      raise app.UsageError(f"--mqar_samples must be >= 1, got {_MQAR_SAMPLES.value}")
  for name, val in (("context", _CONTEXT.value), ("samples", _SAMPLES.value)):
    if val < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {val}")
  if _BATCH.value < 0:
    raise app.UsageError(f"--batch_size must be >= 0, got {_BATCH.value}")
  return Setting(
    context=_CONTEXT.value,
    depths=depths,
    samples=_SAMPLES.value,
    segment=_SEGMENT.value,
    tasks=tuple(_TASKS.value),
    mqar_pairs=pairs,
    mqar_seq_len=_MQAR_SEQ_LEN.value,
    mqar_samples=_MQAR_SAMPLES.value,
    batch_size=_BATCH.value,
  )


def main(argv):
  del argv
  chunk = _CHUNK.value
  if chunk < 1:
    raise app.UsageError(f"--chunk_size must be >= 1, got {chunk}")
  setting = _setting_from_flags()
  if setting.segment < 1 or setting.segment % chunk:
    raise app.UsageError(
      f"--segment must be a positive multiple of --chunk_size={chunk}, got {setting.segment} "
      "(occupancy is read at chunk boundaries, and only there are the splits exact)"
    )
  unknown = sorted(set(_FAMILIES.value) - set(FAMILIES))
  if unknown or not _FAMILIES.value:
    raise app.UsageError(f"--families: unknown {unknown} (expected a subset of {FAMILIES})")
  model_cfg, hybrid = nets.load_hybrid(_PARAMS_DIR.value, _PRESET.value)
  sre_sizes = tuple(int(x) for x in _SRE_SIZES.value)
  if _CAP.value < 1 or not sre_sizes or min(sre_sizes) < 1:
    raise app.UsageError(
      f"--cap and --sre_sizes must be positive, got {_CAP.value} and {_SRE_SIZES.value}"
    )
  policies = policy_rows(
    model_cfg.num_kv_heads, chunk, tuple(_FAMILIES.value), _CAP.value, sre_sizes
  )
  if _QUICK.value:
    policies = quick_rows(policies)
  print(
    f"{len(policies)} policy rows, tasks {list(setting.tasks)}, context {setting.context}, "
    f"{len(setting.depths)} depths x {setting.samples} samples, segment {setting.segment}, "
    f"batch {setting.batch} ({jax.default_backend()})",
    flush=True,
  )
  rows = run_ablation(hybrid, policies, setting, log=lambda s: print(s, flush=True))
  print("\n" + markdown_table(rows), flush=True)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=1)
    print(f"\nwrote {_OUT.value}")
  if _FIG_DIR.value:
    os.makedirs(_FIG_DIR.value, exist_ok=True)
    paths = [
      plot_pareto(rows, os.path.join(_FIG_DIR.value, "cache_policies_pareto.png")),
      plot_occupancy_hist(rows, os.path.join(_FIG_DIR.value, "cache_policies_occupancy_hist.png")),
    ]
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
  app.run(main)
