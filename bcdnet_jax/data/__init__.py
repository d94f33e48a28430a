"""Input pipelines on TFDS / tf.data: ImageNet-style training and evaluation.

Each process yields the host batches of its own rows of every global batch (training) or
its own part of the split (evaluation, `tfds.split_for_jax_process`); `train.py` assembles
them into global arrays on the device mesh. Training is
deterministic given the seed (stateless random ops keyed by the example's position in the
stream), so the iterator position alone (batches consumed) restores it. Evaluation pads
and masks the last batches so every example counts exactly once across processes.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bcdnet_jax import errors, preprocessing, transforms

MEAN_RGB, STDDEV_RGB = preprocessing.MEAN_RGB, preprocessing.STDDEV_RGB


class DataError(errors.UserError):
  """A dataset that cannot be found or read; the message says where we looked."""


# --- the built-in digits data set -----------------------------------------------------------

class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (1,797 images) as 32x32 RGB PNGs.

  A small real data set that ships with a dependency, so the demo and the tests run the
  same TFDS/tf.data path as ImageNet without any download. 360 images (20 %, stratified,
  fixed seed) form the test split.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn digits upscaled to 32x32 RGB",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    test = np.zeros(len(labels), bool)
    for c in range(10):  # stratified 20 % test split
      idx = order[labels[order] == c]
      test[idx[: int(round(0.2 * len(idx)))]] = True
    return {"train": self._generate_examples(images[~test], labels[~test]),
            "test": self._generate_examples(images[test], labels[test])}

  def _generate_examples(self, images, labels):
    for i, (img, label) in enumerate(zip(images, labels)):
      big = np.kron(img, np.ones((4, 4), np.uint8))  # 8x8 -> 32x32, nearest
      yield i, {"image": np.repeat(big[:, :, None], 3, axis=2), "label": int(label)}


# --- finding the data -----------------------------------------------------------------------

def get_builder(dataset: str, data_dir: str | None):
  """The TFDS builder for `dataset`, prepared; 'digits' is built on first use.

  `dataset` is a TFDS name ('imagenet2012', 'cifar10', ...), 'digits', or
  'folder:/path' for an ImageFolder tree (path/split/label/image.jpg).
  """
  if dataset.startswith("folder:"):
    root = dataset[len("folder:"):]
    if not os.path.isdir(root):
      raise DataError(f"image folder {root!r} does not exist (expected "
                      f"{root}/<split>/<label>/<image>.jpg)")
    check_folder(root)
    return tfds.ImageFolder(root)
  if dataset == "digits":
    builder = Digits(data_dir=data_dir)
    builder.download_and_prepare()
    return builder
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - unknown names raise DatasetNotFoundError
    raise DataError(f"unknown TFDS dataset {dataset!r}: {e}") from None
  if not builder.is_prepared():
    where = builder.data_dir
    hint = ""
    root = data_dir or "~/tensorflow_datasets"
    manual = os.path.join(data_dir or os.path.expanduser("~/tensorflow_datasets"),
                          "downloads", "manual")
    if dataset.startswith("imagenet2012"):
      tars = ("ILSVRC2012_img_val.tar" if dataset.startswith("imagenet2012_real") else
              "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar")
      hint = (f"\n{dataset} needs a manual download: put {tars} in {manual}, then run\n"
              f"  tfds build {dataset} --data_dir={root}"
              f"\n(or pass --config.data_dir=DIR where it is already prepared)")
    elif dataset.startswith("imagenet_v2"):
      hint = (f"\nImageNet-V2 downloads by itself: run\n  tfds build {dataset} "
              f"--data_dir={root}\n(or pass --config.data_dir=DIR where it is prepared)")
    raise DataError(f"dataset {dataset!r} is not prepared: nothing found at {where}{hint}")
  return builder


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what tfds.ImageFolder takes


def check_folder(root: str) -> None:
  """An ImageFolder tree whose splits have the same classes, none of them empty; the
  message names the classes at fault (tfds would merge them silently)."""
  splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not splits:
    raise DataError(f"image folder {root}: no split directories (expected "
                    f"{root}/<split>/<label>/<image>.jpg)")
  classes = {}
  for split in splits:
    sdir = os.path.join(root, split)
    names = sorted(d for d in os.listdir(sdir) if os.path.isdir(os.path.join(sdir, d)))
    empty = [n for n in names if not any(f.lower().endswith(_IMAGE_SUFFIXES)
                                         for f in os.listdir(os.path.join(sdir, n)))]
    if empty:
      raise DataError(f"image folder {sdir}: class directories without images "
                      f"({', '.join(_IMAGE_SUFFIXES)}): {', '.join(empty[:10])}")
    classes[split] = set(names)
  first = splits[0]
  for split in splits[1:]:
    if classes[split] != classes[first]:
      only_a = sorted(classes[first] - classes[split])
      only_b = sorted(classes[split] - classes[first])
      raise DataError(f"image folder {root}: splits {first!r} and {split!r} have different "
                      f"classes (only in {first}: {only_a[:10]}; only in {split}: "
                      f"{only_b[:10]}); the labels would not mean the same")


def undecodable(builder, split: str) -> list[str]:
  """The examples of `split` that cannot be decoded (file names where the builder has
  them, else positions), found by decoding every image once in parallel."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ok = ds.enumerate().map(lambda i, ex: (i, tf.size(transforms.decode(ex["image"]))),
                          num_parallel_calls=tf.data.AUTOTUNE)
  ok = ok.ignore_errors()
  good = {int(i) for i, _ in ok.as_numpy_iterator()}
  total = split_size(builder, split)
  if len(good) == total:
    return []
  has_names = "image/filename" in builder.info.features
  names = []
  for i, ex in enumerate(ds.as_numpy_iterator()):
    if i not in good:
      names.append(ex["image/filename"].decode() if has_names else f"{split}[{i}]")
  return names


