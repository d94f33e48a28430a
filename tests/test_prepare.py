"""`bcdnet-prepare`: ImageNet from (synthetic) manual tars, TFRecord conversion, bad input."""

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from bcdnet_jax.data import prepare, sources
from tests.helpers.imagenet_tars import imagenet_synsets, make_imagenet_tars
from tests.helpers.no_tensorflow import run_without_tensorflow


def _files(d):
  return sorted(os.path.relpath(os.path.join(t, f), d) for t, _, fs in os.walk(d) for f in fs)


def test_imagenet2012_from_manual_tars(tmp_path, capsys):
  """TFDS' imagenet2012 builder on archives in image-net.org's layout (3 classes x 4
  training images, 6 validation images), read back by index."""
  data_dir = str(tmp_path / "tfds")
  written = make_imagenet_tars(os.path.join(data_dir, "downloads", "manual"),
                               classes=[0, "n01443537", 999], per_class=4, val_per_class=2)
  assert prepare.main(["imagenet2012", f"--data_dir={data_dir}"]) == 0
  err = capsys.readouterr().err
  assert "imagenet2012: prepared in" in err and "train 12, validation 6 examples" in err
  assert "\r" not in err and "\x1b" not in err  # no progress-bar escape codes
  files = _files(os.path.join(data_dir, "imagenet2012"))
  assert any("train.array_record" in f for f in files), files
  assert not any("incomplete" in f or "tfrecord" in f for f in files), files
  synsets = imagenet_synsets()
  for split in ("train", "validation"):
    src = sources.open_source("imagenet2012", split, data_dir)
    want = dict(written[split])
    assert len(src) == len(want) and src.num_classes == 1000 and not src.multi_label
    got = {src[i]["name"]: src[i] for i in range(len(src))}
    assert {n: r["label"] for n, r in got.items()} == want
    for name, rec in got.items():
      assert rec["image"][:2] == b"\xff\xd8"  # the JPEG as archived
      if split == "train":
        assert name.startswith(synsets[rec["label"]] + "_")
  # a second run finds it prepared and changes nothing
  before = {f: os.stat(os.path.join(data_dir, "imagenet2012", f)).st_mtime_ns
            for f in files}
  assert prepare.main(["imagenet2012", f"--data_dir={data_dir}"]) == 0
  assert "already prepared" in capsys.readouterr().err
  assert before == {f: os.stat(os.path.join(data_dir, "imagenet2012", f)).st_mtime_ns
                    for f in files}


