"""The evaluation preprocessing a model expects, as a record that travels with it.

A model trained on 32 px digits evaluated with ImageNet's 224/256 gets a tenth of its
accuracy; so `model.json` (model directories and training workdirs) and the deploy
artefact's header record the image size, crop ratio and normalisation, and evaluation
and `predict` default to them. No TensorFlow here: the deploy side imports it.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from bcdnet_jax import errors

MEAN_RGB = (0.485, 0.456, 0.406)  # ImageNet, as torchvision's Normalize in the recipe
STDDEV_RGB = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
CROP_RATIO = 224 / 256  # resize the shorter side to 256, centre-crop 224

log = logging.getLogger("bcdnet_jax")


def record(image_size: int = IMAGE_SIZE, crop_ratio: float = CROP_RATIO,
           mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB) -> dict:
  """A validated preprocessing record (JSON-serialisable)."""
  if not (isinstance(image_size, int) and image_size > 0):
    raise ValueError(f"preprocessing: image_size must be a positive integer, got "
                     f"{image_size!r}")
  if not (isinstance(crop_ratio, (int, float)) and 0 < crop_ratio <= 1):
    raise ValueError(f"preprocessing: crop_ratio must be in (0, 1], got {crop_ratio!r}")
  mean, std = [float(v) for v in mean_rgb], [float(v) for v in stddev_rgb]
  if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) \
      or min(std) <= 0:
    raise ValueError(f"preprocessing: mean_rgb/stddev_rgb must be 3 finite values, std "
                     f"positive; got {mean_rgb!r} / {stddev_rgb!r}")
  return {"image_size": int(image_size), "crop_ratio": float(crop_ratio),
          "mean_rgb": mean, "stddev_rgb": std}


DEFAULT = record()


def image_size_ok(v, recorded_allowed: bool = False) -> bool:
  """A positive integer; 0 (the model's recorded size) where a record exists."""
  return isinstance(v, int) and not isinstance(v, bool) and (
      v > 0 or (recorded_allowed and v == 0))


def crop_ratio_ok(v, recorded_allowed: bool = False) -> bool:
  """In (0, 1]; 0 (the model's recorded ratio) where a record exists."""
  return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (0 < v <= 1 or (recorded_allowed and v == 0)))


def check_preprocessing(image_size, crop_ratio, *, names=("config.image_size",
                        "config.eval_crop_ratio"), recorded_allowed: bool = False) -> None:
  """The image size and crop ratio rules of the config table, for every entry point
  (predict's --image_size / --crop_ratio too).

  Raises:
    errors.ConfigError: naming `names[0]` or `names[1]` and the valid range.
  """
  if not image_size_ok(image_size, recorded_allowed):
    raise errors.ConfigError(f"{names[0]}: must be a positive integer"
                             f"{' (0: the recorded size)' if recorded_allowed else ''}, got "
                             f"{image_size!r}")
  if not crop_ratio_ok(crop_ratio, recorded_allowed):
    raise errors.ConfigError(
        f"{names[1]}: must be in (0, 1] (224/256 resizes to 256 and crops 224)"
        f"{'; 0: the recorded ratio' if recorded_allowed else ''}, got {crop_ratio!r}")


def table(mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB) -> np.ndarray:
  """float32 [256, C]: entry [v, c] is torchvision's `ToTensor` + `Normalize` of pixel value
  v in channel c, `(float32(v) / 255 - mean[c]) / std[c]` with true IEEE float32 divisions
  on the host (NumPy's float32 `/` is IEEE division, as torch's CPU `div`)."""
  mean = np.asarray(mean_rgb, np.float32)
  std = np.asarray(stddev_rgb, np.float32)
  values = np.arange(256, dtype=np.float32)[:, None]
  return (values / np.float32(255.0) - mean) / std


def normalize(images, mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB):
  """torchvision's `ToTensor` + `Normalize(mean, std)` on uint8 NHWC images (C = len(mean)
  channels on the last axis), equal to torch's float32 `x.float().div(255).sub(mean)
  .div(std)` bit for bit.

  A lookup in `table` rather than the formula: inside a jitted step XLA turns divisions by
  constants into multiplications by reciprocals, which differ from true division on about
  500 of the 768 (value, channel) pairs (by up to 7e-7; a binary network flips a sign
  where a pre-activation sits within rounding of 0). One function for both sides: on
  `jax.Array`s inside the jitted train and eval steps (the host sends uint8, 4x fewer
  bytes) and on NumPy arrays in `predict`. Returns float32 of the input's shape; raises
  TypeError for a dtype other than uint8.
  """
  if images.dtype != np.uint8:
    raise TypeError(f"normalize: expected uint8 images, got {images.dtype}")
  lut = table(mean_rgb, stddev_rgb)
  channels = np.arange(lut.shape[1])
  if isinstance(images, np.ndarray):
    return lut[images.astype(np.intp), channels]
  import jax.numpy as jnp
  return jnp.asarray(lut)[images.astype(jnp.int32), jnp.asarray(channels)]


def from_config(config) -> dict:
  """The record of a training config (image_size, eval_crop_ratio)."""
  return record(int(config.image_size), float(config.eval_crop_ratio))


def resolve(recorded: dict | None, *, image_size: int = 0, crop_ratio: float = 0.0,
            where: str = "the model") -> dict:
  """The model's record (ImageNet's when none was recorded), with each non-zero override
  applied; an override that differs from the record is allowed and logged."""
  rec = record(**recorded) if recorded else dict(DEFAULT)
  for key, value in (("image_size", image_size), ("crop_ratio", crop_ratio)):
    if value and value != rec[key]:
      log.warning("%s=%s overrides %s's recorded %s=%s", key, value, where, key, rec[key])
      rec[key] = type(rec[key])(value)
  return record(**rec)
