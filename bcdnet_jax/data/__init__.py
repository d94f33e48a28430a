"""The input pipeline, TensorFlow-free at run time.

The trainer asks for an iterator of host batches at a step (`loader.train_batches`);
mean/std normalisation runs on the device inside the jitted steps
(`preprocessing.normalize`).

Modules:
  sources: random access to (image bytes, label, name): TFDS data sources (ArrayRecord),
    the digits demo; label and decode checks.
  folders: folder trees of every file PIL opens (ImageFolder order), checked first.
  order: the global example stream: a seeded permutation of the whole split per epoch,
    this process's rows of each global batch, the position a function of the step
    (resuming at step k reads O(batch) records, not O(k)).
  transforms: PIL decoding and torchvision's transforms on PIL images (uint8 out).
  loader: Grain: source + order + transforms -> uint8 host batches (threads), evaluation
    padded + masked, prefetch to the device.
  prepare: `bcdnet-prepare`: build or convert TFDS datasets to ArrayRecord.
"""

from bcdnet_jax.data.folders import check_folder
from bcdnet_jax.data.loader import (
                                    EVAL_SPLITS,
                                    DataConfig,
                                    DevicePrefetch,
                                    default_workers,
                                    eval_batches,
                                    parse_eval_dataset,
                                    train_batches,
)
from bcdnet_jax.data.order import EvalOrder, TrainOrder, epoch_permutation
from bcdnet_jax.data.sources import (
                                    DataError,
                                    Source,
                                    check_images,
                                    check_labels,
                                    open_source,
)
from bcdnet_jax.data.transforms import (
                                    ImageDecodeError,
                                    eval_transform,
                                    set_max_image_pixels,
                                    train_transform,
)

__all__ = ["DataConfig", "DataError", "DevicePrefetch", "EVAL_SPLITS", "EvalOrder",
           "ImageDecodeError", "Source", "TrainOrder", "check_folder", "check_images",
           "check_labels", "default_workers", "epoch_permutation", "eval_batches",
           "eval_transform", "open_source", "parse_eval_dataset", "set_max_image_pixels",
           "train_batches", "train_transform"]
