"""Grain: source + order + PIL transforms -> uint8 host batches, in parallel, prefetched.

Training: `train_batches(source, cfg, order, start_step, stop_step)` yields this process's
rows of global batches start_step, start_step + 1, ... (`order.TrainOrder`) as
`{"image": uint8 [local, S, S, 3], "label": int32 [local]}`. Evaluation:
`eval_batches(source, cfg, local_batch, global_batch, ...)` yields padded, masked batches
`{"image": uint8 [local, S, S, 3], "labels": float32 [local, classes] (multi-hot: the ReaL
label set, possibly empty), "mask": float32 [local]}`, the same number on every process,
every example in exactly one row of one process. Mean/std normalisation is not done here:
it runs on the device inside the jitted steps (`preprocessing.normalize`), so 4x fewer
bytes travel host -> device.

Parallelism: `workers` threads of one Grain pipeline per process, each decoding and
transforming single images (PIL's decoder and resampler release the GIL). Threads, not
Grain's worker processes: measured on 2 cores with photographic 500x375 JPEGs at 224 px,
threads gave 280-380 training images per CPU-second, two worker processes 290-310, and
processes cost a spawn (a re-import of JAX) and a copy of the source each. The order and
the images do not depend on the number of threads. Grain's `ReadOptions` are always set
explicitly (its defaults start 16 threads per process).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import grain
import numpy as np

from bcdnet_jax.data import order as order_lib
from bcdnet_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The input pipeline's view of a run config (built by the trainer from it).

  Attributes:
    image_size: side S of the square uint8 images, pixels.
    eval_crop_ratio: evaluation centre crop over the resized shorter side, in (0, 1].
    color_jitter: (brightness, contrast, saturation, hue) of torchvision's ColorJitter.
    crop_scale: RandomResizedCrop's area range (min, max).
    random_flip: horizontal flip with p = 0.5 in training.
    seed: keys every random draw with the stream position.
    workers: decoding threads per process; 0: `default_workers()`.
  """
  image_size: int
  eval_crop_ratio: float = 224 / 256
  color_jitter: tuple = (0.0, 0.0, 0.0, 0.0)
  crop_scale: tuple = (0.08, 1.0)
  random_flip: bool = True
  seed: int = 0
  workers: int = 0  # threads; 0: auto (`default_workers`)
  max_image_pixels: int = 0  # images over it are refused; 0: PIL's limit


def default_workers() -> int:
  """Decoding threads when none are asked for.

  Returns:
    All cores of this process's share (its CPU affinity: SLURM's --cpus-per-task) but
    one (the training loop's), at least 1.
  """
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return max(1, cores - 1)


def _workers(cfg: DataConfig) -> int:
  return cfg.workers if cfg.workers > 0 else default_workers()


class _TrainExample:
  """Element j of the stream from `start_step`: row j % L of global batch start + j // L.
  A class, not a closure: Grain's worker processes pickle it."""

  def __init__(self, source, cfg: DataConfig, order: order_lib.TrainOrder, start_step: int):
    self.source, self.cfg, self.order, self.start_step = source, cfg, order, start_step

  def __call__(self, j: int) -> dict:
    o, cfg = self.order, self.cfg
    step, row = divmod(int(j), o.local_batch)
    position = (self.start_step + step) * o.global_batch + o.process_index * o.local_batch + row
    ex = self.source[o.record(position)]
    image = transforms.train_transform(
        ex["image"], transforms.rng(cfg.seed, position), image_size=cfg.image_size,
        crop_scale=tuple(cfg.crop_scale), random_flip=cfg.random_flip,
        color_jitter=tuple(cfg.color_jitter), name=ex["name"])
    return {"image": image, "label": np.int32(ex["label"])}


class _EvalExample:
  """Element j: row j % L of evaluation batch j // L; padding rows are zeros, mask 0."""

  def __init__(self, source, cfg: DataConfig, order: order_lib.EvalOrder, num_classes: int):
    self.source, self.cfg, self.order, self.num_classes = source, cfg, order, num_classes

  def __call__(self, j: int) -> dict:
    batch, row = divmod(int(j), self.order.local_batch)
    index = int(self.order.records(batch)[row])
    s = self.cfg.image_size
    labels = np.zeros(self.num_classes, np.float32)
    if index < 0:
      return {"image": np.zeros((s, s, 3), np.uint8), "labels": labels,
              "mask": np.float32(0.0)}
    ex = self.source[index]
    labels[np.asarray(ex["label"], np.int64).reshape(-1)] = 1.0  # a set, maybe empty
    image = transforms.eval_transform(ex["image"], image_size=s,
                                      crop_ratio=self.cfg.eval_crop_ratio, name=ex["name"])
    return {"image": image, "labels": labels, "mask": np.float32(1.0)}


def _pipeline(fn: Callable[[int], dict], num_elements: int, local_batch: int,
              cfg: DataConfig) -> grain.IterDataset:
  """Elements 0..num_elements-1 through `fn`, batched by `local_batch`, in order."""
  ds = grain.MapDataset.range(num_elements).map(fn)
  # Threads transform single images, in order; the buffer keeps the next batch in flight.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=_workers(cfg),
                                            prefetch_buffer_size=2 * local_batch))
  return it.batch(local_batch, drop_remainder=True)


