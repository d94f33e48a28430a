"""`bcdnet-prepare` (`python -m bcdnet_jax prepare`): data sets in ArrayRecord format.

    python -m bcdnet_jax prepare imagenet2012 --data_dir=DIR [--manual_dir=DIR/downloads/manual]
    python -m bcdnet_jax prepare imagenet_v2 imagenet2012_real digits --data_dir=DIR
    python -m bcdnet_jax prepare --convert_from_tfrecord imagenet2012 --data_dir=DIR

Builds TFDS data sets in ArrayRecord format (random access: what `data.sources` reads) with
TFDS' own builders and no Apache Beam: `imagenet2012` from image-net.org's
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the manual directory, `imagenet_v2`
(all three variants, or one: `imagenet_v2/matched-frequency`) and the ReaL labels of
`imagenet2012_real` downloaded by TFDS (ReaL also needs ILSVRC2012_img_val.tar), `digits`,
or any other TFDS image classification set that builds without Beam.
`--convert_from_tfrecord NAME` adds ArrayRecord files to a data set already prepared in
TFRecord format (e.g. by `tfds build`), copying the serialised records: images are not
re-encoded.

TensorFlow is needed here, and only here: TFDS' builders (4.9) read the ImageNet archives
and downloads through `tf.io.gfile`, and TFRecord files are read with `tf.data` (install
the `prepare` extra where the data is prepared). `digits` builds without it, and reading
the prepared ArrayRecord files (`data.sources`) never imports it.

TFDS writes a build into an `incomplete.*` directory and renames it when complete, and a
conversion updates `dataset_info.json` only after every shard is written, so an
interrupted or failed run never leaves a data set that looks prepared (rerunning it
resumes a conversion, and restarts a build). Progress goes to stderr as plain lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time

from bcdnet_jax import errors
from bcdnet_jax.data import sources
from bcdnet_jax.data.sources import DataError

IMAGENET_V2_VARIANTS = ("imagenet_v2/matched-frequency", "imagenet_v2/threshold-0.7",
                        "imagenet_v2/topimages")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def default_manual_dir(data_dir: str | None) -> str:
  return os.path.join(data_dir or sources.default_data_dir(), "downloads", "manual")


def check_writable(data_dir: str) -> None:
  """Raises DataError unless files can be created in `data_dir` (made if missing)."""
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(f"--data_dir {data_dir} is a file, not a directory; pass the TFDS data "
                    "directory")
  try:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".bcdnet-prepare-"):
      pass
  except OSError as e:
    raise DataError(f"cannot write to data_dir {data_dir}: {e.strerror or e}") from None


def check_manual(dataset: str, manual_dir: str) -> None:
  """Raises DataError naming the ImageNet archives `dataset` needs that `manual_dir` lacks."""
  need = sources.manual_tars(dataset)
  missing = [t for t in need if not os.path.isfile(os.path.join(manual_dir, t))]
  if missing:
    raise DataError(f"{dataset} is built from {' and '.join(need)} (image-net.org, after "
                    f"registering): missing {', '.join(missing)} in {manual_dir} (pass "
                    "--manual_dir=DIR where they are)")
  for t in need:
    path = os.path.join(manual_dir, t)
    try:
      if not tarfile.is_tarfile(path):
        raise DataError(f"{path} is not a tar archive (truncated or another file?)")
    except OSError as e:
      raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def expand(names) -> list[str]:
  """'imagenet_v2' stands for its three variants; other names are kept, in order."""
  out = []
  for name in names:
    for n in (IMAGENET_V2_VARIANTS if name == "imagenet_v2" else (name,)):
      if n not in out:
        out.append(n)
  return out


class _Progress:
  """Wraps a builder's example generator: a line on stderr every `every_s` seconds and at
  the end (TFDS' tqdm bars are switched off: escape codes in redirected logs)."""

  def __init__(self, dataset: str, generate, every_s: float):
    self.dataset, self.generate, self.every_s = dataset, generate, every_s
    self.last_key = None  # the last example read: where a damaged archive broke off

  def __call__(self, *args, **kwargs):
    start = last = time.monotonic()
    n = 0
    for n, item in enumerate(self.generate(*args, **kwargs), 1):
      self.last_key = item[0]
      now = time.monotonic()
      if now - last >= self.every_s:
        _log(f"{self.dataset}: {n:,} examples read ({n / (now - start):,.0f}/s)")
        last = now
      yield item
    _log(f"{self.dataset}: {n:,} examples read in {time.monotonic() - start:,.0f} s; "
         "shuffling and writing ArrayRecord shards")


def _build(dataset: str, builder, download_config, every_s: float) -> None:
  progress = _Progress(dataset, builder._generate_examples, every_s)  # noqa: SLF001
  builder._generate_examples = progress  # noqa: SLF001
  # the banner TFDS prints on stdout for every build ("Downloading and preparing dataset
  # Unknown size ..."): our own lines say what happens
  builder._log_download_bytes = lambda: None  # noqa: SLF001
  builder._log_download_done = lambda: None  # noqa: SLF001
  from tensorflow_datasets.core.download import download_manager, extractor, util
  failures = (OSError, tarfile.TarError, EOFError, util.DownloadError, extractor.ExtractError,
              download_manager.NonMatchingChecksumError)
  try:
    with sources.quiet_tfds():
      builder.download_and_prepare(download_config=download_config)
  except failures as e:  # disk full, a damaged archive, the network, a changed download
    detail = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [""])[0]
    where = (f" from {', '.join(sources.manual_tars(dataset))} in "
             f"{download_config.manual_dir}" if sources.manual_tars(dataset) else "")
    after = f" after {progress.last_key}" if progress.last_key is not None else ""
    raise DataError(f"preparing {dataset}{where} failed{after}: {type(e).__name__}: "
                    f"{detail}; nothing is left as prepared in {builder.data_dir}") from None


