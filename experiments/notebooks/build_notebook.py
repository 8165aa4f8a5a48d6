"""Writes lola_tpu_colab.ipynb (outputs cleared) from the cell sources below.

  .venv/bin/python experiments/notebooks/build_notebook.py

Edit the cells here, rerun, commit both files. tests/experiments/test_notebook.py executes the
.ipynb as committed on CPU (PRESET = "auto" picks "tiny" there).
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "lola_tpu_colab.ipynb")

CELLS: list[tuple[str, str]] = []


def md(text: str) -> None:
  CELLS.append(("md", text.strip("\n")))


def code(text: str, tags: tuple[str, ...] = ()) -> None:
  CELLS.append(("code:" + ",".join(tags), text.strip("\n")))


md(
  """
# LoLA on a Colab TPU: low-rank linear attention with sparse caching

This notebook runs [lola-jax](../../README.md) end to end on whatever accelerator it finds:

1. what LoLA is, pictured from a real `lola_prefill` run;
2. the core API on random tensors (`LoLAConfig`, `lola_prefill`, `lola_decode`, `cached_positions`);
3. a sharded training run of a small softmax model over **all devices** with the project's own
   `lola_jax.training.train_and_evaluate`;
4. distillation of that model into the `hybrid` (sliding window + linear attention);
5. the pass-key evaluation with and without the sparse cache, with accuracy and memory plots;
6. a short prefill/decode benchmark on the device.

**Runtime.** It expects a Colab **TPU** runtime (*Runtime > Change runtime type > TPU*: v2-8 or
v5e). On a CPU or GPU runtime it says so and carries on. `PRESET = "auto"` (the default) picks the
full run on a TPU or GPU and the small one on CPU, where the whole notebook finishes in a few
minutes: that is what the project's test (`tests/experiments/test_notebook.py`) runs, as
committed.
"""
)

code(
  """
# Parameters (papermill convention: this cell is tagged "parameters"; a runner may override them).
PRESET = "auto"  # "auto": "colab" on a TPU or GPU, "tiny" on CPU; or force "colab" / "tiny"
REPO_URL = "https://github.com/YOUR_ORG/lola-jax.git"  # placeholder: `git clone` address of the repo
WORKDIR = "lola_runs"  # checkpoints, metrics.jsonl, figures, report.md
CPU_DEVICES = 4  # simulated CPU devices when no accelerator is found (exercises the sharded path)
""",
  tags=("parameters",),
)

md(
  """
## Setup: install the project, check the backend

If `lola_jax` is not importable yet, the next cell installs it from a copy of the repository:
one uploaded or cloned into `./lola-jax` (or an uploaded `lola-jax*.zip`), else a `git clone` of
`REPO_URL` (replace the placeholder with the repository's address). It installs the repository's
pinned `requirements.txt` together with the matching `jax[tpu]` (TPU) or `jax[cuda12]` (GPU) in
one `pip` call, so the set is the one the project is tested with, then the project itself without
dependencies. Before JAX starts, a subprocess checks that the default backend comes up; if it does
not (say, a TPU runtime whose libtpu does not match), the notebook runs on CPU and says so.
"""
)

code(
  """
import glob
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

PLACEHOLDER = "YOUR_ORG"
# Simulated CPU devices must be requested before JAX starts (TPU and GPU backends ignore it).
if CPU_DEVICES and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={CPU_DEVICES}"
  ).strip()


def run(*argv):
  print("$", " ".join(argv), flush=True)
  return subprocess.run(argv).returncode == 0


def pinned_version(requirements, name):
  \"\"\"The version `name==X` pinned in a requirements file.\"\"\"
  with open(requirements) as f:
    for line in f:
      m = re.match(rf"\\s*{re.escape(name)}==([^\\s#;]+)", line)
      if m:
        return m.group(1)
  raise ValueError(f"{requirements} pins no version of {name!r}")


