"""One training run: plan, records, state, the jitted step, the loop, the final evaluation.

Parameters, BN statistics and optimiser state are replicated; the batch is sharded on its
leading axis over a ('data',) mesh of all devices, so BatchNorm means/variances inside the
step are over the global batch (what SyncBN gave the authors).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bcdnet_jax import data, fileio, runtime
from bcdnet_jax.log import logger as log
from bcdnet_jax.nn import models
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train import diagnostics, metric_writer, owner
from bcdnet_jax.train import evaluate as evaluate_lib
from bcdnet_jax.train import plan as plan_lib
from bcdnet_jax.train import preemption as preemption_lib
from bcdnet_jax.train import step as step_lib
from bcdnet_jax.train import workdir as workdir_lib


def create_train_state(config, plan: plan_lib.Plan):
  """(state, tx, schedule, train graphdef, eval graphdef) of a fresh run (`init_from`
  weights when given): params, BN statistics, AdamW state and the step."""
  model = models.build(plan.spec, seed=config.seed)
  train_def, eval_def, params, batch_stats = step_lib.split_model(model)
  if plan.init_params is not None:
    params, batch_stats = plan.init_params
  tx, schedule = step_lib.make_optimizer(config, plan.total_steps)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  return state, tx, schedule, train_def, eval_def


def due(step: int, every: int) -> bool:
  """Whether a cadence of `every` steps (0: never) falls on `step`."""
  return bool(every) and step % every == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_hook: Callable[[int], Any] | None = None,
                       return_params: bool = False) -> dict:
  """Trains one model (resuming from the newest intact checkpoint in `workdir`), evaluates
  it, writes and returns the results; `bcdnet_jax.train.run` dispatches pipelines and
  evaluations. `return_params` adds the final parameters (host arrays) as "params"."""
  if config.get("pipeline"):
    raise ValueError("a config with stages (config.pipeline): run it with "
                     "bcdnet_jax.train.run, which runs each stage")
  start_time = time.time()
  rt = runtime.Runtime.create()
  plan = plan_lib.plan_run(config, workdir, rt)
  with owner.lock(workdir) as lock:
    owner.check_owner(workdir, "train")  # again, locked: a run may have begun meanwhile
    return _train(config, workdir, rt, plan, lock, start_time, step_hook, return_params)


def _train(config, workdir, rt, plan, lock, start_time, step_hook, return_params) -> dict:
  """`train_and_evaluate` once checked and locked: restore, then (only then) write."""
  state, tx, schedule, train_def, eval_def = create_train_state(config, plan)
  manager = workdir_lib.open_checkpoints(config, workdir)
  try:
    state, start_step, resumed = workdir_lib.restore_or_start(manager, state, rt, workdir,
                                                              config)
    if start_step >= plan.total_steps and not return_params:
      done = workdir_lib.finished_results(config, workdir, start_step)
      if done is not None:  # a rerun of a finished run: nothing to train or rewrite
        manager.close()
        return done
    workdir_lib.check_space(workdir, state)
    workdir_lib.write_run_records(config, workdir, plan.spec)
  except BaseException:
    manager.close()
    raise
  teacher_def, teacher_state = _teacher(plan, rt)
  p_train, monitor = make_p_train(config, rt, plan, train_def, tx, teacher_def, state,
                                  start_step)
  p_eval = rt.jit_eval_step(eval_def)
  dcfg = plan_lib.data_config(config)
  train_iter = _train_batches(config, plan, dcfg, start_step, rt)

  def evaluate_now(state):
    return evaluate_lib.run_evaluation(p_eval, state, plan.eval_source, dcfg,
                                       config.eval_batch_size, rt)

  writer = metric_writer.MetricWriter(workdir, start_step=start_step,
                                      active=jax.process_index() == 0,
                                      jsonl=("metrics", "diagnostics"))
  finished = False
  try:
    state, step, stopped = train_loop(
        config, rt, plan, state, start_step, p_train, teacher_state, train_iter, manager,
        writer, schedule, evaluate_now, step_hook, monitor, resumed=resumed, lock=lock)
    wait = train_iter.wait_fraction()
    if wait is not None and jax.process_index() == 0:
      log.info("the training steps waited for input %.1f%% of the time after the first",
               100 * wait)
    if stopped:
      finished = True
      return {"preempted": True, "steps": step}
    eval_result = evaluate_now(state)
    writer.scalars(step, {"eval_top1": eval_result["top1"], "eval_top5": eval_result["top5"]})
    finished = True
  finally:
    close_all((writer.close, manager.close), quiet=not finished)
  results = _write_results(config, workdir, eval_result, step, time.time() - start_time, wait)
  if return_params:
    results["params"] = jax.device_get(state["params"])
  return results


def close_all(closers, quiet: bool) -> None:
  """Calls each closer; with an error already on its way (`quiet`), a closer's OSError (a
  full disk flushing the event files) is dropped so that the first error is the one shown."""
  for close in closers:
    try:
      close()
    except OSError:
      if not quiet:
        raise


def _teacher(plan: plan_lib.Plan, rt: runtime.Runtime):
  """(graphdef, replicated state) of the frozen teacher in eval mode, or (None, None)."""
  if plan.teacher is None:
    return None, None
  plan.teacher.eval()
  teacher_def, teacher_state = nnx.split(plan.teacher)
  return teacher_def, rt.replicate(teacher_state)


def _train_batches(config, plan: plan_lib.Plan, dcfg, start_step: int, rt: runtime.Runtime):
  """Global batches from `start_step` on, prefetched to the devices. The data position is
  the step: resuming reads only the records of the batches ahead."""
  order = data.TrainOrder(len(plan.train_source), config.batch_size, config.seed,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
  return data.DevicePrefetch(
      data.train_batches(plan.train_source, dcfg, order, start_step, plan.total_steps),
      rt.global_batch)


def _write_results(config, workdir: str, eval_result: dict, step: int, wall_time_s: float,
                   wait) -> dict:
  """results.json of a finished run (and the evaluation of `config.eval_datasets`)."""
  results = {"top1": eval_result["top1"], "top5": eval_result["top5"],
             "num_eval_examples": eval_result["num_eval_examples"], "steps": step,
             "wall_time_s": wall_time_s, "model": config.model.name,
             "stage": config.model.stage, "dataset": config.dataset,
             "eval_split": config.eval_split, "input_wait_fraction": wait,
             "environment": config_lib.environment()}
  if config.eval_datasets:
    results.update(evaluate_lib.evaluate_sets(config, workdir, workdir))
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, workdir_lib.RESULTS_FILE), results)
    log.info("final: top-1 %.4f top-5 %.4f on %d examples", results["top1"],
             results["top5"], results["num_eval_examples"])
  return results


def make_p_train(config, rt, plan, train_def, tx, teacher_def, state, start_step):
  """(jitted step `(state, batch, teacher_state) -> (state, metrics)`, the
  `diagnostics.Monitor` behind it or None when `config.diagnostics_every_steps` is off)."""
  every = diagnostics.resolve_every(config)
  if not every:
    return rt.jit_train_step(step_lib.make_train_step(train_def, tx, config, teacher_def)), None
  lay = diagnostics.layout(plan.spec, config.image_size)
  p_step = rt.jit_train_step(step_lib.make_train_step(train_def, tx, config, teacher_def, lay),
                             diagnostics=True)
  monitor = diagnostics.Monitor(lay, p_step, state["params"], every=every,
                                start_step=start_step, total=plan.total_steps, config=config)
  return monitor, monitor


def train_loop(config, rt, plan, state, step, p_train, teacher_state, train_iter, manager,
                writer, schedule, evaluate_now, step_hook, monitor=None, *, resumed=None,
                lock=None):
  """Steps until `plan.total_steps` or an agreed stop request: logs (with the ETA after
  compilation), writes the binarisation diagnostics (`monitor`), evaluates and
  checkpoints on their cadences. Returns (state, step, stopped early)."""
  start_step, total = step, plan.total_steps
  last_time, last_step = time.time(), step
  if jax.process_index() == 0 and step < total:
    log.info("compiling the training step (the first step includes it)...")
  with preemption_lib.Preemption() as preempt:
    while step < total:
      batch = next_batch(train_iter, config)
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
        last_time, last_step = log_progress(config, writer, metrics, schedule, step, total,
                                             last_time, last_step, manager, resumed)
      if monitor is not None and monitor.due(step):
        monitor.write(step, writer)
      if due(step, config.eval_every_steps) and not is_last:
        r = evaluate_now(state)
        writer.scalars(step, {"eval_top1": r["top1"], "eval_top5": r["top5"]})
      stop = preempt.agreed()  # every process stops at the same step, or none does
      if due(step, config.checkpoint_every_steps) or is_last or stop:
        if lock is not None:
          lock.check()  # taken over by another run (this one thought dead): write no more
        preempt.saving = True
        try:
          workdir_lib.save_checkpoint(manager, state, step, plan.spec, resumed)
        finally:
          preempt.saving = False
        if preempt.requested and jax.process_count() == 1:
          stop = True  # a signal that came during the save (several processes: next step)
      if stop and not is_last:
        log.warning("stopped at step %d (checkpoint saved); resume by running the same "
                    "command", step)
        return state, step, True
  return state, step, False


def log_progress(config, writer, metrics, schedule, step, total, last_time, last_step,
                  manager, resumed=None):
  """One progress line and its scalars; a non-finite loss stops the run."""
  m = jax.device_get(metrics)
  if not all(np.isfinite(v) for v in m.values()):
    shown = ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(m.items()))
    raise workdir_lib.diverged(manager, f"non-finite loss at step {step} ({shown})", resumed)
  now = time.time()
  rate = (step - last_step) / max(now - last_time, 1e-9)
  eta = (total - step) / rate if rate > 0 else float("nan")
  m.update(learning_rate=float(schedule(step - 1)), steps_per_s=rate,
           images_per_s=rate * config.batch_size)
  writer.scalars(step, m)
  if jax.process_index() == 0:
    log.info("step %d/%d loss %.4f acc %.3f/%.3f lr %.3g %.2f steps/s %.0f img/s ETA %s",
             step, total, m["loss"], m["accuracy"], m["accuracy_dist"], m["learning_rate"],
             rate, rate * config.batch_size, fmt_eta(eta))
  return now, step


def next_batch(train_iter, config):
  """The next global batch; an undecodable image stops the run with its file named (not
  skipped: skipping would silently change the deterministic data order and epoch)."""
  try:
    return next(train_iter)
  except data.ImageDecodeError as e:
    raise data.DataError(f"{config.dataset} split {config.train_split!r}: {e}; remove or "
                         "replace the file (--config.check_images=True finds them all "
                         "before training)") from None


def fmt_eta(seconds):
  if not math.isfinite(seconds):
    return "(after the next steps)"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
