"""Orbax checkpoints of a model's state with its architecture recorded beside the weights.

A model directory holds `model.json` (the `ModelSpec`, so no flags are needed to rebuild
it; the evaluation preprocessing; the sha256 of every file of the state) and `state/`
(an Orbax checkpoint of `nnx.state(model)`: parameters and BN statistics). It is written
into a temporary sibling and renamed into place, so a killed write never leaves a
half-written directory and an existing one is never overwritten. Restoring verifies the
checksums and that every value is finite, naming the damaged file or tensor.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bcdnet_jax import errors, fileio, preprocessing, runtime
from bcdnet_jax.nn import models

SPEC_FILE = "model.json"
STATE_DIR = "state"
TRAIN_CHECKPOINTS = "checkpoints"  # a training workdir's Orbax CheckpointManager
TRAIN_ITEMS = ("state", "model", "meta")  # its items: train state, model weights, step
FORMAT_VERSION = 1


class CheckpointError(errors.UserError):
  """A model directory that cannot be written or read; the message says why."""


def file_digests(root: str) -> dict[str, str]:
  """sha256 of every file under `root`, keyed by the path relative to it."""
  out = {}
  for d, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(d, name)
      out[os.path.relpath(path, root)] = file_digests_one(path)
  return out


def verify_digests(root: str, expected: dict[str, str]) -> None:
  """Raises CheckpointError naming the first file under `root` that is missing or whose
  content changed since `expected` was taken."""
  for rel, digest in sorted(expected.items()):
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    if file_digests_one(path) != digest:
      raise CheckpointError(f"{path}: corrupted (its sha256 differs from the one recorded "
                            "when it was written)")


def file_digests_one(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def check_finite(tree, where: str) -> None:
  """Raises CheckpointError naming the first tensor of `tree` with a NaN or infinity."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(leaf)
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
      bad = int(np.sum(~np.isfinite(x)))
      raise CheckpointError(f"{where}: tensor {jax.tree_util.keystr(path)} has {bad} "
                            f"non-finite value(s) (NaN or infinity)")


def save_model(model: nnx.Module, directory: str, *, extra: dict | None = None,
               preprocess: dict | None = None) -> str:
  """Writes `model` to the new directory `directory` (which must not exist or be empty).

  `preprocess` is the evaluation preprocessing the model expects (`preprocessing.record`;
  ImageNet's 224 / 0.875 by default).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise CheckpointError(f"{directory}: already exists and is not an empty directory; "
                          "refusing to overwrite it")
  state = nnx.to_pure_dict(nnx.state(model))
  check_finite(state, f"{directory}: refusing to save")
  check_space(directory, state)
  import logging
  held = fileio.HoldErrors()  # orbax logs each failed writer thread with its traceback
  absl_log = logging.getLogger("absl")
  absl_log.addFilter(held)
  try:
    with fileio.new_directory(directory) as tmp:
      ckptr = ocp.StandardCheckpointer()
      ckptr.save(os.path.join(tmp, STATE_DIR), state)
      ckptr.wait_until_finished()
      meta = {"format_version": FORMAT_VERSION, "spec": model.spec.to_json(),
              "preprocessing": preprocessing.record(**preprocess) if preprocess
              else dict(preprocessing.DEFAULT),
              "state_sha256": file_digests(os.path.join(tmp, STATE_DIR))}
      if extra:
        meta.update(extra)
      with open(os.path.join(tmp, SPEC_FILE), "w") as f:
        json.dump(meta, f, indent=2)
  except Exception as e:  # noqa: BLE001 - orbax wraps the OSError of its writer threads
    full = fileio.disk_full(e)
    if full is None:
      held.release(absl_log)  # not ours to summarise: everything orbax said, then the error
      raise
    raise CheckpointError(f"{directory}: cannot write the model directory there ({full}); "
                          "nothing written (the partial copy is removed)") from None
  finally:
    absl_log.removeFilter(held)
  held.release(absl_log)
  return directory


def check_space(directory: str, state) -> None:
  """Raises CheckpointError when the file system of `directory` has less free space than
  the model directory needs: the raw tensor bytes plus Orbax's metadata (measured ~600
  bytes per tensor; 2 KiB allowed) and 64 KiB. Checked before writing because a save that
  runs out of space leaves Orbax's writer threads printing tracebacks at exit."""
  import shutil
  leaves = jax.tree_util.tree_leaves(state)
  need = sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in leaves)
  need += 2048 * len(leaves) + 65536
  parent = os.path.dirname(directory)
  while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
    parent = os.path.dirname(parent)
  try:
    free = shutil.disk_usage(parent).free
  except OSError:
    return  # the write itself will say what is wrong
  if free < need:
    raise CheckpointError(f"{directory}: not enough space there (No space left on device: "
                          f"the model directory needs about {need / 1e6:.2f} MB, "
                          f"{free / 1e6:.2f} MB free); nothing written")


