"""Training and evaluation: one jitted step sharded over a ('data',) mesh of all devices.

Parameters, BN statistics and optimiser state are replicated; the batch is sharded on its
leading axis, so BatchNorm means/variances inside the step are over the global batch
(what SyncBN gave the authors). The loss is the released one: (label-smoothed CE on `fc` +
KD from the frozen ResNet-50 teacher on `fc_dist`) / 2, or CE on both heads when no teacher
is configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from bcdnet_jax import checkpoint, errors, fileio, preprocessing, runtime
from bcdnet_jax import log as log_lib
from bcdnet_jax.nn import models
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train import metric_writer

# `bcdnet_jax.data` (Grain, PIL, TFDS data sources; no TensorFlow) is imported inside the
# functions that build pipelines, so the steps, losses and optimiser import only JAX.

log = log_lib.logger
setup_logging = log_lib.setup


ConfigError = config_lib.ConfigError  # the error type of every config check
MODES = config_lib.MODES


class TrainingDiverged(errors.UserError, RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


# --- configuration (the checks of every field: bcdnet_jax/config.py) -------------------

def check_workdir_model(workdir: str, spec: models.ModelSpec) -> None:
  """Refuses to resume a workdir that holds a run of another model, before anything in it
  is written (its model.json and config.json stay as they are)."""
  if not os.path.exists(os.path.join(workdir, checkpoint.SPEC_FILE)):
    return
  try:
    old = checkpoint.read_spec(workdir)
  except checkpoint.CheckpointError:
    return  # not ours to judge: an unreadable record is reported where it is read
  differ = [f.name for f in dataclasses.fields(spec) if f.name not in models.ARITHMETIC_FIELDS
            and getattr(old, f.name) != getattr(spec, f.name)]
  if differ:
    shown = ", ".join(f"{k}: {getattr(old, k)!r} there, {getattr(spec, k)!r} requested"
                      for k in differ[:4])
    raise ConfigError(f"workdir {workdir} holds a run of another model ({shown}); use a new "
                      "--workdir, or the same model to resume")


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """The released schedules, with the LR scaled linearly with the global batch.

  Warm-up (if any) goes linearly from `warmup_init_lr` to the peak over `warmup_steps`,
  then a cosine decays to 0 at `total_steps`, as the authors' scheduler does per step.
  """
  scale = config.batch_size / config.base_batch_size
  peak = config.learning_rate * scale
  if config.warmup_steps > 0:
    warm = optax.linear_schedule(config.warmup_init_lr * scale, peak, config.warmup_steps)
    cos = optax.cosine_decay_schedule(peak, max(1, total_steps - config.warmup_steps))
    return optax.join_schedules([warm, cos], [config.warmup_steps])
  return optax.cosine_decay_schedule(peak, total_steps)


def make_optimizer(config, total_steps: int):
  """torch.optim.AdamW: decoupled decay lr * wd * p with the pre-update parameters."""
  schedule = learning_rate_schedule(config, total_steps)
  return optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                     weight_decay=config.weight_decay), schedule


# --- losses ---------------------------------------------------------------------------------

def smoothed_cross_entropy(logits, labels, smoothing: float):
  """Mean CE against (1 - eps) one-hot + eps / K (torch's label_smoothing=eps)."""
  k = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, k), smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def distillation_loss(student_logits, teacher_logits):
  """Mean over the batch of -sum_k softmax(teacher)_k log_softmax(student)_k."""
  p = jax.nn.softmax(teacher_logits, axis=-1)
  return jnp.mean(-jnp.sum(p * jax.nn.log_softmax(student_logits, axis=-1), axis=-1))


# --- the steps ------------------------------------------------------------------------------

