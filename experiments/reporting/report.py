"""Markdown tables of recall results (rows as in `plots.py`)."""

from __future__ import annotations


def _kib(n):
  return f"{n / 1024:,.0f} KiB" if n >= 10 * 1024 else f"{n / 1024:.1f} KiB"


def method_labels(rows):
  """The rows' labels, each once, in first-seen order (table rows and plot lines)."""
  seen = []
  for r in rows:
    if r["label"] not in seen:
      seen.append(r["label"])
  return seen


def retrieval_table(rows, task: str) -> str:
  """Accuracy per context (columns) per method, with state bytes and the ratio to full KV."""
  sel = [r for r in rows if r["task"] == task]
  contexts = sorted({r["context"] for r in sel})
  head = ["method", "window C", "cache", "policy"]
  head += [f"acc @{c}" for c in contexts]
  head += [f"state @{contexts[-1]}", f"full KV @{contexts[-1]}", "KV / state"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label in method_labels(sel):
    rs = {r["context"]: r for r in sel if r["label"] == label}
    r0 = rs[max(rs)]
    cells = [
      label,
      str(r0["window"] if r0["window"] is not None else "full"),
      ":".join(map(str, r0["layer_cache_sizes"]))
      if r0.get("layer_cache_sizes")
      else str(r0["cache_size"]),
      str(r0["policy"] or "-"),
    ]
    cells += [f"{100 * rs[c]['accuracy']:.0f}%" if c in rs else "" for c in contexts]
    cells += [
      _kib(r0["state_bytes"]),
      _kib(r0["full_kv_bytes"]),
      f"{r0['full_kv_bytes'] / r0['state_bytes']:.1f}x",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def bytes_table(rows, task: str = "passkey") -> str:
  """State bytes per method against the full KV cache at every context."""
  sel = [r for r in rows if r["task"] == task]
  contexts = sorted({r["context"] for r in sel})
  head = ["method"] + [f"state @{c} (x smaller than KV)" for c in contexts]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label in method_labels(sel):
    rs = {r["context"]: r for r in sel if r["label"] == label}
    cells = [label] + [
      f"{_kib(rs[c]['state_bytes'])} ({rs[c]['full_kv_bytes'] / rs[c]['state_bytes']:.1f}x)"
      if c in rs
      else ""
      for c in contexts
    ]
    lines.append("| " + " | ".join(cells) + " |")
  kv = {r["context"]: r["full_kv_bytes"] for r in sel}
  lines.append("| full KV cache | " + " | ".join(_kib(kv[c]) for c in contexts) + " |")
  return "\n".join(lines)


def mqar_table(rows) -> str:
  """MQAR accuracy per number of pairs (columns) per method, with state bytes."""
  sel = [r for r in rows if r["task"] == "mqar"]
  pairs = sorted({r["num_pairs"] for r in sel})
  head = ["method"] + [f"N={n}" for n in pairs] + ["state", "full KV"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label in method_labels(sel):
    rs = {r["num_pairs"]: r for r in sel if r["label"] == label}
    r0 = next(iter(rs.values()))
    cells = [label] + [f"{100 * rs[n]['accuracy']:.0f}%" if n in rs else "" for n in pairs]
    cells += [_kib(r0["state_bytes"]), _kib(r0["full_kv_bytes"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def coverage_table(rows) -> str:
  """Share of the needle's secret tokens in the sparse cache, per LoLA method, task and context."""
  sel = [r for r in rows if "needle_in_cache" in r]
  contexts = sorted({r["context"] for r in sel})
  head = ["method", "task"] + [f"@{c}" for c in contexts]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label in method_labels(sel):
    for task in ("passkey", "niah"):
      rs = {r["context"]: r for r in sel if r["label"] == label and r["task"] == task}
      if rs:
        cells = [label, task]
        cells += [f"{100 * rs[c]['needle_in_cache']:.0f}%" if c in rs else "" for c in contexts]
        lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
