"""Top-5 ImageNet classes of image files from a deploy artefact (`bcdnet_jax.deploy.export`).

Images get the evaluation preprocessing of training (`data.transforms.eval_transform`: PIL,
shorter side to 256, centre crop 224; then `preprocessing.normalize`), so predictions are
those the evaluation measures.

    python -m bcdnet_jax predict --model model.bcdnet image.jpg [more.png ...]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys

import numpy as np

from bcdnet_jax import errors
from bcdnet_jax import log as log_lib

log = log_lib.logger


class PredictError(errors.UserError):
  """An image that cannot be read or decoded; the message names the file."""


def class_names(num_classes: int) -> list[str]:
  """ImageNet-1k names for 1000 classes; 'class <i>' for any other label set."""
  if num_classes == 1000:
    text = importlib.resources.files("bcdnet_jax").joinpath("imagenet_classes.txt")
    names = text.read_text().splitlines()
    if len(names) == 1000:
      return names
  return [f"class {i}" for i in range(num_classes)]


MAX_IMAGE_SIZE = 4096  # px: the model's input side (--image_size)
MAX_RESIZE = 2 * MAX_IMAGE_SIZE  # px: the shorter side before the crop (size / crop ratio)


def load_image(path: str, pre: dict) -> np.ndarray:
  """One image file decoded and preprocessed (`load_images`, unnormalised). Raises
  `PredictError` naming the file."""
  import os

  from bcdnet_jax.data import transforms
  if "://" in path:
    raise PredictError(f"{path}: a URL; download the image and pass the file")
  if os.path.isdir(path):
    raise PredictError(f"{path}: a directory; pass image files (e.g. "
                       f"{os.path.join(path, '*.jpg')})")
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise PredictError(f"{path}: cannot read the image file ({e.strerror})") from None
  try:
    return transforms.eval_transform(raw, image_size=pre["image_size"],
                                     crop_ratio=pre["crop_ratio"], name=path)
  except transforms.ImageDecodeError as e:
    why = getattr(e, "reason", None) or str(e).removeprefix(f"cannot decode image {path}: ")
    raise PredictError(f"{path}: not a decodable image: {why}") from None


def load_images(paths: list[str], pre: dict) -> np.ndarray:
  """Decodes and preprocesses image files into a normalised NHWC float32 batch with the
  model's preprocessing `pre` (`preprocessing.record`): `transforms.eval_transform` (PIL:
  shorter side to image_size / crop_ratio, centre crop) and `preprocessing.normalize` (the
  formula of the evaluation step). Raises `PredictError` naming the first bad file."""
  from bcdnet_jax import preprocessing
  out = [load_image(path, pre) for path in paths]
  return preprocessing.normalize(np.stack(out), pre["mean_rgb"], pre["stddev_rgb"])


def check_sizes(pre: dict, image_size_flag: int, crop_ratio_flag: float, model: str) -> None:
  """Raises PredictError when the input side or the resize before the crop is beyond
  `MAX_IMAGE_SIZE` / `MAX_RESIZE` px (PIL would try to allocate gigabytes)."""
  size, ratio = pre["image_size"], pre["crop_ratio"]
  where = "--image_size" if image_size_flag else f"the image size recorded in {model}"
  if size > MAX_IMAGE_SIZE:
    raise PredictError(f"{where}: {size} px is over the limit of {MAX_IMAGE_SIZE} px")
  if size / ratio > MAX_RESIZE:
    where = "--crop_ratio" if crop_ratio_flag else f"the crop ratio recorded in {model}"
    raise PredictError(f"{where}: {ratio} resizes to {round(size / ratio)} px before the "
                       f"{size} px crop, over the limit of {MAX_RESIZE} px")


def warn_small_images(paths: list[str], image_size: int) -> list[str]:
  """One warning line on stderr per image whose shorter side is under a quarter of the
  model's input size (e.g. 1x1 px for 224 px): its prediction says little. Files PIL cannot
  open are left to the decoder's error. Returns the warnings."""
  from PIL import Image
  out = []
  for path in paths:
    try:
      with Image.open(path) as im:
        w, h = im.size
    except Exception:  # noqa: BLE001 - not an image, or unreadable: load_images names it
      continue
    if 4 * min(w, h) < image_size:
      out.append(f"warning: {path} is {w}x{h} px, far below the model's {image_size} px "
                 "input: it is upscaled, and the prediction says little")
      print(out[-1], file=sys.stderr)
  return out


def predict(model, images: np.ndarray, *, path: str = "packed", k: int = 5):
  """(top-k indices, top-k probabilities) per image."""
  import jax
  logits = np.asarray(model(images, path=path))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  top = np.argsort(-probs, axis=-1)[:, :k]
  return top, np.take_along_axis(probs, top, axis=-1)


