"""Everything a training run checks and decides before anything is written or compiled:
the config, the data sources, the model spec, the workdir's model, `init_from`, the teacher."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

from flax import nnx

from bcdnet_jax import checkpoint, data, runtime
from bcdnet_jax.nn import models
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train import owner
from bcdnet_jax.train import workdir as workdir_lib
from bcdnet_jax.train.config import ConfigError


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


def data_config(config):
  """The data pipeline's view of a config (`data.DataConfig`)."""
  return data.DataConfig(
      image_size=config.image_size, eval_crop_ratio=config.eval_crop_ratio,
      color_jitter=tuple(config.color_jitter), crop_scale=tuple(config.crop_scale),
      random_flip=config.random_flip, seed=config.seed, workers=config.data_workers,
      max_image_pixels=config.get("max_image_pixels", 0))


def resolve_num_classes(config, source) -> int:
  n = source.num_classes
  if config.model.num_classes and config.model.num_classes != n:
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} but dataset "
                      f"{config.dataset!r} has {n} classes")
  return n


def model_spec(config, num_classes):
  try:
    overrides = models.config_overrides(config.model.name, dict(config.model.overrides))
    overrides.setdefault("compute_dtype", config.model.compute_dtype)
    overrides.setdefault("dtype_policy", config.model.dtype_policy)
    return models.get_spec(config.model.name, stage=config.model.stage,
                           num_classes=num_classes, **overrides)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None


@dataclasses.dataclass
class Plan:
  """What a training run needs, checked before anything is written or compiled."""
  train_source: Any  # data.Source of config.train_split
  eval_source: Any  # data.Source of config.eval_split
  spec: models.ModelSpec
  total_steps: int
  init_params: Any = None
  teacher: Any = None


@contextlib.contextmanager
def naming(field: str):
  """Prefixes a model directory's error (missing, not a model directory, damaged) with the
  config field that named the directory."""
  try:
    yield
  except checkpoint.CheckpointError as e:
    raise type(e)(f"{field}: {e}") from None


def plan_run(config, workdir: str, rt: runtime.Runtime) -> Plan:
  """Validates the config, data, model, workdir, init_from and teacher; writes nothing."""
  config_lib.validate(config, rt.size)
  config_lib.check_workdir(workdir)
  owner.check_owner(workdir, "train")
  data_dir = config.data_dir or None
  data.set_max_image_pixels(config.get("max_image_pixels", 0))  # the scans and checks below
  train_source = data.open_source(config.dataset, config.train_split, data_dir)
  eval_source = data.open_source(config.dataset, config.eval_split, data_dir)
  for source in (train_source, eval_source):  # an unlabelled split (-1) trains silently
    data.check_labels(source)
  if train_source.multi_label:
    raise ConfigError(f"config.dataset: {config.dataset!r} has label sets (ReaL), not one "
                      "class per image; train on imagenet2012 and evaluate on it")
  num_classes = resolve_num_classes(config, train_source)
  spec = model_spec(config, num_classes)
  config_lib.check_image_size(spec, config.image_size)
  workdir_lib.check_model(workdir, spec)
  threads = data.default_workers() + 1
  if config.dataset.startswith("folder:") or config.check_images:
    # A bad validation image would only show after training: look before.
    data.check_images(eval_source, threads=threads)
  if config.check_images:
    data.check_images(train_source, threads=threads)
  steps_per_epoch = max(1, len(train_source) // config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  plan = Plan(train_source, eval_source, spec, total_steps)
  if config.init_from and not config_lib.is_none(config.init_from):
    with naming("config.init_from"):
      plan.init_params = load_init_from(config.init_from, spec)
  if not config_lib.is_none(config.teacher_dir):
    # the teacher computes under the student's policy (its activations dominate the step)
    with naming("config.teacher_dir"):
      check_teacher(config.teacher_dir)
      plan.teacher = models.set_dtype_policy(
          checkpoint.restore_model(config.teacher_dir, rt), plan.spec.dtype_policy)
    if plan.teacher.spec.num_classes != num_classes:
      raise ConfigError(f"config.teacher_dir: teacher has {plan.teacher.spec.num_classes} "
                        f"classes, the dataset {num_classes}")
  return plan


def check_teacher(path: str) -> None:
  """Refuses a `teacher_dir` that does not hold a real-valued ResNet-50 (the released KD
  teacher), from its model.json alone: a BCDNet there would fail inside the step with a
  shape error after compilation."""
  spec = checkpoint.read_spec(path)
  if spec.family != "resnet50":
    kind = f"{spec.builder} (a custom model)" if spec.family == "custom" else (
        f"a stage-{spec.stage} {spec.family} model")
    raise ConfigError(
        f"config.teacher_dir: {path} holds {kind}, not the ResNet-50 teacher; convert "
        "torchvision's weights with python -m bcdnet_jax convert --torch_ckpt "
        "resnet50-19c8e357.pth --arch resnet50 --out runs/ckpt/resnet50")
