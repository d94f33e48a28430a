"""Bad data refused before any work, in one line naming the data set, split or file: labels
outside [0, num_classes) (TFDS's -1 of an unlabelled split), over-limit images, one-class
folder trees, non-regular files, symlink loops."""

import io
import os

import numpy as np
import pytest
from helpers.configs import small_config
from PIL import Image

from bcdnet_jax import checkpoint, errors
from bcdnet_jax import train as train_lib
from bcdnet_jax.data import sources, transforms
from bcdnet_jax.nn import models


def _png(value: int) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (16, 16), (value, 0, 0)).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
  """data_dir of a 3-class TFDS set in ArrayRecord: 'train' labelled, 'test' all -1 (how
  TFDS stores imagenet2012's test split), 'mixed' with one -1 among labels."""
  import tensorflow_datasets as tfds
  splits = {"train": [0, 1, 2, 0, 1, 2], "test": [-1] * 4, "mixed": [0, 1, -1, 2]}

  class ThreeClasses(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(labels) for s, labels in splits.items()}

    def _generate_examples(self, labels):
      for i, label in enumerate(labels):
        yield i, {"image": _png(i), "label": label}

  d = str(tmp_path_factory.mktemp("tfds-unlabelled"))
  with sources.quiet_tfds():
    ThreeClasses(data_dir=d, file_format="array_record").download_and_prepare()
  return d


def _one_line(capsys, fn):
  """Runs `fn` as main.py does (errors.one_line): (exit code, stderr lines)."""
  with pytest.raises(SystemExit) as e, errors.one_line():
    fn()
  return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("split", ["test", "mixed"])
def test_check_labels_names_missing_labels(unlabelled, split):
  src = sources.open_source("three_classes", split, unlabelled)
  with pytest.raises(sources.DataError, match=rf"^three_classes split '{split}' has no labels "
                     rf"\(record {split}\[\d\] has label -1"):
    sources.check_labels(src)
  sources.check_labels(sources.open_source("three_classes", "train", unlabelled))


def test_check_labels_samples_a_large_split_and_reads_catch_the_rest(unlabelled, monkeypatch):
  """Above LABEL_FULL_SCAN records only a sample is read; a bad label outside it stops the
  read of its record (never scored)."""
  # the policy: every label up to LABEL_FULL_SCAN records or in memory, else a spread sample
  assert len(sources._label_indices(sources.LABEL_FULL_SCAN, False)) == sources.LABEL_FULL_SCAN
  assert len(sources._label_indices(10**6, True)) == 10**6
  sample = sources._label_indices(1_281_167, False)
  assert len(sample) == sources.LABEL_SAMPLE and sample[0] == 0 and sample[-1] == 1_281_166
  src = sources.open_source("three_classes", "mixed", unlabelled)
  bad = []
  for i in range(len(src)):  # TFDS shuffles the records: find the unlabelled one
    try:
      src[i]
    except sources.DataError:
      bad.append(i)
  assert len(bad) == 1
  sample = [i for i in range(len(src)) if i != bad[0]]
  monkeypatch.setattr(sources, "_label_indices", lambda n, cheap: np.asarray(sample))
  sources.check_labels(src)  # the sample misses it
  with pytest.raises(sources.DataError, match=rf"has no labels \(record mixed\[{bad[0]}\]"):
    src[bad[0]]



def test_check_labels_out_of_range_value():
  class Fake(sources.Source):
    dataset, split, num_classes, labels_in_memory = "fake", "val", 3, True

    def __len__(self):
      return 3

    def read_labels(self, indices):
      return [[0, 1, 2][i] if i < 2 else 7 for i in indices]
  with pytest.raises(sources.DataError, match=r"^fake split 'val': record val\[2\] has label "
                     r"7, outside \[0, 3\)"):
    sources.check_labels(Fake())


def test_training_on_an_unlabelled_split_is_refused(unlabelled, tmp_path, capsys):
  c = small_config(unlabelled, dataset="three_classes", train_split="test",
                   eval_split="train")
  wd = tmp_path / "wd"
  code, lines = _one_line(capsys, lambda: train_lib.run(c, str(wd)))
  assert code == 2 and len(lines) == 1
  assert lines[0].startswith("error: three_classes split 'test' has no labels")
  assert not wd.exists()


def test_evaluating_an_unlabelled_split_is_refused(unlabelled, tmp_path, capsys):
  model = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                              mlp_groups=1, mlp_group=("lsr", "pw"))
  checkpoint.save_model(model, str(tmp_path / "model"))
  c = small_config(unlabelled, mode="eval", checkpoint=str(tmp_path / "model"),
                   dataset="three_classes", eval_split="test")
  wd = tmp_path / "ev"
  code, lines = _one_line(capsys, lambda: train_lib.run(c, str(wd)))
  assert code == 2 and len(lines) == 1
  assert lines[0].startswith("error: three_classes split 'test' has no labels")
  assert not wd.exists()