def local_copy():
  for archive in glob.glob("lola-jax*.zip") + glob.glob("/content/lola-jax*.zip"):
    print(f"unpacking {archive}", flush=True)
    zipfile.ZipFile(archive).extractall(".")
  for p in ["lola-jax", "/content/lola-jax", *sorted(glob.glob("lola-jax-*"))]:
    if os.path.exists(os.path.join(p, "requirements.txt")):
      return os.path.abspath(p)
  return None


if importlib.util.find_spec("lola_jax") is None:
  repo = local_copy()
  if repo is None and PLACEHOLDER in REPO_URL:
    raise RuntimeError(
      f"lola_jax is not installed, no copy of the repository was found in {os.getcwd()!r} "
      f"(./lola-jax, /content/lola-jax or an uploaded lola-jax*.zip), and REPO_URL is still the "
      f"placeholder {REPO_URL!r}. Either set REPO_URL in the parameters cell to the repository's "
      "git address, or upload the repository as lola-jax.zip (Files pane; `git archive "
      "--prefix=lola-jax/ -o lola-jax.zip HEAD` makes one), then run this cell again."
    )
  if repo is None:
    if not run("git", "clone", "--depth=1", REPO_URL, "lola-jax"):
      raise RuntimeError(f"git clone {REPO_URL} failed (see above): check REPO_URL")
    repo = os.path.abspath("lola-jax")
  requirements = os.path.join(repo, "requirements.txt")
  jax_version = pinned_version(requirements, "jax")
  looks_like_tpu = bool(
    os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") or glob.glob("/dev/accel*")
    or glob.glob("/dev/vfio/[0-9]*")
  )
  extra = []
  if looks_like_tpu:  # jax[tpu]==<pin> brings the libtpu that jax version was released with
    extra = [f"jax[tpu]=={jax_version}"]
  elif shutil.which("nvidia-smi"):
    extra = [f"jax[cuda12]=={jax_version}"]
  # One resolver call: the pinned project set and the accelerator's jax extra together.
  if not run(sys.executable, "-m", "pip", "install", "-q", "-r", requirements, *extra):
    raise RuntimeError("pip could not install the pinned requirements (see above)")
  if not run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", repo):
    raise RuntimeError(f"pip could not install {repo} (see above)")
  sys.path.insert(0, repo)  # an editable install's path hook is read at start-up only
  importlib.invalidate_caches()
else:
  print("lola_jax is already importable: skipping the install.")

# Does the default backend come up? Asked in a subprocess, because a JAX whose backend failed
# to start cannot switch platforms afterwards in the same process.
if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "") != "cpu":
  probe = subprocess.run(
    [sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
    capture_output=True, text=True,
  )
  if probe.returncode:
    reason = (probe.stderr.strip().splitlines() or ["no message"])[-1]
    print(f"JAX could not start its default backend ({reason[:300]}); falling back to CPU.")
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

devices = jax.devices()
BACKEND = jax.default_backend()
print(f"JAX {jax.__version__}: backend {BACKEND!r}, {len(devices)} device(s) of kind "
      f"{devices[0].device_kind!r}, {jax.process_count()} process(es)")
if BACKEND == "tpu":
  print("TPU runtime found: training is sharded over all of its cores.")
else:
  print(f"This notebook expects a Colab TPU runtime (v2-8 or v5e). Running on {BACKEND} instead: "
        "every cell still runs, more slowly.")
if PRESET == "auto":  # the full run on an accelerator, the few-minute one on CPU
  PRESET = "tiny" if BACKEND == "cpu" else "colab"
  print(f"PRESET 'auto' -> {PRESET!r} on backend {BACKEND!r}")
""",
)

md(
  """
### Sizes

`PRESET` picks the recall pipeline's preset (`experiments/recall/presets.py`: `demo` is what
`make demo` runs, `tiny` its CI smoke size) and this notebook's own knobs. The model, the task mix
and the training recipes are those of `experiments/configs/recall_teacher.py` and
`recall_distill.py`.
"""
)

code(
  """
import json
import time

import numpy as np

from experiments.recall import grid as recall_grid
from experiments.recall import nets
from experiments.recall.presets import PRESETS

