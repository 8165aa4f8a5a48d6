"""Tables and the figure of the SmolLM2 evaluation (`recall.py`'s summary)."""

from __future__ import annotations

import matplotlib.ticker
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from experiments.reporting import plots


def _mib(nbytes: int) -> str:
  return f"{nbytes / 2**20:.2f}"


def recall_table(rows: list[dict]) -> str:
  """Markdown: one line per (task, method), one column pair per context."""
  contexts = sorted({r["context"] for r in rows})
  tasks = sorted({r["task"] for r in rows})
  lines = []
  for task in tasks:
    lines.append(f"\n**{task}** (teacher-forced accuracy / greedy exact match; prompts per cell)\n")
    head = "| method | " + " | ".join(f"{c} tok" for c in contexts)
    head += f" | state MiB at {contexts[-1]} | KV MiB at {contexts[-1]} |"
    lines += [head, "|---" * (len(contexts) + 3) + "|"]
    labels = list(dict.fromkeys(r["label"] for r in rows if r["task"] == task))
    for label in labels:
      cells = {r["context"]: r for r in rows if r["task"] == task and r["label"] == label}
      parts = [
        f"{cells[c]['accuracy']:.0%} / {cells[c]['greedy_accuracy']:.0%} ({cells[c]['prompts']})"
        if c in cells
        else "-"
        for c in contexts
      ]
      last = cells.get(contexts[-1])
      mem = [_mib(last["state_bytes"]), _mib(last["full_kv_bytes"])] if last else ["-", "-"]
      lines.append(f"| {label} | " + " | ".join(parts + mem) + " |")
  return "\n".join(lines)


def markdown(summary: dict) -> str:
  out = [f"# {summary['model']}: preset {summary['preset']}", "", f"`{summary['command']}`"]
  if summary.get("recall"):
    out.append(recall_table(summary["recall"]))
  if summary.get("perplexity"):
    out += ["", "**held-out perplexity**", "", "| method | T | windows | perplexity |"]
    out.append("|---|---|---|---|")
    for r in summary["perplexity"]:
      out.append(f"| {r['label']} | {r['length']} | {r['windows']} | {r['perplexity']:.3f} |")
  if summary.get("decode"):
    out += [
      "",
      "**decode**",
      "",
      "| method | context | ms / token | state MiB |",
      "|---|---|---|---|",
    ]
    for r in summary["decode"]:
      out.append(
        f"| {r['label']} | {r['context']} | {r['ms_per_token']:.1f} | {_mib(r['state_bytes'])} |"
      )
  return "\n".join(out) + "\n"


def plot_recall(rows: list[dict], path: str) -> str:
  """Teacher-forced accuracy against context (one panel per task); returns `path`."""
  tasks = sorted({r["task"] for r in rows})
  fig = Figure(figsize=(6.5 * len(tasks), 4.2))
  axes = fig.subplots(1, len(tasks), squeeze=False)
  cmap = colormaps["tab20"]
  for ax, task in zip(axes[0], tasks, strict=True):
    labels = list(dict.fromkeys(r["label"] for r in rows if r["task"] == task))
    for i, label in enumerate(labels):
      pts = sorted(
        (r["context"], r["accuracy"]) for r in rows if r["task"] == task and r["label"] == label
      )
      xs, ys = zip(*pts, strict=True)
      teacher = label.startswith("teacher")
      ax.plot(xs, ys, marker="o", label=label, color="black" if teacher else cmap(i))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["context"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("accuracy (true key ranked first of 10)")
    n = max(r["prompts"] for r in rows if r["task"] == task)
    ax.set_title(f"SmolLM2-135M, {task} (up to {n} prompts per point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def depth_cells(cells: list[dict], labels: dict[str, str]) -> list[dict]:
  """Per-prompt cells -> one cell per (method, task, context, depth) with its forced accuracy.

  `labels` maps method names to report labels; cells of other methods are left out.
  """
  groups: dict[tuple, list[bool]] = {}
  for c in cells:
    if c["method"] in labels:
      key = (labels[c["method"]], c["task"], c["context"], round(c["depth"], 4))
      groups.setdefault(key, []).append(bool(c["forced"]))
  return [
    {"label": label, "task": task, "context": ctx, "depth": depth, "accuracy": float(np.mean(v))}
    for (label, task, ctx, depth), v in groups.items()
  ]


def plot_depths(cells: list[dict], labels: dict[str, str], path: str, task="passkey") -> str:
  """Heat maps of teacher-forced accuracy over needle depth x context, one panel per method."""
  return plots.depth_heatmaps(depth_cells(cells, labels), path, task=task)