def train_batches(source, cfg: DataConfig, order: order_lib.TrainOrder, start_step: int,
                  stop_step: int) -> Iterator[dict]:
  """This process's host batches of global batches `start_step .. stop_step - 1`.

  Reads only this process's records of those batches (nothing before `start_step`), so
  resuming at step k costs O(batch), not O(k).

  Args:
    source: the training split (`open_source`).
    cfg: image size, augmentation, seed and threads.
    order: the global stream and this process's rows of it.
    start_step: the first global batch.
    stop_step: one past the last global batch.

  Returns:
    An iterator of `{"image": uint8 [local, S, S, 3], "label": int32 [local]}`.

  Raises:
    ImageDecodeError: (while iterating) an undecodable image, named; the run stops, since
      skipping it would change the order.
  """
  n = max(0, stop_step - start_step) * order.local_batch
  # PIL's limit is process-wide: set once here for the worker threads, not per example
  # (a pipeline still draining would reset it under the next one)
  transforms.set_max_image_pixels(cfg.max_image_pixels)
  return iter(_pipeline(_TrainExample(source, cfg, order, start_step), n, order.local_batch,
                        cfg))


def eval_batches(source, cfg: DataConfig, local_batch: int, global_batch: int, *,
                 process_index: int = 0, process_count: int = 1):
  """This process's evaluation batches of a whole split, padded and masked.

  Every process yields the same number of batches and each example appears once, in one
  row of one process (`order.EvalOrder`).

  Args:
    source: the evaluation split (`open_source`).
    cfg: image size and crop ratio, threads.
    local_batch: rows per batch of this process (= global_batch / process_count).
    global_batch: rows per batch over all processes.
    process_index: this process.
    process_count: processes evaluating.

  Returns:
    (iterator of host batches, number of batches, number of examples in the split);
    a batch is `{"image": uint8 [local, S, S, 3], "labels": float32 [local, classes],
    "mask": float32 [local]}` (mask 0 on padding rows).

  Raises:
    ValueError: `local_batch` is not `global_batch / process_count`.
  """
  o = order_lib.EvalOrder(len(source), global_batch, process_index=process_index,
                          process_count=process_count)
  if o.local_batch != local_batch:
    raise ValueError(f"local batch {local_batch} != {global_batch} / {process_count}")
  fn = _EvalExample(source, cfg, o, int(source.num_classes))
  transforms.set_max_image_pixels(cfg.max_image_pixels)  # process-wide, once (train_batches)
  return iter(_pipeline(fn, o.num_batches * local_batch, local_batch, cfg)), \
      o.num_batches, len(source)


class DevicePrefetch:
  """Puts the next `size` host batches on the device while the current step runs.

  It records how long the consumer was blocked waiting for host batches after the first
  (`wait_s`, from `since`: the start of the second request, i.e. after compilation). JAX
  dispatches steps asynchronously, so the device may still be computing during part of
  that time: `wait_fraction()` is an upper bound of the time the step waited for input
  (0: input never held the loop up).

  Args:
    host_batches: an iterator of host batches.
    put: host batch -> device batch, e.g. `runtime.Runtime.global_batch`.
    size: batches kept ahead on the device.
  """

  def __init__(self, host_batches: Iterator[Any], put: Callable[[Any], Any], size: int = 2):
    self._it, self._put, self._size = host_batches, put, size
    self._queue: collections.deque = collections.deque()
    self.calls = 0
    self.wait_s = 0.0
    self.since: float | None = None

  def __iter__(self):
    return self

  def __next__(self):
    self.calls += 1
    if self.calls == 2:
      self.since = time.perf_counter()
    while len(self._queue) < self._size:
      t0 = time.perf_counter()
      try:
        host = next(self._it)
      except StopIteration:
        break
      finally:
        if self.calls > 1:
          self.wait_s += time.perf_counter() - t0
      self._queue.append(self._put(host))
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()

  def wait_fraction(self) -> float | None:
    """Fraction of the wall time since the second batch spent waiting for host batches."""
    if self.since is None:
      return None
    return self.wait_s / max(time.perf_counter() - self.since, 1e-9)


# --- the ImageNet test sets -----------------------------------------------------------------

# The sets users report next to the validation top-1, and their splits.
EVAL_SPLITS = {"imagenet2012": "validation", "imagenet2012_real": "validation",
               "imagenet_v2": "test", "imagenet_v2/matched-frequency": "test",
               "imagenet_v2/threshold-0.7": "test", "imagenet_v2/topimages": "test"}


def parse_eval_dataset(entry: str, default_split: str) -> tuple[str, str]:
  """Splits an `eval_datasets` entry 'name[:split]' into (TFDS name, split).

  'folder:/path:split' keeps the path whole (the split is after the last colon).

  Args:
    entry: one comma-separated entry of `config.eval_datasets`.
    default_split: the split when the entry names none and the set has no own split.

  Returns:
    (name, split); the split defaults to the set's own (`EVAL_SPLITS`: validation for
    imagenet2012 and ReaL, test for ImageNet-V2), else `default_split`; 'imagenet_v2'
    is its matched-frequency variant, the one papers report.
  """
  entry = entry.strip()
  if entry.startswith("folder:"):
    root, sep, split = entry[len("folder:"):].rpartition(":")
    return ("folder:" + root, split) if sep else (entry, default_split)
  name, _, split = entry.partition(":")
  if name == "imagenet_v2":
    name = "imagenet_v2/matched-frequency"  # the variant papers report
  return name, split or EVAL_SPLITS.get(name, default_split)