SETTINGS = {
  # demo recall preset: 450 + 100 + 60 training steps, pass-key at 512..8K and MQAR (the needle
  # task is left to `make demo`: another compile per method and context)
  "colab": dict(recall_preset="demo", recall_changes={}, niah=False, mqar=True,
                api_tokens=4096, reference_tokens=256, diagram_tokens=330,
                bench_lengths=[2048, 8192, 32768], bench_decode_steps=64),
  # a few steps, one context (512), four rows (teacher, hybrid, LoLA sre / recency), pass-key only:
  # the whole notebook in a few CPU minutes
  "tiny": dict(recall_preset="tiny", niah=False, mqar=False,
               recall_changes=dict(contexts=[512], caches=[64], wide_for=[]),
               api_tokens=300, reference_tokens=64, diagram_tokens=170,
               bench_lengths=[512], bench_decode_steps=8),
}
if PRESET not in SETTINGS:
  raise ValueError(f"PRESET must be one of {sorted(SETTINGS)}, got {PRESET!r}")
S = SETTINGS[PRESET]
RECALL = dict(PRESETS[S["recall_preset"]], **S["recall_changes"])
N_DEVICES = jax.device_count()
# Mesh over all devices: FSDP pairs (parameters and optimizer state split over "fsdp") when the
# device count is even, data parallelism over the rest ("data" = -1 takes what is left).
FSDP = 2 if N_DEVICES % 2 == 0 else 1
MESH_OVERRIDES = ["mesh.data=-1", f"mesh.fsdp={FSDP}", "mesh.tensor=1"]
OVERRIDES = list(RECALL["overrides"]) + MESH_OVERRIDES
os.makedirs(WORKDIR, exist_ok=True)
print(f"preset {PRESET!r} (recall preset {S['recall_preset']!r}); "
      f"workdir {os.path.abspath(WORKDIR)}")
print("config overrides:", OVERRIDES)
""",
)

md(
  """
## 1. What LoLA is

Linear attention keeps a constant-size state $H=\\sum_j \\phi(k_j)v_j^\\top$, $s=\\sum_j\\phi(k_j)$,
but recalls poorly: everything is smeared into one matrix. Sliding-window hybrids add exact
softmax attention over the last few tokens, which does not help for anything older. **LoLA** keeps
every past key/value pair of a layer in exactly one of three memories:

- the **sliding window** (the previous and the current chunk of `chunk_size` tokens): exact softmax;
- the **sparse cache** (`cache_size` pairs per kv head): the pairs the linear state would
  recall *worst* (largest self-recall error
  $\\lVert v - H^\\top\\phi(k)/s^\\top\\phi(k)\\rVert$), also exact softmax;
- the **linear state**: everything else, absorbed into $H$ and $s$.

A query attends to the window and the cache with softmax and reads the rest from the linear state;
the two are mixed per head by a learned gate. Memory is constant in the context length.

The picture below is not a sketch: it is `cached_positions(state)` and the window positions of a
real `lola_prefill` over random keys and values (with a few "surprising" tokens, whose values the
linear state cannot predict, planted so the cache has something to find).
"""
)

code(
  """
import functools

import jax.numpy as jnp
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from IPython.display import display

from lola_jax import LoLAConfig, cached_positions, lola_decode, lola_prefill


def show(fig):
  # Displays a figure in the notebook (the inline backend formats it), then frees it.
  display(fig)
  plt.close(fig)



def random_inputs(key, batch, tokens, hq, hkv, dk, feat):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (batch, tokens, hq, dk))
  k = jax.random.normal(ks[1], (batch, tokens, hkv, dk))
  v = 0.1 * jax.random.normal(ks[2], (batch, tokens, hkv, dk))
  phi_q = jax.nn.softmax(jax.random.normal(ks[3], (batch, tokens, hq, feat)), -1)
  phi_k = jax.nn.softmax(jax.random.normal(ks[4], (batch, tokens, hkv, feat)), -1)
  gate = jnp.full((hq,), 0.5)
  return q, k, v, phi_q, phi_k, gate