def make_train_step(train_graphdef, tx, config, teacher_graphdef=None, diagnostics=None):
  """train_step(state, batch, teacher_state) -> (state, metrics): the released loss,
  (label-smoothed CE on `fc` + KD from the teacher, or CE, on `fc_dist`) / 2, and AdamW.

  With `diagnostics` (a `diagnostics.Layout` of the model) the step is
  train_step(state, batch, teacher_state, diag) -> (state, metrics, diag_out): `diag` is
  {"signs": the weight signs of the previous diagnostics step, "due": a bool scalar}, and
  `diag_out` the binarisation statistics of this step when due
  (`diagnostics.step_outputs`). The loss, gradients and update are the same computations
  either way.
  `batch["image"]` is uint8 NHWC, normalised here (`preprocessing.normalize`, ImageNet's
  mean/std as the recipe's `Normalize`); the teacher sees the same normalised batch.
  """
  from bcdnet_jax.train import diagnostics as diag_lib
  smoothing = config.label_smoothing

  def train_step(state, batch, teacher_state, diag=None):
    images, labels = preprocessing.normalize(batch["image"]), batch["label"]

    def loss_fn(params):
      model = nnx.merge(train_graphdef, params, state["batch_stats"], copy=True)
      if diagnostics is not None:
        out, sign_inputs = diag_lib.forward_recording(model, images)
      else:
        out, sign_inputs = model(images), None
      logits, logits_dist = models.heads(out)
      ce = smoothed_cross_entropy(logits, labels, smoothing)
      if teacher_graphdef is not None:
        teacher = nnx.merge(teacher_graphdef, teacher_state, copy=True)
        t_logits = jax.lax.stop_gradient(teacher(images))
        second = distillation_loss(logits_dist, t_logits)
      else:
        second = smoothed_cross_entropy(logits_dist, labels, smoothing)
      loss = (ce + second) / 2
      return loss, (nnx.state(model, nnx.BatchStat), logits, logits_dist, ce, second,
                    sign_inputs)

    (loss, (batch_stats, logits, logits_dist, ce, second, sign_inputs)), grads = (
        jax.value_and_grad(loss_fn, has_aux=True)(state["params"]))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates),
                 "batch_stats": batch_stats, "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics = {"loss": loss, "ce": ce, "second_loss": second,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "accuracy_dist": jnp.mean(jnp.argmax(logits_dist, -1) == labels)}
    if diagnostics is None:
      return new_state, metrics
    return new_state, metrics, diag_lib.step_outputs(
        diagnostics, diag, new_state["params"], grads, sign_inputs)

  return train_step


# --- state ----------------------------------------------------------------------------------

def split_model(model):
  """(train graphdef, eval graphdef, params, batch_stats) of an nnx model."""
  model.train()
  train_def, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_def, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.train()
  return train_def, eval_def, params, batch_stats


def load_init_from(path: str, spec: models.ModelSpec):
  """Params and BN statistics of a model directory or training workdir, checked against spec."""
  src_spec = checkpoint.read_spec(path)
  free = ("stage", *models.ARITHMETIC_FIELDS)  # may change between init_from and this run
  mine = {k: v for k, v in spec.to_json().items() if k not in free}
  theirs = {k: v for k, v in src_spec.to_json().items() if k not in free}
  if mine != theirs:
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    raise ConfigError(f"config.init_from={path}: architecture differs from the configured "
                      f"model: {diff} (init_from, configured)")
  src = checkpoint.restore_model(path)
  return nnx.state(src, nnx.Param), nnx.state(src, nnx.BatchStat)


# --- the loop -------------------------------------------------------------------------------

class _Preemption:
  """SIGTERM / SIGUSR1 (SLURM's --signal) and SIGINT (Ctrl-C) request a checkpoint and a
  clean exit (code 0); a second Ctrl-C interrupts at once (KeyboardInterrupt), except while
  a checkpoint is being written (`saving`): interrupting Orbax's writer threads would leave
  a half-written step and a flood of thread tracebacks, so the save finishes first."""

  def __init__(self):
    self.requested = False
    self.saving = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      if self.saving:
        log.warning("received SIGINT again: the checkpoint being written finishes first "
                    "(seconds), then the run exits")
        return
      raise KeyboardInterrupt
    log.warning("received %s: checkpointing and exiting after this step%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else "")
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was asked to stop, agreed by all processes at this step.

    Processes signalled a step apart (or only one of them) would otherwise save at
    different steps, and the first collective of the save would wait forever for the
    others; so with several processes the flag is all-gathered every step (one tiny
    collective).
    """
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _data_config(config):
  """The data pipeline's view of a config (`data.DataConfig`)."""
  from bcdnet_jax import data
  return data.DataConfig(
      image_size=config.image_size, eval_crop_ratio=config.eval_crop_ratio,
      color_jitter=tuple(config.color_jitter), crop_scale=tuple(config.crop_scale),
      random_flip=config.random_flip, seed=config.seed, workers=config.data_workers)


def resolve_num_classes(config, source) -> int:
  n = source.num_classes
  if config.model.num_classes and config.model.num_classes != n:
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} but dataset "
                      f"{config.dataset!r} has {n} classes")
  return n


def _model_spec(config, num_classes):
  try:
    overrides = models.config_overrides(config.model.name, dict(config.model.overrides))
    overrides.setdefault("compute_dtype", config.model.compute_dtype)
    overrides.setdefault("dtype_policy", config.model.dtype_policy)
    return models.get_spec(config.model.name, stage=config.model.stage,
                           num_classes=num_classes, **overrides)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None


