"""The rows of the real-model evaluation: which attention, window, cache and policy each runs.

Byte accounting for equal-memory comparisons is `lola_jax.evaluation.memory` (what `LoLAState`
holds, per layer and kv head, float32, head dim d, feature width D): a window buffer of 2C tokens
with their keys, values and mapped keys (2C (2d + D)), L cached pairs with the same three and a
position (L (2d + D) + L int32) and the linear state (D d + D). A hybrid with LoLA's bytes has
C' ~ C + L / 2 windowed tokens per chunk, a little less for the positions: for SmolLM2 (d = 64,
D = 128), C = 64 and L = 64 give C' = 95 (`memory.equal_memory_chunk`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

from lola_jax import pretrained
from lola_jax.evaluation import memory
from lola_jax.model import ModelConfig

POLICIES = ("sre", "recency", "sre_below", "energy")


@dataclasses.dataclass(frozen=True)
class Method:
  """One evaluated row.

  Attributes:
    name: short id (used on the command line and in the JSON).
    label: the report's label.
    attention: "softmax" | "hybrid" | "lola".
    chunk_size: C (window of C+1..2C tokens); unused by softmax.
    cache_size: L sparse-cache slots per kv head (0 for hybrid).
    policy: sparse-cache policy of "lola".
    maps_chunk: the window whose committed feature maps the row runs
      (`pretrained.committed_feature_maps`); None: the maps fitted to its own window.
    window_features: `LoLAConfig.window_features`: "recomputed" keeps no phi_k of the window in
      the state (the "_lean" rows: same outputs up to rounding, 2C D fewer values per kv head).
  """

  name: str
  label: str
  attention: str
  chunk_size: int = 64
  cache_size: int = 0
  policy: str = "sre"
  maps_chunk: int | None = None
  window_features: str = "stored"

  def feature_maps_file(self) -> str:
    """The committed feature-map file this row runs (the binaries' --feature_maps overrides)."""
    return pretrained.committed_feature_maps(self.maps_chunk or self.chunk_size)

  def model_config(self, base: ModelConfig) -> ModelConfig:
    """`base` (the pretrained architecture) under this row's attention."""
    lola = dataclasses.replace(
      base.lola,
      chunk_size=self.chunk_size,
      cache_size=self.cache_size,
      policy=self.policy,
      window_features=self.window_features,
    )
    return base.replace(attention=self.attention, lola=lola)


def row_setting(m: Method) -> dict:
  """What a scored cell records of its row (`recall.py`'s `cells.jsonl`), so that a row
  redefined later cannot silently reuse cells scored under its old definition."""
  return {
    "attention": m.attention,
    "window": m.chunk_size,
    "cache_size": m.cache_size,
    "policy": m.policy,
    "window_features": m.window_features,
  }


def feature_maps_id(path: str) -> str:
  """`name@sha256[:12]` of a feature-map file: what a linearised row's cells record of the maps
  they were scored with."""
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:12]
  return f"{os.path.basename(path)}@{digest}"


def check_cells(cells, rows, path: str, feature_maps: dict[str, str] | None = None) -> None:
  """ValueError when `cells` (dicts read from `path`) hold a row's cells scored under another
  definition of that row, or (linearised rows named in `feature_maps`, {row name:
  `feature_maps_id`}) with other feature maps; cells that predate the recorded settings are not
  checked."""
  by_name = {m.name: (m, row_setting(m)) for m in rows}
  for rec in cells:
    if rec["method"] not in by_name:
      continue
    m, want = by_name[rec["method"]]
    if feature_maps and m.attention != "softmax" and m.name in feature_maps:
      want = {**want, "feature_maps": feature_maps[m.name]}
    got = {k: rec[k] for k in want if k in rec}
    if any(got[k] != want[k] for k in got):
      raise ValueError(
        f"{path} holds cells of row {m.name!r} scored with {got}, but the row is now {want}: "
        "use a fresh --workdir or remove that row's lines"
      )


