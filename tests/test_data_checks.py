"""Bad data refused before any work, in one line naming the data set, split or file: labels
outside [0, num_classes) (TFDS's -1 of an unlabelled split), over-limit images, one-class
folder trees, non-regular files, symlink loops."""

import io

import numpy as np
import pytest
from helpers.configs import small_config
from PIL import Image

from bcdnet_jax import checkpoint, errors
from bcdnet_jax import train as train_lib
from bcdnet_jax.data import sources
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