# --- over-limit images (PIL's decompression-bomb guard) -------------------------------------

def _header(fmt: str, w: int, h: int) -> bytes:
  """A file whose header claims w x h px (RGB), with a few bytes of pixels."""
  import struct
  import zlib
  if fmt == "BMP":
    return (b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0) + b"\0" * 16)
  if fmt == "PPM":
    return f"P6\n{w} {h}\n255\n".encode() + b"\0" * 16
  if fmt == "TGA":
    return struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, w, h, 24, 0) + b"\0" * 16
  assert fmt == "PNG"

  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _folder(root, big_name, big_bytes, split="val"):
  """root/{train,val}/{cat,dog}/ with small PNGs; `big_name` written into val/dog."""
  for s in ("train", "val"):
    for c, v in (("cat", 10), ("dog", 200)):
      os.makedirs(root / s / c, exist_ok=True)
      for i in range(2):
        (root / s / c / f"{i}.png").write_bytes(_png(v + i))
  if big_name:
    (root / split / "dog" / big_name).write_bytes(big_bytes)
  return root


@pytest.fixture(autouse=True)
def _pil_limit():
  """Each test starts and ends with PIL's default limit."""
  transforms.set_max_image_pixels(0)
  yield
  transforms.set_max_image_pixels(0)


@pytest.mark.parametrize("fmt", ["BMP", "PPM", "TGA"])
def test_over_limit_file_in_the_folder_scan_is_one_line(tmp_path, capsys, fmt):
  root = _folder(tmp_path, f"big.{fmt.lower()}", _header(fmt, 15000, 15000))
  code, lines = _one_line(capsys, lambda: sources.open_source(f"folder:{root}", "val", None))
  assert code == 2 and len(lines) == 1, lines
  assert lines[0] == (f"error: image folder {root}/val: {root}/val/dog/big.{fmt.lower()}: "
                      "225,000,000 pixels is over the limit of 178,956,970 pixels (PIL's "
                      "guard against decompression bombs); for data sets with images this "
                      "large set --config.max_image_pixels above it")
  transforms.set_max_image_pixels(15000 * 15000)  # the config field lifts it
  assert len(sources.open_source(f"folder:{root}", "val", None)) == 5


def test_over_limit_png_in_check_images_names_the_reason(tmp_path, capsys):
  root = _folder(tmp_path, "big.png", _header("PNG", 15000, 15000))
  src = sources.open_source(f"folder:{root}", "val", None)  # a PNG signature: it enters
  code, lines = _one_line(capsys, lambda: sources.check_images(src))
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith(f"error: folder:{root} split 'val': cannot decode image "
                             "dog/big.png: 225,000,000 pixels is over the limit of "
                             "178,956,970 pixels (PIL's guard")
  assert "undecodable" not in lines[0]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_over_limit_image_refused_before_training_and_evaluation(tmp_path, capsys, mode):
  root = _folder(tmp_path / "data", "big.bmp", _header("BMP", 15000, 15000))
  wd = tmp_path / "wd"
  if mode == "train":
    c = small_config("", dataset=f"folder:{root}", train_split="train", eval_split="val")
  else:
    model = models.create_model("bcdnet_a", stage=2, num_classes=2, channels=[8, 16],
                                mlp_groups=1, mlp_group=("lsr", "pw"))
    checkpoint.save_model(model, str(tmp_path / "model"))
    c = small_config("", mode="eval", checkpoint=str(tmp_path / "model"),
                     dataset=f"folder:{root}", eval_split="val")
  code, lines = _one_line(capsys, lambda: train_lib.run(c, str(wd)))
  assert code == 2 and len(lines) == 1, lines
  assert "big.bmp: 225,000,000 pixels is over the limit of 178,956,970" in lines[0]
  assert not wd.exists()


def test_over_limit_image_read_during_training_names_file_and_reason(tmp_path):
  """Past the scan (a PNG signature; check_images off for the train split): the worker's
  decode names the file and the limit."""
  from bcdnet_jax import data
  root = _folder(tmp_path, "big.png", _header("PNG", 15000, 15000), split="train")
  src = sources.open_source(f"folder:{root}", "train", None)
  cfg = data.DataConfig(image_size=16, workers=1)
  order = data.TrainOrder(len(src), 5, 0)
  with pytest.raises(transforms.ImageTooLargeError,
                     match=r"dog/big\.png: 225,000,000 pixels is over the limit"):
    list(data.train_batches(src, cfg, order, 0, 1))
  cfg = data.DataConfig(image_size=16, workers=1, max_image_pixels=15000 * 15000)
  with pytest.raises(transforms.ImageDecodeError) as e:  # the limit lifted in the worker:
    list(data.train_batches(src, cfg, order, 0, 1))  # PIL now reads the (truncated) pixels
  assert not isinstance(e.value, transforms.ImageTooLargeError)