def read_meta(directory: str) -> dict:
  """`model.json` of a model directory or training workdir."""
  path = os.path.join(directory, SPEC_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such model directory")
  if not os.path.exists(path):
    inside = model_dirs_in(directory)
    if inside:  # a pipeline's root (stage1/, stage2/) or a folder of runs
      raise CheckpointError(
          f"{directory}: not a model directory (no {SPEC_FILE}); it holds the model "
          f"directories {', '.join(inside)}: pass one, e.g. "
          f"{os.path.join(directory, inside[-1])} (a pipeline's last stage is its result)")
    raise CheckpointError(f"{directory}: not a model directory (no {SPEC_FILE}); write one "
                          "with convert_torch_ckpt.py or checkpoint.save_model")
  try:
    with open(path) as f:
      meta = json.load(f)
    meta["spec"] = models.ModelSpec.from_json(meta["spec"])
    return meta
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable architecture record: {e}") from None


def model_dirs_in(directory: str) -> list[str]:
  """The subdirectories of `directory` holding a `model.json`, in a pipeline's stage order
  when its config.json names the stages, else sorted."""
  try:
    names = sorted(n for n in os.listdir(directory)
                   if os.path.isfile(os.path.join(directory, n, SPEC_FILE)))
  except OSError:
    return []
  try:
    with open(os.path.join(directory, "config.json")) as f:
      order = list(json.load(f).get("pipeline") or {})
  except (OSError, ValueError, AttributeError, TypeError):
    order = []
  return [n for n in order if n in names] + [n for n in names if n not in order]


_STAGES = {1: "stage 1: binary activations, real-valued weights",
           2: "stage 2: binary activations and weights"}


def describe(directory: str) -> str:
  """One line saying what a model directory or training workdir holds, its stage first:
  'DIR: stage-2 mobilenet model, 1000 classes (stage 2: binary ...), converted from F
  with --stage 2 (a torch checkpoint does not record its stage)'."""
  meta = read_meta(directory)
  spec = meta["spec"]
  line = (f"{directory}: stage-{spec.stage} {spec.family} model, {spec.num_classes} classes "
          f"({_STAGES.get(spec.stage, f'stage {spec.stage}')})")
  conv = meta.get("converted_from")
  if isinstance(conv, dict) and conv.get("source"):
    line += (f", converted from {conv['source']} with --stage {conv.get('stage')} (a torch "
             "checkpoint does not record its stage: the converter was told)")
  return line


def read_spec(directory: str) -> models.ModelSpec:
  """The architecture recorded in a model directory."""
  return read_meta(directory)["spec"]


def read_preprocessing(directory: str) -> dict:
  """The evaluation preprocessing recorded with a model (ImageNet's when none was)."""
  rec = read_meta(directory).get("preprocessing")
  try:
    return preprocessing.record(**rec) if rec else dict(preprocessing.DEFAULT)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{os.path.join(directory, SPEC_FILE)}: {e}") from None


def restore_model(directory: str, rt: runtime.Runtime | None = None) -> nnx.Module:
  """Rebuilds the model saved in `directory` and loads its weights and BN statistics.

  The architecture comes from the directory's `model.json`; the weights are checked
  against their recorded sha256 where one is recorded.

  Args:
    directory: a model directory (converter output, `save_model`) or a training workdir
      (its newest intact checkpoint is used).
    rt: the device runtime to place the weights with (replicated); None: all local
      devices.

  Returns:
    The model, in training mode like any new model: call `.eval()` for inference. It
    maps normalised NHWC float32 images to float32 logits (in training mode BCDNet
    returns both heads).

  Raises:
    CheckpointError: no such directory, no `model.json` or an unreadable one, neither
      weights nor training checkpoints, a changed or missing file, weights that do not
      fit the recorded architecture, or a NaN/infinity in them.
  """
  meta = read_meta(directory)
  spec = meta["spec"]
  abstract = models.abstract_model(spec)
  graphdef, abstract_state = nnx.split(abstract)
  # Replicated on this process's devices, whatever topology wrote the checkpoint.
  target = (rt or runtime.Runtime.create()).abstract_replicated(
      nnx.to_pure_dict(abstract_state))
  state_path = os.path.join(os.path.abspath(directory), STATE_DIR)
  train_path = os.path.join(os.path.abspath(directory), TRAIN_CHECKPOINTS)
  if os.path.isdir(state_path):
    if "state_sha256" in meta:
      verify_digests(state_path, meta["state_sha256"])
    try:
      restored = ocp.StandardCheckpointer().restore(state_path, target)
    except Exception as e:  # orbax raises a variety of types for bad trees/shapes
      raise CheckpointError(f"{state_path}: cannot restore the weights for the {spec.family}"
                            f" model recorded in {SPEC_FILE}: {type(e).__name__}: {e}") from None
  elif os.path.isdir(train_path):
    restored, state_path = _restore_from_training(train_path, target)
  else:
    raise CheckpointError(f"{directory}: neither {STATE_DIR}/ (a model directory) nor "
                          f"{TRAIN_CHECKPOINTS}/ (a training workdir) is there")
  restored = _int_keys(restored, target)
  _check_shapes(target, restored, state_path)
  check_finite(restored, state_path)
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)


