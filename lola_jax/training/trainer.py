"""The training loop: `train_and_evaluate(config, workdir)` (called by experiments/train.py).

Config layout (ml_collections; see experiments/configs/default.py for every field):
  seed            data order and parameter init;
  model.*         ModelConfig fields (attention, feature_map, sizes, dtype, ...);
  lola.*          LoLAConfig fields (chunk_size, cache_size, mix, policy);
  task.name, task.seq_len, task.options   -> lola_jax.data.get_task;
  train.*         steps, batch_size, grad_accum_steps, mode ("lm" | "distill"), log/eval/save
                  cadence, keep_checkpoints, stop_at_step (save and stop there, as if
                  preempted: time-sliced jobs and resume tests);
  optim.*         lr, warmup_steps, end_lr_factor, weight_decay, b1, b2, eps, clip_norm;
  distill.*       teacher_workdir (or teacher_params, a .npz), finetune_steps, finetune_lr,
                  finetune_warmup_steps,
                  finetune_params ("all" | "feature_maps");
  mesh.*          data, fsdp, tensor (-1 = remaining devices).

Steps [0, train.steps) run the main stage; in distill mode they train only feature maps and
gates (attention transfer from the teacher's softmax attention), and steps
[train.steps, train.steps + distill.finetune_steps) then finetune on the task loss: everything,
or only the feature maps and gates (`distill.finetune_params`).
The step counter is the only position: batch `s` is `task.batch(s, batch_size)`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lola_jax import data
from lola_jax import model as model_lib
from lola_jax import sharding as sharding_lib
from lola_jax.core.config import LoLAConfig
from lola_jax.training import checkpoint as ckpt_lib
from lola_jax.training import metrics as metrics_lib
from lola_jax.training import optim as optim_lib
from lola_jax.training import pretrained_source, workdir_lock
from lola_jax.training import steps as steps_lib
from lola_jax.training.trainable import trainable_mask

MODES = ("lm", "distill")


def model_config_from(config) -> model_lib.ModelConfig:
  """ModelConfig from the `model` and `lola` config sections (ValueError names the field)."""
  lola_fields = {f.name for f in dataclasses.fields(LoLAConfig)}
  lola_kwargs = {k: v for k, v in config.lola.items() if k in lola_fields}
  unknown = set(config.lola.keys()) - lola_fields
  if unknown:
    raise ValueError(f"unknown config.lola field(s): {sorted(unknown)}")
  try:
    lola = LoLAConfig(**lola_kwargs)
  except ValueError as e:
    raise ValueError(f"config.lola: {e}") from e
  model_fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)} - {"lola"}
  unknown = set(config.model.keys()) - model_fields
  if unknown:
    raise ValueError(f"unknown config.model field(s): {sorted(unknown)}")
  kwargs = dict(config.model.items())
  if "vocab_size" not in kwargs or kwargs["vocab_size"] in (None, 0, -1):
    kwargs.pop("vocab_size", None)
  try:
    return model_lib.ModelConfig(lola=lola, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.model: {e}".replace("ModelConfig.", "model.")) from e


def mesh_config_from(config) -> sharding_lib.MeshConfig:
  return sharding_lib.MeshConfig(**dict(config.mesh.items()))


def get_task(config, *, seed_offset: int = 0, **extra):
  """The training (or, with a seed offset, evaluation) task named by config.task."""
  options = dict(config.task.get("options", {}) or {})
  options.update(extra)
  return data.get_task(
    config.task.name, seq_len=config.task.seq_len, seed=config.seed + seed_offset, **options
  )


@dataclasses.dataclass
class Setup:
  """Everything built from a config before any compilation."""

  model_config: model_lib.ModelConfig
  mesh: Any
  task: Any
  eval_task: Any
  total_steps: int
  schedule: Any
  tx: Any
  param_sh: Any
  opt_sh: Any
  abstract_params: Any


def setup(config, task=None, eval_task=None) -> Setup:
  """Validate the config and build mesh, task, optimizer and shardings (no compilation)."""
  mode = config.train.get("mode", "lm")
  if mode not in MODES:
    raise ValueError(f"train.mode must be one of {MODES}, got {mode!r}")
  for field in ("steps", "batch_size", "grad_accum_steps"):
    val = config.train[field]
    if not isinstance(val, int) or val < (0 if field == "steps" else 1):
      raise ValueError(f"train.{field} must be a positive int, got {val!r}")
  keep = config.train.keep_checkpoints
  if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
    raise ValueError(
      f"train.keep_checkpoints must be an int >= 1 (the newest N checkpoints are kept), got "
      f"{keep!r}"
    )
  every = config.train.checkpoint_every
  if not isinstance(every, int) or isinstance(every, bool) or every < 0:
    raise ValueError(
      f"train.checkpoint_every must be an int >= 0 (0: only at the end and on preemption), got "
      f"{every!r}"
    )
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ValueError(
      f"train.batch_size ({config.train.batch_size}) must be divisible by "
      f"train.grad_accum_steps ({config.train.grad_accum_steps})"
    )
  mesh = sharding_lib.make_mesh(mesh_config_from(config))
  sharding_lib.check_batch(
    config.train.batch_size // config.train.grad_accum_steps,
    mesh,
    "train.batch_size / train.grad_accum_steps",
  )
  sharding_lib.check_batch(
    config.train.get("eval_batch_size", config.train.batch_size), mesh, "train.eval_batch_size"
  )
  gguf_path = pretrained_source.gguf_path(config)
  if gguf_path is not None and config.task.name == "text" and (task is None or eval_task is None):
    text_train, text_eval = pretrained_source.text_tasks(config, gguf_path)
    task = task if task is not None else text_train
    eval_task = eval_task if eval_task is not None else text_eval
  task = task if task is not None else get_task(config)
  if eval_task is None:
    eval_task = get_task(config, seed_offset=10_007)
  if gguf_path is not None:
    model_config = pretrained_source.model_config(config, gguf_path)
  else:
    if "vocab_size" not in config.model or config.model.vocab_size in (None, 0, -1):
      config.model.vocab_size = task.vocab_size
    model_config = model_config_from(config)
  if model_config.vocab_size < task.vocab_size:
    raise ValueError(
      f"model.vocab_size ({model_config.vocab_size}) is smaller than the task's vocabulary "
      f"({task.vocab_size})"
    )
  if mode == "distill":
    if not model_config.kind.uses_feature_maps:
      raise ValueError(
        f"model.attention must be hybrid, lola or linear in distill mode, got "
        f"{model_config.attention!r}"
      )
    if gguf_path is None and not (
      config.distill.get("teacher_workdir") or config.distill.get("teacher_params")
    ):
      raise ValueError(
        "distill.teacher_workdir must name a softmax run's workdir (or distill.teacher_params "
        "an exported .npz of its parameters)"
      )
  finetune = int(config.distill.get("finetune_steps", 0)) if mode == "distill" else 0
  total_steps = config.train.steps + finetune
  stages = ()
  if finetune:
    stages = ((finetune, config.distill.finetune_lr, config.distill.finetune_warmup_steps),)
  schedule = optim_lib.make_schedule(config.optim, config.train.steps, stages)
  shapes = jax.eval_shape(lambda: model_lib.init_params(model_config, jax.random.key(0)))
  tx = optim_lib.make_optimizer(
    config.optim, schedule, trainable=_trainable_in_any_stage(config, model_config, shapes)
  )
  param_sh = sharding_lib.param_shardings(model_lib.logical_axes(model_config), shapes, mesh)
  abstract_params = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_sh
  )
  opt_sh = sharding_lib.opt_state_shardings(tx, abstract_params, param_sh, mesh)
  return Setup(
    model_config,
    mesh,
    task,
    eval_task,
    total_steps,
    schedule,
    tx,
    param_sh,
    opt_sh,
    abstract_params,
  )


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True
    print("SIGTERM received: saving a checkpoint and exiting", flush=True)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _all_agree(flag: bool) -> bool:
  """True on every process if it is True on any (so all save at the same step and stop)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