T_DIAGRAM = S["diagram_tokens"]
diagram_config = LoLAConfig(chunk_size=16, cache_size=12)
q, k, v, phi_q, phi_k, gate = random_inputs(jax.random.key(0), 1, T_DIAGRAM, 4, 2, 32, 32)
# Plant surprising values at a few positions: large, unlike anything else.
surprising = np.sort(np.random.default_rng(0).choice(T_DIAGRAM - 40, 10, replace=False))
v = v.at[:, surprising].multiply(30.0)
_, diagram_state = lola_prefill(q, k, v, phi_q, phi_k, gate, config=diagram_config)

WHERE = {"linear state": 0, "sparse cache": 1, "window (previous chunk)": 2, "current chunk": 3}
hkv = diagram_state.num_kv_heads
grid = np.zeros((hkv, T_DIAGRAM), int)
cached = np.asarray(cached_positions(diagram_state))[0]  # [Hkv, L], -1 = empty slot
window = np.asarray(diagram_state.window_positions)[0]
chunk = np.asarray(diagram_state.chunk_positions)[0]
for h in range(hkv):
  grid[h, cached[h][cached[h] >= 0]] = 1
  grid[h, window[window >= 0]] = 2
  grid[h, chunk[chunk >= 0]] = 3
colors = ["#9ecae1", "#e6550d", "#31a354", "#a1d99b"]
fig, ax = plt.subplots(figsize=(12, 2.2))
ax.imshow(grid, aspect="auto", cmap=ListedColormap(colors), vmin=0, vmax=3, interpolation="none")
for p in surprising:
  ax.axvline(p, color="k", lw=0.6, ls=":", alpha=0.6)
ax.set_yticks(range(hkv), [f"kv head {h}" for h in range(hkv)])
ax.set_xlabel(f"token position (the next query is position {T_DIAGRAM}); dotted: planted "
              "surprising values")
ax.set_title(f"Where each past pair lives after {T_DIAGRAM} tokens "
             f"(chunk {diagram_config.chunk_size}, cache {diagram_config.cache_size})")
