r"""The XLA LoLA path near the machine's limit (issue 17): prefill and decode against the previous
version of the code, one large matmul and one pass over the state, all measured in the same run.

  python -m experiments.benchmarks.bench_lola                       # `make bench`
  python -m experiments.benchmarks.bench_lola --quick               # a few seconds' smoke run
  python -m experiments.benchmarks.bench_lola --baseline=REV        # compare with git REV

Workload (issue 17): float32, batch 1, 8 query and 8 kv heads, head dim 64, Hedgehog features
D = 128, chunk 64. For every T and cache size: `lola_prefill` tokens/s, achieved GFLOP/s under
one FLOP model (`prefill_flops`, the same count for both versions) and that as a % of one
2048^2 matmul's GFLOP/s measured in this run, beside the "matmul floor" (`matmul_floor`: the
counted matmuls alone, at LoLA's shapes, in a scan over the chunks). Decode at several
positions: ms per token as a single `lola_decode` call (validation, dispatch and the jitted
step, chunk ends included in the mean) and inside jitted loops over the tokens (a user's scan,
`lola_decode_steps`, the generation loop), against the time of one jitted reduction over arrays
of the state's size (streaming the state once).

The baseline runs the same measurements in a child process on a `git worktree` of REV
(created under /tmp if missing; the main checkout is not touched), interleaved with ours per
sequence length so that both see the same machine load. Medians of --repeats timed runs after a
compile run; on a shared machine only the ratios within one run mean anything.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import lola_jax
from lola_jax import LoLAConfig, lola_decode, lola_prefill
from lola_jax import generate as gen
from lola_jax import model as model_lib
from lola_jax.core import scan as core_scan
from lola_jax.core import selection
from pallas_kernels.equations import gate_terms, self_recall_error
from pallas_kernels.lola_chunk.xla import attend, chunk_mask

_QUICK = flags.DEFINE_bool("quick", False, "Tiny grid (tests, smoke runs).")
_OUT = flags.DEFINE_string("out", "docs/bench_lola.json", "JSON results ('' = none).")
_BASELINE = flags.DEFINE_string("baseline", "", "git revision to compare with ('' = none).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "8192", "32768"], "Prefill lengths T.")
_CACHES = flags.DEFINE_list("caches", ["0", "64", "256", "512"], "Cache sizes L.")
_POSITIONS = flags.DEFINE_list("positions", ["1024", "8192", "32768", "65536"], "Decode at.")
_DECODE_CACHES = flags.DEFINE_list("decode_caches", ["64", "256"], "Decode cache sizes.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 128, "Decode steps per measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per setting (median).")
_CHILD = flags.DEFINE_string("child", None, "Internal: JSON job for the baseline process.")
_PROFILE = flags.DEFINE_bool(
  "profile", False, "Time the parts of one prefill chunk (scans running one part at a time)."
)

HEADS, KV_HEADS, HEAD_DIM, FEATURES, CHUNK = 8, 8, 64, 128, 64
# The decode loop's compiler options (as a user's loop would pass them); a baseline child's older
# lola_jax has none, and its loop compiles with XLA's defaults, as it did then.
decode_compiler_options = getattr(lola_jax, "decode_compiler_options", dict)


def _inputs(t, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(1, t, HEADS, HEAD_DIM))
  k = rng.normal(size=(1, t, KV_HEADS, HEAD_DIM))
  v = rng.normal(size=(1, t, KV_HEADS, HEAD_DIM))
  phi_q = np.exp(0.3 * rng.normal(size=(1, t, HEADS, FEATURES))) / FEATURES
  phi_k = np.exp(0.3 * rng.normal(size=(1, t, KV_HEADS, FEATURES))) / FEATURES
  gate = np.full((HEADS,), 0.5)
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, phi_q, phi_k, gate))


def _median_time(fn, repeats):
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def prefill_flops(t, lam, c=CHUNK, hq=HEADS, hkv=KV_HEADS, dk=HEAD_DIM, dv=HEAD_DIM, d=FEATURES):
  """One FLOP model for every version (the work LoLA needs, as chunked matmuls): per chunk, the
  logits and weighted values of C queries over [cache; window; chunk] (L + 2C keys, masked ones
  included), the linear read-out phi_q [H, s], and when L > 0 the self-recall errors of the L + C
  candidates and the absorption of the C pairs that leave (a version that contracts all L + C
  candidates does more work than counted here)."""
  chunks = -(-t // c)
  attn = hq * c * (lam + 2 * c) * (dk + dv) * 2
  linear = hq * c * d * (dv + 1) * 2
  update = hkv * (lam + c) * d * (dv + 1) * 2 + hkv * c * d * (dv + 1) * 2 if lam else 0
  return chunks * (attn + linear + update)


def matmul_floor(t, lam, c=CHUNK, h=HEADS, dk=HEAD_DIM, dv=HEAD_DIM, d=FEATURES):
  """A program that does exactly the matmuls `prefill_flops` counts, at LoLA's shapes, and
  nothing else: a `lax.scan` over the T / C chunks whose step multiplies per head q [C, dk] by
  the keys [L + 2C, dk], the logits by the values [L + 2C, dv], phi_q [C, D] by the state
  [D, dv + 1], and when L > 0 the L + C candidates' phi_k [L + C, D] by the same state (the
  self-recall scoring) and adds phi_k^T v of C evicted pairs ([D, C] x [C, dv + 1]) to it.
  No softmax, masks, selection or gathers: the time XLA needs for the arithmetic alone on
  matmuls this small, the floor of any XLA form of this FLOP model on this machine.

  Returns (run, args): the jitted program and its inputs; time `run(*args)`."""
  n = -(-t // c)
  rng = np.random.default_rng(0)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=(n, h) + shape), jnp.float32)

  keys = lam + 2 * c
  xs = (arr(c, dk), arr(keys, dk), arr(keys, dv), arr(c, d), arr(lam + c, d), arr(c, d),
        arr(c, dv + 1))  # fmt: skip

  def step(state, x):
    q, k, v, phi_q, phi_cand, phi_out, v_out = x
    logits = jnp.einsum("hrd,hkd->hrk", q, k)
    out = jnp.einsum("hrk,hkd->hrd", logits, v)
    read = jnp.einsum("hrf,hfe->hre", phi_q, state)
    if lam:
      scores = jnp.sum(jnp.einsum("hnf,hfe->hne", phi_cand, state))
      state = state + jnp.einsum("hcf,hce->hfe", phi_out, v_out)
    else:
      scores = jnp.zeros(())
    return state, (out, read, scores)

  run = jax.jit(lambda s0, xs: jax.lax.scan(step, s0, xs))
  s0 = jnp.asarray(0.01 * rng.normal(size=(h, d, dv + 1)), jnp.float32)
  return run, (s0, xs)


def matmul_gflops(n=2048, repeats=5):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / _median_time(lambda: f(a), repeats) / 1e9


def profile_parts(t, lam, repeats):
  """Milliseconds of each part of the prefill's per-chunk work, each timed as its own `lax.scan`
  over the T / C chunks (a carry threads through so nothing is hoisted out of the loop): the
  forms of the previous version (one softmax over the concatenated [cache; window; chunk], the
  absorption of all L + C candidates under a 0/1 mask, an argsort compaction) next to this
  version's (the window + chunk terms apart from the cache's, the evicted C pairs gathered and
  absorbed, a cumulative-sum compaction)."""
  c, h, dk, d = CHUNK, KV_HEADS, HEAD_DIM, FEATURES
  n = t // c
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
  q, phq = arr(n, 1, h, 1, c, dk), jnp.abs(arr(n, 1, h, 1, c, d)) / d
  kc, vc, phk = arr(n, 1, h, c, dk), arr(n, 1, h, c, dk), jnp.abs(arr(n, 1, h, c, d)) / d
  gates = tuple(x.reshape(h, 1) for x in gate_terms(jnp.full((h,), 0.5)))
  ck, cv, cphi = arr(1, h, lam, dk), arr(1, h, lam, dk), jnp.abs(arr(1, h, lam, d)) / d
  s0 = jnp.abs(arr(1, h, d))
  pos = jnp.broadcast_to(jnp.arange(lam + c, dtype=jnp.int32), (1, h, lam + c))

  def scan_time(body):
    f = jax.jit(
      lambda h0: jax.lax.scan(lambda hh, x: (body(hh, *x), None), h0, (q, phq, kc, vc, phk))[0]
    )
    return _median_time(lambda: f(jnp.abs(arr(1, h, d, dk))), repeats) * 1e3

  def concat_attention(hh, qq, pq, k, v, pk):
    keys, vals = jnp.concatenate([ck, k, k], -2), jnp.concatenate([cv, v, v], -2)
    mask = chunk_mask(jnp.ones((1, h, lam + 2 * c), bool), lam, c)
    y, _, _ = attend(qq, pq, keys, vals, mask, hh, s0, gates, scale=0.125, mix="gated")
    return hh + 1e-9 * y[:, :, 0, :1]

  def scores(hh, k, v, pk):
    cphi_all, cv_all = jnp.concatenate([cphi, pk], -2), jnp.concatenate([cv, v], -2)
    return self_recall_error(cphi_all, cv_all, hh, s0[..., None, :], 1e-6)[..., 0]

  def keep_mask(hh, k):
    return (jnp.concatenate([ck[..., 0], k[..., 0]], -1) + hh[..., :1, 0]) > 0

  def masked_absorb(hh, qq, pq, k, v, pk):
    cand = selection.Candidates(
      k=None, v=jnp.concatenate([cv, v], -2), phi_k=jnp.concatenate([cphi, pk], -2), positions=pos
    )
    return selection.absorb(hh, s0, cand, keep_mask(hh, k))[0]

  def evicted_absorb(hh, qq, pq, k, v, pk):
    cand = selection.Candidates(
      k=None, v=jnp.concatenate([cv, v], -2), phi_k=jnp.concatenate([cphi, pk], -2), positions=pos
    )
    return selection.absorb_evicted(hh, s0, cand, keep_mask(hh, k), c)[0]

  def argsort_compaction(hh, qq, pq, k, v, pk):
    keep = keep_mask(hh, k)
    order = jnp.argsort(jnp.where(keep, pos, 2**31 - 1), axis=-1)[..., :lam]
    rows = jnp.take_along_axis(jnp.concatenate([cphi, pk], -2), order[..., None], -2)
    return hh + 1e-9 * rows.sum(-2)[..., None, :1]

  def cumsum_compaction(hh, qq, pq, k, v, pk):
    order, ok = selection.compaction_indices(keep_mask(hh, k), lam)
    rows = jnp.take_along_axis(jnp.concatenate([cphi, pk], -2), order[..., None], -2)
    return hh + 1e-9 * jnp.where(ok[..., None], rows, 0).sum(-2)[..., None, :1]

  def top_k(hh, qq, pq, k, v, pk):
    sc = scores(hh, k, v, pk)
    cand = selection.Candidates(k=None, v=None, phi_k=None, positions=pos)
    keep = selection.select_sre(LoLAConfig(chunk_size=c, cache_size=lam), cand, hh, s0, sc)
    return hh + 1e-9 * keep.sum(-1)[..., None, None]

  def scoring(hh, qq, pq, k, v, pk):
    return hh + 1e-9 * scores(hh, k, v, pk).sum(-1)[..., None, None]

  parts = {"attention + linear read-out, concatenated keys (previous)": concat_attention}
  if lam:
    parts.update(
      {
        "self-recall scoring of L + C candidates": scoring,
        "scoring + top-L selection": top_k,
        "absorption, all L + C under a 0/1 mask (previous)": masked_absorb,
        "absorption, the C evicted pairs gathered (now)": evicted_absorb,
        "compaction by argsort + gathers (previous)": argsort_compaction,
        "compaction by cumulative-sum scatter + gathers (now)": cumsum_compaction,
      }
    )
  out = {name: scan_time(fn) for name, fn in parts.items()}
  inputs = _inputs(t)
  config = LoLAConfig(chunk_size=c, cache_size=lam)
  out["whole lola_prefill (now)"] = (
    _median_time(functools.partial(lola_prefill, *inputs, config=config), repeats) * 1e3
  )
  return out


def _decode_setup(pos, lam, steps):
  """A state after a `pos`-token prefill, the next `steps` tokens' inputs (as single tokens and
  stacked on a leading time axis) and one jitted `lax.scan` of `lola_decode` over such a stack
  (a user's loop, compiled with `decode_compiler_options`)."""
  config = LoLAConfig(chunk_size=CHUNK, cache_size=lam)
  *seq, gate = _inputs(pos + steps, seed=1)
  _, state0 = lola_prefill(*(x[:, :pos] for x in seq), gate, config=config)
  tokens = [tuple(x[:, pos + i] for x in seq) for i in range(steps)]
  xs = tuple(jnp.moveaxis(x[:, pos : pos + steps], 1, 0) for x in seq)

  @functools.partial(jax.jit, compiler_options=decode_compiler_options())
  def loop(st, xs):
    def body(s, x):
      y, s = lola_decode(*x, gate, config=config, state=s)
      return s, y

    return jax.lax.scan(body, st, xs)

  decode = functools.partial(lola_decode, config=config)
  return state0, tokens, xs, gate, decode, loop


def profile_decode(pos, lam, repeats):
  """Milliseconds of one decode token, split into its parts (from a state after a `pos`-token
  prefill, `pos` a multiple of C, so the chunk buffer starts empty):

    in-chunk step   a jitted scan of C - 1 tokens (no chunk completes), per token: the logits
                    over [cache; window; chunk so far], the linear read-out, the mix, the token
                    written into the chunk buffer;
    chunk-end update  a scan of C tokens minus the scan of C - 1 and one in-chunk step: the
                    sparse-cache update the C-th token triggers (self-recall scoring, top-L,
                    absorption, compaction, window roll); per token it is this / C;
    call overhead   one `lola_decode` call from Python (input checks, dispatch, the transfer
                    of the outputs) minus an in-chunk step; the jitted generation loop has none;
    stream state    one jitted pass over arrays of the state's size (inside a loop), the floor.
  """
  state0, tokens, xs, gate, decode, loop = _decode_setup(pos, lam, CHUNK)

  def loop_seconds(n):
    sub = tuple(x[:n] for x in xs)
    return _median_time(lambda: loop(state0, sub), repeats)

  before_end = loop_seconds(CHUNK - 1)
  in_chunk = before_end / (CHUNK - 1)
  # The C-th token: its step plus the update (a difference of two medians: noisy, floored at 0).
  chunk_end = max(loop_seconds(CHUNK) - before_end - in_chunk, 0.0)
  single = _median_time(lambda: decode(*tokens[0], gate, state=state0), max(repeats, 20))
  _, stream = _stream_seconds(state0, repeats)
  return {
    "in-chunk step (attention over cache + window + chunk, read-out, write)": in_chunk * 1e3,
    "chunk-end update, once per C tokens": chunk_end * 1e3,
    "chunk-end update per token (/ C)": chunk_end / CHUNK * 1e3,
    "generation-loop token (in-chunk + update / C)": (in_chunk + chunk_end / CHUNK) * 1e3,
    "call overhead of one lola_decode from Python (validation, dispatch)": max(
      single - in_chunk, 0.0
    )
    * 1e3,
    "stream the state once (yardstick)": stream * 1e3,
  }


def bench_prefill(t, caches, repeats, floor=False):
  """Prefill rows; `floor`: also the matmul floor's seconds (`matmul_floor`)."""
  inputs = _inputs(t)
  rows = []
  for lam in caches:
    config = LoLAConfig(chunk_size=CHUNK, cache_size=lam)
    sec = _median_time(functools.partial(lola_prefill, *inputs, config=config), repeats)
    flops = prefill_flops(t, lam)
    rows.append(
      dict(T=t, cache=lam, seconds=sec, tokens_per_s=t / sec, gflop_per_s=flops / sec / 1e9)
    )
    if floor:
      run, args = matmul_floor(t, lam)
      rows[-1]["floor_seconds"] = _median_time(functools.partial(run, *args), repeats)
  return rows


def _stream_seconds(state, repeats):
  """One jitted reduction over arrays of the state's size: a single call, and per pass inside a
  jitted loop of 64 passes (each pass reads every leaf once)."""
  leaves = [x for x in jax.tree_util.tree_leaves(state) if x.size and x.dtype == jnp.float32]
  single = jax.jit(lambda xs: sum(jnp.sum(x) for x in xs))

  @jax.jit
  def loop(xs):
    def body(i, acc):
      w = 1.0 + i.astype(jnp.float32) * 1e-7  # depends on i: not hoisted out of the loop
      return acc + sum(jnp.sum(x * w) for x in xs)

    return jax.lax.fori_loop(0, 64, body, jnp.float32(0))

  return _median_time(lambda: single(leaves), repeats), _median_time(
    lambda: loop(leaves), repeats
  ) / 64


def _library_loop_seconds(state0, xs, gate, lam, repeats):
  """Seconds per token of `lola_decode_steps` (the library's decode loop: in-chunk steps in a
  loop, the chunk-end update between them) over the tokens `xs` ([steps, B, ...]), or None for
  a baseline that predates it."""
  steps_fn = getattr(core_scan, "lola_decode_steps", None)
  if steps_fn is None:
    return None
  seq = tuple(jnp.moveaxis(x, 0, 1) for x in xs)
  config = LoLAConfig(chunk_size=CHUNK, cache_size=lam)
  run = functools.partial(steps_fn, *seq, gate, config=config)
  return _median_time(lambda: run(state=state0), repeats) / xs[0].shape[0]


def _generation_loop_seconds(state0, lam, steps, repeats):
  """Seconds per token of `lola_jax.generate.decode_block` (sampling and the model's decode in
  one jitted loop) for a 1-layer `LoLALM` whose attention has this benchmark's shapes (8 query /
  8 kv heads of 64, Hedgehog D = 128) on a narrow residual stream (E = 64, MLP 64, vocabulary
  256: about 0.3 MFLOP and 0.5 MiB of weights per token outside attention), continuing from the
  core state `state0`. Each timed block decodes `steps` tokens from the previous block's states
  (they are donated)."""
  config = model_lib.ModelConfig(
    vocab_size=256,
    num_layers=1,
    d_model=64,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    mlp_dim=64,
    attention="lola",
    feature_dim=FEATURES // 2,
    lola=LoLAConfig(chunk_size=CHUNK, cache_size=lam),
  )
  params = model_lib.init_params(config, jax.random.key(0))
  args = (
    jnp.zeros((1, config.vocab_size), jnp.float32),  # logits
    jnp.zeros((1,), bool),  # done
    jnp.zeros((1,), jnp.int32),  # count
    jax.random.split(jax.random.key(1), 1),
    jnp.int32(steps),  # limit
    jnp.full((1,), -1, jnp.int32),  # stop tokens: none
    jnp.int32(0),  # pad id
  )
  block = functools.partial(gen.decode_block, config, sampling=gen.Sampling(), block_size=steps)
  states = (jax.tree.map(jnp.copy, state0),)
  states = jax.block_until_ready(block(params, states, *args)[1])  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    states = jax.block_until_ready(block(params, states, *args)[1])
    times.append(time.perf_counter() - start)
  return statistics.median(times) / steps


def bench_decode(pos, lam, steps, repeats):
  state0, tokens, xs, gate, decode, loop = _decode_setup(pos, lam, steps)
  state = state0
  jax.block_until_ready(decode(*tokens[0], gate, state=state))
  lat = []
  for i in range(steps):
    start = time.perf_counter()
    _, state = jax.block_until_ready(decode(*tokens[i], gate, state=state))
    lat.append(time.perf_counter() - start)
  in_loop = _median_time(lambda: loop(state0, xs), repeats) / steps
  library = _library_loop_seconds(state0, xs, gate, lam, repeats)
  generation = _generation_loop_seconds(state0, lam, steps, repeats)
  stream_single, stream_loop = _stream_seconds(state0, repeats)
  return dict(
    position=pos,
    cache=lam,
    single_median_ms=statistics.median(lat) * 1e3,
    single_mean_ms=statistics.mean(lat) * 1e3,
    loop_ms=in_loop * 1e3,
    steps_loop_ms=None if library is None else library * 1e3,
    generation_ms=generation * 1e3,
    stream_single_ms=stream_single * 1e3,
    stream_loop_ms=stream_loop * 1e3,
    state_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state0)),
  )


