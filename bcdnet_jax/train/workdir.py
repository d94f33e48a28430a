"""The on-disk layout of a training run, owned here: run records (config.json, model.json),
results, the Orbax checkpoints and their sha256 records, damaged steps set aside, a full
disk and a non-finite stop.

    WORKDIR/config.json            the resolved config (+ deviations from the recipe)
    WORKDIR/model.json             architecture + evaluation preprocessing (checkpoint.SPEC_FILE)
    WORKDIR/checkpoints/<step>/    Orbax items checkpoint.TRAIN_ITEMS: state, model, meta
    WORKDIR/checkpoint_sha256/     <step>.json: every file's digest (checkpoint.STEP_DIGESTS)
    WORKDIR/damaged_checkpoints/   steps that failed to restore, moved aside (never deleted)
    WORKDIR/results.json           final metrics;  metrics.jsonl, tensorboard/, report/
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bcdnet_jax import checkpoint, errors, fileio, preprocessing, runtime
from bcdnet_jax.log import logger as log
from bcdnet_jax.nn import models
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train.config import ConfigError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
DAMAGED_DIR = "damaged_checkpoints"


class TrainingDiverged(errors.UserError, RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_model(workdir: str, spec: models.ModelSpec) -> None:
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


def write_run_records(config, workdir: str, spec: models.ModelSpec) -> None:
  """config.json (resolved) and model.json (architecture + evaluation preprocessing)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    deviations = config_lib.deviations(config)
    for d in deviations:
      log.warning("deviation from the released recipe: %s", d)
    new = {**config.to_dict(), "deviations": deviations}
    log_config_changes(os.path.join(workdir, CONFIG_FILE), new)
    fileio.write_json(os.path.join(workdir, CONFIG_FILE), new)
    fileio.write_json(os.path.join(workdir, checkpoint.SPEC_FILE),
                      {"format_version": checkpoint.FORMAT_VERSION, "spec": spec.to_json(),
                       "preprocessing": preprocessing.from_config(config)})


def log_config_changes(path: str, new: dict) -> None:
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


def open_checkpoints(config, workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, checkpoint.TRAIN_CHECKPOINTS)),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
      item_names=checkpoint.TRAIN_ITEMS)


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
  set_aside_damaged(manager, step, workdir)
  return rt.replicate(restored["state"]), int(restored["meta"]["step"])


def save_checkpoint(manager, state, step: int, spec: models.ModelSpec) -> None:
  """The training state, the "model" item (what restore_model reads: weights and BN
  statistics in a model directory's layout, on any topology) and the step; then the
  checksum record."""
  check_finite(state, step, manager)
  model_item = checkpoint.merge_pure(nnx.to_pure_dict(state["params"]),
                                     nnx.to_pure_dict(state["batch_stats"]))
  held = HoldErrors()  # orbax logs each failed writer thread with its traceback
  absl_log = logging.getLogger("absl")
  absl_log.addFilter(held)
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), model=ocp.args.StandardSave(model_item),
        meta=ocp.args.JsonSave({"step": step, "data_position_batches": step,
                                "spec": spec.to_json()})), force=True)
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - orbax wraps the OSError of its writer threads
    full = disk_full(e)
    if full is None:
      held.release(absl_log)  # not ours to summarise: everything orbax said, then the error
      raise
    raise SaveError(f"disk full while saving checkpoint {step} in {manager.directory} "
                    f"({full}); nothing was lost: {kept(manager)} and the unfinished "
                    "save is not used; free space and run the same command to resume "
                    "from it") from None
  finally:
    absl_log.removeFilter(held)
  held.release(absl_log)
  if jax.process_index() == 0:
    checkpoint.record_step_digests(str(manager.directory), step)


class SaveError(errors.UserError):
  """A checkpoint could not be written for lack of space; earlier ones are intact."""


class HoldErrors:
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


DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


def disk_full(e: BaseException) -> str | None:
  """'No space left on device' (or the quota's) when `e` or its causes say so, else None:
  an OSError, or tensorstore's RESOURCE_EXHAUSTED text that orbax raises as ValueError."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_FULL:
      return DISK_FULL[e.errno]
    for code, text in DISK_FULL.items():
      if text in str(e) or f"os_error_code='{code}'" in str(e):
        return text
    e = e.__cause__ or e.__context__
  return None


def check_finite(state, step, manager):
  leaves = jax.tree.leaves(jax.device_get(state["params"]))
  if not all(np.isfinite(x).all() for x in leaves):
    raise TrainingDiverged(f"non-finite parameters at step {step}; not saved; "
                           f"{kept(manager)}")


def kept(manager) -> str:
  """What a stopped run leaves: its newest checkpoint, or that there is none yet."""
  last = manager.latest_step()
  if last is None:
    return f"no checkpoint had been saved yet in {manager.directory} (nothing to keep)"
  return f"the last good checkpoint (step {last}) is kept in {manager.directory}"


def set_aside_damaged(manager, good_step: int, workdir: str) -> None:
  """Moves checkpoints newer than the one resumed from (damaged ones) to
  `workdir/damaged_checkpoints/`, so the run can save those steps again; nothing is
  deleted."""
  newer = [s for s in manager.all_steps() if s > good_step]
  if not newer or jax.process_index() != 0:
    return
  aside = os.path.join(workdir, DAMAGED_DIR)
  os.makedirs(aside, exist_ok=True)
  for step in newer:
    dest = os.path.join(aside, f"{step}-{int(time.time())}")
    os.replace(os.path.join(str(manager.directory), str(step)), dest)
    log.warning("moved damaged checkpoint %d to %s", step, dest)
  manager.reload()


def finished_results(config, workdir: str, step: int) -> dict | None:
  """The results.json of a run that finished at `step` with this data set and split, or
  None (then the run evaluates again)."""
  path = os.path.join(workdir, RESULTS_FILE)
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