def _not_folder(dataset: str) -> None:
  if dataset.startswith("folder:"):
    raise DataError(f"{dataset}: folder: datasets are read directly from their files; "
                    "nothing to prepare")


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None, *,
            progress_every_s: float = 30.0) -> str:
  """Builds `dataset` in ArrayRecord format under `data_dir` (default $TFDS_DATA_DIR or
  ~/tensorflow_datasets); returns its directory. A data set already prepared in
  ArrayRecord format is left as it is. Raises DataError for an unknown name, missing
  ImageNet archives (naming the files and directory), an unwritable data_dir, a data set
  prepared in TFRecord format only (naming the conversion), or a failed build."""
  _not_folder(dataset)
  root = data_dir or sources.default_data_dir()
  check_writable(root)
  if dataset == "digits":
    builder = sources.digits_builder(root)
    _log(f"digits: prepared in {builder.data_dir}")
    return builder.data_dir
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import file_adapters

  builder = sources.tfds_builder(dataset, root)
  with sources.quiet_absl():
    prepared = builder.is_prepared()
  if prepared:
    if file_adapters.FileFormat.ARRAY_RECORD in builder.info.available_file_formats():
      _log(f"{dataset}: already prepared in ArrayRecord format in {builder.data_dir}")
      return builder.data_dir
    raise DataError(f"{dataset} is prepared in {builder.info.file_format.value} format in "
                    f"{builder.data_dir}; convert it (images are copied, not re-encoded): "
                    f"`python -m bcdnet_jax prepare --convert_from_tfrecord {dataset} "
                    f"--data_dir={root}`")
  manual = manual_dir or default_manual_dir(root)
  check_manual(dataset, manual)
  _tensorflow(f"building {dataset} with TFDS' builder (it reads its archives and downloads "
              "through tf.io.gfile)")
  builder = tfds.builder(dataset, data_dir=root, file_format="array_record")
  _log(f"{dataset}: building in ArrayRecord format into {builder.data_dir}"
       + (f" from {', '.join(sources.manual_tars(dataset))} in {manual}"
          if sources.manual_tars(dataset) else ""))
  _build(dataset, builder, tfds.download.DownloadConfig(manual_dir=manual), progress_every_s)
  _log(f"{dataset}: prepared in {builder.data_dir} ("
       + ", ".join(f"{s} {builder.info.splits[s].num_examples:,}"
                   for s in sorted(builder.info.splits)) + " examples)")
  return builder.data_dir


def _tensorflow(purpose: str):
  """TensorFlow, for what TFDS does with it; one line naming `purpose` when it is missing
  (checked before TFDS prints its own banner and traceback)."""
  import importlib.util
  if importlib.util.find_spec("tensorflow") is None:
    raise DataError(f"{purpose} needs TensorFlow: pip install 'bcdnet-jax[prepare]' (or "
                    "tensorflow-cpu) where you prepare the data; reading it for training, "
                    "evaluation and predict does not need TensorFlow")
  import tensorflow as tf
  return tf