def segment_for(m: Method, segment: int) -> int:
  """The prefill segment of row `m`: `segment` rounded down to a multiple of its chunk (at least
  one chunk); the state carries everything between segments, so scores do not depend on it."""
  if segment < 1:
    raise ValueError(f"segment must be a positive number of tokens, got {segment}")
  if m.attention == "softmax":
    return segment
  return max(segment // m.chunk_size, 1) * m.chunk_size


def all_methods(base: ModelConfig, chunk: int = 64) -> dict[str, Method]:
  """Every row: teacher, hybrid, hybrid with LoLA-64's bytes, LoLA {16, 64, 256} x policies,
  and `sre` rows with longer windows (chunk 128 and 256, caches 64 and 256; the paper's 4K
  setting is chunk 256, cache 256) with their cache-0 hybrids, each with the maps fitted to
  its window, with the C64 maps ("_m64") and with a state that recomputes the window's
  features ("_lean"); with the C256 window in that state every policy at caches 16 / 64 / 256
  and a hybrid with the bytes of its cache-64 row ("hybrid_wide_c256_lean")."""
  equal_bytes = functools.partial(
    memory.equal_memory_chunk,
    cache_size=64,
    key_dim=base.head_dim,
    value_dim=base.head_dim,
    feature_dim=base.phi_dim,
    kv_dtype=base.dtype,
  )  # the window of a cache-0 hybrid holding the bytes of LoLA cache 64
  wide = equal_bytes(chunk_size=chunk)
  rows = [
    Method("teacher", "teacher (full KV)", "softmax"),
    Method("hybrid", f"hybrid C{chunk} (cache 0)", "hybrid", chunk),
    Method("hybrid_wide", f"hybrid C{wide} (bytes of cache 64)", "hybrid", wide),
  ]
  for cache in (16, 64, 256):
    for policy in POLICIES:
      rows.append(
        Method(
          f"lola{cache}_{policy}",
          f"LoLA C{chunk} cache {cache} {policy}",
          "lola",
          chunk,
          cache,
          policy,
        )
      )
  for wide_chunk in (128, 256):  # longer windows (the paper's 4K setting is C256, cache 256)
    # Each with the maps fitted to its window where one is committed, and with the C64 maps
    # ("_m64": what a window change without re-fitting gives).
    for maps, suffix, note in ((None, "", ""), (64, "_m64", ", C64 maps")):
      rows.append(
        Method(
          f"hybrid_c{wide_chunk}{suffix}",
          f"hybrid C{wide_chunk} (cache 0{note})",
          "hybrid",
          wide_chunk,
          maps_chunk=maps,
        )
      )
      for cache in (64, 256):
        rows.append(
          Method(
            f"lola{cache}_sre_c{wide_chunk}{suffix}",
            f"LoLA C{wide_chunk} cache {cache} sre{note}",
            "lola",
            wide_chunk,
            cache,
            "sre",
            maps_chunk=maps,
          )
        )
    # The same rows (own maps) with a state that keeps no phi_k of its window.
    lean = dict(window_features="recomputed")
    rows.append(
      Method(f"hybrid_c{wide_chunk}_lean", f"hybrid C{wide_chunk} (cache 0, lean)", "hybrid",
             wide_chunk, **lean)
    )  # fmt: skip
    for cache in (64, 256):
      rows.append(
        Method(
          f"lola{cache}_sre_c{wide_chunk}_lean",
          f"LoLA C{wide_chunk} cache {cache} sre, lean",
          "lola",
          wide_chunk,
          cache,
          "sre",
          **lean,
        )
      )
  # The C256 window with its maps in the lean state: every policy at caches 16 / 64 / 256, and
  # the cache-0 hybrid with the bytes of its cache-64 row in a wider window (C320).
  have = {m.name for m in rows}
  for cache in (16, 64, 256):
    for policy in POLICIES:
      if f"lola{cache}_{policy}_c256_lean" not in have:
        rows.append(
          Method(f"lola{cache}_{policy}_c256_lean", f"LoLA C256 cache {cache} {policy}, lean",
                 "lola", 256, cache, policy, **lean)
        )  # fmt: skip
  wide_lean = equal_bytes(chunk_size=256, window_features=False)
  rows.append(
    Method("hybrid_wide_c256_lean", f"hybrid C{wide_lean} (bytes of cache 64), C256 maps, lean",
           "hybrid", wide_lean, maps_chunk=256, **lean)
  )  # fmt: skip
  return {m.name: m for m in rows}