def test_large_image_under_the_limit_is_one_line_of_ours_once(caplog):
  """A 100-megapixel image: PIL's own warning (once per read) is replaced by one line of
  ours per file."""
  import warnings
  raw = _header("PNG", 10000, 10000)
  with warnings.catch_warnings(record=True) as caught:
    for _ in range(3):
      with pytest.raises(transforms.ImageDecodeError):  # the header's pixels are missing
        transforms.decode(raw, "huge.png")
  assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
  ours = [r.getMessage() for r in caplog.records if "huge.png" in r.getMessage()]
  assert ours == ["huge.png: 10000 x 10000 px (100 megapixels) is a very large image; "
                  "decoding it (images over 178,956,970 pixels are refused; "
                  "config.max_image_pixels raises the limit)"]


# --- folder trees: misleading lines and hangs -----------------------------------------------

def test_fifo_in_a_split_is_named_without_blocking(tmp_path, capsys):
  root = _folder(tmp_path, None, b"")
  os.mkfifo(root / "val" / "dog" / "pipe.jpg")  # opening it for reading would block forever
  code, lines = _one_line(capsys, lambda: sources.open_source(f"folder:{root}", "val", None))
  assert code == 2 and lines == [f"error: image folder {root}/val: {root}/val/dog/pipe.jpg is a "
                                 "FIFO, not a regular file; remove it from the image folder"]


def test_one_class_folder_is_refused(tmp_path, capsys):
  for s in ("train", "val"):
    os.makedirs(tmp_path / s / "cat")
    (tmp_path / s / "cat" / "a.png").write_bytes(_png(1))
  code, lines = _one_line(capsys, lambda: sources.open_source(f"folder:{tmp_path}", "train",
                                                               None))
  assert code == 2 and lines == [f"error: image folder {tmp_path}/train: one class directory "
                                 "(cat); a classifier needs at least 2 classes, one directory "
                                 "each"]


def test_folder_root_that_is_a_file(tmp_path, capsys):
  (tmp_path / "f").write_text("x")
  code, lines = _one_line(capsys, lambda: sources.open_source(f"folder:{tmp_path / 'f'}",
                                                               "train", None))
  assert code == 2 and lines == [f"error: image folder '{tmp_path / 'f'}' is a file, not a "
                                 f"directory (expected {tmp_path / 'f'}/<split>/<class>/"
                                 "<image file>)"]


@pytest.mark.parametrize("link,target,why", [
    ("loop", ".", "a directory that contains it (a loop)"),
    ("up", "..", "a directory that contains it (a loop)"),
    ("other", "../cat", "a directory inside the image folder")])
def test_directory_symlinks_inside_the_folder_are_one_line(tmp_path, capsys, link, target, why):
  root = _folder(tmp_path / "data", None, b"")
  os.symlink(target, root / "val" / "dog" / link)
  code, lines = _one_line(capsys, lambda: sources.open_source(f"folder:{root}", "val", None))
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith(f"error: image folder {root}/val/dog: {link} is a symbolic link "
                             "to ")
  assert why in lines[0]


def test_directory_symlink_outside_the_folder_is_followed(tmp_path):
  root = _folder(tmp_path / "data", None, b"")
  os.makedirs(tmp_path / "elsewhere")
  (tmp_path / "elsewhere" / "x.png").write_bytes(_png(3))
  os.symlink(tmp_path / "elsewhere", root / "val" / "dog" / "more")
  src = sources.open_source(f"folder:{root}", "val", None)
  assert [src[i]["name"] for i in range(len(src))] == [
      "cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/more/x.png"]


def test_digits_preparation_says_where(tmp_path, caplog):
  import logging
  caplog.set_level(logging.INFO, logger="bcdnet_jax")
  d = tmp_path / "nonexistent" / "tfds"
  sources.open_source("digits", "test", str(d))
  lines = [r.getMessage() for r in caplog.records if "digits" in r.getMessage()]
  assert lines == [f"preparing the digits data set (1,797 images) in {d}/digits/2.0.0"]
  caplog.clear()
  sources.open_source("digits", "train", str(d))  # prepared: nothing written, no line
  assert not [r for r in caplog.records if "preparing" in r.getMessage()]


def test_over_limit_image_in_predict_is_named_with_the_reason(tmp_path):
  from bcdnet_jax import preprocessing
  from bcdnet_jax.deploy import predict
  path = tmp_path / "big.bmp"
  path.write_bytes(_header("BMP", 15000, 15000))
  with pytest.raises(predict.PredictError) as e:
    predict.load_image(str(path), preprocessing.DEFAULT)
  assert str(e.value) == (f"{path}: not a decodable image: 225,000,000 pixels is over the "
                          "limit of 178,956,970 pixels (PIL's guard against decompression "
                          "bombs)")