def run(config: ml_collections.ConfigDict, workdir: str, *,
        cli_overrides: set[str] | frozenset = frozenset()) -> dict:
  """main.py's entry point: `config.mode` 'train' (train, then evaluate) or 'eval'."""
  config_lib.check_fields(config)  # config.mode among them
  if config.mode == "eval":
    return evaluate(config, workdir)
  return train_and_evaluate(config, workdir, cli_overrides=cli_overrides)


@dataclasses.dataclass
class _Plan:
  """What a training run needs, checked before anything is written or compiled."""
  train_source: Any  # data.Source of config.train_split
  eval_source: Any  # data.Source of config.eval_split
  spec: models.ModelSpec
  total_steps: int
  init_params: Any = None
  teacher: Any = None


@contextlib.contextmanager
def _naming(field: str):
  """Prefixes a model directory's error (missing, not a model directory, damaged) with the
  config field that named the directory."""
  try:
    yield
  except checkpoint.CheckpointError as e:
    raise type(e)(f"{field}: {e}") from None


def plan_run(config, workdir: str, rt: runtime.Runtime) -> _Plan:
  """Validates the config, data, model, workdir, init_from and teacher; writes nothing."""
  from bcdnet_jax import data
  config_lib.validate(config, rt.size)
  config_lib.check_workdir(workdir)
  data_dir = config.data_dir or None
  train_source = data.open_source(config.dataset, config.train_split, data_dir)
  eval_source = data.open_source(config.dataset, config.eval_split, data_dir)
  if train_source.multi_label:
    raise ConfigError(f"config.dataset: {config.dataset!r} has label sets (ReaL), not one "
                      "class per image; train on imagenet2012 and evaluate on it")
  num_classes = resolve_num_classes(config, train_source)
  spec = _model_spec(config, num_classes)
  config_lib.check_image_size(spec, config.image_size)
  check_workdir_model(workdir, spec)
  threads = data.default_workers() + 1
  if config.dataset.startswith("folder:") or config.check_images:
    # A bad validation image would only show after training: look before.
    data.check_images(eval_source, threads=threads)
  if config.check_images:
    data.check_images(train_source, threads=threads)
  steps_per_epoch = max(1, len(train_source) // config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  plan = _Plan(train_source, eval_source, spec, total_steps)
  if config.init_from and not config_lib.is_none(config.init_from):
    with _naming("config.init_from"):
      plan.init_params = load_init_from(config.init_from, spec)
  if not config_lib.is_none(config.teacher_dir):
    # the teacher computes under the student's policy (its activations dominate the step)
    with _naming("config.teacher_dir"):
      plan.teacher = models.set_dtype_policy(
          checkpoint.restore_model(config.teacher_dir, rt), plan.spec.dtype_policy)
    if plan.teacher.spec.num_classes != num_classes:
      raise ConfigError(f"config.teacher_dir: teacher has {plan.teacher.spec.num_classes} "
                        f"classes, the dataset {num_classes}")
  return plan


def write_run_records(config, workdir: str, spec: models.ModelSpec) -> None:
  """config.json (resolved) and model.json (architecture + evaluation preprocessing)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    deviations = config_lib.deviations(config)
    for d in deviations:
      log.warning("deviation from the released recipe: %s", d)
    new = {**config.to_dict(), "deviations": deviations}
    _log_config_changes(os.path.join(workdir, "config.json"), new)
    fileio.write_json(os.path.join(workdir, "config.json"), new)
    fileio.write_json(os.path.join(workdir, checkpoint.SPEC_FILE),
                      {"format_version": checkpoint.FORMAT_VERSION, "spec": spec.to_json(),
                       "preprocessing": preprocessing.from_config(config)})


def _log_config_changes(path: str, new: dict) -> None:
  """Warns, field by field, when a rerun in a workdir uses another configuration than the
  one recorded there (a resumed run continues with the new values: say so, not silently)."""
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict) and k not in ("overrides", "pipeline"):
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[prefix + k] = v
    return out

  a, b = flat(old), flat(json.loads(json.dumps(new, default=str)))
  changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
  if changed:
    log.warning("%s: this run's configuration differs from the recorded one (%s); a resumed "
                "run continues with the new values", path, "; ".join(changed[:8]) +
                (f"; and {len(changed) - 8} more" if len(changed) > 8 else ""))


def create_train_state(config, plan: _Plan):
  """(state, tx, schedule, train graphdef, eval graphdef) of a fresh run (`init_from`
  weights when given): params, BN statistics, AdamW state and the step."""
  model = models.build(plan.spec, seed=config.seed)
  train_def, eval_def, params, batch_stats = split_model(model)
  if plan.init_params is not None:
    params, batch_stats = plan.init_params
  tx, schedule = make_optimizer(config, plan.total_steps)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  return state, tx, schedule, train_def, eval_def


def open_checkpoints(config, workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
      item_names=("state", "model", "meta"))


def restore_or_start(manager, state, rt: runtime.Runtime, workdir: str):
  """(state, first step): the newest intact checkpoint's, or the fresh state at 0."""
  abstract = rt.abstract_replicated(state)
  found = checkpoint.restore_intact(manager, lambda step: manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                    meta=ocp.args.JsonRestore())), log)
  if found is None:
    return rt.replicate(state), 0
  step, restored = found
  log.info("resumed from %s at step %d", manager.directory, int(restored["meta"]["step"]))
  _set_aside_damaged(manager, step, workdir)
  return rt.replicate(restored["state"]), int(restored["meta"]["step"])


