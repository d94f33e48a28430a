import os

import numpy as np
import pytest

from bcdnet_jax import data


def cfg(**kw):
  base = dict(dataset="digits", data_dir=None, train_split="train", eval_split="test",
              image_size=32, eval_crop_ratio=1.0, color_jitter=(0.2, 0.2, 0.2, 0.1),
              shuffle_buffer=512, seed=3)
  base.update(kw)
  return data.DataConfig(**base)


def test_digits_is_a_real_tfds_dataset(digits_dir):
  b = data.get_builder("digits", digits_dir)
  files = [f for _, _, fs in os.walk(digits_dir) for f in fs if ".tfrecord" in f]
  assert files, "TFRecord files written by the builder"
  assert data.split_size(b, "train") + data.split_size(b, "test") == 1797
  assert data.num_classes(b) == 10
  with pytest.raises(data.DataError, match="no split 'validation'"):
    data.split_size(b, "validation")


@pytest.mark.slow
def test_train_batches_deterministic_and_resumable(digits_dir):
  b = data.get_builder("digits", digits_dir)
  first = list(data.train_dataset(b, cfg(data_dir=digits_dir), 8).take(5).as_numpy_iterator())
  again = list(data.train_dataset(b, cfg(data_dir=digits_dir), 8).take(5).as_numpy_iterator())
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  resumed = list(data.train_dataset(b, cfg(data_dir=digits_dir), 8, start_batch=3)
                 .take(2).as_numpy_iterator())
  for x, y in zip(first[3:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert first[0]["image"].shape == (8, 32, 32, 3) and first[0]["image"].dtype == np.float32
  other = next(data.train_dataset(b, cfg(data_dir=digits_dir, seed=4), 8).as_numpy_iterator())
  assert not np.array_equal(other["image"], first[0]["image"])


def test_eval_covers_every_example_once_across_processes(digits_dir):
  b = data.get_builder("digits", digits_dir)
  total = data.split_size(b, "test")
  seen_labels, count = [], 0
  per_process_batches = set()
  for p in range(2):
    ds, n, t = data.eval_dataset(b, cfg(data_dir=digits_dir), 50, 100, process_index=p,
                                 process_count=2)
    batches = list(ds.as_numpy_iterator())
    per_process_batches.add(len(batches))
    assert t == total and n == -(-total // 100)
    for batch in batches:
      m = batch["mask"].astype(bool)
      count += int(m.sum())
      seen_labels.extend(batch["labels"][m].argmax(-1).tolist())
  assert per_process_batches == {-(-total // 100)}  # same number of steps everywhere
  assert count == total
  ref = [int(ex["label"]) for ex in b.as_dataset(split="test").as_numpy_iterator()]
  assert sorted(seen_labels) == sorted(ref)


def test_eval_preprocessing_resize_and_center_crop():
  import tensorflow as tf
  img = np.zeros((300, 400, 3), np.uint8)
  img[:, 200:] = 255
  encoded = tf.io.encode_jpeg(img).numpy()
  out = data.preprocess_eval(encoded, image_size=224).numpy()
  assert out.shape == (224, 224, 3)
  # shorter side 300 -> 256, width 400 -> 341; centre crop keeps the edge in the middle
  white = (1 - np.array(data.MEAN_RGB)) / np.array(data.STDDEV_RGB)
  np.testing.assert_allclose(out[112, -1], white, atol=0.05)


def test_missing_imagenet_explains_how_to_prepare(tmp_path):
  with pytest.raises(data.DataError) as info:
    data.get_builder("imagenet2012", str(tmp_path))
  msg = str(info.value)
  assert "not prepared" in msg and str(tmp_path) in msg
  assert "ILSVRC2012_img_train.tar" in msg and "tfds build imagenet2012" in msg
  with pytest.raises(data.DataError, match="unknown TFDS dataset"):
    data.get_builder("no_such_dataset_xyz", str(tmp_path))
  with pytest.raises(data.DataError, match="does not exist"):
    data.get_builder("folder:" + str(tmp_path / "nope"), None)


def test_image_folder_dataset(tmp_path):
  import tensorflow as tf
  for split in ("train", "val"):
    for label in ("cat", "dog"):
      d = tmp_path / split / label
      d.mkdir(parents=True)
      for i in range(3):
        img = np.full((40, 50, 3), 60 * i, np.uint8)
        (d / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(img).numpy())
  b = data.get_builder("folder:" + str(tmp_path), None)
  c = cfg(train_split="train", eval_split="val", image_size=24, eval_crop_ratio=0.875)
  batch = next(data.train_dataset(b, c, 4).as_numpy_iterator())
  assert batch["image"].shape == (4, 24, 24, 3)
  ds, n, total = data.eval_dataset(b, c, 4, 4)
  assert total == 6 and n == 2
  assert sum(int(x["mask"].sum()) for x in ds.as_numpy_iterator()) == 6


def test_processes_split_each_global_batch(digits_dir):
  """Two processes' local batches, stacked, are the one-process global batch."""
  b = data.get_builder("digits", digits_dir)
  c = cfg(data_dir=digits_dir)
  whole = list(data.train_dataset(b, c, 8, start_batch=1).take(2).as_numpy_iterator())
  parts = [list(data.train_dataset(b, c, 4, start_batch=1, process_index=p, process_count=2)
                .take(2).as_numpy_iterator()) for p in range(2)]
  for step in range(2):
    stacked = np.concatenate([parts[0][step]["image"], parts[1][step]["image"]])
    np.testing.assert_array_equal(stacked, whole[step]["image"])


def test_per_process_sharding_reads_disjoint_parts(digits_dir):
  b = data.get_builder("digits", digits_dir)
  # no augmentation, so a batch shows the stored images themselves
  c = cfg(data_dir=digits_dir, sharding="per_process", shuffle_buffer=1, crop_scale=(1.0, 1.0),
          random_flip=False, color_jitter=(0.0, 0.0, 0.0, 0.0))
  n = data.split_size(b, "train") // 2
  seen = []
  for p in range(2):
    ds = data.train_dataset(b, c, n, process_index=p, process_count=2).take(1)
    batch = next(ds.as_numpy_iterator())
    seen.append({x.tobytes() for x in batch["image"].round(4)})
  whole = next(data.train_dataset(b, c, 2 * n).as_numpy_iterator())
  everything = {x.tobytes() for x in whole["image"].round(4)}
  assert seen[0] | seen[1] == everything  # the halves cover the split...
  assert len(seen[0] & seen[1]) < 0.02 * n  # ...and share no example (but duplicates)
  with pytest.raises(data.DataError, match="config.data_sharding"):
    data.train_dataset(b, cfg(data_dir=digits_dir, sharding="bogus"), 4)