def run_job(job):
  """The measurements of one job dict (also what the baseline child runs)."""
  out = {}
  if "prefill" in job:
    out["prefill"] = bench_prefill(
      job["prefill"], job["caches"], job["repeats"], job.get("floor", False)
    )
  if "decode" in job:
    pos, lam = job["decode"]
    out["decode"] = [bench_decode(pos, lam, job["steps"], job["repeats"])]
  return out


def _worktree(rev):
  path = f"/tmp/lola_baseline_{rev}"
  if not os.path.isdir(path):
    subprocess.run(["git", "worktree", "add", "--detach", path, rev], check=True)
  return path


def _baseline(path, job):
  env = dict(os.environ, PYTHONPATH=path)
  # This file, with lola_jax imported from the worktree (PYTHONPATH precedes the editable
  # install of the main checkout).
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
  res = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True, check=False)
  if res.returncode:
    print(res.stderr[-2000:], flush=True)
    return {}
  out = json.loads(res.stdout.strip().splitlines()[-1])
  if not out.pop("lola_jax").startswith(path):
    raise RuntimeError(f"the baseline child did not import lola_jax from {path}")
  return out


def _ms(x):
  return "-" if x is None else f"{x:.3f}"


def _best_loop_ms(r):
  return min(x for x in (r["loop_ms"], r.get("steps_loop_ms")) if x is not None)