def model_preprocessing(header: dict, model: str, image_size: int, crop_ratio: float) -> dict:
  """The preprocessing to apply: the artefact's record with the flags' overrides. An
  artefact that records none (exported from a model directory without the record) needs
  --image_size: ImageNet's 224 px for a model trained on 32 px digits would give wrong
  predictions without a word, so none is guessed; the ImageNet crop ratio and
  normalisation it then uses are said in one line."""
  from bcdnet_jax import preprocessing
  from bcdnet_jax.nn import models
  rec = header.get("preprocess")
  if not rec and not image_size:
    raise PredictError(f"{model} records no preprocessing (the image size and crop ratio "
                       "the model expects): pass --image_size (224 for the ImageNet models; "
                       f"--crop_ratio defaults to {preprocessing.CROP_RATIO:g})")
  rec = rec or {"crop_ratio": preprocessing.CROP_RATIO}
  # every check before the override is logged: a refused run prints one line
  pre = {"image_size": image_size or rec["image_size"],
         "crop_ratio": crop_ratio or rec["crop_ratio"]}
  check_sizes(pre, image_size, crop_ratio, model)
  models.check_image_size(models.ModelSpec.from_json(header["spec"]), pre["image_size"],
                          "--image_size" if image_size
                          else f"the image size recorded in {model}")
  if header.get("preprocess"):
    return preprocessing.resolve(header["preprocess"], image_size=image_size,
                                 crop_ratio=crop_ratio, where=model)
  pre = preprocessing.record(image_size, pre["crop_ratio"])
  log.warning("%s records no preprocessing: using --image_size %d, crop ratio %g and "
              "ImageNet's mean and standard deviation", model, image_size, pre["crop_ratio"])
  return pre


def main(argv=None) -> int:
  log_lib.setup()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="deploy artefact (bcdnet_jax.deploy.export)")
  p.add_argument("--path", default="packed", choices=["packed", "int8", "float"])
  p.add_argument("--top", type=int, default=5, help="classes to show (1 or more)")
  p.add_argument("--image_size", type=int, default=0,
                 help="override the model's recorded image size (logged)")
  p.add_argument("--crop_ratio", type=float, default=0.0,
                 help="override the model's recorded crop ratio (logged)")
  p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
  p.add_argument("images", nargs="+")
  a = p.parse_args(argv)
  if a.top < 1:
    p.error(f"--top must be 1 or more, got {a.top}")
  from bcdnet_jax import preprocessing
  from bcdnet_jax.deploy import packed
  try:
    # the rules of training and evaluation, before the model is loaded or compiled
    preprocessing.check_preprocessing(a.image_size, a.crop_ratio,
                                      names=("--image_size", "--crop_ratio"),
                                      recorded_allowed=True)
    if a.image_size > MAX_IMAGE_SIZE:
      raise PredictError(f"--image_size: at most {MAX_IMAGE_SIZE} px, got {a.image_size}")
    model = packed.load_packed(a.model)
    pre = model_preprocessing(model.header, a.model, a.image_size, a.crop_ratio)
    warn_small_images(a.images, pre["image_size"])
    good, loaded, failed = [], [], []
    for path in a.images:  # a bad image does not cost the good ones their predictions
      try:
        loaded.append(load_image(path, pre))
        good.append(path)
      except PredictError as e:
        failed.append(e)
    if good:
      images = preprocessing.normalize(np.stack(loaded), pre["mean_rgb"], pre["stddev_rgb"])
      top, probs = predict(model, images, path=a.path, k=min(a.top, model.num_classes))
      if not np.all(np.isfinite(probs)):
        raise PredictError(f"{a.model}: the model gives non-finite outputs (NaN or infinity)")
  except (errors.UserError, ValueError) as e:
    return errors.report(e)
  names = class_names(model.num_classes)
  result = []
  for path, idx, pr in zip(good, top, probs) if good else ():
    preds = [{"class": int(i), "name": names[i], "prob": float(q)} for i, q in zip(idx, pr)]
    result.append({"image": path, "top": preds})
    if not a.json:
      print(path)
      for r in preds:
        print(f"  {r['prob']:6.1%}  {r['class']:4d}  {r['name']}")
  if a.json and good:
    print(json.dumps(result))
  for e in failed:
    errors.report(e)
  return errors.EXIT_USER_ERROR if failed else 0



def cli() -> None:
  """The `bcdnet-predict` console script."""
  errors.run_cli(main)


if __name__ == "__main__":
  cli()
