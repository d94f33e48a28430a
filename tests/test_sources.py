"""Data sources: TFDS ArrayRecord sets read by index, folder trees, digits, their errors."""

import io
import os
import textwrap

import numpy as np
import pytest
from PIL import Image

from bcdnet_jax.data import sources
from tests.helpers.no_tensorflow import run_without_tensorflow


@pytest.fixture(scope="module")
def digits_ar(tmp_path_factory):
  """A data_dir with the digits set prepared in ArrayRecord format, once per module."""
  d = str(tmp_path_factory.mktemp("tfds-ar"))
  sources.open_source("digits", "train", d)
  return d


def _decode(raw):
  with Image.open(io.BytesIO(raw)) as im:
    return np.asarray(im.convert("RGB"))


def test_digits_prepared_as_array_record(digits_ar):
  files = [f for _, _, fs in os.walk(digits_ar) for f in fs]
  assert any(".array_record" in f for f in files), files
  assert not any(".tfrecord" in f for f in files), files
  train = sources.open_source("digits", "train", digits_ar)
  test = sources.open_source("digits", "test", digits_ar)
  assert (len(train), len(test)) == (1438, 359)
  assert train.num_classes == test.num_classes == 10 and not train.multi_label
  rec = train[7]
  assert isinstance(rec["image"], bytes) and rec["name"] == "train[7]"
  assert isinstance(rec["label"], int) and 0 <= rec["label"] < 10
  assert _decode(rec["image"]).shape == (32, 32, 3)
  # the same images and stratified split as the arrays: every class in both splits with
  # 20 % of its images (rounded) in test, and the test images are the arrays' test images
  images, labels, mask = sources.digits_arrays()
  got = np.stack([_decode(test[i]["image"]) for i in range(len(test))])
  want = {(im.tobytes(), int(lab)) for im, lab in zip(images[mask], labels[mask])}
  assert {(g.tobytes(), test[i]["label"]) for i, g in enumerate(got)} == want
  assert sorted(set(labels[~mask])) == list(range(10))
  batch = train.__getitems__([3, 0, 3])
  assert [r["label"] for r in batch] == [train[3]["label"], train[0]["label"],
                                         train[3]["label"]]
  with pytest.raises(IndexError):
    train[1438]


def test_digits_second_open_does_not_rebuild(digits_ar):
  stamp = {p: os.stat(os.path.join(t, p)).st_mtime_ns
           for t, _, fs in os.walk(digits_ar) for p in fs}
  sources.open_source("digits", "test", digits_ar)
  again = {p: os.stat(os.path.join(t, p)).st_mtime_ns
           for t, _, fs in os.walk(digits_ar) for p in fs}
  assert again == stamp