def _table(headers, rows):
  out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
  return "\n".join(out)


def _floor_cells(r, mm):
  if "floor_seconds" not in r:
    return "-"
  f = r["floor_seconds"]
  pct = 100 * prefill_flops(r["T"], r["cache"]) / f / 1e9 / mm
  return f"{f * 1e3:.1f} / {pct:.0f}% / {r['seconds'] / f:.2f}x"


def report(res):
  mm = res["matmul_gflop_per_s"]
  base = {(r["T"], r["cache"]): r for r in res.get("baseline_prefill", [])}
  lines = [
    f"Machine: {res['machine']}; jax {res['jax']}; one 2048^2 f32 matmul: {mm:.1f} GFLOP/s "
    f"(median of the run's start and end); baseline: {res['baseline'] or 'none'}.",
    "",
    "Prefill (batch 1, 8 heads, head dim 64, D 128, chunk 64, float32):",
    "",
  ]
  rows = []
  for r in res["prefill"]:
    b = base.get((r["T"], r["cache"]))
    rows.append(
      [
        r["T"],
        r["cache"],
        f"{r['seconds'] * 1e3:.1f}",
        f"{r['tokens_per_s']:.0f}",
        f"{r['gflop_per_s']:.1f}",
        f"{100 * r['gflop_per_s'] / mm:.0f}%",
        _floor_cells(r, mm),
        f"{b['tokens_per_s']:.0f}" if b else "-",
        f"{100 * b['gflop_per_s'] / mm:.0f}%" if b else "-",
        f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-",
      ]
    )
  lines.append(
    _table(
      [
        "T",
        "cache",
        "ms",
        "tokens/s",
        "GFLOP/s",
        "% matmul",
        "matmul floor: ms / % matmul / ours over floor",
        "base tokens/s",
        "base % matmul",
        "speed-up",
      ],
      rows,
    )  # fmt: skip
  )
  dbase = {(r["position"], r["cache"]): r for r in res.get("baseline_decode", [])}
  lines += [
    "",
    "Decode, ms per token (single call: median / mean of consecutive `lola_decode` calls, chunk "
    "ends in the mean; scan: one jitted `lax.scan` of `lola_decode` over the tokens (a user's "
    "loop, `decode_compiler_options`); library loop: `lola_decode_steps` over the same tokens; "
    "generation: `lola_jax.generate.decode_block` of a 1-layer model with this attention, "
    "sampling included; stream: one jitted reduction over the state's arrays, per pass inside a "
    "loop):",
    "",
  ]
  rows = []
  for r in res["decode"]:
    b = dbase.get((r["position"], r["cache"]))
    rows.append(
      [
        r["position"],
        r["cache"],
        f"{r['single_median_ms']:.3f} / {r['single_mean_ms']:.3f}",
        f"{r['loop_ms']:.3f}",
        _ms(r.get("steps_loop_ms")),
        _ms(r.get("generation_ms")),
        f"{r['stream_loop_ms']:.3f}",
        f"{_best_loop_ms(r) / r['stream_loop_ms']:.1f}x",
        f"{b['single_median_ms']:.3f} / {b['single_mean_ms']:.3f}" if b else "-",
        f"{b['loop_ms']:.3f}" if b else "-",
        _ms(b.get("steps_loop_ms")) if b else "-",
        _ms(b.get("generation_ms")) if b else "-",
        f"{r['state_bytes'] / 2**20:.1f} MiB",
      ]
    )
  lines.append(
    _table(
      [
        "position",
        "cache",
        "single call",
        "scan",
        "library loop",
        "generation",
        "stream state",
        "best loop / stream",
        "base single call",
        "base scan",
        "base library loop",
        "base generation",
        "state",
      ],
      rows,
    )  # fmt: skip
  )
  return "\n".join(lines)


