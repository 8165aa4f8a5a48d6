"""PNG plots of recall results (matplotlib `Figure`s written to files: no pyplot, so importing
this module neither needs a display nor changes the caller's matplotlib backend).

Rows are the dicts of `runs/*/results.json` ({"method", "window", "cache_size", "policy",
"context", "task", "accuracy", "state_bytes", "full_kv_bytes", "label", ...}); cells are the
per-(depth, context) dicts of `cells.json` ({"label", "task", "context", "depth", "accuracy"}).
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from experiments.reporting.report import method_labels


def _style(label):
  if label.startswith("teacher"):
    return {"color": "black", "marker": "s", "linestyle": "-"}
  if label.startswith("hybrid_wide"):
    return {"marker": "^", "linestyle": ":"}
  if label.startswith("hybrid"):
    return {"color": "tab:gray", "marker": "v", "linestyle": "--"}
  if "recency" in label:
    return {"marker": "x", "linestyle": "-."}
  if "sre_below" in label:
    return {"marker": "D", "linestyle": "-", "linewidth": 2.2}
  return {"marker": "o", "linestyle": "-"}


def _save(fig, path, tight=True):
  """Writes `fig` to `path` (PNG, 120 dpi); returns `path`."""
  if tight:
    fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def _accuracy_lines(ax, rows, x: str, xlabel: str, ylabel: str):
  """One line per method: accuracy against row[x] on a log2 axis."""
  for label in method_labels(rows):
    pts = sorted((r[x], r["accuracy"]) for r in rows if r["label"] == label)
    ax.plot(*zip(*pts, strict=True), label=label, **_style(label))
  ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(-0.03, 1.03)


def accuracy_vs_context(rows, path, tasks=("passkey", "niah")):
  """One panel per task: accuracy against context length (log2 axis), one line per method."""
  tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
  fig = Figure(figsize=(6 * len(tasks), 4.2))
  axes = fig.subplots(1, len(tasks), squeeze=False)
  for ax, task in zip(axes[0], tasks, strict=True):
    sel = [r for r in rows if r["task"] == task]
    _accuracy_lines(ax, sel, "context", "context (tokens)", "exact-match accuracy")
    ax.set_title(task)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="best")
  return _save(fig, path)


def accuracy_vs_bytes(rows, path, context, tasks=("passkey", "niah", "mqar")):
  """Pareto view: accuracy against state bytes (log axis) at one context, one panel per task."""
  tasks = [t for t in tasks if any(r["task"] == t and r["context"] == context for r in rows)]
  if not tasks:
    tasks = [t for t in ("mqar",) if any(r["task"] == t for r in rows)]
  fig = Figure(figsize=(5.5 * len(tasks), 4.2))
  axes = fig.subplots(1, len(tasks), squeeze=False)
  for ax, task in zip(axes[0], tasks, strict=True):
    sel = [r for r in rows if r["task"] == task and (task == "mqar" or r["context"] == context)]
    if task == "mqar":  # average over pair counts
      agg = {}
      for r in sel:
        agg.setdefault(r["label"], []).append(r)
      sel = [dict(v[0], accuracy=float(np.mean([x["accuracy"] for x in v]))) for v in agg.values()]
    for r in sel:
      st = _style(r["label"])
      ax.scatter(
        r["state_bytes"],
        r["accuracy"],
        marker=st["marker"],
        color=st.get("color"),
        label=r["label"],
        s=50,
      )
    pts = sorted((r["state_bytes"], r["accuracy"]) for r in sel)
    front, best = [], -1.0
    for b, a in pts:
      if a > best:
        front.append((b, a))
        best = a
    if len(front) > 1:
      ax.step(*zip(*front, strict=True), where="post", color="k", alpha=0.3, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("decode state bytes per sequence (all layers)")
    ax.set_ylabel("accuracy" + (" (mean over pair counts)" if task == "mqar" else ""))
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{task} @ {context}" if task != "mqar" else "mqar")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="best")
  return _save(fig, path)


def depth_heatmaps(cells, path, task="passkey"):
  """NIAH-style heat maps: accuracy over needle depth (rows) x context (columns), per method."""
  cells = [c for c in cells if c["task"] == task]
  if not cells:
    raise ValueError(f"depth_heatmaps: no cells of task {task!r} to plot")
  labels = method_labels(cells)
  contexts = sorted({c["context"] for c in cells})
  depths = sorted({c["depth"] for c in cells})
  cols = min(4, len(labels))
  nrows = (len(labels) + cols - 1) // cols
  fig = Figure(figsize=(3.8 * cols, 3.2 * nrows), layout="constrained")
  axes = fig.subplots(nrows, cols, squeeze=False)
  for ax in axes.flat[len(labels) :]:
    ax.axis("off")
  im = None
  for ax, label in zip(axes.flat, labels, strict=False):
    grid = np.full((len(depths), len(contexts)), np.nan)
    for c in cells:
      if c["label"] == label:
        grid[depths.index(c["depth"]), contexts.index(c["context"])] = c["accuracy"]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts], fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("context", fontsize=8)
    if ax in axes[:, 0]:
      ax.set_ylabel("needle depth", fontsize=8)
  if im is not None:
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy")
  return _save(fig, path, tight=False)  # constrained_layout already placed the panels


def mqar_vs_pairs(rows, path):
  """MQAR accuracy against the number of key/value pairs, one line per method."""
  sel = [r for r in rows if r["task"] == "mqar"]
  fig = Figure(figsize=(6, 4.2))
  ax = fig.subplots()
  _accuracy_lines(ax, sel, "num_pairs", "key/value pairs", "accuracy")
  ax.set_title(f"MQAR (T = {sel[0]['context']})" if sel else "MQAR")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)


# Line colours: tab10 without its gray (the hybrid's colour), then darker shades, so that up to 14
# methods get distinct colours.
_COLORS = [c for c in matplotlib.colormaps["tab10"].colors if len(set(c)) > 1] + [
  "navy",
  "darkgreen",
  "maroon",
  "darkgoldenrod",
  "teal",
]


def all_plots(rows, cells, out_dir, pareto_context):
  """Writes every plot into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  with matplotlib.rc_context({"axes.prop_cycle": matplotlib.cycler(color=_COLORS)}):
    return _all_plots(rows, cells, out_dir, pareto_context)


def _all_plots(rows, cells, out_dir, pareto_context):
  paths = [
    accuracy_vs_context(rows, os.path.join(out_dir, "accuracy_vs_context.png")),
    accuracy_vs_bytes(rows, os.path.join(out_dir, "accuracy_vs_bytes.png"), pareto_context),
  ]
  for task in ("passkey", "niah"):
    if any(c["task"] == task for c in cells):
      paths.append(depth_heatmaps(cells, os.path.join(out_dir, f"heatmap_{task}.png"), task))
  if any(r["task"] == "mqar" for r in rows):
    paths.append(mqar_vs_pairs(rows, os.path.join(out_dir, "mqar_vs_pairs.png")))
  return paths