ax.legend(handles=[Patch(color=c, label=n) for n, c in zip(WHERE, colors)],
          loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
fig.tight_layout()
show(fig)
hits = [len(set(surprising) & set(cached[h])) for h in range(hkv)]
print("cached positions per kv head:", [sorted(int(p) for p in c if p >= 0) for c in cached])
print(f"planted surprising positions held in the cache, per kv head: {hits} of {len(surprising)}")
""",
)

md(
  """
## 2. The core API on random tensors

`lola_prefill` runs a block of tokens (a chunked scan), `lola_decode` one more token; both take
and return a `LoLAState`, a frozen-dataclass pytree whose size does not depend on how many tokens
it has seen. `lola_reference` is the float64 NumPy oracle the tests compare against.
"""
)

code(
  """
from lola_jax import lola_reference
from lola_jax.evaluation import full_kv_bytes

B, T, Hq, Hkv, dk, D = 1, S["api_tokens"], 8, 2, 64, 128
q, k, v, phi_q, phi_k, gate = random_inputs(jax.random.key(1), B, T + 8, Hq, Hkv, dk, D)
config = LoLAConfig(chunk_size=64, cache_size=64)  # window 64..128 tokens, 64 cached pairs
y, state = lola_prefill(q[:, :T], k[:, :T], v[:, :T], phi_q[:, :T], phi_k[:, :T], gate,
                        config=config)
print("prefill output", y.shape, "| tokens seen", int(state.num_tokens[0]))
decoded = []
for t in range(T, T + 8):  # eight more tokens, one at a time
  y1, state = lola_decode(q[:, t], k[:, t], v[:, t], phi_q[:, t], phi_k[:, t], gate,
                          config=config, state=state)
  decoded.append(y1)
cached = np.asarray(cached_positions(state))
n = int(state.num_tokens[0])
in_window = int((np.asarray(state.window_positions)[0] >= 0).sum()
                + (np.asarray(state.chunk_positions)[0] >= 0).sum())
in_cache = (cached[0] >= 0).sum(-1)
print(f"after {n} tokens, per kv head: window {in_window}, sparse cache {in_cache.tolist()}, "
      f"absorbed into the linear state {(n - in_window - in_cache).tolist()}")
print("oldest cached positions of kv head 0:",
      sorted(int(p) for p in cached[0, 0] if p >= 0)[:12], "...")
kv = full_kv_bytes(n, num_layers=1, num_kv_heads=Hkv, key_dim=dk, value_dim=dk)
print(f"state {state.nbytes() / 1024:.0f} KiB (constant) vs a full KV cache of {n} tokens "
      f"{kv / 1024:.0f} KiB")

# Decode continues prefill exactly: compare with the float64 reference on the whole sequence.
t_check = S["reference_tokens"]
ref = lola_reference(q[:, :t_check], k[:, :t_check], v[:, :t_check], phi_q[:, :t_check],
                     phi_k[:, :t_check], gate, config=config)
y_check, _ = lola_prefill(q[:, :t_check], k[:, :t_check], v[:, :t_check], phi_q[:, :t_check],
                          phi_k[:, :t_check], gate, config=config)
print(f"max |lola_prefill - lola_reference| over {t_check} tokens: "
      f"{float(np.abs(np.asarray(y_check, np.float64) - ref).max()):.2e}")
""",
)

md(
  """
### Does the Pallas kernel compile here?

On TPU and GPU `lola_prefill` picks the fused Pallas chunk step (`implementation=None`); on CPU
the XLA step. This cell compiles both on the device and compares them. If the kernel fails or
disagrees, the rest of the notebook uses the XLA step (`lola.implementation=xla`) and says so.
"""
)

code(
  """
import dataclasses

USE_XLA = False
if BACKEND == "cpu":
  print("CPU backend: lola_prefill uses the XLA chunk step (the Pallas kernel is for TPU/GPU).")
else:
  args = random_inputs(jax.random.key(2), 2, 512, 8, 2, 64, 64)
  try:
    outs = {}
    for impl in ("xla", "pallas"):
      cfg = LoLAConfig(chunk_size=64, cache_size=32, implementation=impl)
      outs[impl] = np.asarray(jax.jit(functools.partial(lola_prefill, config=cfg))(*args)[0])
    err = float(np.abs(outs["xla"] - outs["pallas"]).max())
    scale = float(np.abs(outs["xla"]).max())
    print(f"Pallas vs XLA chunk step on {BACKEND}: max abs difference {err:.2e} (outputs up to "
          f"{scale:.2f})")
    USE_XLA = not err <= 2e-2 * max(scale, 1.0)
  except Exception as e:  # noqa: BLE001 - report and fall back, never stop the notebook
    print(f"The Pallas kernel failed on {BACKEND}: {type(e).__name__}: {str(e)[:500]}")
    USE_XLA = True
if USE_XLA:
  print("Falling back to the XLA chunk step for training and evaluation.")
  OVERRIDES.append("lola.implementation=xla")
""",
)

md(
  """
## 3. Sharded training of a small model over all devices

`lola_jax.training.train_and_evaluate(config, workdir)` is what the training binary
(`python -m experiments.train`) calls: it builds a `("data", "fsdp", "tensor")` mesh over all
devices (`lola_jax.sharding`), shards parameters and optimizer state by logical axis rules, splits
each batch over the data-parallel axes, writes Orbax checkpoints, `metrics.jsonl` and TensorBoard
events, and resumes from the newest checkpoint when rerun. Here it trains the softmax **teacher**
of the recall pipeline (`experiments/configs/recall_teacher.py`) on its task mix (pass-key,
needle, MQAR and byte LM). The progress bar follows `metrics.jsonl`; the trainer prints its own
lines too.
"""
)

code(
  '''
import threading
import warnings

from experiments.configs import recall_distill, recall_teacher
from lola_jax.training import train_and_evaluate

with warnings.catch_warnings():
  warnings.simplefilter("ignore")  # tqdm.auto warns when ipywidgets is missing (plain text bar)
  from tqdm.auto import tqdm


def make_config(module, overrides):
  """A config file's get_config() with `key=value` overrides (the pipeline's own parser)."""
  return nets.apply_overrides(module.get_config(), overrides)


def read_metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_with_progress(config, workdir, desc):
  """train_and_evaluate, with a progress bar that follows workdir/metrics.jsonl."""
  total = config.train.steps
  if config.train.mode == "distill":
    total += config.distill.finetune_steps
  bar = tqdm(total=total, desc=desc)
  done = threading.Event()

  def follow():
    shown = 0
    while True:
      finished = done.wait(1.0)
      recs = [r for r in read_metrics(workdir) if r.get("loss") is not None]
      if recs and recs[-1]["step"] != shown:  # redraw only on progress (text bars print lines)
        shown = recs[-1]["step"]
        bar.set_postfix(loss=f"{recs[-1]['loss']:.3f}", stage=recs[-1].get("stage", ""),
                        refresh=False)
        bar.update(min(total, shown) - bar.n)
      if finished:
        return

  thread = threading.Thread(target=follow, daemon=True)
  thread.start()
  start = time.time()
  try:
    result = train_and_evaluate(config, workdir)
  finally:
    done.set()
    thread.join()
    bar.close()
  result["wall_s"] = time.time() - start
  return result


TEACHER_DIR = os.path.join(WORKDIR, "teacher")
HYBRID_DIR = os.path.join(WORKDIR, "hybrid")
TIMINGS = {}
teacher_config = make_config(recall_teacher, OVERRIDES + [f"train.steps={RECALL['teacher_steps']}"])
teacher = train_with_progress(teacher_config, TEACHER_DIR, "teacher (softmax)")
TIMINGS["teacher"] = teacher["wall_s"]
print(f"teacher: step {teacher['step']}, loss {teacher.get('loss', float('nan')):.4f}, "
      f"eval loss {teacher.get('eval_loss', float('nan')):.4f}, {teacher['wall_s']:.0f} s")
''',
)

code(
  """