def test_missing_or_bad_tars_and_unwritable_dir(tmp_path, capsys):
  data_dir, manual = str(tmp_path / "tfds"), str(tmp_path / "manual")
  os.makedirs(manual)
  (tmp_path / "manual" / "ILSVRC2012_img_val.tar").write_bytes(b"")
  assert prepare.main(["imagenet2012", f"--data_dir={data_dir}",
                       f"--manual_dir={manual}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ")
  assert f"missing ILSVRC2012_img_train.tar in {manual}" in err
  (tmp_path / "manual" / "ILSVRC2012_img_val.tar").write_bytes(b"not a tar" * 100)
  assert prepare.main(["imagenet2012_real", f"--data_dir={data_dir}",
                       f"--manual_dir={manual}"]) == 2
  assert "ILSVRC2012_img_val.tar is not a tar archive" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(data_dir, "imagenet2012_real"))
  assert prepare.main(["no_such_dataset_xyz", f"--data_dir={data_dir}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "unknown dataset 'no_such_dataset_xyz'" in err
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  assert prepare.main(["digits", f"--data_dir={blocker}/sub"]) == 2
  assert f"cannot write to data_dir {blocker}/sub" in capsys.readouterr().err
  assert prepare.main(["digits", f"--data_dir={blocker}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"--data_dir {blocker} is a file, not a directory" in err
  assert blocker.read_text() == "x"


def test_folder_datasets_need_no_preparing(tmp_path, capsys):
  for argv in (["folder:/tmp"], ["--convert_from_tfrecord", "folder:/tmp"]):
    assert prepare.main(argv + [f"--data_dir={tmp_path / 'tfds'}"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: folder:/tmp: folder: datasets are read directly from their "
                   "files; nothing to prepare\n")
    assert not os.path.exists(tmp_path / "tfds")


def test_damaged_archive_leaves_nothing_prepared(tmp_path, capsys):
  """A class archive inside ILSVRC2012_img_train.tar that is not a tar: one line saying
  where reading stopped, and no data set left that looks prepared."""
  import tarfile
  data_dir = str(tmp_path)
  manual = os.path.join(data_dir, "downloads", "manual")
  make_imagenet_tars(manual, classes=2, per_class=2, val_per_class=1)
  train = os.path.join(manual, "ILSVRC2012_img_train.tar")
  with tarfile.open(train) as t:
    members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
  with tarfile.open(train, "w") as t:
    for i, (name, blob) in enumerate(members):
      blob = blob if i == 0 else b"garbage" * 100
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      t.addfile(info, io.BytesIO(blob))
  assert prepare.main(["imagenet2012", f"--data_dir={data_dir}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  synsets = imagenet_synsets()
  assert err.startswith(f"error: preparing imagenet2012 from ILSVRC2012_img_train.tar, "
                        f"ILSVRC2012_img_val.tar in {manual} failed after {synsets[0]}_1.JPEG")
  assert "ReadError" in err and "nothing is left as prepared" in err
  with pytest.raises(sources.DataError, match="is not prepared"):
    sources.open_source("imagenet2012", "train", data_dir)


def test_imagenet_v2_expands_to_its_variants():
  assert prepare.expand(["imagenet_v2", "digits", "imagenet_v2/topimages"]) == [
      "imagenet_v2/matched-frequency", "imagenet_v2/threshold-0.7", "imagenet_v2/topimages",
      "digits"]


def _jpeg(i):
  buf = io.BytesIO()
  Image.fromarray(np.full((12, 16, 3), 20 * i, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def test_convert_from_tfrecord_copies_records(tmp_path, capsys):
  """A TFDS set prepared in TFRecord format is refused by name, converted in place
  (the same image bytes, not re-encoded), then read by index."""
  import tensorflow_datasets as tfds

  class TinyTfrecordSet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=3),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(7), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": _jpeg(i), "label": i % 3, "file_name": f"im{i}.jpg"}

  data_dir = str(tmp_path)
  with sources.quiet_tfds():
    TinyTfrecordSet(data_dir=data_dir, file_format="tfrecord").download_and_prepare()
  capsys.readouterr()
  name = "tiny_tfrecord_set"  # found by its files: the class is not registered
  with pytest.raises(sources.DataError) as info:
    sources.open_source(name, "train", data_dir)
  assert (f"python -m bcdnet_jax prepare --convert_from_tfrecord {name} "
          f"--data_dir={data_dir}") in str(info.value)
  assert prepare.main([name, f"--data_dir={data_dir}"]) == 2  # prepare refers to it too
  assert "in tfrecord format" in capsys.readouterr().err
  assert prepare.main(["--convert_from_tfrecord", name, f"--data_dir={data_dir}"]) == 0
  for split, n in (("train", 7), ("test", 3)):
    src = sources.open_source(name, split, data_dir)
    assert len(src) == n and src.num_classes == 3
    got = {src[i]["name"]: (src[i]["image"], src[i]["label"]) for i in range(n)}
    assert got == {f"im{i}.jpg": (_jpeg(i), i % 3) for i in range(n)}
  # converting again is a no-op
  assert prepare.main(["--convert_from_tfrecord", name, f"--data_dir={data_dir}"]) == 0
  assert "already readable in ArrayRecord" in capsys.readouterr().err
  with pytest.raises(sources.DataError, match="not prepared.*nothing to convert"):
    prepare.convert_from_tfrecord("mnist", data_dir)


@pytest.mark.slow
def test_cli_entry_point_reports_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "bcdnet_jax", "prepare", "imagenet2012",
                        f"--data_dir={tmp_path}"], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: imagenet2012 is built from ILSVRC2012_img_train.tar")
  assert os.path.join(str(tmp_path), "downloads", "manual") in last
  assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_imagenet_reads_without_tensorflow(tmp_path):
  """An imagenet2012 prepared where TensorFlow is installed reads, and its images decode,
  on a host without it; building one there is refused in one line naming the extra."""
  data_dir = str(tmp_path / "tfds")
  manual = os.path.join(data_dir, "downloads", "manual")
  make_imagenet_tars(manual, classes=2, per_class=3, val_per_class=2)
  assert prepare.main(["imagenet2012", f"--data_dir={data_dir}"]) == 0
  code = textwrap.dedent(f"""
      import os, sys, types
      import bcdnet_jax
      pkg = types.ModuleType("bcdnet_jax.data")  # sources and prepare alone
      pkg.__path__ = [os.path.join(os.path.dirname(bcdnet_jax.__file__), "data")]
      sys.modules["bcdnet_jax.data"] = pkg
      from bcdnet_jax.data import prepare, sources
      for split in ("train", "validation"):
        src = sources.open_source("imagenet2012", split, {data_dir!r})
        sources.check_images(src)
        print(split, len(src), src[0]["name"][:4])
      print("tensorflow" in sys.modules)
      print(prepare.main(["imagenet2012", "--data_dir={tmp_path / 'other'}",
                          "--manual_dir={manual}"]))
  """)
  out = run_without_tensorflow(code, str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert out.stdout.split("\n")[:4] == ["train 6 n014", "validation 4 ILSV", "False", "2"]
  assert out.stderr.strip().splitlines()[-1].startswith(
      "error: building imagenet2012 with TFDS' builder (it reads its archives and downloads "
      "through tf.io.gfile) needs TensorFlow: pip install 'bcdnet-jax[prepare]'")
  assert "Traceback" not in out.stderr and "Failed to import TensorFlow" not in out.stderr
  assert not os.path.exists(tmp_path / "other" / "imagenet2012")
