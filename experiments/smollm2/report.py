"""Tables and figures of the SmolLM2 evaluation (`recall.py`'s summary) and the selection probe's
measurements (`probe.py`). No flags here: binaries import it, and so do the tests."""

from __future__ import annotations

import matplotlib.ticker
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from experiments.reporting import plots
from experiments.smollm2.methods import POLICIES


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
      "| method | context | ms / token (generation loop) | ms (single call) | state MiB |",
      "|---|---|---|---|---|",
    ]
    for r in summary["decode"]:
      single = r.get("single_call_ms")
      out.append(
        f"| {r['label']} | {r['context']} | {r['ms_per_token']:.1f} | "
        f"{'-' if single is None else f'{single:.1f}'} | {_mib(r['state_bytes'])} |"
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


def policy_grids(rows: list[dict]) -> dict[tuple, list[dict]]:
  """Summary rows of LoLA with one window over several selection policies and cache sizes:
  {(task, context, window): rows}, only where at least two policies and two cache sizes were
  scored (the selection ablation)."""
  grids: dict[tuple, list[dict]] = {}
  for r in rows:
    if r["attention"] == "lola":
      grids.setdefault((r["task"], r["context"], r["window"]), []).append(r)
  return {
    key: rs
    for key, rs in sorted(grids.items())
    if len({r["policy"] for r in rs}) > 1 and len({r["cache_size"] for r in rs}) > 1
  }


def plot_policies(rows: list[dict], path: str) -> str | None:
  """Accuracy of each selection policy against the cache size (grouped bars), one panel per
  (task, context, window) of `policy_grids`, with the teacher and the hybrids (no cache) of that
  task and context as horizontal lines; returns `path`, or None when no grid was scored."""
  grids = policy_grids(rows)
  if not grids:
    return None
  fig = Figure(figsize=(9.5 * len(grids), 4.2))
  axes = fig.subplots(1, len(grids), squeeze=False)
  cmap = colormaps["tab10"]
  for ax, ((task, ctx, window), rs) in zip(axes[0], grids.items(), strict=True):
    caches = sorted({r["cache_size"] for r in rs})
    policies = sorted({r["policy"] for r in rs}, key=lambda p: (POLICIES.index(p), p)
                      if p in POLICIES else (len(POLICIES), p))  # the rows' order  # fmt: skip
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
      acc = {r["cache_size"]: r for r in rs if r["policy"] == policy}
      xs = [j + (i - (len(policies) - 1) / 2) * width for j, c in enumerate(caches) if c in acc]
      ys = [acc[c]["accuracy"] for c in caches if c in acc]
      n = "/".join(sorted({str(acc[c]["prompts"]) for c in acc}))
      ax.bar(xs, ys, width, color=cmap(i), label=f"{policy} ({n} prompts)")
    others = [
      r for r in rows
      if r["task"] == task and r["context"] == ctx and r["attention"] in ("softmax", "hybrid")
    ]  # fmt: skip
    for k, r in enumerate(others):
      teacher = r["attention"] == "softmax"
      ax.axhline(
        r["accuracy"], color="black" if teacher else cmap(len(policies) + k),
        linestyle="-" if teacher else "--", linewidth=1, label=f"{r['label']}: {r['accuracy']:.0%}",
      )  # fmt: skip
    ax.set_xticks(range(len(caches)), [str(c) for c in caches])
    ax.set_xlabel("sparse cache slots per kv head")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (true key ranked first of 10)")
    ax.set_title(f"SmolLM2-135M, {task} at {ctx} tokens, LoLA window C{window}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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


# The selection probe's measurements (experiments/smollm2/probe.py).


def key_positions(tokenizer, prompt) -> np.ndarray:
  """int [K]: positions inside the needle whose token carries a digit of the key."""
  span = range(prompt.needle_start, prompt.needle_end)
  pos = [
    t for t in span if any(ch.isdigit() for ch in tokenizer.decode([int(prompt.prompt_ids[t])]))
  ]
  if not pos:
    raise ValueError(f"prompt at depth {prompt.depth}: no digit token in its needle span")
  return np.asarray(pos)


def held_shares(states, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per layer: shares of `positions` held in the sparse cache / the window (any kv head)."""
  cached, windowed = [], []
  for st in states:
    slots = np.asarray(st.cache_positions[0])  # [Hkv, L]
    cached.append(np.isin(positions, slots).mean())
    # The window is the last complete chunk plus the current one (positions >= its start).
    n = int(st.num_tokens[0])
    c = st.window_k.shape[-2]
    window_start = max(0, (n // c - 1) * c)
    windowed.append((positions >= window_start).mean())
  return np.asarray(cached), np.asarray(windowed)


def plot_held(results: list[dict], path: str) -> str:
  """Per layer, the share of the key's digits held exactly (sparse cache or window), per run."""
  fig = Figure(figsize=(8, 4.2))
  ax = fig.subplots()
  for r in results:
    kept = np.asarray(r["held"]) + np.asarray(r["window"])  # disjoint: cache or window
    ax.plot(
      np.arange(len(kept)),
      kept,
      marker="o",
      markersize=3,
      label=f"{r['policy']} C{r['chunk']} cache {r['cache']} @ {r['context']} tok",
    )
  ax.set_xlabel("layer")
  ax.set_ylabel("key's digit tokens kept exactly (cache or window)")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title("SmolLM2-135M, LoLA: is the pass key kept exactly? (mean over prompts)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