# Where the parameters live: the trainer's NamedShardings over the mesh.
leaves = jax.tree_util.tree_flatten_with_path(teacher["params"])[0]
mesh_shape = dict(next(iter(leaves))[1].sharding.mesh.shape)
print(f"mesh {mesh_shape} over {N_DEVICES} device(s)")
for path, x in leaves[:6]:
  name = "/".join(str(getattr(p, "key", p)) for p in path)
  print(f"  {name:48s} {str(x.shape):16s} spec {x.sharding.spec}  "
        f"per-device shard {x.addressable_shards[0].data.shape}")

recs = [r for r in read_metrics(TEACHER_DIR) if r.get("loss") is not None]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], marker=".")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title("teacher (softmax) on the recall task mix")
ax.grid(alpha=0.3)
fig.tight_layout()
show(fig)
""",
)

md(
  """
## 4. Distillation into `hybrid`

`train.mode = "distill"` (`experiments/configs/recall_distill.py`): the teacher's weights are
loaded, then only the feature maps and gates are trained so each layer's hybrid attention output
matches its softmax output (attention transfer, LoLCATs stage 1), then everything is finetuned on
the task loss for `distill.finetune_steps`. The hybrid is sliding window + linear attention with
no sparse cache; LoLA adds the cache at inference time on the same weights.
"""
)

code(
  """
distill_config = make_config(
  recall_distill,
  OVERRIDES
  + [
    f"train.steps={RECALL['distill_steps']}",
    f"distill.finetune_steps={RECALL['finetune_steps']}",
    f"distill.teacher_workdir={TEACHER_DIR}",
  ],
)
hybrid = train_with_progress(distill_config, HYBRID_DIR, "distill -> hybrid")
TIMINGS["distill"] = hybrid["wall_s"]
recs = [r for r in read_metrics(HYBRID_DIR) if r.get("loss") is not None]
for stage in ("distill", "lm"):
  sel = [r for r in recs if r.get("stage") == stage]
  if sel:
    print(f"{stage:8s} stage: loss {sel[0]['loss']:.4f} (step {sel[0]['step']}) -> "
          f"{sel[-1]['loss']:.4f} (step {sel[-1]['step']})")
