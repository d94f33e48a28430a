"""Synthetic ImageNet archives in the layout image-net.org ships, for TFDS' imagenet2012.

`ILSVRC2012_img_train.tar` is a tar of per-class tars (`n01440764.tar`) of JPEGs named like
`n01440764_10026.JPEG`; `ILSVRC2012_img_val.tar` holds `ILSVRC2012_val_00000001.JPEG`, ...
flat. TFDS' builder takes a training image's class from its per-class tar's name, and a
validation image's class from its position: it pairs the archive's sorted file names with
the lines of its own `validation_labels.txt` (the 50,000 true labels, in file-name order).
So a validation archive with N images must hold exactly files 1..N, whose classes are the
first N lines of that file; `make_imagenet_tars` draws each validation image for the class
TFDS will give it. Used by the tests of `bcdnet-prepare` and by `bench/end_to_end.py`.
"""

from __future__ import annotations

import io
import os
import tarfile


def imagenet_synsets() -> list[str]:
  """The 1000 WordNet ids in label order (TFDS' labels.txt: label i is line i)."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  return imagenet_common.label_names_file().read_text().split()


def validation_synsets(n: int) -> list[str]:
  """The classes TFDS assigns to ILSVRC2012_val_00000001 ... ILSVRC2012_val_{n:08}."""
  import tensorflow_datasets as tfds
  path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
  return path.read_text().split()[:n]


def solid_jpeg(label: int, index: int) -> bytes:
  """A tiny 24x20 JPEG whose colour encodes the label (the default `image_fn`)."""
  from PIL import Image
  color = ((37 * label) % 256, (91 * label + 7 * index) % 256, (53 * label) % 256)
  buf = io.BytesIO()
  Image.new("RGB", (24, 20), color).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_imagenet_tars(manual_dir: str, classes, per_class: int, val_per_class: int,
                       image_fn=solid_jpeg) -> dict[str, list[tuple[str, int]]]:
  """Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into `manual_dir`.

  classes: an int k (the first k classes of label order) or a list of label indices
    (0..999) or WordNet ids ("n01440764"): the training split's classes.
  per_class: training images per class, named f"{wnid}_{i}.JPEG".
  val_per_class: sets the validation size, N = len(classes) * val_per_class images
    ILSVRC2012_val_00000001 ... N, whose classes are ImageNet's true labels of those files
    (TFDS' validation_labels.txt), not `classes` (see the module doc).
  image_fn(label: int, index: int) -> bytes: the encoded image (JPEG) for an image of
    class `label` (0..999); `index` counts the images written so far.
  Returns {"train": [(file name, label)], "validation": [(file name, label)]}, in archive
  order.
  """
  synsets = imagenet_synsets()
  index_of = {s: i for i, s in enumerate(synsets)}
  if isinstance(classes, int):
    classes = list(range(classes))
  labels = [index_of[c] if isinstance(c, str) else int(c) for c in classes]
  os.makedirs(manual_dir, exist_ok=True)
  written = {"train": [], "validation": []}
  count = 0
  tmp = os.path.join(manual_dir, ".ILSVRC2012_img_train.tar.partial")
  with tarfile.open(tmp, "w") as outer:
    for label in labels:
      wnid = synsets[label]
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for i in range(per_class):
          name = f"{wnid}_{i}.JPEG"
          _add(inner, name, image_fn(label, count))
          written["train"].append((name, label))
          count += 1
      _add(outer, f"{wnid}.tar", inner_buf.getvalue())
  os.replace(tmp, os.path.join(manual_dir, "ILSVRC2012_img_train.tar"))
  n_val = len(labels) * val_per_class
  tmp = os.path.join(manual_dir, ".ILSVRC2012_img_val.tar.partial")
  with tarfile.open(tmp, "w") as tar:
    for i, wnid in enumerate(validation_synsets(n_val)):
      name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
      _add(tar, name, image_fn(index_of[wnid], count))
      written["validation"].append((name, index_of[wnid]))
      count += 1
  os.replace(tmp, os.path.join(manual_dir, "ILSVRC2012_img_val.tar"))
  return written
