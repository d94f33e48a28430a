"""Orbax checkpoints of a model's state with its architecture recorded beside the weights.

A model directory holds `model.json` (the `ModelSpec`, so no flags are needed to rebuild
it) and `state/` (an Orbax checkpoint of `nnx.state(model)`: parameters and BN
statistics). It is written into a temporary sibling and renamed into place, so a killed
write never leaves a half-written directory and an existing one is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bcdnet_jax import models

SPEC_FILE = "model.json"
STATE_DIR = "state"
TRAIN_CHECKPOINTS = "checkpoints"  # a training workdir's Orbax CheckpointManager
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A model directory that cannot be written or read; the message says why."""


def save_model(model: nnx.Module, directory: str, *, extra: dict | None = None) -> str:
  """Writes `model` to the new directory `directory` (which must not exist or be empty)."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise CheckpointError(f"{directory}: already exists and is not an empty directory; "
                          "refusing to overwrite it")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    state = nnx.to_pure_dict(nnx.state(model))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, STATE_DIR), state)
    ckptr.wait_until_finished()
    meta = {"format_version": FORMAT_VERSION, "spec": model.spec.to_json()}
    if extra:
      meta.update(extra)
    with open(os.path.join(tmp, SPEC_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.isdir(directory):
      os.rmdir(directory)  # empty, checked above
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def read_spec(directory: str) -> models.ModelSpec:
  """The architecture recorded in a model directory."""
  path = os.path.join(directory, SPEC_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such model directory")
  if not os.path.exists(path):
    raise CheckpointError(f"{directory}: not a model directory (no {SPEC_FILE}); write one "
                          "with convert_torch_ckpt.py or checkpoint.save_model")
  try:
    with open(path) as f:
      meta = json.load(f)
    return models.ModelSpec.from_json(meta["spec"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable architecture record: {e}") from None


def restore_model(directory: str) -> nnx.Module:
  """Rebuilds the model saved in `directory` and loads its weights and BN statistics.

  `directory` is a model directory (converter output) or a training workdir (the
  latest checkpoint is used).
  Returned in training mode like any new model; call `.eval()` for inference.
  """
  spec = read_spec(directory)
  abstract = models.abstract_model(spec)
  graphdef, abstract_state = nnx.split(abstract)
  # Replicated on this process's devices, whatever topology wrote the checkpoint.
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.devices()), ("data",)), jax.sharding.PartitionSpec())
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      nnx.to_pure_dict(abstract_state))
  state_path = os.path.join(os.path.abspath(directory), STATE_DIR)
  train_path = os.path.join(os.path.abspath(directory), TRAIN_CHECKPOINTS)
  if os.path.isdir(state_path):
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
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)


def _restore_from_training(path, target):
  """Params and BN statistics (the 'model' item) of a training workdir's latest step."""
  manager = ocp.CheckpointManager(path, item_names=("state", "model", "meta"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise CheckpointError(f"{path}: no finished checkpoint in this training workdir")
  try:
    raw = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target)))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{path}: cannot read the model of checkpoint {step}: "
                          f"{type(e).__name__}: {e}") from None
  finally:
    manager.close()
  return raw["model"], os.path.join(path, str(step))


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
