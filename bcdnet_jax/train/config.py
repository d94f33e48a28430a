"""Every configuration field checked by type and range from one table, before any work.

`FIELDS` has one line per field of `configs/default.py` (`tests/test_config.py` fails when a
field has no line). `validate` applies it, then the rules that join fields (batch and
devices, steps or epochs, the recipe's teacher and stage-1 start), and raises `ConfigError`
naming `config.<field>`: main.py prints it as one line `error: ...` with exit code 2, before
anything is compiled or written. The image size and crop ratio rules are shared with
evaluation and `predict` (`check_preprocessing`, `check_image_size`).
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from typing import Any, Callable

from bcdnet_jax import errors, preprocessing

MODES = ("train", "eval")
NONE = "none"  # teacher_dir / init_from: explicitly without (a deviation from the recipe)
TEACHER_COMMAND = ("python convert_torch_ckpt.py --torch_ckpt resnet50-19c8e357.pth "
                   "--arch resnet50 --out runs/ckpt/resnet50")


ConfigError = errors.ConfigError  # the error type of every check here

# --- value kinds ----------------------------------------------------------------------------

def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str(v) -> bool:
  return isinstance(v, str)


def _name(v) -> bool:
  return isinstance(v, str) and bool(v.strip())


def _mapping(v) -> bool:
  return hasattr(v, "keys") and hasattr(v, "items")


def _seq(v, n) -> bool:
  return isinstance(v, (tuple, list)) and len(v) == n and all(_num(x) for x in v)


def _eval_mode(c) -> bool:
  return c.get("mode") == "eval"


def _in(choices) -> Callable[[Any, Any], bool]:
  return lambda v, c: v in choices


image_size_ok = preprocessing.image_size_ok
crop_ratio_ok = preprocessing.crop_ratio_ok
check_preprocessing = preprocessing.check_preprocessing


def _models():
  from bcdnet_jax.nn import models  # jax: only when a config is checked
  return models


# field -> (is the value valid (value, whole config), what a valid value is)
FIELDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "model.name": (lambda v, c: v in _models().PRESETS or _models().is_custom_name(v),
                   "a model name of models.PRESETS, a registered name or module:function"),
    "model.stage": (_in((1, 2)), "1 or 2"),
    "model.num_classes": (lambda v, c: _int(v) and v >= 0, "an integer >= 0 (0: the data set's)"),
    "model.overrides": (lambda v, c: _mapping(v), "a mapping of ModelSpec fields"),
    "model.compute_dtype": (lambda v, c: v in _models().COMPUTE_DTYPES,
                            "one of models.COMPUTE_DTYPES"),
    "model.dtype_policy": (lambda v, c: v in _models().DTYPE_POLICIES,
                           "one of models.DTYPE_POLICIES"),
    "dataset": (lambda v, c: _name(v), "a data set name (TFDS name, digits, folder:PATH)"),
    "data_dir": (lambda v, c: _str(v), "a directory path, or '' for TFDS' default"),
    "train_split": (lambda v, c: _name(v), "a split name"),
    "eval_split": (lambda v, c: _name(v), "a split name"),
    "image_size": (lambda v, c: image_size_ok(v, _eval_mode(c)),
                   "a positive integer (0 in evaluation mode: the model's recorded size)"),
    "eval_crop_ratio": (lambda v, c: crop_ratio_ok(v, _eval_mode(c)),
                        "in (0, 1], 224/256 resizes to 256 and crops 224 (0 in evaluation "
                        "mode: the model's recorded ratio)"),
    "color_jitter": (lambda v, c: _seq(v, 4) and min(v) >= 0 and v[3] <= 0.5,
                     "(brightness, contrast, saturation, hue), each >= 0, hue <= 0.5"),
    "crop_scale": (lambda v, c: _seq(v, 2) and 0 < v[0] <= v[1] <= 1,
                   "(min, max) area fractions with 0 < min <= max <= 1"),
    "random_flip": (lambda v, c: isinstance(v, bool), "True or False"),
    "check_images": (lambda v, c: isinstance(v, bool), "True or False"),
    "data_workers": (lambda v, c: _int(v) and v >= 0,
                     "an integer >= 0 (input threads per process; 0: all cores but one)"),
    "max_image_pixels": (lambda v, c: _int(v) and v >= 0,
                         "an integer >= 0 (images over it are refused; 0: PIL's limit, "
                         "178,956,970)"),
    "batch_size": (lambda v, c: _int(v) and v > 0, "a positive integer (the global batch)"),
    "eval_batch_size": (lambda v, c: _int(v) and v > 0, "a positive integer"),
    "base_batch_size": (lambda v, c: _int(v) and v > 0,
                        "a positive integer (the batch learning_rate is given for)"),
    "num_train_steps": (lambda v, c: _int(v) and v >= 0, "an integer >= 0 (0: num_epochs)"),
    "num_epochs": (lambda v, c: _num(v) and v >= 0, "a number >= 0"),
    "learning_rate": (lambda v, c: _num(v) and v > 0, "a positive number"),
    "warmup_steps": (lambda v, c: _int(v) and v >= 0, "an integer >= 0"),
    "warmup_init_lr": (lambda v, c: _num(v) and v >= 0, "a number >= 0"),
    "weight_decay": (lambda v, c: _num(v) and v >= 0, "a number >= 0"),
    "adam_b1": (lambda v, c: _num(v) and 0 <= v < 1, "in [0, 1)"),
    "adam_b2": (lambda v, c: _num(v) and 0 <= v < 1, "in [0, 1)"),
    "adam_eps": (lambda v, c: _num(v) and v > 0, "a positive number"),
    "label_smoothing": (lambda v, c: _num(v) and 0 <= v < 1, "in [0, 1)"),
    "teacher_dir": (lambda v, c: _str(v), f"a model directory, or '{NONE}'"),
    "init_from": (lambda v, c: _str(v), f"a model directory or workdir, or '{NONE}'"),
    "checkpoint": (lambda v, c: _str(v), "a model directory or training workdir"),
    "mode": (_in(MODES), f"one of {MODES}"),
    "eval_datasets": (lambda v, c: _str(v), "comma-separated TFDS names[:split]"),
    "pipeline": (lambda v, c: _mapping(v) and all(_mapping(s) for s in v.values()),
                 "a mapping of stage names to field overrides"),
    "seed": (lambda v, c: _int(v) and 0 <= v < 2**31, "an integer in [0, 2**31)"),
    "log_every_steps": (lambda v, c: _int(v) and v >= 0, "an integer >= 0 (0: never)"),
    "eval_every_steps": (lambda v, c: _int(v) and v >= 0, "an integer >= 0 (0: at the end)"),
    "checkpoint_every_steps": (lambda v, c: _int(v) and v >= 0,
                               "an integer >= 0 (0: at the end and when stopped)"),
    "keep_checkpoints": (lambda v, c: _int(v) and v >= 1,
                         "an integer >= 1 (the newest checkpoint is the trained model)"),
    "diagnostics_every_steps": (lambda v, c: _int(v) and v >= -1,
                                "an integer >= -1 (-1: every log step, 0: off)"),
    "diagnostics_warn_after": (lambda v, c: _int(v) and v >= 1,
                               "an integer >= 1 (diagnostics steps in a row)"),
    "diagnostics_flip_min": (lambda v, c: _num(v) and 0 <= v <= 1, "in [0, 1]"),
    "diagnostics_flip_max": (lambda v, c: _num(v) and 0 <= v <= 1, "in [0, 1]"),
    "diagnostics_sign_balance": (lambda v, c: _seq(v, 2) and 0 <= v[0] < v[1] <= 1,
                                 "(low, high) fractions of +1 with 0 <= low < high <= 1"),
}


def leaves(config, prefix: str = "") -> dict[str, Any]:
  """field -> value of every field of `config`; `model.overrides` and `pipeline` (free
  mappings) count as one field each."""
  out = {}
  for k, v in config.items():
    key = prefix + k
    if _mapping(v) and key not in ("model.overrides", "pipeline"):
      out.update(leaves(v, key + "."))
    else:
      out[key] = v
  return out


def _short(v) -> str:
  if hasattr(v, "to_dict"):  # a ConfigDict's repr is multi-line YAML
    v = v.to_dict()
  text = " ".join(repr(v).split())
  return text if len(text) <= 80 else text[:77] + "..."


def check_complete(config, source: str = "the config") -> None:
  """The config is an `ml_collections.ConfigDict` with every field of the table: a config
  file written from scratch (a plain dict, or without `mode`) would otherwise fail far
  into the run on the first field read. `source` names it (main.py: '--config=FILE')."""
  import ml_collections
  if not isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    raise ConfigError(f"{source}: get_config() returns a {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; start from configs/default.py "
                      "(c = default.get_config(), then set fields) as configs/digits.py does")
  present = leaves(config)
  missing = [k for k in FIELDS if k not in present]
  if missing:
    more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}" + (
        ", ...)" if len(missing) > 4 else ")") if len(missing) > 1 else ""
    raise ConfigError(f"{source}: config.{missing[0]} is missing{more}; start from "
                      "configs/default.py (c = default.get_config(), then set fields), which "
                      "has every field")


def check_fields(config, source: str = "the config") -> None:
  """Every field by the table: present (`check_complete`), known, of its type, in its
  range."""
  check_complete(config, source)
  for key, value in leaves(config).items():
    if key not in FIELDS:
      raise ConfigError(f"config.{key}: unknown field (see configs/default.py)")
    ok, rule = FIELDS[key]
    if not ok(value, config):
      raise ConfigError(f"config.{key}: must be {rule}, got {_short(value)}")
  for stage, overrides in config.get("pipeline", {}).items():
    for key in leaves(overrides):
      if key not in FIELDS:
        raise ConfigError(f"config.pipeline.{stage}.{key}: unknown field")


def _check_strides(config) -> None:
  """A basic-block model has one stride per block after the stem: len(channels) - 1. A
  config that sets both (configs/digits.py) and a command line that changes one of them
  would otherwise fail inside the model spec without naming the relation."""
  ov = config.model.overrides
  preset = _models().PRESETS.get(config.model.name, {})
  if "channels" not in ov or "strides" not in ov or preset.get("family") != "mobilenet":
    return
  channels, strides = tuple(ov.channels), tuple(ov.strides)
  if len(strides) != len(channels) - 1:
    blocks = len(channels) - 1
    example = "(" + ",".join(["2"] * blocks) + ("," if blocks == 1 else "") + ")"
    raise ConfigError(
        f"config.model.overrides: channels={channels} make {blocks} block(s) after the "
        f"stem, but strides={strides} has {len(strides)} value(s); strides needs one value "
        f"(1 or 2) per block, len(channels) - 1: set both, e.g. "
        f"'--config.model.overrides.strides={example}'")


def validate(config, num_devices: int = 1) -> None:
  """The table, then the rules between fields of a run of `config.mode`."""
  check_fields(config)
  _check_strides(config)
  if config.mode == "train" and config.batch_size % num_devices:
    raise ConfigError(f"config.batch_size: {config.batch_size} is not divisible by the "
                      f"{num_devices} devices")
  if config.eval_batch_size % num_devices:
    raise ConfigError(f"config.eval_batch_size: {config.eval_batch_size} is not divisible "
                      f"by the {num_devices} devices")
  if config.mode != "train":
    return
  if not (config.num_train_steps > 0 or config.num_epochs > 0):
    raise ConfigError("config.num_train_steps: set num_train_steps > 0 or num_epochs > 0")
  if not config.teacher_dir:
    raise ConfigError(
        "config.teacher_dir: the released recipe distils from a ResNet-50 teacher; convert "
        f"it once ({TEACHER_COMMAND}) and add --config.teacher_dir=runs/ckpt/resnet50, or set "
        f"--config.teacher_dir={NONE} to train without distillation (recorded as a "
        "deviation from the recipe)")
  if config.model.stage == 2 and not config.init_from:
    raise ConfigError(
        "config.init_from: stage 2 of the released recipe starts from the stage-1 run; add "
        "--config.init_from=runs/stage1 (its workdir or a model directory), or set "
        f"--config.init_from={NONE} to start from fresh weights (recorded as a deviation)")


def is_none(value: str) -> bool:
  """Whether teacher_dir / init_from say explicitly 'without'."""
  return str(value).strip().lower() == NONE


def deviations(config) -> list[str]:
  """The ways a training config leaves the released recipe on purpose (config.json)."""
  out = []
  if is_none(config.teacher_dir):
    out.append(f"teacher_dir={NONE}: no distillation; the second head (of a one-head "
               "model, its only one) learns from the labels (label-smoothed CE) instead of "
               "from the ResNet-50 teacher")
  if config.model.stage == 2 and is_none(config.init_from):
    out.append(f"init_from={NONE}: stage 2 starts from fresh weights instead of the "
               "stage-1 run")
  return out


# --- shared by every entry point ------------------------------------------------------------

def check_image_size(spec, image_size: int, name: str = "config.image_size") -> None:
  """`models.check_image_size` (jax is imported only when a config is checked)."""
  _models().check_image_size(spec, image_size, name)


def _probe_write(directory: str) -> None:
  """Creates and removes a file in `directory` (os.access is True for root on a read-only
  mount's mode bits, and says nothing of a full disk)."""
  fd, path = tempfile.mkstemp(prefix=".write-check-", dir=directory)
  os.close(fd)
  os.remove(path)


def check_workdir(workdir: str, name: str = "--workdir") -> None:
  """The workdir is a writable directory, or can be created: checked before any work, so
  a file or a read-only mount is one line instead of a traceback after the run."""
  if not workdir:
    raise ConfigError(f"{name}: empty path")
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.isdir(probe):
    if os.path.islink(probe) and not os.path.exists(probe):
      raise ConfigError(f"{name}={workdir}: {probe} is a dangling symlink to "
                        f"{os.readlink(probe)} (which does not exist); create that directory "
                        "or remove the link; nothing done")
    if os.path.lexists(probe):
      raise ConfigError(f"{name}={workdir}: {probe} is a file, not a directory; nothing done")
    probe = os.path.dirname(probe)
  try:
    _probe_write(probe)
  except OSError as e:
    why = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.ENOSPC: "no space left"}.get(e.errno, e.strerror or str(e))
    raise ConfigError(f"{name}={workdir}: cannot write in {probe} ({why}); nothing "
                      "done") from None


def environment() -> dict:
  """The versions and hardware a result was measured with (results.json): numbers of
  binary networks move with the compiler's float rounding, so they travel together."""
  import importlib.metadata
  import platform

  import jax
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow",
              "tensorflow-cpu", "grain"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  out["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  try:
    with open("/proc/cpuinfo") as f:
      out["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
  except (OSError, StopIteration):
    out["cpu"] = platform.processor() or platform.machine()
  out["cpu_count"] = os.cpu_count()
  return out