def save_checkpoint(manager, state, step: int, spec: models.ModelSpec) -> None:
  """The training state, the "model" item (what restore_model reads: weights and BN
  statistics in a model directory's layout, on any topology) and the step; then the
  checksum record."""
  _check_finite(state, step, manager)
  model_item = checkpoint.merge_pure(nnx.to_pure_dict(state["params"]),
                                     nnx.to_pure_dict(state["batch_stats"]))
  held = _HoldErrors()  # orbax logs each failed writer thread with its traceback
  absl_log = logging.getLogger("absl")
  absl_log.addFilter(held)
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), model=ocp.args.StandardSave(model_item),
        meta=ocp.args.JsonSave({"step": step, "data_position_batches": step,
                                "spec": spec.to_json()})), force=True)
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - orbax wraps the OSError of its writer threads
    full = _disk_full(e)
    if full is None:
      held.release(absl_log)  # not ours to summarise: everything orbax said, then the error
      raise
    raise SaveError(f"disk full while saving checkpoint {step} in {manager.directory} "
                    f"({full}); nothing was lost: {_kept(manager)} and the unfinished "
                    "save is not used; free space and run the same command to resume "
                    "from it") from None
  finally:
    absl_log.removeFilter(held)
  held.release(absl_log)
  if jax.process_index() == 0:
    checkpoint.record_step_digests(str(manager.directory), step)


class SaveError(errors.UserError):
  """A checkpoint could not be written for lack of space; earlier ones are intact."""


class _HoldErrors:
  """A logging filter that holds back ERROR records (orbax's writer threads report each
  failure with a traceback) until `release` re-emits them; a disk-full save drops them and
  says it in one line instead."""

  def __init__(self):
    self.records = []

  def filter(self, record) -> bool:
    if record.levelno >= logging.ERROR:
      self.records.append(record)
      return False
    return True

  def release(self, logger) -> None:
    records, self.records = self.records, []
    logger.removeFilter(self)
    for record in records:
      logger.handle(record)


_DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