print(f"hybrid eval loss {hybrid.get('eval_loss', float('nan')):.4f}, {hybrid['wall_s']:.0f} s")
""",
)

md(
  """
## 5. Pass-key recall with and without the sparse cache

The recall pipeline's own evaluation (`experiments.recall.grid.evaluate`, built on
`lola_jax.evaluation` and `lola_jax.data`) reloads both runs from their checkpoints
(`experiments.recall.nets.load_nets`) and scores
greedy exact-match pass-key retrieval at contexts longer than the training length, for the teacher
(full KV cache), the hybrid (window only), a hybrid with a wider window of LoLA's memory, and LoLA
(the same hybrid weights plus a sparse cache of several sizes, `sre` and `recency` policies).
Every row carries its decode-state bytes next to the full KV cache's. `recall_grid.write_report`
writes `report.md` and the figures.
"""
)

code(
  """
from IPython.display import Image, Markdown

from experiments.reporting import report

start = time.time()
teacher_net, hybrid_config, hybrid_net = nets.load_nets(WORKDIR, OVERRIDES)
methods = recall_grid.method_rows(RECALL, hybrid_config)
if USE_XLA:  # the evaluated LoLA rows run the XLA chunk step too
  methods = [
    (label, method, attention, dataclasses.replace(lola, implementation="xla"), sizes)
    for label, method, attention, lola, sizes in methods
  ]
rows, cells = recall_grid.evaluate(
  RECALL, teacher_net, hybrid_net, methods=methods, niah=S["niah"], mqar=S["mqar"]
)
TIMINGS["eval"] = time.time() - start
json.dump(rows, open(os.path.join(WORKDIR, "results.json"), "w"), indent=1)
json.dump(cells, open(os.path.join(WORKDIR, "cells.json"), "w"), indent=1)
commands = [f"notebook lola_tpu_colab.ipynb, PRESET={PRESET!r}, overrides {OVERRIDES}"]
figures = recall_grid.write_report(S["recall_preset"], RECALL, WORKDIR, rows, cells, TIMINGS, commands)
print("Pass-key exact-match accuracy (state bytes per sequence, all layers):")
print(report.retrieval_table(rows, "passkey"))
if any("needle_in_cache" in r for r in rows):
  print("\\nShare of the pass key's tokens held in the sparse cache after the prompt:")
  print(report.coverage_table(rows))
print(f"\\nwrote {WORKDIR}/results.json, cells.json, report.md; evaluation {TIMINGS['eval']:.0f} s")
display(Markdown(report.retrieval_table(rows, "passkey")))
""",
)

code(
  """
# Accuracy against context and against state bytes (the pipeline's figures).
for path in figures:
  if os.path.basename(path) in ("accuracy_vs_context.png", "accuracy_vs_bytes.png"):
    display(Image(filename=path))

# Memory: decode-state bytes per sequence against context. LoLA / hybrid states have fixed
# capacities (lola_jax.evaluation.memory), so their bytes are flat; the full KV cache is linear.
passkey_rows = [r for r in rows if r["task"] == "passkey"]
grid_ctx = [2**i for i in range(8, 18)]
fig, ax = plt.subplots(figsize=(7, 4))
for label in dict.fromkeys(r["label"] for r in passkey_rows if r["method"] != "teacher"):
  r = next(x for x in passkey_rows if x["label"] == label)
  ax.plot(grid_ctx, [r["state_bytes"]] * len(grid_ctx), label=label)
r = passkey_rows[0]
ax.plot(grid_ctx, [r["full_kv_bytes"] * c / r["context"] for c in grid_ctx], "k--",
        label="full KV cache (teacher)")
ax.scatter([x["context"] for x in passkey_rows], [x["state_bytes"] for x in passkey_rows],
           color="k", s=12, zorder=3, label="evaluated here")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context (tokens)")
ax.set_ylabel("decode-state bytes per sequence")
ax.set_title("Memory: LoLA / hybrid states are constant, the KV cache grows")
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(WORKDIR, "figures", "state_bytes_vs_context.png"), dpi=120)
show(fig)
""",
)

md(
  """