def main(argv):
  del argv
  if _CHILD.value:
    out = run_job(json.loads(_CHILD.value))
    out["lola_jax"] = os.path.dirname(os.path.dirname(lola_prefill.__code__.co_filename))
    print(json.dumps(out))
    return
  if _PROFILE.value:
    t = 1024 if _QUICK.value else 8192
    prof = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores", jax=jax.__version__)
    prof["prefill"], prof["decode"] = {}, {}
    for lam in [0, 64] if _QUICK.value else [0, 64, 256]:
      print(f"T={t} cache={lam}, ms per prefill (scans over the chunks):", flush=True)
      parts = prof["prefill"][f"T={t} cache={lam}"] = profile_parts(t, lam, _REPEATS.value)
      for name, ms in parts.items():
        print(f"  {ms:9.2f}  {name}", flush=True)
    for lam in [64] if _QUICK.value else [64, 256]:
      print(f"decode at position {t}, cache={lam}, ms:", flush=True)
      parts = prof["decode"][f"position={t} cache={lam}"] = profile_decode(t, lam, _REPEATS.value)
      for name, ms in parts.items():
        print(f"  {ms:9.3f}  {name}", flush=True)
    if _OUT.value:
      path = os.path.splitext(_OUT.value)[0] + "_profile.json"
      with open(path, "w") as f:
        json.dump(prof, f, indent=1)
      print(f"wrote {path}")
    return
  if _QUICK.value:
    seq_lens, caches, positions, dcaches, steps, repeats = [1024], [0, 64], [1024], [64], 16, 1
  else:
    seq_lens = [int(x) for x in _SEQ_LENS.value]
    caches = [int(x) for x in _CACHES.value]
    positions = [int(x) for x in _POSITIONS.value]
    dcaches = [int(x) for x in _DECODE_CACHES.value]
    steps, repeats = _DECODE_STEPS.value, _REPEATS.value
  base_path = _worktree(_BASELINE.value) if _BASELINE.value else None
  print(f"bench_lola: devices={jax.devices()}, baseline={_BASELINE.value or 'none'}", flush=True)
  mm0 = matmul_gflops()
  res = dict(
    machine=f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
    jax=jax.__version__,
    baseline=_BASELINE.value,
    prefill=[],
    decode=[],
    baseline_prefill=[],
    baseline_decode=[],
  )
  for t in seq_lens:
    job = dict(prefill=t, caches=caches, repeats=repeats)
    res["prefill"] += run_job(dict(job, floor=True))["prefill"]
    for r in res["prefill"][-len(caches) :]:
      print(f"  prefill T={t} L={r['cache']}: {r['tokens_per_s']:.0f} tok/s", flush=True)
    if base_path:
      res["baseline_prefill"] += _baseline(base_path, job).get("prefill", [])
  for pos in positions:
    for lam in dcaches:
      job = dict(decode=(pos, lam), steps=steps, repeats=repeats)
      res["decode"] += run_job(job)["decode"]
      r = res["decode"][-1]
      print(
        f"  decode pos={pos} L={lam}: single {r['single_median_ms']:.3f} ms, scan "
        f"{r['loop_ms']:.3f} ms, library loop {_ms(r['steps_loop_ms'])} ms, generation "
        f"{_ms(r['generation_ms'])} ms, stream "
        f"{r['stream_loop_ms']:.3f} ms",
        flush=True,
      )
      if base_path:
        res["baseline_decode"] += _baseline(base_path, job).get("decode", [])
  res["matmul_gflop_per_s"] = statistics.median([mm0, matmul_gflops()])
  print()
  print(report(res))
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(res, f, indent=1)
    print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
