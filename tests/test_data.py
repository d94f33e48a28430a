"""The training order and the Grain loader: epochs, processes, resume, evaluation coverage."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from bcdnet_jax import data
from bcdnet_jax.data import loader, order, transforms


class MemorySource:
  """A list of records with the `data.Source` interface that counts its reads; record i
  has label i (so batches show which records they hold)."""

  def __init__(self, images, *, num_classes=None, labels=None, multi_label=False):
    self.images = images
    self.labels = labels if labels is not None else list(range(len(images)))
    self.num_classes = num_classes or len(images)
    self.multi_label = multi_label
    self.dataset, self.split = "memory", "train"
    self.reads = 0

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    self.reads += 1
    return {"image": self.images[i], "label": self.labels[i], "name": f"img{i}.jpg"}


def photo_jpegs(n, seed=0):
  """Small JPEGs cut from scikit-learn's sample photographs (sizes vary)."""
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p = photos[i % 2]
    h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
    y, x = int(rng.integers(0, p.shape[0] - h)), int(rng.integers(0, p.shape[1] - w))
    buf = io.BytesIO()
    Image.fromarray(p[y:y + h, x:x + w]).save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def cfg(**kw):
  base = dict(image_size=24, eval_crop_ratio=0.875, color_jitter=(0.2, 0.2, 0.2, 0.1),
              crop_scale=(0.08, 1.0), random_flip=True, seed=3, workers=2)
  base.update(kw)
  return loader.DataConfig(**base)


def take(it, k):
  return [next(it) for _ in range(k)]


def test_every_record_once_per_epoch_and_epochs_differ():
  n, g = 30, 6
  o = order.TrainOrder(n, g, seed=5)
  epochs = [np.concatenate([o.records(s)[0] for s in range(e * 5, e * 5 + 5)])
            for e in range(3)]
  for e in epochs:
    assert sorted(e.tolist()) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(n))  # shuffled, not file order
  # a batch straddling two epochs: the end of one permutation, then the next one's start
  o = order.TrainOrder(n, 8, seed=5)
  recs, pos = o.records(3)  # positions 24..31
  np.testing.assert_array_equal(pos, np.arange(24, 32))
  np.testing.assert_array_equal(recs[:6], order.epoch_permutation(n, 5, 0)[24:])
  np.testing.assert_array_equal(recs[6:], order.epoch_permutation(n, 5, 1)[:2])
  # another seed, another order
  assert not np.array_equal(order.TrainOrder(n, g, seed=6).records(0)[0], epochs[0][:g])


def test_loader_batches_follow_the_order_in_uint8():
  src = MemorySource(photo_jpegs(20))
  o = order.TrainOrder(len(src), 10, seed=3)
  batches = take(loader.train_batches(src, cfg(), o, 0, 4), 4)
  assert batches[0]["image"].shape == (10, 24, 24, 3) and batches[0]["image"].dtype == np.uint8
  assert batches[0]["label"].dtype == np.int32
  for s, b in enumerate(batches):
    recs, pos = o.records(s)
    np.testing.assert_array_equal(b["label"], recs)
    # row r is the training transform of its record keyed by its stream position
    r = 7
    ref = transforms.train_transform(src.images[recs[r]], transforms.rng(3, int(pos[r])),
                                     image_size=24, crop_scale=(0.08, 1.0), random_flip=True,
                                     color_jitter=(0.2, 0.2, 0.2, 0.1))
    np.testing.assert_array_equal(b["image"][r], ref)
  # epoch 0 and 1 hold every record once each, in different orders
  first = np.concatenate([b["label"] for b in batches[:2]])
  second = np.concatenate([b["label"] for b in batches[2:]])
  assert sorted(first) == sorted(second) == list(range(20))
  assert not np.array_equal(first, second)
  # the same record gets another crop in another epoch (the position keys the draws)
  i, j = int(np.where(first == 0)[0][0]), int(np.where(second == 0)[0][0])
  assert not np.array_equal(np.concatenate([b["image"] for b in batches[:2]])[i],
                            np.concatenate([b["image"] for b in batches[2:]])[j])


def test_two_processes_rows_stack_to_the_one_process_batch():
  """1 process (x 2 devices: one host batch of 8) == 2 processes x 4 rows, stacked; also
  with another number of threads."""
  src = MemorySource(photo_jpegs(13))
  whole = take(loader.train_batches(src, cfg(workers=1), order.TrainOrder(13, 8, 3), 1, 5), 4)
  parts = [take(loader.train_batches(
      src, cfg(workers=2), order.TrainOrder(13, 8, 3, process_index=p, process_count=2), 1,
      5), 4) for p in range(2)]
  for step in range(4):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])