def test_digits_built_by_another_process_meanwhile(tmp_path, monkeypatch):
  """Processes of one job preparing digits at once: the one whose rename loses finds the
  set prepared; a build that fails for itself is one error naming the directory."""
  cls = sources._digits_builder_class()
  build = cls.download_and_prepare

  def loses_the_race(self, *args, **kwargs):
    build(self, *args, **kwargs)  # the other process's build lands first ...
    raise OSError(39, "Directory not empty")  # ... so this one's rename fails

  monkeypatch.setattr(cls, "download_and_prepare", loses_the_race)
  assert len(sources.open_source("digits", "test", str(tmp_path / "a"))) == 359

  def fails(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(cls, "download_and_prepare", fails)
  with pytest.raises(sources.DataError, match=r"cannot prepare the digits data set in "
                     r".*/b/digits/2\.0\.0: No space left on device"):
    sources.open_source("digits", "test", str(tmp_path / "b"))


def test_sources_pickle_and_reopen(digits_ar):
  import pickle
  src = sources.open_source("digits", "train", digits_ar)
  copy = pickle.loads(pickle.dumps(src))
  assert len(copy) == len(src) and copy[11] == src[11]


@pytest.mark.slow
def test_digits_without_tensorflow(tmp_path):
  """Where TensorFlow is not installed, digits prepares and every source reads; TFDS'
  build banner and progress bars stay out of the output.

  The `bcdnet_jax.data` package is entered without running its `__init__` so the test
  measures `sources` alone, whatever the package's other modules import."""
  code = textwrap.dedent(f"""
      import os, sys, types
      import bcdnet_jax
      pkg = types.ModuleType("bcdnet_jax.data")
      pkg.__path__ = [os.path.join(os.path.dirname(bcdnet_jax.__file__), "data")]
      sys.modules["bcdnet_jax.data"] = pkg
      from bcdnet_jax.data import sources
      src = sources.open_source("digits", "train", {str(tmp_path / "tfds")!r})
      assert len(src) == 1438 and len(src.__getitems__([1, 2])) == 2
      sources.check_images(sources.open_source("digits", "test", {str(tmp_path / "tfds")!r}))
      try:
        import tensorflow
      except ImportError:
        print("no tensorflow", "tensorflow" in sys.modules)
  """)
  out = run_without_tensorflow(code, str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert out.stdout.split("\n")[0] == "no tensorflow False"
  assert "Downloading and preparing" not in out.stdout + out.stderr
  assert "examples/s" not in out.stderr and "Variant folder" not in out.stderr


# --- errors ---------------------------------------------------------------------------------

def test_unknown_dataset_is_one_short_line(tmp_path):
  with pytest.raises(sources.DataError) as info:
    sources.open_source("no_such_dataset_xyz", "train", str(tmp_path))
  msg = str(info.value)
  assert "\n" not in msg and len(msg) < 200 and "no_such_dataset_xyz" in msg
  with pytest.raises(sources.DataError, match="matched-frequency") as info:
    sources.open_source("imagenet_v2/bogus", "test", str(tmp_path))
  assert "\n" not in str(info.value)


def test_not_prepared_names_the_prepare_command(tmp_path):
  with pytest.raises(sources.DataError) as info:
    sources.open_source("imagenet2012", "train", str(tmp_path))
  msg = str(info.value)
  assert "not prepared" in msg and "\n" not in msg
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  assert (f"python -m bcdnet_jax prepare imagenet2012 --data_dir={tmp_path} "
          f"--manual_dir={manual}") in msg
  assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
  with pytest.raises(sources.DataError) as info:
    sources.open_source("imagenet2012_real", "validation", str(tmp_path))
  assert "ILSVRC2012_img_val.tar" in str(info.value)
  assert "ILSVRC2012_img_train.tar" not in str(info.value)
  with pytest.raises(sources.DataError, match=r"prepare imagenet_v2/matched-frequency "):
    sources.open_source("imagenet_v2/matched-frequency", "test", str(tmp_path))


def test_unknown_split_lists_splits(digits_ar):
  with pytest.raises(sources.DataError, match=r"no split 'validation'; splits: test, train"):
    sources.open_source("digits", "validation", digits_ar)


# --- folder trees ---------------------------------------------------------------------------

def _save(path, fmt, size=(12, 10), mode="RGB", value=90, **kw):
  im = Image.new(mode, size, value if mode in ("L", "P") else (value, 2 * value % 256, 30))
  if mode == "P":
    im.info["transparency"] = 0
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path, format=fmt, **kw)


FORMATS = {"a.bmp": "BMP", "b.gif": "GIF", "c.webp": "WEBP", "d.tiff": "TIFF", "e.png": "PNG",
           "f.jpg": "JPEG", "g.jpeg": "JPEG", "h_png_named.jpg": "PNG", "noext": "JPEG"}


def _tree(root, splits=("train", "val"), classes=("cat", "dog")):
  for split in splits:
    for c in classes:
      for name, fmt in FORMATS.items():
        _save(os.path.join(root, split, c, name), fmt, mode="P" if fmt == "GIF" else "RGB")


def test_folder_every_image_format_enters_the_split(tmp_path):
  _tree(str(tmp_path))
  (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1junk")
  (tmp_path / ".hidden").mkdir()
  src = sources.open_source(f"folder:{tmp_path}", "train", None)
  assert len(src) == 2 * len(FORMATS) and src.num_classes == 2
  names = [src[i]["name"] for i in range(len(src))]
  assert names == [os.path.join(c, f) for c in ("cat", "dog") for f in sorted(FORMATS)]
  assert [src[i]["label"] for i in range(len(src))] == [0] * 9 + [1] * 9
  for i in range(len(src)):
    assert _decode(src[i]["image"]).shape == (10, 12, 3)
  sources.check_images(src)
  val = sources.open_source(f"folder:{tmp_path}", "val", None)
  assert len(val) == len(src)


def test_folder_non_image_named(tmp_path):
  _tree(str(tmp_path))
  (tmp_path / "train" / "dog" / "x.jpg").write_text("not an image at all")
  with pytest.raises(sources.DataError, match=r"not images.*dog/x\.jpg"):
    sources.open_source(f"folder:{tmp_path}", "train", None)
  sources.open_source(f"folder:{tmp_path}", "val", None)  # the other split is fine


def test_folder_tree_errors(tmp_path):
  with pytest.raises(sources.DataError, match="does not exist"):
    sources.open_source(f"folder:{tmp_path / 'nope'}", "train", None)
  _tree(str(tmp_path / "a"), classes=("cat", "dog"))
  _tree(str(tmp_path / "a"), splits=("val",), classes=("cow",))
  with pytest.raises(sources.DataError, match=r"different classes.*only in val: \['cow'\]"):
    sources.open_source(f"folder:{tmp_path / 'a'}", "train", None)
  _tree(str(tmp_path / "b"))
  (tmp_path / "b" / "val" / "dog").mkdir(exist_ok=True)
  for f in os.listdir(tmp_path / "b" / "val" / "dog"):
    os.remove(tmp_path / "b" / "val" / "dog" / f)
  (tmp_path / "b" / "val" / "dog" / ".DS_Store").write_bytes(b"x")
  with pytest.raises(sources.DataError, match=r"without images: dog"):
    sources.check_folder(str(tmp_path / "b"))
  _tree(str(tmp_path / "c"))
  with pytest.raises(sources.DataError, match=r"no split 'test'; splits: train, val"):
    sources.open_source(f"folder:{tmp_path / 'c'}", "test", None)


def test_check_images_names_undecodable(tmp_path):
  _tree(str(tmp_path), splits=("train",))
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
      buf, format="JPEG")
  good = buf.getvalue()  # its header survives the cut, its pixels do not
  (tmp_path / "train" / "cat" / "z_truncated.jpg").write_bytes(good[: len(good) // 2])
  src = sources.open_source(f"folder:{tmp_path}", "train", None)  # the header is fine
  with pytest.raises(sources.DataError, match=r"1 undecodable image\(s\).*cat/z_truncated"):
    sources.check_images(src, threads=2)


def test_real_style_label_sets(tmp_path):
  """A TFDS set with ImageNet-ReaL's `real_label` feature (a set of classes per image,
  possibly empty) reads as int64 label arrays."""
  import tensorflow_datasets as tfds

  label_sets = [[2], [], [0, 3], [1]]

  class TinyRealSet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="png"),
          "original_label": tfds.features.ClassLabel(num_classes=4),
          "real_label": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=4)),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i, labels in enumerate(label_sets):
        buf = io.BytesIO()
        Image.new("RGB", (5, 4), (i, 0, 0)).save(buf, format="PNG")
        yield i, {"image": buf.getvalue(), "original_label": i, "real_label": labels,
                  "file_name": f"v{i}.png"}

  with sources.quiet_tfds():
    TinyRealSet(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = sources.open_source("tiny_real_set", "validation", str(tmp_path))
  assert src.multi_label and src.num_classes == 4 and len(src) == 4
  for i in range(4):
    rec = src[i]
    k = int(rec["name"][1])
    assert rec["label"].dtype == np.int64 and rec["label"].ndim == 1
    assert sorted(rec["label"].tolist()) == label_sets[k]
    assert _decode(rec["image"])[0, 0, 0] == k