# Settings that may change between a run and its resume: they change neither the saved arrays
# nor what they compute (backend, KV-cache length of the softmax decode state) or only the
# compute precision.
RESUMABLE_FIELDS = ("lola.implementation", "model.dtype", "model.max_seq_len")


def state_config(config, mc: model_lib.ModelConfig) -> dict[str, Any]:
  """The settings that define the training state, flat ({'model.d_model': 32, 'lola.*', ...}).

  Saved with every checkpoint; resuming with other values (except RESUMABLE_FIELDS) is refused
  with the differing fields named (`checkpoint.ConfigMismatchError`).
  """
  fields = dataclasses.asdict(mc)
  lola = fields.pop("lola")
  flat = {f"model.{k}": v for k, v in fields.items()}
  flat.update({f"lola.{k}": v for k, v in lola.items()})
  flat["train.mode"] = config.train.get("mode", "lm")
  return {k: v for k, v in flat.items() if k not in RESUMABLE_FIELDS}


def _abstract_train_state(s: Setup):
  opt = jax.eval_shape(s.tx.init, s.abstract_params)
  opt = jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt, s.opt_sh
  )
  rep = sharding_lib.replicated(s.mesh)
  return {
    "params": s.abstract_params,
    "opt_state": opt,
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
  }


def _trainable_in_any_stage(config, model_config, params) -> Any:
  """Which leaves some stage of the run trains (the optimizer keeps moments for those only)."""
  if config.train.get("mode", "lm") != "distill":
    return None
  which = ["feature_maps"]
  if int(config.distill.get("finetune_steps", 0)):
    which.append(config.distill.get("finetune_params", "all"))
  masks = [trainable_mask(model_config, params, w) for w in which]
  return jax.tree.map(lambda *m: any(m), *masks)