def test_resume_at_step_k_equals_the_straight_run_and_reads_only_its_batches():
  src = MemorySource(photo_jpegs(11))
  o = order.TrainOrder(len(src), 4, seed=1)
  straight = take(loader.train_batches(src, cfg(), o, 0, 12), 12)
  for k in (5, 9):  # 5: inside epoch 1; 9: a batch straddling epochs 3 and 4
    resumed = take(loader.train_batches(src, cfg(), o, k, 12), 12 - k)
    for a, b in zip(straight[k:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  # resuming a million steps in reads a few batches' records, not a million batches'
  counted = MemorySource(src.images)
  it = loader.train_batches(counted, cfg(), order.TrainOrder(11, 4, 1), 10**6, 10**6 + 100)
  first = next(it)
  assert counted.reads <= 4 * 4, counted.reads  # the batch + Grain's prefetch buffer
  recs, _ = order.TrainOrder(11, 4, 1).records(10**6)
  np.testing.assert_array_equal(first["label"], recs)


def test_eval_covers_every_example_once_across_processes():
  images = photo_jpegs(23, seed=1)
  src = MemorySource(images)
  c = cfg(image_size=20)
  seen, counts, images_seen = [], set(), {}
  for p in range(2):
    batches, n, total = loader.eval_batches(src, c, 5, 10, process_index=p, process_count=2)
    batches = list(batches)
    assert n == 3 and total == 23 and len(batches) == 3  # same number on every process
    counts.add(len(batches))
    for b in batches:
      assert b["image"].dtype == np.uint8 and b["image"].shape == (5, 20, 20, 3)
      assert b["labels"].shape == (5, 23) and b["mask"].dtype == np.float32
      m = b["mask"].astype(bool)
      labels = b["labels"][m].argmax(-1)
      seen.extend(labels.tolist())
      for i, img in zip(labels, b["image"][m]):
        images_seen[int(i)] = img
      assert not b["image"][~m].any() and not b["labels"][~m].any()  # padding is zeros
  assert sorted(seen) == list(range(23))
  ref = transforms.eval_transform(images[17], image_size=20, crop_ratio=0.875)
  np.testing.assert_array_equal(images_seen[17], ref)


def test_eval_label_sets_are_multi_hot_and_may_be_empty():
  sets = [np.array([1, 3]), np.array([], np.int64), np.array([2])]
  src = MemorySource(photo_jpegs(3), num_classes=4, labels=sets, multi_label=True)
  batch = next(loader.eval_batches(src, cfg(image_size=16), 4, 4)[0])
  np.testing.assert_array_equal(batch["labels"], [[0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0],
                                                  [0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["mask"], [1, 1, 1, 0])


def test_an_undecodable_training_image_is_named():
  images = photo_jpegs(6)
  images[4] = images[4][:40]  # truncated
  it = loader.train_batches(MemorySource(images), cfg(), order.TrainOrder(6, 6, 0), 0, 1)
  with pytest.raises(transforms.ImageDecodeError, match="img4.jpg"):
    next(it)


def test_device_prefetch_keeps_order_and_counts_waits():
  seen = []
  it = loader.DevicePrefetch(iter(range(5)), lambda x: seen.append(x) or 10 * x, size=2)
  assert list(it) == [0, 10, 20, 30, 40]
  assert seen == [0, 1, 2, 3, 4] and it.calls == 6
  assert it.wait_fraction() is not None and 0 <= it.wait_fraction() <= 1
  assert loader.default_workers() >= 1


def _save(path, fmt, mode="RGB", **kw):
  rng = np.random.default_rng(len(str(path)))
  img = Image.fromarray(rng.integers(0, 255, (20, 24, 3)).astype(np.uint8))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  (img.convert(mode) if mode != "RGB" else img).save(path, fmt, **kw)


@pytest.mark.slow
def test_folder_dataset_of_bmp_gif_webp_trains(tmp_path):
  from helpers.configs import small_config

  from bcdnet_jax.train import loop
  root = tmp_path / "imgs"
  for split in ("train", "val"):
    for c in ("cat", "dog"):
      _save(str(root / split / c / "a.bmp"), "BMP")
      _save(str(root / split / c / "b.gif"), "GIF", mode="P")
      _save(str(root / split / c / "c.webp"), "WEBP")
      _save(str(root / split / c / "d.png"), "PNG")
  c = small_config(str(tmp_path / "tfds"), dataset=f"folder:{root}", eval_split="val",
                   num_train_steps=2, batch_size=4, base_batch_size=4, eval_batch_size=4)
  res = loop.train_and_evaluate(c, str(tmp_path / "wd"))
  assert res["steps"] == 2 and res["num_eval_examples"] == 8
  assert 0 <= res["input_wait_fraction"] <= 1


_NO_TF = r"""
import json, os, sys
sys.path.insert(0, os.path.join({root!r}, "tests"))
from helpers.configs import small_config
from bcdnet_jax.deploy import export
from bcdnet_jax.deploy import predict
from bcdnet_jax.train import evaluate as evaluate_lib
from bcdnet_jax.train import loop
wd, tmp, data_dir = {wd!r}, {tmp!r}, {data_dir!r}
res = loop.train_and_evaluate(small_config(data_dir, num_train_steps=1), wd)
ev = evaluate_lib.evaluate(small_config(data_dir, mode="eval", checkpoint=wd), tmp + "/ev")
art = tmp + "/m.bcdnet"
export.export_checkpoint(wd, art)
rc = predict.main(["--model", art, "--json", {png!r}])
print(json.dumps({{"tf": "tensorflow" in sys.modules, "rc": rc, "top1": ev["top1"],
                   "steps": res["steps"]}}))
"""


@pytest.mark.slow
def test_training_evaluation_export_predict_without_tensorflow(tmp_path, digits_dir):
  """On a host where TensorFlow is not installed (`python -S`, site-packages without it):
  a training step, an evaluation, an export and a prediction run and never import it."""
  from helpers.no_tensorflow import ROOT, run_without_tensorflow
  png = tmp_path / "x.png"
  _save(str(png), "PNG")
  code = _NO_TF.format(root=ROOT, wd=str(tmp_path / "wd"), tmp=str(tmp_path),
                       data_dir=digits_dir, png=str(png))
  out = run_without_tensorflow(code, str(tmp_path), timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res == {"tf": False, "rc": 0, "top1": res["top1"], "steps": 1}


def test_missing_dataset_is_a_data_error(tmp_path):
  with pytest.raises(data.DataError, match="bcdnet_jax.prepare"):
    data.open_source("imagenet2012", "train", str(tmp_path))