def check_images(builder, split: str, dataset: str) -> None:
  """Raises DataError naming the undecodable images of `split`."""
  bad = undecodable(builder, split)
  if bad:
    raise DataError(f"{dataset} split {split!r}: {len(bad)} undecodable image(s) (not JPEG, "
                    f"PNG, GIF or BMP content, empty or truncated): {', '.join(bad[:10])}"
                    f"{' ...' if len(bad) > 10 else ''}; remove or replace them")


def split_size(builder, split: str) -> int:
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError):
    raise DataError(f"dataset {builder.info.name!r} has no split {split!r}; splits: "
                    f"{sorted(builder.info.splits)}") from None


def label_key(builder) -> str:
  """'real_label' for ImageNet-ReaL-style builders (a set of labels per image), else
  'label'."""
  return "real_label" if "real_label" in builder.info.features else "label"


def num_classes(builder) -> int:
  feature = builder.info.features[label_key(builder)]
  return int(getattr(feature, "feature", feature).num_classes)


# The ImageNet test sets users report next to the validation top-1, and their splits.
EVAL_SPLITS = {"imagenet2012": "validation", "imagenet2012_real": "validation",
               "imagenet_v2": "test", "imagenet_v2/matched-frequency": "test",
               "imagenet_v2/threshold-0.7": "test", "imagenet_v2/topimages": "test"}


def parse_eval_dataset(entry: str, default_split: str) -> tuple[str, str]:
  """'name[:split]' -> (TFDS name, split); the split defaults to the set's own
  (`EVAL_SPLITS`: validation for imagenet2012 and ReaL, test for ImageNet-V2)."""
  name, _, split = entry.strip().partition(":")
  if name == "imagenet_v2":
    name = "imagenet_v2/matched-frequency"  # the variant papers report
  return name, split or EVAL_SPLITS.get(name, default_split)


# --- preprocessing --------------------------------------------------------------------------

def _normalize(image, mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB):
  return (image / 255.0 - tf.constant(mean_rgb, tf.float32)) / tf.constant(stddev_rgb,
                                                                           tf.float32)


def eval_resize_size(image_size: int, crop_ratio: float) -> int:
  """The shorter side before the centre crop: 256 for 224 at the usual 0.875."""
  return int(round(image_size / crop_ratio))


def preprocess_train(image_bytes, seed, *, image_size: int,
                     color_jitter: tuple = (0.0, 0.0, 0.0, 0.0),
                     crop_scale: tuple = (0.08, 1.0), random_flip: bool = True,
                     exact_resize: bool = False):
  """torchvision's training transform on a PIL image, decoded by content:
  `RandomResizedCrop(image_size, crop_scale)` (decoding fused with the crop),
  `RandomHorizontalFlip()`, `ColorJitter(*color_jitter)` when any is non-zero, `ToTensor`,
  `Normalize` (see `transforms`). The resize is within one level of PIL's, or equal with
  `exact_resize` (at about half the images/s per core)."""
  s_crop, s_flip, s_color = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  window = transforms.random_resized_crop_window(
      transforms.image_shape(image_bytes), s_crop, scale=tuple(crop_scale))
  image = transforms.resize(transforms.decode_crop(image_bytes, window),
                            image_size, image_size, exact=exact_resize)
  if random_flip:
    image = tf.image.stateless_random_flip_left_right(image, s_flip)
  image = tf.cast(image, tf.float32)
  if any(color_jitter):
    image = transforms.color_jitter(image, s_color, *color_jitter)
  return _normalize(image)