def _disk_full(e: BaseException) -> str | None:
  """'No space left on device' (or the quota's) when `e` or its causes say so, else None:
  an OSError, or tensorstore's RESOURCE_EXHAUSTED text that orbax raises as ValueError."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
      return _DISK_FULL[e.errno]
    for code, text in _DISK_FULL.items():
      if text in str(e) or f"os_error_code='{code}'" in str(e):
        return text
    e = e.__cause__ or e.__context__
  return None


def due(step: int, every: int) -> bool:
  """Whether a cadence of `every` steps (0: never) falls on `step`."""
  return bool(every) and step % every == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_hook: Callable[[int], Any] | None = None,
                       return_params: bool = False,
                       cli_overrides: set[str] | frozenset = frozenset()) -> dict:
  """Trains (resuming from the newest intact checkpoint in `workdir`), evaluates, returns
  the results. Runs with a `pipeline` (the digits demo) go through each stage in its own
  subdirectory. `return_params` adds the final parameters (host arrays) as "params"."""
  from bcdnet_jax import data
  if config.pipeline:
    return _run_pipeline(config, workdir, step_hook, cli_overrides)
  start_time = time.time()
  rt = runtime.Runtime.create()
  plan = plan_run(config, workdir, rt)
  write_run_records(config, workdir, plan.spec)
  state, tx, schedule, train_def, eval_def = create_train_state(config, plan)
  manager = open_checkpoints(config, workdir)
  state, start_step = restore_or_start(manager, state, rt, workdir)
  if start_step >= plan.total_steps and not return_params:
    done = _finished_results(config, workdir, start_step)
    if done is not None:  # a rerun of a finished run: nothing to train or rewrite
      manager.close()
      return done
  teacher_def = teacher_state = None
  if plan.teacher is not None:
    plan.teacher.eval()
    teacher_def, teacher_state = nnx.split(plan.teacher)
    teacher_state = rt.replicate(teacher_state)
  p_train, monitor = _make_p_train(config, rt, plan, train_def, tx, teacher_def, state,
                                   start_step)
  p_eval = rt.jit_eval_step(eval_def)
  dcfg = _data_config(config)
  order = data.TrainOrder(len(plan.train_source), config.batch_size, config.seed,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
  # the data position is the step: resuming reads only the records of the batches ahead
  train_iter = data.DevicePrefetch(
      data.train_batches(plan.train_source, dcfg, order, start_step, plan.total_steps),
      rt.global_batch)

  def evaluate_now(state):
    return run_evaluation(p_eval, state, plan.eval_source, dcfg, config.eval_batch_size, rt)

  writer = metric_writer.MetricWriter(workdir, start_step=start_step,
                                      active=jax.process_index() == 0,
                                      jsonl=("metrics", "diagnostics"))
  try:
    state, step, stopped = _train_loop(
        config, rt, plan, state, start_step, p_train, teacher_state, train_iter, manager,
        writer, schedule, evaluate_now, step_hook, monitor)
    wait = train_iter.wait_fraction()
    if wait is not None and jax.process_index() == 0:
      log.info("the training steps waited for input %.1f%% of the time after the first",
               100 * wait)
    if stopped:
      return {"preempted": True, "steps": step}
    eval_result = evaluate_now(state)
    writer.scalars(step, {"eval_top1": eval_result["top1"], "eval_top5": eval_result["top5"]})
  finally:
    writer.close()
    manager.close()
  results = {"top1": eval_result["top1"], "top5": eval_result["top5"],
             "num_eval_examples": eval_result["num_eval_examples"], "steps": step,
             "wall_time_s": time.time() - start_time, "model": config.model.name,
             "stage": config.model.stage, "dataset": config.dataset,
             "eval_split": config.eval_split, "input_wait_fraction": wait,
             "environment": config_lib.environment()}
  if config.eval_datasets:
    results.update(_evaluate_sets(config, workdir, workdir))
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, "results.json"), results)
    log.info("final: top-1 %.4f top-5 %.4f on %d examples", results["top1"],
             results["top5"], results["num_eval_examples"])
  if return_params:
    results["params"] = jax.device_get(state["params"])
  return results


def _make_p_train(config, rt, plan, train_def, tx, teacher_def, state, start_step):
  """(jitted step `(state, batch, teacher_state) -> (state, metrics)`, the
  `diagnostics.Monitor` behind it or None when `config.diagnostics_every_steps` is off)."""
  from bcdnet_jax.train import diagnostics
  every = diagnostics.resolve_every(config)
  if not every:
    return rt.jit_train_step(make_train_step(train_def, tx, config, teacher_def)), None
  lay = diagnostics.layout(plan.spec, config.image_size)
  p_step = rt.jit_train_step(make_train_step(train_def, tx, config, teacher_def, lay),
                             diagnostics=True)
  monitor = diagnostics.Monitor(lay, p_step, state["params"], every=every,
                                start_step=start_step, total=plan.total_steps, config=config)
  return monitor, monitor


def _finished_results(config, workdir: str, step: int) -> dict | None:
  """The results.json of a run that finished at `step` with this data set and split, or
  None (then the run evaluates again)."""
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      done = json.load(f)
  except (OSError, ValueError):
    return None
  same = {"steps": step, "dataset": config.dataset, "eval_split": config.eval_split,
          "model": config.model.name, "stage": config.model.stage}
  if any(done.get(k) != v for k, v in same.items()):
    return None
  if config.eval_datasets and "datasets" not in done:
    return None
  if jax.process_index() == 0:
    log.info("%s finished at step %d earlier: its results.json is kept (top-1 %.4f); "
             "evaluate again with configs/eval.py", workdir, step, done["top1"])
  return done


def _evaluate_sets(config, model_dir: str, workdir: str) -> dict:
  """Evaluation mode on `config.eval_datasets` of the model in `model_dir`, written to
  `workdir/eval/`; returns {"datasets": ..., "eval_wall_time_s": ...} for results.json."""
  ev = config.copy_and_resolve_references()
  with ev.unlocked():
    ev.mode, ev.checkpoint, ev.pipeline = "eval", model_dir, ml_collections.ConfigDict()
    ev.image_size, ev.eval_crop_ratio = 0, 0.0  # the preprocessing recorded with the model
  r = evaluate(ev, os.path.join(workdir, "eval"))
  return {"datasets": r["datasets"], "eval_wall_time_s": r["wall_time_s"]}


def _train_loop(config, rt, plan, state, step, p_train, teacher_state, train_iter, manager,
                writer, schedule, evaluate_now, step_hook, monitor=None):
  """Steps until `plan.total_steps` or an agreed stop request: logs (with the ETA after
  compilation), writes the binarisation diagnostics (`monitor`), evaluates and
  checkpoints on their cadences. Returns (state, step, stopped early)."""
  start_step, total = step, plan.total_steps
  last_time, last_step = time.time(), step
  if jax.process_index() == 0 and step < total:
    log.info("compiling the training step (the first step includes it)...")
  with _Preemption() as preempt:
    while step < total:
      batch = _next_batch(train_iter, config)
      state, metrics = p_train(state, batch, teacher_state)
      step += 1
      if step == start_step + 1:  # the ETA counts steps after compilation only
        jax.block_until_ready(metrics)
        if jax.process_index() == 0:
          log.info("first step done after %.1f s (compilation)", time.time() - last_time)
        last_time, last_step = time.time(), step
      if step_hook is not None:
        step_hook(step)
      is_last = step == total
      if due(step, config.log_every_steps) or (is_last and config.log_every_steps):
        last_time, last_step = _log_progress(config, writer, metrics, schedule, step, total,
                                             last_time, last_step, manager)
      if monitor is not None and monitor.due(step):
        monitor.write(step, writer)
      if due(step, config.eval_every_steps) and not is_last:
        r = evaluate_now(state)
        writer.scalars(step, {"eval_top1": r["top1"], "eval_top5": r["top5"]})
      stop = preempt.agreed()  # every process stops at the same step, or none does
      if due(step, config.checkpoint_every_steps) or is_last or stop:
        preempt.saving = True
        try:
          save_checkpoint(manager, state, step, plan.spec)
        finally:
          preempt.saving = False
        if preempt.requested and jax.process_count() == 1:
          stop = True  # a signal that came during the save (several processes: next step)
      if stop and not is_last:
        log.warning("stopped at step %d (checkpoint saved); resume by running the same "
                    "command", step)
        return state, step, True
  return state, step, False


def _log_progress(config, writer, metrics, schedule, step, total, last_time, last_step,
                  manager):
  """One progress line and its scalars; a non-finite loss stops the run."""
  m = jax.device_get(metrics)
  if not all(np.isfinite(v) for v in m.values()):
    shown = ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(m.items()))
    raise TrainingDiverged(f"non-finite loss at step {step} ({shown}); {_kept(manager)}")
  now = time.time()
  rate = (step - last_step) / max(now - last_time, 1e-9)
  eta = (total - step) / rate if rate > 0 else float("nan")
  m.update(learning_rate=float(schedule(step - 1)), steps_per_s=rate,
           images_per_s=rate * config.batch_size)
  writer.scalars(step, m)
  if jax.process_index() == 0:
    log.info("step %d/%d loss %.4f acc %.3f/%.3f lr %.3g %.2f steps/s %.0f img/s ETA %s",
             step, total, m["loss"], m["accuracy"], m["accuracy_dist"], m["learning_rate"],
             rate, rate * config.batch_size, _fmt_eta(eta))
  return now, step


def _check_finite(state, step, manager):
  leaves = jax.tree.leaves(jax.device_get(state["params"]))
  if not all(np.isfinite(x).all() for x in leaves):
    raise TrainingDiverged(f"non-finite parameters at step {step}; not saved; "
                           f"{_kept(manager)}")


def _kept(manager) -> str:
  """What a stopped run leaves: its newest checkpoint, or that there is none yet."""
  last = manager.latest_step()
  if last is None:
    return f"no checkpoint had been saved yet in {manager.directory} (nothing to keep)"
  return f"the last good checkpoint (step {last}) is kept in {manager.directory}"


def _set_aside_damaged(manager, good_step: int, workdir: str) -> None:
  """Moves checkpoints newer than the one resumed from (damaged ones) to
  `workdir/damaged_checkpoints/`, so the run can save those steps again; nothing is
  deleted."""
  newer = [s for s in manager.all_steps() if s > good_step]
  if not newer or jax.process_index() != 0:
    return
  aside = os.path.join(workdir, "damaged_checkpoints")
  os.makedirs(aside, exist_ok=True)
  for step in newer:
    dest = os.path.join(aside, f"{step}-{int(time.time())}")
    os.replace(os.path.join(str(manager.directory), str(step)), dest)
    log.warning("moved damaged checkpoint %d to %s", step, dest)
  manager.reload()


def _next_batch(train_iter, config):
  """The next global batch; an undecodable image stops the run with its file named (not
  skipped: skipping would silently change the deterministic data order and epoch)."""
  from bcdnet_jax import data
  try:
    return next(train_iter)
  except data.ImageDecodeError as e:
    raise data.DataError(f"{config.dataset} split {config.train_split!r}: {e}; remove or "
                         "replace the file (--config.check_images=True finds them all "
                         "before training)") from None


def _fmt_eta(seconds):
  if not math.isfinite(seconds):
    return "(after the next steps)"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def run_evaluation(p_eval, state, source, dcfg, eval_batch_size, rt: runtime.Runtime,
                   return_predictions=False) -> dict:
  """Top-1/top-5 over the whole split of `source` (a `data.Source`); checks every example
  counted once. An undecodable image raises `data.DataError` naming it."""
  from bcdnet_jax import data
  local = eval_batch_size // jax.process_count()
  batches, num_batches, total = data.eval_batches(source, dcfg, local, eval_batch_size,
                                                  process_index=jax.process_index(),
                                                  process_count=jax.process_count())
  sums = {"top1": 0.0, "top5": 0.0, "count": 0.0, "scored": 0.0}
  preds = []
  seen = 0
  while True:
    try:
      host_batch = next(batches)
    except StopIteration:
      break
    except data.ImageDecodeError as e:
      raise data.DataError(f"{source.dataset} split {source.split!r}: {e}") from None
    seen += 1
    out, pred = p_eval(state, rt.global_batch(host_batch))
    out = jax.device_get(out)
    for k in sums:
      sums[k] += float(out[k])
    if return_predictions:
      mask = host_batch["mask"].astype(bool)
      preds.append(np.asarray(jax.device_get(pred))[mask] if jax.process_count() == 1
                   else None)
  if seen != num_batches or int(round(sums["count"])) != total:
    raise RuntimeError(f"evaluation counted {sums['count']:.0f} examples in {seen} batches, "
                       f"the split has {total} in {num_batches}")
  scored = int(round(sums["scored"]))
  result = {"top1": sums["top1"] / max(scored, 1), "top5": sums["top5"] / max(scored, 1),
            "num_eval_examples": scored, "num_images": total}
  if return_predictions:
    result["predictions"] = np.concatenate(preds)
  return result


def eval_entries(config) -> list[tuple[str, str]]:
  """(TFDS name, split) of each set to evaluate: `config.eval_datasets` (comma-separated
  'name[:split]'), else `config.dataset` on `config.eval_split`."""
  from bcdnet_jax import data
  listed = [e for e in str(config.eval_datasets or "").split(",") if e.strip()]
  if not listed:
    return [(config.dataset, config.eval_split)]
  return [data.parse_eval_dataset(e, config.eval_split) for e in listed]


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             return_predictions: bool = False) -> dict:
  """Evaluates `config.checkpoint` (a model directory or training workdir) on each set of
  `eval_entries(config)`; the first set's numbers are also the top-level ones."""
  from bcdnet_jax import data
  start = time.time()
  rt = runtime.Runtime.create()
  config_lib.validate(config, rt.size)
  if not config.checkpoint:
    raise ConfigError("config.checkpoint: set it to a model directory (convert_torch_ckpt.py "
                      "output) or a training workdir")
  config_lib.check_workdir(workdir)
  held = [f for f in (checkpoint.SPEC_FILE, "checkpoints")
          if os.path.exists(os.path.join(workdir, f))]
  if held:  # its config.json and results.json would be replaced by the evaluation's
    raise ConfigError(f"--workdir={workdir} holds a training run or a model ({held[0]}); "
                      "evaluation writes config.json and results.json there: use another "
                      "--workdir (e.g. a new directory)")
  with _naming("config.checkpoint"):
    model = models.set_dtype_policy(checkpoint.restore_model(config.checkpoint, rt),
                                   config.model.dtype_policy)
  pre = preprocessing.resolve(checkpoint.read_preprocessing(config.checkpoint),
                              image_size=config.image_size,
                              crop_ratio=config.eval_crop_ratio, where=config.checkpoint)
  config_lib.check_image_size(model.spec, pre["image_size"],
                              "config.image_size" if config.image_size else
                              f"the image size recorded in {config.checkpoint}")
  entries = eval_entries(config)
  sources = [data.open_source(name, split, config.data_dir or None) for name, split in entries]
  for (name, _), source in zip(entries, sources):  # all checked before any work
    if model.spec.num_classes != source.num_classes:
      raise ConfigError(f"config.checkpoint: the model has {model.spec.num_classes} "
                        f"classes, dataset {name!r} has {source.num_classes}")
  _, eval_def, params, batch_stats = split_model(model)
  state = rt.replicate({"params": params, "batch_stats": batch_stats})
  p_eval = rt.jit_eval_step(eval_def, pre["mean_rgb"], pre["stddev_rgb"])
  dcfg = dataclasses.replace(_data_config(config), image_size=pre["image_size"],
                             eval_crop_ratio=pre["crop_ratio"])

  per_set = {}
  for (name, split), source in zip(entries, sources):
    r = run_evaluation(p_eval, state, source, dcfg, config.eval_batch_size, rt,
                       return_predictions)
    per_set[f"{name}:{split}"] = r
    if jax.process_index() == 0:
      log.info("%s:%s: top-1 %.4f top-5 %.4f on %d examples", name, split, r["top1"],
               r["top5"], r["num_eval_examples"])
  result = dict(next(iter(per_set.values())))
  result.update(steps=0, wall_time_s=time.time() - start, checkpoint=config.checkpoint,
                dataset=entries[0][0], eval_split=entries[0][1], preprocessing=pre,
                datasets={k: {f: v[f] for f in ("top1", "top5", "num_eval_examples",
                                                 "num_images")}
                          for k, v in per_set.items()})
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    fileio.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    fileio.write_json(os.path.join(workdir, "results.json"),
                {k: v for k, v in result.items() if k != "predictions"})
  return result