def initial_state(config, s: Setup):
  """Fresh parameters (or the teacher's, in distill mode), optimizer state and RNG."""
  gguf_path = pretrained_source.gguf_path(config)
  if gguf_path is not None:
    maps = pretrained_source.feature_maps_path(config)
    params = pretrained_source.initial_params(s.model_config, gguf_path, config.seed, maps)
    params = jax.device_put(params, s.param_sh)
    print(f"Starting from the pretrained weights of {gguf_path}")
    if maps is not None:
      print(f"  with the feature maps and gates of {maps}")
  elif config.train.get("mode", "lm") == "distill" and config.distill.get("teacher_params"):
    path = config.distill.teacher_params
    params = jax.device_put(ckpt_lib.load_params_npz(path, s.abstract_params), s.param_sh)
    print(f"Distilling from teacher parameters {path}")
  elif config.train.get("mode", "lm") == "distill":
    params, meta = ckpt_lib.restore_params(
      os.path.join(config.distill.teacher_workdir, "checkpoints"), s.abstract_params
    )
    print(f"Distilling from teacher step {meta.get('step')} in {config.distill.teacher_workdir}")
  else:
    key = jax.random.key(config.seed)
    params = jax.jit(lambda k: model_lib.init_params(s.model_config, k), out_shardings=s.param_sh)(
      key
    )
  opt_state = jax.jit(s.tx.init, out_shardings=s.opt_sh)(params)
  rng = jax.device_put(
    jax.random.key_data(jax.random.key(config.seed + 1)), sharding_lib.replicated(s.mesh)
  )
  return {"params": params, "opt_state": opt_state, "rng": rng}