## 6. Prefill and decode on the device

A short benchmark of the core (no model around it): `lola_prefill` throughput at a few lengths,
with and without the sparse cache, and the per-token latency of `lola_decode` (jitted, the state
carried from step to step). Timings are medians after one compile-and-warm-up call. The full
benchmark is `make bench` (`experiments/benchmarks/bench_core.py`, results in
`docs/benchmarks.md`).
"""
)

code(
  """
import statistics


def median_time(fn, repeats=3):
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


Hq, Hkv, dk, D, C = 8, 8, 64, 128, 64
impl = "xla" if USE_XLA else None
bench_rows = []
for T in S["bench_lengths"]:
  args = random_inputs(jax.random.key(3), 1, T + S["bench_decode_steps"], Hq, Hkv, dk, D)
  prompt = [x[:, :T] for x in args[:5]] + [args[5]]
  for lam in (0, 64):
    cfg = LoLAConfig(chunk_size=C, cache_size=lam, implementation=impl)
    prefill = jax.jit(functools.partial(lola_prefill, config=cfg))
    sec = median_time(lambda: prefill(*prompt))
    _, st = prefill(*prompt)
    decode = jax.jit(functools.partial(lola_decode, config=cfg))
    step_args = [tuple(x[:, T + i] for x in args[:5]) + (args[5],)
                 for i in range(S["bench_decode_steps"])]
    jax.block_until_ready(decode(*step_args[0], state=st))  # compile
    lat = []
    for a in step_args:
      t0 = time.perf_counter()
      _, st = jax.block_until_ready(decode(*a, state=st))
      lat.append(time.perf_counter() - t0)
    bench_rows.append(dict(T=T, cache=lam, prefill_ms=sec * 1e3, tokens_per_s=T / sec,
                           decode_ms=statistics.median(lat) * 1e3, state_kib=st.nbytes() / 1024,
                           kv_kib=full_kv_bytes(T, num_layers=1, num_kv_heads=Hkv, key_dim=dk,
                                                value_dim=dk) / 1024))
lines = [f"Device: {jax.devices()[0].device_kind} ({BACKEND}); one layer, B=1, Hq={Hq}, "
         f"Hkv={Hkv}, dk=dv={dk}, D={D}, chunk {C}", "",
         "| T | cache | prefill ms | prefill tok/s | decode ms/token | state KiB | full KV KiB |",
         "|---|---|---|---|---|---|---|"]
for r in bench_rows:
  lines.append(f"| {r['T']} | {r['cache']} | {r['prefill_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
               f"{r['decode_ms']:.3f} | {r['state_kib']:.0f} | {r['kv_kib']:.0f} |")
print("\\n".join(lines))
json.dump(bench_rows, open(os.path.join(WORKDIR, "bench.json"), "w"), indent=1)
""",
)

md(
  """
## Where to go next

- `python -m experiments.recall.pipeline --preset=full --workdir=runs/full` for the full-size
  recall experiment (`docs/results.md`), `make bench` for the benchmark tables
  (`docs/benchmarks.md`), `docs/semantics.md` for the equations.
- Rerunning the training cells resumes from `WORKDIR`'s checkpoints; delete `WORKDIR` to start over.
"""
)


def build() -> nbformat.NotebookNode:
  nb = new_notebook()
  for kind, src in CELLS:
    if kind == "md":
      nb.cells.append(new_markdown_cell(src))
    else:
      tags = [t for t in kind.split(":", 1)[1].split(",") if t]
      cell = new_code_cell(src)
      if tags:
        cell.metadata["tags"] = tags
      nb.cells.append(cell)
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["accelerator"] = "TPU"
  nb.metadata["colab"] = {"provenance": [], "gpuType": "V5E1"}
  # Stable cell ids so regenerating gives the same file.
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"cell-{i:02d}"
  return nb


def main() -> None:
  nb = build()
  nbformat.validate(nb)
  with open(OUT, "w") as f:
    nbformat.write(nb, f)
  print(f"wrote {OUT} ({len(nb.cells)} cells)")


if __name__ == "__main__":
  main()