def _stage_config(config, name, overrides, cli_overrides):
  """`config` with a pipeline stage's values, except fields set on the command line: those
  win (`--config.num_train_steps=30` shortens every stage), and the log says so."""
  stage_cfg = config.copy_and_resolve_references()
  flat = {}
  for k, v in overrides.items():
    if isinstance(v, ml_collections.ConfigDict):
      flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
    else:
      flat[k] = v
  with stage_cfg.unlocked():
    stage_cfg.pipeline = ml_collections.ConfigDict()
    for key, v in flat.items():
      if key in cli_overrides:
        log.info("pipeline stage %s: config.%s from the command line replaces the stage's "
                 "%r", name, key, v)
        continue
      parent, _, leaf = key.rpartition(".")
      (stage_cfg[parent] if parent else stage_cfg)[leaf] = v
  return stage_cfg


def _run_pipeline(config, workdir, step_hook, cli_overrides=frozenset()):
  """Runs the stages of `config.pipeline` in order, each initialised from the last, then
  evaluates the final model on `config.eval_datasets` (when set). Every stage's config is
  checked before the first one starts. Rerunning the command resumes where it stopped:
  finished stages keep their results, an interrupted stage resumes from its newest
  checkpoint."""
  config_lib.check_workdir(workdir)
  stages, previous = [], None
  for name, overrides in config.pipeline.items():
    stage_cfg = _stage_config(config, name, overrides, cli_overrides)
    with stage_cfg.unlocked():
      if previous is not None and not stage_cfg.init_from:
        stage_cfg.init_from = previous
      stage_cfg.eval_datasets = ""  # the final model's, below
    config_lib.validate(stage_cfg, jax.device_count())
    previous = os.path.join(workdir, name)
    stages.append((name, stage_cfg, previous))
  results = {}
  for name, stage_cfg, sub in stages:
    log.info("pipeline stage %s -> %s", name, sub)
    results[name] = train_and_evaluate(stage_cfg, sub, step_hook=step_hook)
    if results[name].get("preempted"):
      return results[name]
  final = dict(results[name])
  final.update(stages=results,
               wall_time_s=sum(r.get("wall_time_s", 0.0) for r in results.values()))
  if config.eval_datasets:
    final.update(_final_sets(config, sub, workdir))
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, "results.json"), final)
    fileio.write_json(os.path.join(workdir, "config.json"), {
        **config.to_dict(),
        "deviations": sorted({d for _, c, _ in stages for d in config_lib.deviations(c)})})
    write_report(workdir)
  return final


