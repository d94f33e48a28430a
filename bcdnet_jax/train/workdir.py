"""The on-disk layout of a training run, owned here: run records (config.json, model.json),
results, the Orbax checkpoints and their sha256 records, damaged steps set aside, a full
disk and a non-finite stop.

    WORKDIR/.bcdnet_run.json       whose it is: kind and run id (train.owner), written first
    WORKDIR/.bcdnet_lock           the lock of the run writing there now (train.owner)
    WORKDIR/config.json            the resolved config (+ deviations from the recipe)
    WORKDIR/model.json             architecture + evaluation preprocessing (checkpoint.SPEC_FILE)
    WORKDIR/checkpoints/<step>/    Orbax items checkpoint.TRAIN_ITEMS: state, model, meta
    WORKDIR/checkpoint_sha256/     <step>.json: every file's digest (checkpoint.STEP_DIGESTS)
    WORKDIR/damaged_checkpoints/   steps that failed to restore, moved aside (never deleted)
    WORKDIR/results.json           final metrics;  metrics.jsonl, tensorboard/, report/
"""

from __future__ import annotations

import dataclasses
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
from bcdnet_jax.train import owner
from bcdnet_jax.train.config import ConfigError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
DAMAGED_DIR = "damaged_checkpoints"


class TrainingDiverged(errors.UserError, RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_model(workdir: str, spec: models.ModelSpec) -> None:
  """Refuses to resume a workdir that holds a run of another model, before anything in it
  is written (its model.json and config.json stay as they are). An unreadable model.json
  is judged by the model its newest checkpoint records (and rewritten only after that
  checkpoint restored)."""
  where = os.path.join(workdir, checkpoint.SPEC_FILE)
  if not os.path.exists(where):
    return
  try:
    old = checkpoint.read_spec(workdir)
  except checkpoint.CheckpointError as e:
    old, where = checkpointed_spec(workdir)
    if old is None:
      return  # no checkpoint either: nothing to resume, nothing to judge by
    log.warning("%s; the model is judged by %s", e, where)
  differ = [f.name for f in dataclasses.fields(spec) if f.name not in models.ARITHMETIC_FIELDS
            and getattr(old, f.name) != getattr(spec, f.name)]
  if differ:
    shown = ", ".join(f"{k}: {getattr(old, k)!r} there, {getattr(spec, k)!r} requested"
                      for k in differ[:4])
    raise ConfigError(f"workdir {workdir} holds a run of another model ({shown}; recorded "
                      f"in {where}); use a new --workdir, or the same model to resume")


def checkpointed_spec(workdir: str):
  """(ModelSpec, path) recorded in the newest checkpoint's meta item, or (None, None)."""
  root = os.path.join(workdir, checkpoint.TRAIN_CHECKPOINTS)
  steps = sorted((int(s) for s in (os.listdir(root) if os.path.isdir(root) else [])
                  if s.isdigit()), reverse=True)
  for step in steps:
    path = os.path.join(root, str(step), "meta", "metadata")
    try:
      with open(path) as f:
        return models.ModelSpec.from_json(json.load(f)["spec"]), path
    except (OSError, ValueError, KeyError, TypeError):
      continue
  return None, None


def write_run_records(config, workdir: str, spec: models.ModelSpec) -> None:
  """The workdir's owner record (first), config.json (resolved) and model.json
  (architecture + evaluation preprocessing). Called once the run has proven it can
  continue (checked, locked, its checkpoint restored): nothing is written before."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    owner.claim(workdir, "train")
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


@dataclasses.dataclass
class Resumed:
  """The checkpoint a run resumed from: its step, and whether its sha256 record matched
  (False: it had none, and only its shapes and finiteness were checked)."""
  step: int
  verified: bool


def restore_or_start(manager, state, rt: runtime.Runtime, workdir: str, config=None):
  """(state, first step, Resumed or None): the newest intact checkpoint's, or the fresh
  state at 0. A checkpoint that does not restore, or whose state holds a NaN or infinity,
  is skipped as damaged; one without its sha256 record is said so (`restore_intact`)."""
  abstract = rt.abstract_replicated(state)

  def restore(step):
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    checkpoint.check_finite(jax.tree.map(local_copy, out["state"]),
                            os.path.join(str(manager.directory), str(step), "state"))
    return out

  found = checkpoint.restore_intact(manager, restore, log)
  if found is None:
    check_not_lost(workdir, config)
    return rt.replicate(state), 0, None
  step, restored = found
  log.info("resumed from %s at step %d", manager.directory, int(restored["meta"]["step"]))
  set_aside_damaged(manager, step, workdir)
  resumed = Resumed(int(restored["meta"]["step"]),
                    checkpoint.step_recorded(str(manager.directory), step))
  return rt.replicate(restored["state"]), resumed.step, resumed


def local_copy(x):
  """A host copy of one replica of `x` (a replicated array may span other processes)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def check_not_lost(workdir: str, config) -> None:
  """Refuses to start at step 0 in a workdir whose records say its run had checkpoints
  (they were deleted or moved): starting again would replace its metrics history."""
  digests = os.path.join(workdir, checkpoint.STEP_DIGESTS)
  recorded = sorted(int(n[:-5]) for n in (os.listdir(digests) if os.path.isdir(digests)
                                          else []) if n.endswith(".json") and n[:-5].isdigit())
  aside = os.path.join(workdir, DAMAGED_DIR)
  reached = metrics_reach(os.path.join(workdir, "metrics.jsonl"))
  every = int(getattr(config, "checkpoint_every_steps", 0) or 0)
  if recorded:  # records of checkpoints that are gone (set-aside ones take theirs along)
    said = f"{checkpoint.STEP_DIGESTS}/ records checkpoint {recorded[-1]}"
  elif os.path.isdir(aside) and os.listdir(aside):
    log.warning("%s: no checkpoint left in %s (the damaged ones are in %s): starting again "
                "at step 0", workdir, checkpoint.TRAIN_CHECKPOINTS, aside)
    return
  elif every and reached >= every:
    said = (f"metrics.jsonl reaches step {reached} (past checkpoint_every_steps={every}: "
            "a checkpoint had been saved)")
  else:
    return  # stopped before its first checkpoint: starting again is resuming
  raise checkpoint.CheckpointError(
      f"{workdir}: {said}, but {checkpoint.TRAIN_CHECKPOINTS}/ holds no checkpoint (deleted "
      "or moved?); starting again at step 0 would replace that run's metrics: put the "
      "checkpoints back, use a new --workdir, or remove metrics.jsonl, results.json and "
      f"{checkpoint.STEP_DIGESTS}/ there to start again at step 0; nothing done")


def metrics_reach(path: str) -> int:
  """The highest step in a metrics.jsonl (0 when there is none)."""
  reach = 0
  try:
    with open(path) as f:
      for line in f:
        try:
          reach = max(reach, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
          continue
  except OSError:
    return 0
  return reach


def check_space(workdir: str, state) -> None:
  """Refuses to start when the workdir's file system cannot hold one checkpoint (the
  tensors of the state and of the model item, plus Orbax's metadata): a full disk is one
  line before any work, not a failed save minutes later."""
  def size(tree):
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves), \
        len(leaves)
  # the "state" item and the "model" item (params + BN statistics), stored uncompressed,
  # plus Orbax's metadata (about 1 KiB per tensor; half of it counted: a lower bound)
  (state_bytes, n_state), (model_bytes, n_model) = size(state), size(
      (state["params"], state["batch_stats"]))
  need = state_bytes + model_bytes + 512 * (n_state + n_model)
  st = os.statvfs(workdir)
  free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
  if free < need:
    raise SaveError(f"{workdir}: its file system has {fmt_bytes(free)} free; one "
                    f"checkpoint of this run needs at least {fmt_bytes(need)}: free space "
                    "(or use another --workdir) and run the same command; nothing done")


def fmt_bytes(n: int) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def save_checkpoint(manager, state, step: int, spec: models.ModelSpec,
                    resumed: Resumed | None = None) -> None:
  """The training state, the "model" item (what restore_model reads: weights and BN
  statistics in a model directory's layout, on any topology) and the step; then the
  checksum record."""
  check_finite(state, step, manager, resumed)
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


# one mechanism for every writer of the project (checkpoint.save_model uses it too)
HoldErrors, DISK_FULL, disk_full = fileio.HoldErrors, fileio.DISK_FULL, fileio.disk_full


def check_finite(state, step, manager, resumed: Resumed | None = None):
  leaves = jax.tree.leaves(jax.tree.map(local_copy, state["params"]))
  if not all(np.isfinite(x).all() for x in leaves):
    raise diverged(manager, f"non-finite parameters at step {step}; not saved", resumed)


def diverged(manager, what: str, resumed: Resumed | None) -> TrainingDiverged:
  """The error of a run whose loss or parameters became non-finite (`what`). The
  checkpoint it resumed from is never called "the last good" when nothing was saved since:
  an unverified one (no sha256 record) is suspect and set aside, so that the rerun resumes
  from an older one; a verified one is the state as written, and the run diverges from it."""
  if resumed is None or manager.latest_step() != resumed.step:
    return TrainingDiverged(f"{what}; {kept(manager)}")
  since = f"after resuming from checkpoint {resumed.step}"
  if resumed.verified:
    return TrainingDiverged(
        f"{what}, {since} (intact: its sha256 record matches; kept in {manager.directory}): "
        "the run diverges from it and a rerun repeats this; lower config.learning_rate, or "
        f"move checkpoints/{resumed.step} aside to resume from an older step")
  workdir = os.path.dirname(os.path.abspath(str(manager.directory)))
  moved = set_aside(manager, [resumed.step], workdir)
  older = manager.latest_step()
  nxt = (f"run the same command to resume from checkpoint {older}" if older is not None
         else "run the same command to start again at step 0")
  return TrainingDiverged(
      f"{what}, {since}, which had no sha256 record ({checkpoint.STEP_DIGESTS}/"
      f"{resumed.step}.json), so its bytes were unverified: it is suspect and was moved to "
      f"{moved[0] if moved else DAMAGED_DIR}; {nxt}")


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
  set_aside(manager, [s for s in manager.all_steps() if s > good_step], workdir)


def set_aside(manager, steps, workdir: str) -> list[str]:
  """Moves checkpoints `steps` (and their sha256 records) to workdir/damaged_checkpoints/
  (process 0); returns where they went."""
  if not steps or jax.process_index() != 0:
    return []
  aside = os.path.join(workdir, DAMAGED_DIR)
  os.makedirs(aside, exist_ok=True)
  moved = []
  for step in steps:
    dest = os.path.join(aside, f"{step}-{int(time.time())}")
    os.replace(os.path.join(str(manager.directory), str(step)), dest)
    record = os.path.join(workdir, checkpoint.STEP_DIGESTS, f"{step}.json")
    if os.path.exists(record):
      os.replace(record, os.path.join(dest, "sha256.json"))
    log.warning("moved damaged checkpoint %d to %s", step, dest)
    moved.append(dest)
  manager.reload()
  return moved


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