# --- training checkpoints: checksums and falling back to an intact step ------------------------

STEP_DIGESTS = "checkpoint_sha256"  # beside checkpoints/: <step>.json per saved step


def _digests_path(manager_dir: str, step: int) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(manager_dir)), STEP_DIGESTS,
                      f"{step}.json")


def record_step_digests(manager_dir: str, step: int) -> None:
  """Writes the sha256 of every file of training checkpoint `step` (after Orbax finished
  it) and drops the records of steps Orbax has since deleted."""
  path = _digests_path(manager_dir, step)
  fileio.write_json(path, file_digests(os.path.join(manager_dir, str(step))))
  for name in os.listdir(os.path.dirname(path)):
    stem = name[:-len(".json")]
    if name.endswith(".json") and stem.isdigit() and \
        not os.path.isdir(os.path.join(manager_dir, stem)):
      os.remove(os.path.join(os.path.dirname(path), name))


def step_problem(manager_dir: str, step: int) -> str | None:
  """Why training checkpoint `step` cannot be trusted, or None. A step saved without a
  record (an older run, or killed between Orbax's atomic rename and the record) passes."""
  path = _digests_path(manager_dir, step)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      expected = json.load(f)
    verify_digests(os.path.join(manager_dir, str(step)), expected)
  except (CheckpointError, json.JSONDecodeError, OSError) as e:
    return str(e)
  return None


def step_recorded(manager_dir: str, step: int) -> bool:
  """Whether training checkpoint `step` has its sha256 record (checked by step_problem)."""
  return os.path.exists(_digests_path(manager_dir, step))


def restore_intact(manager, restore_step, log=None):
  """(step, restore_step(step)) of the newest training checkpoint that is intact and
  restores; damaged ones are skipped and said so. A step without its sha256 record (copied
  without checkpoint_sha256/, or a kill between the save and the record) is restored only
  with a warning naming it: `restore_step` checks what can be (shapes, finiteness).
  None when there is no checkpoint."""
  steps = sorted(manager.all_steps(), reverse=True)
  problems = []
  for step in steps:
    problem = step_problem(str(manager.directory), step)
    if problem is None:
      if log is not None and not step_recorded(str(manager.directory), step):
        log.warning("checkpoint %d has no sha256 record (%s missing: copied without it, or "
                    "the run was killed between the save and the record); its bytes cannot "
                    "be verified, only its shapes and finiteness", step,
                    _digests_path(str(manager.directory), step))
      try:
        return step, restore_step(step)
      except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged files
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    problems.append(f"step {step}: {problem}")
    if log is not None:
      log.warning("checkpoint %d is damaged (%s); trying an older one", step, problem)
  if problems:
    raise CheckpointError(f"{manager.directory}: no intact checkpoint; " + "; ".join(problems))
  return None


class _DropMessage:
  """A logging filter that drops the records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    self.prefix = prefix

  def filter(self, record) -> bool:
    return not str(record.msg).startswith(self.prefix)


def _restore_from_training(path, target):
  """Params and BN statistics (the 'model' item) of a training workdir's newest intact
  step."""
  import logging
  # read_only with the options it would otherwise reset (and warn about) already off; its
  # "Given directory is read only" line is dropped: reading is all we asked for
  absl_log = logging.getLogger("absl")
  quiet = _DropMessage("Given directory is read only")
  absl_log.addFilter(quiet)
  try:
    manager = ocp.CheckpointManager(path, item_names=TRAIN_ITEMS,
                                    options=ocp.CheckpointManagerOptions(
                                        read_only=True, save_interval_steps=0, create=False,
                                        max_to_keep=None))
  finally:
    absl_log.removeFilter(quiet)
  try:
    found = restore_intact(manager, lambda step: manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target)))["model"], logging.getLogger("bcdnet_jax"))
  finally:
    manager.close()
  if found is None:
    raise CheckpointError(f"{path}: no finished checkpoint in this training workdir")
  step, model = found
  return model, os.path.join(path, str(step))


def merge_pure(a, b):
  """Deep union of two pure-dict states (e.g. parameters and BN statistics)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_pure(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def _int_keys(tree, like):
  """Orbax stores list indices as strings; give them the model's int keys back."""
  if not isinstance(tree, dict) or not isinstance(like, dict):
    return tree
  out = {}
  for k, v in tree.items():
    key = int(k) if isinstance(k, str) and k.isdigit() and int(k) in like else k
    out[key] = _int_keys(v, like.get(key, {}))
  return out


def _check_shapes(target, restored, where):
  t = jax.tree_util.tree_flatten_with_path(target)[0]
  r = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  for path, leaf in t:
    got = r.get(path)
    if got is None or tuple(np.shape(got)) != tuple(leaf.shape):
      raise CheckpointError(f"{where}: {jax.tree_util.keystr(path)} has shape "
                            f"{None if got is None else np.shape(got)}, expected {leaf.shape}")