def _final_sets(config, model_dir: str, workdir: str) -> dict:
  """`_evaluate_sets` of the pipeline's final model, or its earlier results when they are
  newer than the model's results.json and cover the same sets (a rerun of a finished
  pipeline evaluates nothing again)."""
  done_path = os.path.join(workdir, "eval", "results.json")
  try:
    if os.path.getmtime(done_path) >= os.path.getmtime(os.path.join(model_dir,
                                                                    "results.json")):
      with open(done_path) as f:
        done = json.load(f)
      wanted = [f"{name}:{split}" for name, split in eval_entries(config)]
      if done.get("checkpoint") == model_dir and list(done.get("datasets", {})) == wanted:
        log.info("%s: the final evaluation was done earlier; kept", done_path)
        return {"datasets": done["datasets"], "eval_wall_time_s": done["wall_time_s"]}
  except (OSError, ValueError):
    pass
  return _evaluate_sets(config, model_dir, workdir)


def write_report(workdir: str) -> str | None:
  """`bcdnet-report`'s plots and page of `workdir` in workdir/report; a report that
  cannot be made is a warning, not a failed run (the training results are written)."""
  from bcdnet_jax.train import report
  try:
    index = report.build(workdir)
  except Exception as e:  # noqa: BLE001 - plotting must not fail a finished training
    log.warning("report of %s not written: %s", workdir, e)
    return None
  log.info("report: %s", index)
  return index