def model_flops_per_token(mc: model_lib.ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (6 N for matmuls + attention), PaLM-style MFU accounting."""
  e, hq, hkv, d, m, v = (
    mc.d_model,
    mc.num_heads,
    mc.num_kv_heads,
    mc.head_dim,
    mc.mlp_dim,
    mc.vocab_size,
  )
  per_layer = e * (hq + 2 * hkv) * d + hq * d * e + 3 * e * m
  n = mc.num_layers * per_layer + e * v
  if mc.kind.full_kv_cache:
    attn = 2 * 2 * hq * d * seq_len / 2  # causal QK^T and AV, half the square
  elif not mc.kind.windowed:
    attn = 2 * 2 * hq * d * mc.phi_dim
  else:
    window = 1.5 * mc.lola.chunk_size + mc.lola_config.cache_size
    attn = 2 * 2 * hq * d * min(window, seq_len / 2) + 2 * 2 * hq * d * mc.phi_dim
  return 6 * n + 3 * mc.num_layers * attn


def train_and_evaluate(config, workdir: str, *, task=None, eval_task=None) -> dict:
  """Train (or resume) per `config` in `workdir`; returns the last metrics.

  Result keys: step, loss, eval_loss (if evaluated), preempted (bool), tokens_per_s, params
  (the final parameter pytree).

  Raises:
    workdir_lock.WorkdirLockedError: another live run holds `workdir` (nothing is touched).
    checkpoint.ConfigMismatchError: the checkpoints were written with other settings (named;
      they are left in place).
    ValueError: the checkpoint is past train.steps (+ distill.finetune_steps).
    FloatingPointError: the loss or the state became NaN/Inf (names the step; nothing
      non-finite is saved and the finite checkpoints are kept).
  """
  s = setup(config, task, eval_task)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.WorkdirLock(workdir):
    ckpt = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      every=config.train.checkpoint_every,
      keep=config.train.keep_checkpoints,
      async_save=config.train.get("async_checkpoint", True),
    )
    try:
      return _train(config, workdir, s, ckpt)
    finally:
      ckpt.close()  # also on errors: in-flight (finite) saves are completed, never left half-way


def _diverged(step: int, what: str, config, ckpt: ckpt_lib.Checkpointer) -> FloatingPointError:
  ckpt.wait()
  kept = ckpt.steps()
  last = f"the last checkpoint, step {kept[-1]}, is kept" if kept else "no checkpoint was saved"
  return FloatingPointError(
    f"training diverged at step {step}: {what}. Nothing non-finite was saved; {last} in "
    f"{ckpt.directory}. Try a lower optim.lr (now {config.optim.lr}), a tighter "
    f"optim.clip_norm (now {config.optim.clip_norm}) or longer optim.warmup_steps (now "
    f"{config.optim.warmup_steps}), and rerun: it resumes from that checkpoint."
  )


def _train(config, workdir: str, s: Setup, ckpt: ckpt_lib.Checkpointer) -> dict:
  """The body of `train_and_evaluate`, run while holding the workdir lock."""
  mode = config.train.get("mode", "lm")
  mc, mesh = s.model_config, s.mesh
  is_main = jax.process_index() == 0
  run_config = state_config(config, mc)
  restored = ckpt.restore_latest(_abstract_train_state(s), run_config)
  if restored is None:
    state = initial_state(config, s)
    start = 0
  else:
    state, meta = restored
    start = int(meta["data_position"])
    print(f"Resumed from checkpoint {meta['step']} in {ckpt.directory}", flush=True)
    if start > s.total_steps:
      raise ValueError(
        f"the checkpoint in {ckpt.directory} is at step {start}, past the {s.total_steps} steps "
        f"this config trains (train.steps={config.train.steps}"
        + (" + distill.finetune_steps" if s.total_steps > config.train.steps else "")
        + "): raise train.steps to continue this run, or use another workdir"
      )
    if start == s.total_steps:
      print(f"Nothing to train: the run is complete at step {start}", flush=True)

  main_kind = "distill" if mode == "distill" else "lm"
  main_mask = trainable_mask(mc, s.abstract_params, "feature_maps" if mode == "distill" else "all")
  train_main = steps_lib.jit_train_step(
    mc,
    s.tx,
    mesh,
    s.param_sh,
    s.opt_sh,
    kind=main_kind,
    accum=config.train.grad_accum_steps,
    mask=main_mask,
  )
  train_finetune = None
  finetune_params = config.distill.get("finetune_params", "all")
  if finetune_params not in ("all", "feature_maps"):
    raise ValueError(
      f"config.distill.finetune_params must be 'all' or 'feature_maps', got {finetune_params!r}"
    )
  if s.total_steps > config.train.steps:
    train_finetune = steps_lib.jit_train_step(
      mc,
      s.tx,
      mesh,
      s.param_sh,
      s.opt_sh,
      kind="lm",
      accum=config.train.grad_accum_steps,
      mask=trainable_mask(mc, s.abstract_params, finetune_params),
    )
  eval_fn = steps_lib.jit_eval_step(mc, mesh, s.param_sh, kind="lm")
  batch_sh = sharding_lib.batch_sharding(mesh)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, start_step=start)
  bsz, seq = config.train.batch_size, config.task.seq_len
  eval_bsz = config.train.get("eval_batch_size", bsz)
  log_every = max(1, config.train.log_every)

  def run_eval(params, step):
    totals = {}
    for i in range(config.train.eval_batches):
      b = s.eval_task.batch(i, eval_bsz)
      out = eval_fn(params, {k: sharding_lib.global_array(v, batch_sh) for k, v in b.items()})
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(sharding_lib.to_host(v)) / config.train.eval_batches
    return {f"eval_{k}": v for k, v in totals.items()}

  result: dict[str, Any] = {"step": start, "preempted": False}
  if is_main:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_params))
    print(
      f"Training {mc.attention} LM ({n_params / 1e6:.2f}M params) mode={mode} on mesh "
      f"{dict(mesh.shape)} ({jax.device_count()} devices, {jax.process_count()} processes); "
      f"steps {start} -> {s.total_steps}",
      flush=True,
    )
  last_time, last_step, t_start = time.time(), start, time.time()
  tokens_per_s = float("nan")
  metrics = None
  with _Preemption() as preempt:
    step = start
    while step < s.total_steps:
      batch = s.task.batch(step, bsz)
      gbatch = {k: sharding_lib.global_array(v, batch_sh) for k, v in batch.items()}
      fn = train_main if step < config.train.steps else train_finetune
      params, opt_state, metrics = fn(state["params"], state["opt_state"], gbatch)
      rng, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))
      state = {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(rng)}
      step += 1
      if step % log_every == 0 or step == s.total_steps or step == start + 1:
        loss = float(sharding_lib.to_host(metrics["loss"]))
        now = time.time()
        if step > last_step and step > start + 1:
          tokens_per_s = (step - last_step) * bsz * seq / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        eta = (
          (s.total_steps - step) * bsz * seq / tokens_per_s if tokens_per_s > 0 else float("nan")
        )
        record = {
          "loss": loss,
          "grad_norm": float(sharding_lib.to_host(metrics["grad_norm"])),
          "lr": float(s.schedule(step - 1)),
          "tokens_per_s": tokens_per_s,
          "stage": "distill" if (mode == "distill" and step <= config.train.steps) else "lm",
        }
        if not np.isfinite(loss):
          writer.write(step, record)
          writer.close()
          raise _diverged(step, f"the loss is {loss}", config, ckpt)
        if config.train.eval_every and step % config.train.eval_every == 0:
          record.update(run_eval(state["params"], step))
        writer.write(step, record)
        if is_main:
          extra = f"eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
          print(
            metrics_lib.progress_line(step, s.total_steps, loss, tokens_per_s, eta, extra),
            flush=True,
          )
        result.update(record)
      stop_here = step == config.train.get("stop_at_step", 0)
      preempted = _all_agree(preempt.requested)
      if ckpt.should_save(step) or step == s.total_steps or preempted or stop_here:
        meta = {"data_position": step, "mode": mode, "config": run_config}
        try:
          ckpt.save(step, state, meta)
        except ckpt_lib.NonFiniteStateError as e:
          writer.close()
          raise _diverged(step, str(e), config, ckpt) from e
      if preempted or stop_here:
        result["preempted"] = True
        break
  ckpt.wait()
  if metrics is not None and "loss" not in result:
    result["loss"] = float(sharding_lib.to_host(metrics["loss"]))
  if not result["preempted"] and config.train.eval_batches:
    final_eval = run_eval(state["params"], step)
    if step > start:  # a rerun of a complete run already has this row
      writer.write(step, final_eval)
    result.update(final_eval)
  result["step"] = step
  result["tokens_per_s"] = tokens_per_s
  result["elapsed_s"] = time.time() - t_start
  result["params"] = state["params"]
  writer.close()
  logging.info("done at step %d: %s", step, {k: v for k, v in result.items() if k != "params"})
  return result