def convert_from_tfrecord(dataset: str, data_dir: str | None = None) -> str:
  """Adds ArrayRecord shards to `dataset`, prepared in TFRecord format under `data_dir`,
  holding the same serialised records (the images are not decoded or re-encoded), then
  records the format in its dataset_info.json; returns the data set's directory.

  Shards already converted are kept (an interrupted conversion resumes), each is written
  to a temporary file and renamed, and dataset_info.json changes last, so the data set
  counts as readable in ArrayRecord format only once every shard exists. Raises DataError
  for an unknown or unprepared data set, an unwritable directory, a shard whose record
  count differs from dataset_info.json, or no TensorFlow."""
  import dataclasses

  from tensorflow_datasets.core import dataset_info as dataset_info_lib
  from tensorflow_datasets.core import file_adapters
  from tensorflow_datasets.core.utils import py_utils

  _not_folder(dataset)
  root = data_dir or sources.default_data_dir()
  builder = sources.tfds_builder(dataset, root)
  with sources.quiet_absl():
    prepared = builder.is_prepared()
  if not prepared:
    raise DataError(f"{dataset} is not prepared in {builder.data_dir}: nothing to convert "
                    f"(build it: `{sources.prepare_command(dataset, data_dir)}`)")
  info = builder.info
  fmt = file_adapters.FileFormat
  if fmt.ARRAY_RECORD in info.available_file_formats():
    _log(f"{dataset}: already readable in ArrayRecord format in {builder.data_dir}")
    return builder.data_dir
  if info.file_format != fmt.TFRECORD:
    raise DataError(f"{dataset} in {builder.data_dir} is in {info.file_format.value} "
                    "format, not TFRecord; only TFRecord data sets convert")
  check_writable(builder.data_dir)
  tf = _tensorflow("reading TFRecord files")
  writer = file_adapters.ADAPTER_FOR_FORMAT[fmt.ARRAY_RECORD]
  start = time.monotonic()
  for split_name, split in sorted(info.splits.items()):
    template = split.filename_template
    out_template = dataclasses.replace(template, filetype_suffix=fmt.ARRAY_RECORD.file_suffix)
    lengths = list(split.shard_lengths)
    for i, want in enumerate(lengths):
      src = template.sharded_filepath(shard_index=i, num_shards=len(lengths))
      dst = out_template.sharded_filepath(shard_index=i, num_shards=len(lengths))
      if dst.exists():
        continue
      count = [0]

      def records(src=src, count=count):
        for record in tf.data.TFRecordDataset(os.fspath(src)).as_numpy_iterator():
          count[0] += 1
          yield None, record

      try:
        with py_utils.incomplete_file(dst) as tmp:
          writer.write_examples(tmp, records())
          if count[0] != want:
            raise DataError(f"{src}: {count[0]} records, dataset_info.json says {want}; "
                            "the TFRecord data set is damaged, rebuild it")
      except (OSError, tf.errors.OpError) as e:
        msg = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
        raise DataError(f"converting {src} failed: {msg.strip().splitlines()[0]}; the "
                        "shards converted so far are kept, rerun to resume") from None
      _log(f"{dataset} {split_name}: shard {i + 1}/{len(lengths)} converted "
           f"({time.monotonic() - start:,.0f} s)")
  proto = dataset_info_lib.read_proto_from_builder_dir(builder.data_dir)
  proto.alternative_file_formats.append(fmt.ARRAY_RECORD.value)
  path = os.path.join(builder.data_dir, "dataset_info.json")
  with py_utils.incomplete_file(dataset_info_lib.epath.Path(path)) as tmp:
    tmp.write_text(dataset_info_lib.get_dataset_info_json(proto))
  _log(f"{dataset}: readable in ArrayRecord format in {builder.data_dir}")
  return builder.data_dir


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="bcdnet-prepare",
      description="Prepare data sets in ArrayRecord format for bcdnet-jax (TFDS builders, "
                  "no Apache Beam), or convert TFRecord-format TFDS data sets.")
  p.add_argument("datasets", nargs="*", metavar="NAME",
                 help="imagenet2012, imagenet_v2 (three variants) or imagenet_v2/VARIANT, "
                      "imagenet2012_real, digits, or another TFDS name")
  p.add_argument("--data_dir", default=None,
                 help="TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--manual_dir", default=None,
                 help="where ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar are "
                      "(default DATA_DIR/downloads/manual)")
  p.add_argument("--convert_from_tfrecord", metavar="NAME", action="append", default=[],
                 help="add ArrayRecord files to a data set prepared in TFRecord format "
                      "(repeatable; needs TensorFlow)")
  a = p.parse_args(argv)
  if not a.datasets and not a.convert_from_tfrecord:
    p.error("name a data set to prepare, or --convert_from_tfrecord NAME")
  # TensorFlow, where TFDS imports it while building, logs CPU-feature lines on stderr
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    for name in a.convert_from_tfrecord:
      convert_from_tfrecord(name, a.data_dir)
    for name in expand(a.datasets):
      prepare(name, a.data_dir, a.manual_dir)
  except errors.UserError as e:
    return errors.report(e)
  return 0


def cli() -> None:
  """The `bcdnet-prepare` console script."""
  errors.run_cli(main)


if __name__ == "__main__":
  cli()