def preprocess_eval(image_bytes, *, image_size: int, crop_ratio: float = 224 / 256,
                    exact_resize: bool = True, mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB):
  """torchvision's `Resize(image_size / crop_ratio)`, `CenterCrop(image_size)`, `ToTensor`,
  `Normalize` on the PIL-decoded image (see `transforms`): equal to PIL's pixels, or
  within one level without `exact_resize`."""
  image = transforms.resize_shorter(transforms.decode(image_bytes),
                                    eval_resize_size(image_size, crop_ratio), exact_resize)
  image = tf.ensure_shape(transforms.center_crop(image, image_size),
                          [image_size, image_size, 3])
  return _normalize(tf.cast(image, tf.float32), mean_rgb, stddev_rgb)


# --- pipelines ------------------------------------------------------------------------------

@dataclasses.dataclass
class DataConfig:
  dataset: str
  data_dir: str | None
  train_split: str
  eval_split: str
  image_size: int
  eval_crop_ratio: float
  color_jitter: tuple
  crop_scale: tuple = (0.08, 1.0)
  random_flip: bool = True
  exact_resize_train: bool = False
  mean_rgb: tuple = MEAN_RGB
  stddev_rgb: tuple = STDDEV_RGB
  shuffle_buffer: int = 16_384
  seed: int = 0
  sharding: str = "global_stream"


def _options():
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = max(1, os.cpu_count() or 1)
  return opts


def train_dataset(builder, cfg: DataConfig, local_batch: int, *, start_batch: int = 0,
                  process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """Infinite, deterministic host batches for this process, resumed at `start_batch`.

  All processes walk the same seeded global stream of examples; process p keeps rows
  [p * local_batch, (p + 1) * local_batch) of every global batch and decodes only those.
  Augmentation is keyed by the example's global position, so a run computes the same
  global batches on any number of processes and devices (and resumes on another count).
  The price is that every process reads (not decodes) every record. With
  `cfg.sharding == "per_process"` each process instead reads only its own even part of
  the split (`tfds.even_splits`) with its own shuffle: less I/O on many hosts, but the
  batches then depend on the process count.
  """
  if cfg.sharding not in ("global_stream", "per_process"):
    raise DataError(f"config.data_sharding: unknown mode {cfg.sharding!r}; expected "
                    "'global_stream' or 'per_process'")
  per_process = cfg.sharding == "per_process" and process_count > 1
  split = (tfds.even_splits(cfg.train_split, n=process_count, drop_remainder=True)
           [process_index] if per_process else cfg.train_split)
  stream_seed = cfg.seed + 7919 * process_index if per_process else cfg.seed
  global_batch = local_batch * process_count
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(options=_options()))
  ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
  ds = ds.repeat()
  ds = ds.shuffle(cfg.shuffle_buffer, seed=stream_seed, reshuffle_each_iteration=True)
  ds = ds.enumerate()
  if per_process:
    ds = ds.skip(start_batch * local_batch)
  else:
    ds = ds.skip(start_batch * global_batch)  # before decoding: cheap to skip
    if process_count > 1:
      ds = ds.filter(lambda i, ex: (i % global_batch) // local_batch == process_index)

  def prep(i, ex):
    s = tf.stack([tf.constant(stream_seed, tf.int64), i])
    return {"image": preprocess_train(ex["image"], s, image_size=cfg.image_size,
                                      color_jitter=tuple(cfg.color_jitter),
                                      crop_scale=tuple(cfg.crop_scale),
                                      random_flip=cfg.random_flip,
                                      exact_resize=cfg.exact_resize_train),
            "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_dataset(builder, cfg: DataConfig, local_batch: int, global_batch: int, *,
                 process_index: int = 0, process_count: int = 1):
  """Host batches with a `mask`; every process yields the same number of batches.

  Labels are multi-hot `labels` [num_classes]: one class for ordinary datasets, the ReaL
  label set for `real_label` builders (empty for the images ReaL excludes). Returns
  (dataset, num_batches, num_examples of the whole split).
  """
  total = split_size(builder, cfg.eval_split)
  num_batches = math.ceil(total / global_batch)
  split = tfds.split_for_jax_process(cfg.eval_split, process_index=process_index,
                                     process_count=process_count, drop_remainder=False) \
      if process_count > 1 else cfg.eval_split
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(options=_options()))
  key, n = label_key(builder), num_classes(builder)

  def prep(ex):
    if key == "real_label":  # a set of labels, possibly empty
      labels = tf.ensure_shape(
          tf.minimum(tf.reduce_sum(tf.one_hot(ex[key], n), axis=0), 1.0), [n])
    else:
      labels = tf.one_hot(ex[key], n)
    return {"image": preprocess_eval(ex["image"], image_size=cfg.image_size,
                                     crop_ratio=cfg.eval_crop_ratio,
                                     mean_rgb=tuple(cfg.mean_rgb),
                                     stddev_rgb=tuple(cfg.stddev_rgb)),
            "labels": labels, "mask": tf.constant(1.0)}

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros([cfg.image_size, cfg.image_size, 3], tf.float32),
      "labels": tf.zeros([n], tf.float32), "mask": tf.constant(0.0)}).repeat()
  ds = ds.concatenate(pad).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options()), num_batches, total
