"""The recall pipeline's evaluation grid: which methods run (`method_rows`), their scores on
pass-key, needle-in-pydoc and MQAR with their decode-state bytes (`evaluate`), and the report
(`write_report`). Used by `experiments/recall/pipeline.py` and the notebook, with explicit
arguments.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments.reporting import plots, report
from lola_jax.core.config import LoLAConfig
from lola_jax.core.state import cached_positions
from lola_jax.evaluation import (
  equal_memory_chunk,
  evaluate_mqar,
  evaluate_retrieval,
  full_kv_bytes,
  model_generate,
  model_predict,
  model_state_bytes,
  retrieval_cache_coverage,
)


def method_rows(preset, hybrid_config):
  """(label, method, attention, LoLAConfig, layer_cache_sizes or None) of every evaluated row."""
  c = hybrid_config.lola.chunk_size
  out = [
    ("teacher (full KV)", "teacher", "softmax", hybrid_config.lola, None),
    (f"hybrid C{c}", "hybrid", "hybrid", LoLAConfig(chunk_size=c, cache_size=0), None),
  ]
  for lam in preset["wide_for"]:
    wide = equal_memory_chunk(
      chunk_size=c,
      cache_size=lam,
      key_dim=hybrid_config.head_dim,
      value_dim=hybrid_config.head_dim,
      feature_dim=hybrid_config.phi_dim,
      kv_dtype=hybrid_config.dtype,
    )
    out.append(
      (
        f"hybrid_wide C{wide} (= lola {lam})",
        "hybrid_wide",
        "hybrid",
        LoLAConfig(chunk_size=wide, cache_size=0),
        None,
      )
    )
  for lam in preset["caches"]:
    out.append(
      (
        f"lola C{c} cache {lam}",
        "lola",
        "lola",
        LoLAConfig(chunk_size=c, cache_size=lam, policy="sre"),
        None,
      )
    )
  lam = preset["recency_cache"]
  out.append(
    (
      f"lola C{c} cache {lam} recency",
      "lola",
      "lola",
      LoLAConfig(chunk_size=c, cache_size=lam, policy="recency"),
      None,
    )
  )
  # Our extension: each layer first keeps what the layer below keeps (policy "sre_below"), with
  # the same cache size in every layer or one per layer ("16:64": 16 slots in layer 0, 64 above).
  for lam in preset.get("below_caches", []):
    sizes = tuple(lam) if isinstance(lam, (list, tuple)) else None
    name = ":".join(map(str, sizes)) if sizes else str(lam)
    out.append(
      (
        f"lola C{c} cache {name} sre_below",
        "lola",
        "lola",
        LoLAConfig(chunk_size=c, cache_size=max(sizes) if sizes else lam, policy="sre_below"),
        sizes,
      )
    )
  return out


def evaluate(preset, teacher, hybrid, *, methods=None, niah=True, mqar=True):
  """Every method on pass-key (and niah, MQAR); returns (rows, cells).

  Args:
    preset: a recall preset (`experiments/recall/presets.py`) with its grid changes.
    teacher, hybrid: the softmax teacher and the distilled hybrid (`nets.load_nets`).
    methods: the rows to evaluate (default `method_rows(preset, hybrid.config)`).
    niah, mqar: also evaluate the needle in natural text / MQAR.
  """
  if methods is None:
    methods = method_rows(preset, hybrid.config)
  tasks = ["passkey"] + (["niah"] if niah else [])
  rows, cells = [], []
  for label, method, attention, lola, layer_sizes in methods:
    base = teacher if method == "teacher" else hybrid
    model = base.with_lola_config(attention=attention, lola=lola, layer_cache_sizes=layer_sizes)
    cfg = model.config
    recorded = {}  # (task, context) -> per prompt batch, per layer cached positions [B,Hkv,lam]
    current = {}

    def record(states, current=current, recorded=recorded, windowed=cfg.kind.windowed):
      if windowed:  # a LoLAState: which positions its sparse cache holds
        recorded.setdefault(current["key"], []).append(
          [np.asarray(cached_positions(st)) for st in states]
        )

    generate_fn = model_generate(model, on_prefill=record)

    def generate(prompts, num_new, current=current, generate_fn=generate_fn):
      current["key"] = (current["task"], prompts.shape[1])
      return generate_fn(prompts, num_new)

    common = {
      "label": label,
      "method": method,
      "window": None if method == "teacher" else lola.chunk_size,
      "cache_size": 0 if method == "teacher" else (lola.cache_size if attention == "lola" else 0),
      "policy": lola.policy if attention == "lola" else None,
    }
    if layer_sizes:
      common["layer_cache_sizes"] = list(layer_sizes)

    def kv(context, cfg=cfg):
      return full_kv_bytes(
        context,
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        key_dim=cfg.head_dim,
        value_dim=cfg.head_dim,
        kv_dtype=cfg.dtype,
      )

    for task in tasks:
      current["task"] = task
      task_cells = []
      for context in preset["contexts"]:
        task_cells += evaluate_retrieval(
          generate,
          task,
          [context],
          preset["depths"],
          preset["samples"],
          seed=0,
          batch_size=max(1, 16384 // context),
          label=label,
        )
      for context in preset["contexts"]:
        sel = [x for x in task_cells if x.context == context]
        acc = sum(x.correct for x in sel) / sum(x.num for x in sel)
        extra = {}
        if attention == "lola":  # is the secret in the sparse cache after the prompt?
          coverage = retrieval_cache_coverage(
            recorded[(task, context)], task, context, preset["depths"], preset["samples"]
          )
          extra["needle_in_cache"] = float(coverage.mean())
        rows.append(
          dict(
            common,
            task=task,
            context=context,
            accuracy=acc,
            state_bytes=model_state_bytes(cfg, context),
            full_kv_bytes=kv(context),
            **extra,
          )
        )
      cells += [dict(label=label, **dataclasses.asdict(x), accuracy=x.accuracy) for x in task_cells]
      print(
        f"  {label:36s} {task:8s} "
        + " ".join(
          f"{r['context']}:{100 * r['accuracy']:.0f}%"
          for r in rows
          if r["label"] == label and r["task"] == task
        ),
        flush=True,
      )
    if mqar:
      acc = evaluate_mqar(
        model_predict(model),
        preset["mqar_pairs"],
        preset["mqar_seq_len"],
        preset["mqar_samples"],
        seed=0,
        label=label,
      )
      t = preset["mqar_seq_len"]
      for n, a in acc.items():
        rows.append(
          dict(
            common,
            task="mqar",
            context=t,
            num_pairs=n,
            accuracy=a,
            state_bytes=model_state_bytes(cfg, t),
            full_kv_bytes=kv(t),
          )
        )
      print(
        f"  {label:36s} mqar     " + " ".join(f"N={n}:{100 * a:.0f}%" for n, a in acc.items()),
        flush=True,
      )
  return rows, cells


def write_report(preset_name, preset, workdir, rows, cells, timings, commands):
  """report.md and figures/ in the workdir; returns the figures' paths."""
  fig_dir = os.path.join(workdir, "figures")
  contexts = preset["contexts"]
  # The Pareto view at 4x the 512-token training length, where the targets are set.
  pareto = 2048 if 2048 in contexts else contexts[-1]
  paths = plots.all_plots(rows, cells, fig_dir, pareto)
  lines = [
    f"# Recall in miniature: preset `{preset_name}`",
    "",
    "Commands (stage wall times in seconds: "
    + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
    + "):",
    "",
    "```",
  ]
  lines += commands + ["```", ""]
  for task in ("passkey", "niah"):
    if any(r["task"] == task for r in rows):
      lines += [
        f"## {task}: exact-match accuracy per context",
        "",
        report.retrieval_table(rows, task),
        "",
      ]
  if any("needle_in_cache" in r for r in rows):
    lines += [
      "## Share of the secret's tokens held in the sparse cache after the prompt",
      "",
      "(mean over layers, kv heads and prompts: what the model could still retrieve exactly)",
      "",
      report.coverage_table(rows),
      "",
    ]
  lines += [
    "## Decode-state bytes per sequence (all layers) vs the full KV cache",
    "",
    report.bytes_table(rows, "passkey"),
    "",
  ]
  if any(r["task"] == "mqar" for r in rows):
    lines += [
      f"## MQAR (T = {preset['mqar_seq_len']}): accuracy per number of pairs",
      "",
      report.mqar_table(rows),
      "",
    ]
  lines += ["## Figures", ""] + [
    f"![{os.path.basename(p)}](figures/{os.path.basename(p)})" for p in paths
  ]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return paths
