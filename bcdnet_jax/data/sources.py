"""Random access to (encoded image, label) records: TFDS data sources, folder trees, digits.

Every source is a Grain `RandomAccessDataSource` (`len`, `source[i]`, `source[[i, j]]`
through `__getitems__`) whose records are

    {"image": bytes   - the encoded file, decoded later by `data.transforms` (PIL),
     "label": int     - the class index, or for ReaL-style label sets (`multi_label`) an
                        int64 array [k] of the image's labels, possibly empty,
     "name": str      - the file name where the data set records it, else f"{split}[{index}]"}

Three kinds, chosen by the name given to `open_source`:
- a TFDS name ("imagenet2012", "imagenet_v2/matched-frequency", "imagenet2012_real", any
  other) prepared in ArrayRecord format (`python -m bcdnet_jax prepare NAME`), read through
  `tfds.data_source` with the image left encoded (`tfds.decode.SkipDecoding`). Reading does
  not import TensorFlow.
- "digits": scikit-learn's handwritten digits as 32x32 RGB PNGs, prepared through TFDS in
  ArrayRecord format on first use (quietly).
- "folder:/root": an ImageFolder tree `root/<split>/<class>/<file>`, every file PIL opens.

Sources hold no open file handles when pickled (Grain workers), and reopen on first read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import re
import threading

import numpy as np

from bcdnet_jax import errors


class DataError(errors.UserError):
  """A dataset that cannot be found or read; the message says where we looked."""


def default_data_dir() -> str:
  """TFDS's data directory when none is given: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepare_command(dataset: str, data_dir: str | None) -> str:
  """The exact command that prepares `dataset` in ArrayRecord format under `data_dir`."""
  root = data_dir or default_data_dir()
  cmd = f"python -m bcdnet_jax prepare {dataset} --data_dir={root}"
  if manual_tars(dataset):
    cmd += f" --manual_dir={os.path.join(root, 'downloads', 'manual')}"
  return cmd


def manual_tars(dataset: str) -> tuple[str, ...]:
  """The ImageNet archives (from image-net.org, after registering) `dataset` is built from;
  empty for data sets TFDS downloads by itself."""
  base = dataset.split(":")[0].split("/")[0]
  if base == "imagenet2012":
    return ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
  if base == "imagenet2012_real":
    return ("ILSVRC2012_img_val.tar",)
  return ()


class Source:
  """A random-access split of (encoded image, label, name) records; see the module doc.

  `source[i]` is one record dict, `len(source)` the number of records.

  Attributes:
    dataset: the data set name as given to `open_source`.
    split: the split name as given to `open_source`.
    num_classes: classes of the data set.
    multi_label: True for ReaL-style label sets, whose "label" is an int64 array.
  """

  dataset: str
  split: str
  num_classes: int
  multi_label: bool = False

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict:
    raise NotImplementedError

  def __getitems__(self, indices) -> list[dict]:
    """Batched reads (TFDS' and PyTorch's name); Grain asks for `_getitems`."""
    return [self[i] for i in indices]

  def _getitems(self, indices) -> list[dict]:
    return self.__getitems__(indices)

  def read_labels(self, indices) -> list:
    """The labels of the records `indices` (ints, or int64 arrays for `multi_label`).
    Reads the records; sources that hold their labels override it (no file read)."""
    return [rec["label"] for rec in self.__getitems__(list(indices))]

  # Whether `read_labels` of every record is cheap (labels held in memory, no image read)
  labels_in_memory: bool = False

  def _check_index(self, index) -> int:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"{self.dataset} split {self.split!r}: index {i} out of range "
                       f"[0, {len(self)})")
    return i

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.dataset!r}, split={self.split!r}, "
            f"{len(self)} examples, {self.num_classes} classes)")


# --- TFDS data sources (ArrayRecord) --------------------------------------------------------

_NAME_KEYS = ("file_name", "image/filename", "filename")
_OPEN_LOCK = threading.Lock()


class TfdsSource(Source):
  """A split of a TFDS data set prepared in ArrayRecord format, the image bytes as stored
  (`tfds.decode.SkipDecoding`). Built by `open_source`, which checks the name, the format
  and the split first."""

  def __init__(self, dataset: str, split: str, data_dir: str | None, builder):
    self.dataset, self.split, self.data_dir = dataset, split, data_dir
    features = builder.info.features
    if "image" not in features:
      raise DataError(f"dataset {dataset!r} has no 'image' feature (features: "
                      f"{sorted(features)}); only image classification sets can be read")
    self.label_key = "real_label" if "real_label" in features else "label"
    if self.label_key not in features:
      raise DataError(f"dataset {dataset!r} has no 'label' feature (features: "
                      f"{sorted(features)})")
    self.multi_label = self.label_key == "real_label"
    label = features[self.label_key]
    self.num_classes = int(getattr(label, "feature", label).num_classes)
    self.name_key = next((k for k in _NAME_KEYS if k in features), None)
    self._builder = builder
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is not None:
      return self._source
    with _OPEN_LOCK:  # threads reading a freshly unpickled source open it once
      if self._source is not None:
        return self._source
      import tensorflow_datasets as tfds
      if self._builder is None:  # reopened after pickling
        self._builder = (digits_builder(self.data_dir, prepare=False)
                         if self.dataset == "digits" else
                         tfds_builder(self.dataset, self.data_dir))
      self._source = self._builder.as_data_source(
          split=self.split, decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):  # no open readers in pickles (Grain worker processes)
    return {**self.__dict__, "_builder": None, "_source": None}

  def __len__(self) -> int:
    return self._len

  def _record(self, index: int, ex: dict) -> dict:
    if self.multi_label:
      label = np.asarray(ex[self.label_key], np.int64).reshape(-1)
    else:
      label = int(ex[self.label_key])
    name = ex.get(self.name_key) if self.name_key else None
    if isinstance(name, bytes):
      name = name.decode("utf-8", "replace")
    name = name or f"{self.split}[{index}]"
    # `check_labels` samples a large split; a bad label it missed stops here, never scored
    _check_label(self, label, name)
    return {"image": bytes(ex["image"]), "label": label, "name": name}

  def __getitem__(self, index: int) -> dict:
    i = self._check_index(index)
    return self._record(i, self._open()[i])

  def __getitems__(self, indices) -> list[dict]:
    idx = [self._check_index(i) for i in indices]
    if not idx:
      return []
    return [self._record(i, ex) for i, ex in zip(idx, self._open().__getitems__(idx))]


def _split_names(split: str) -> list[str]:
  """The split names inside a TFDS split expression ("train[:10%]+validation")."""
  return [re.split(r"[\[(]", part.strip(), maxsplit=1)[0].strip()
          for part in split.split("+")]


@contextlib.contextmanager
def quiet_absl():
  """Without TFDS' absl warnings about version folders it probes ("Variant folder ... has
  no dataset_info.json": the normal state of a data set not prepared yet)."""
  import logging
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _unknown(dataset: str, e: BaseException) -> DataError:
  """One line for a name TFDS cannot build: unknown data set, config or version."""
  import tensorflow_datasets as tfds
  base, _, config = dataset.split(":")[0].partition("/")
  try:
    configs = [c.name for c in (tfds.builder_cls(base).BUILDER_CONFIGS or [])]
  except Exception:  # noqa: BLE001 - any failure here means "not a TFDS name"
    return DataError(f"unknown dataset {dataset!r}: not a TFDS name, 'digits' or "
                     "'folder:/path' (TFDS names: tfds.list_builders())")
  if config and config not in configs:
    return DataError(f"unknown dataset {dataset!r}: {base} has "
                     + (f"the configs {', '.join(configs)}" if configs else "no configs"))
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  first = first.split("}\": ", 1)[-1]  # drop TFDS' "Failed to construct ... builder_kwargs"
  return DataError(f"dataset {dataset!r}: {first[:200]}")


def tfds_builder(dataset: str, data_dir: str | None):
  """The TFDS builder of `dataset`, prepared or not; a name TFDS does not know is one
  line (not TFDS' catalogue)."""
  import tensorflow_datasets as tfds
  try:
    with quiet_absl():
      return tfds.builder(dataset, data_dir=data_dir)
  except (ValueError, AssertionError, TypeError, KeyError) as e:
    raise _unknown(dataset, e) from None


def open_tfds(dataset: str, split: str, data_dir: str | None) -> TfdsSource:
  builder = tfds_builder(dataset, data_dir)
  with quiet_absl():
    prepared = builder.is_prepared()
  if not prepared:
    tars = manual_tars(dataset)
    need = (f" (needs {' and '.join(tars)} from image-net.org in the manual_dir)"
            if tars else "")
    raise DataError(f"dataset {dataset!r} is not prepared: nothing at {builder.data_dir}; "
                    f"run `{prepare_command(dataset, data_dir)}`{need}, or pass the "
                    "data_dir where it is prepared")
  from tensorflow_datasets.core import file_adapters
  formats = builder.info.available_file_formats() or {builder.info.file_format}
  if file_adapters.FileFormat.ARRAY_RECORD not in formats:
    have = ", ".join(sorted(str(getattr(f, "value", f)) for f in formats if f))
    raise DataError(
        f"dataset {dataset!r} at {builder.data_dir} is prepared in {have or 'an unknown'} "
        "format only, without random access; convert it (images are copied, not re-encoded): "
        f"`python -m bcdnet_jax prepare --convert_from_tfrecord {dataset} "
        f"--data_dir={data_dir or default_data_dir()}`")
  splits = sorted(builder.info.splits)
  unknown = [s for s in _split_names(split) if s not in splits]
  if unknown:
    raise DataError(f"dataset {dataset!r} has no split {unknown[0]!r}; splits: "
                    f"{', '.join(splits)}")
  try:
    return TfdsSource(dataset, split, data_dir, builder)
  except (ValueError, AssertionError) as e:  # a malformed split expression
    if isinstance(e, errors.UserError):
      raise
    raise DataError(f"dataset {dataset!r}: cannot read split {split!r}: "
                    f"{str(e).strip().splitlines()[0][:300]}") from None


# --- the built-in digits data set -----------------------------------------------------------

def _digits_builder_class():
  """The TFDS builder class of the digits set, defined on first use (TFDS' import cost is
  paid only by those who read TFDS sets)."""
  global _DIGITS
  if _DIGITS is not None:
    return _DIGITS
  import tensorflow_datasets as tfds

  class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's 8x8 handwritten digits (1,797 images) as 32x32 RGB PNGs.

    A small real data set that ships with a dependency, so the demo and the tests run
    the same TFDS ArrayRecord path as ImageNet without any download. 359 images (20 % of
    each class, fixed seed) form the test split, 1,438 the training split.
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (TFRecord).",
                     "2.0.0": "ArrayRecord; the same pixels, PNGs encoded with PIL."}

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
      images, labels, test = digits_arrays()
      return {"train": self._generate_examples(images[~test], labels[~test]),
              "test": self._generate_examples(images[test], labels[test])}

    def _generate_examples(self, images, labels):
      from PIL import Image
      for i, (img, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")  # PIL: TFDS would encode with TF
        yield i, {"image": buf.getvalue(), "label": int(label)}

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... Subsequent
    # calls will reuse this data." on stdout for every build: noise for a 1-second set.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

  _DIGITS = Digits
  return Digits


_DIGITS = None


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images uint8 [1797, 32, 32, 3], labels int64 [1797], test mask bool [1797]): the 8x8
  digits scaled to 0..255 and repeated 4x4 (nearest), 20 % of each class (rounded) in the
  test split, chosen by a permutation with seed 0."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  small = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(0).permutation(len(labels))
  test = np.zeros(len(labels), bool)
  for c in range(10):  # stratified 20 % test split
    idx = order[labels[order] == c]
    test[idx[: int(round(0.2 * len(idx)))]] = True
  big = np.kron(small, np.ones((1, 4, 4), np.uint8))  # 8x8 -> 32x32, nearest
  return np.repeat(big[..., None], 3, axis=3), labels, test


@contextlib.contextmanager
def quiet_tfds():
  """TFDS without its tqdm progress bars (escape codes in redirected logs)."""
  from tensorflow_datasets.core.utils import tqdm_utils
  was = tqdm_utils._active  # noqa: SLF001 - TFDS has a setter but no getter
  tqdm_utils.display_progress_bar(False)
  try:
    yield
  finally:
    tqdm_utils.display_progress_bar(was)


def digits_builder(data_dir: str | None, prepare: bool = True):
  """The digits TFDS builder in ArrayRecord format, prepared (quietly) unless it is."""
  with quiet_absl():
    builder = _digits_builder_class()(data_dir=data_dir, file_format="array_record")
    prepared = builder.is_prepared()
  if prepare and not prepared:
    # the one file set written outside the workdir: say where (the default is
    # ~/tensorflow_datasets/digits, a --config.data_dir is created if missing)
    import logging
    logging.getLogger("bcdnet_jax").info(
        "preparing the digits data set (1,797 images) in %s", builder.data_dir)
    try:
      with quiet_tfds(), quiet_absl():
        builder.download_and_prepare()
    except OSError as e:
      # several processes of one job may build it at once: one rename wins, the others
      # find it prepared
      with quiet_absl():
        builder = _digits_builder_class()(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
          raise DataError(f"cannot prepare the digits data set in {builder.data_dir}: "
                          f"{e.strerror or e}") from None
  return builder


def open_digits(split: str, data_dir: str | None) -> TfdsSource:
  builder = digits_builder(data_dir)
  splits = sorted(builder.info.splits)
  if split not in splits:
    raise DataError(f"dataset 'digits' has no split {split!r}; splits: {', '.join(splits)}")
  return TfdsSource("digits", split, data_dir, builder)


# --- entry points ---------------------------------------------------------------------------

def open_source(dataset: str, split: str, data_dir: str | None) -> Source:
  """The random-access source of `dataset`'s `split`.

  Args:
    dataset: a TFDS name prepared in ArrayRecord format under `data_dir`, "digits"
      (prepared there on first use) or "folder:/root".
    split: the split name, e.g. "train", "validation", "test".
    data_dir: TFDS' data directory; None for `$TFDS_DATA_DIR` or `~/tensorflow_datasets`.

  Returns:
    The `Source`: records of encoded image bytes, label and name.

  Raises:
    DataError: (one line) an unknown name, a data set not prepared (naming the
      `python -m bcdnet_jax prepare` command and the ImageNet archives it needs), one
      prepared only in TFRecord format (naming the conversion command), an unknown split
      (listing the splits), or a folder tree that breaks `check_folder` or holds files
      that are not images.
  """
  if dataset.startswith("folder:"):
    from bcdnet_jax.data import folders
    return folders.open_folder(dataset[len("folder:"):], split)
  if dataset == "digits":
    return open_digits(split, data_dir)
  return open_tfds(dataset, split, data_dir)


LABEL_SAMPLE = 1024  # records whose label `check_labels` reads in a large TFDS split
LABEL_FULL_SCAN = 20_000  # splits up to this size have every label read


def _check_label(source: Source, label, name: str) -> None:
  """Raises `DataError` for a label outside [0, num_classes) (-1: TFDS's missing label)."""
  values = np.asarray(label).reshape(-1)
  bad = values[(values < 0) | (values >= source.num_classes)]
  if not bad.size:
    return
  where = f"{source.dataset} split {source.split!r}"
  if int(bad[0]) == -1:
    raise DataError(f"{where} has no labels (record {name} has label -1, TFDS's missing "
                    "label; e.g. imagenet2012's test split): it can be neither trained on "
                    "nor scored; use a labelled split")
  raise DataError(f"{where}: record {name} has label {int(bad[0])}, outside [0, "
                  f"{source.num_classes}) of the data set's {source.num_classes} classes")


def _label_indices(n: int, all_cheap: bool) -> np.ndarray:
  """The records whose labels `check_labels` reads: all, or an even sample of a large split."""
  if all_cheap or n <= LABEL_FULL_SCAN:
    return np.arange(n)
  return np.unique(np.linspace(0, n - 1, LABEL_SAMPLE).round().astype(np.int64))


def check_labels(source: Source) -> None:
  """Raises `DataError` (one line: data set, split, record and value; "has no labels" for
  -1, TFDS's missing label) when a label of `source` is outside [0, num_classes).

  Cost: labels held in memory (folder trees) are all checked; a TFDS split of up to
  `LABEL_FULL_SCAN` records has every record read, a larger one `LABEL_SAMPLE` records
  spread evenly over it (ArrayRecord stores the label inside the record, with the image:
  reading all of ImageNet's 1.28 M would read its 140 GB). An unlabelled TFDS split is -1
  throughout, so the sample finds it; a stray bad label the sample misses stops the run
  when its record is read (`TfdsSource`), never trained on or scored.
  """
  indices = _label_indices(len(source), source.labels_in_memory)
  for start in range(0, len(indices), 256):
    chunk = indices[start:start + 256]
    for i, label in zip(chunk, source.read_labels(chunk)):
      _check_label(source, label, f"{source.split}[{int(i)}]")


def _decode_problems(source: Source, threads: int) -> list[tuple[str, Exception]]:
  """(name, ImageDecodeError) of every record whose image does not decode, in index order."""
  import importlib
  # the module itself, not a package attribute of the same name
  transforms = importlib.import_module("bcdnet_jax.data.transforms")

  def check(i):
    rec = source[i]
    try:
      transforms.decode(rec["image"], rec["name"])
    except transforms.ImageDecodeError as e:
      return rec["name"], e
    return None

  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    return [p for p in pool.map(check, range(len(source)), chunksize=32) if p is not None]


def undecodable(source: Source, *, threads: int = 2) -> list[str]:
  """The records of `source` whose image PIL cannot decode, as training decodes them.

  Every image is read and decoded once by `transforms.decode`, in a thread pool (PIL
  releases the GIL while decoding).

  Args:
    source: the split to check.
    threads: decoding threads.

  Returns:
    The names of the undecodable records, in index order.
  """
  return [name for name, _ in _decode_problems(source, threads)]


def check_images(source: Source, *, threads: int = 2) -> None:
  """Decodes every image of `source` once (see `undecodable`).

  Args:
    source: the split to check.
    threads: decoding threads.

  Raises:
    DataError: naming the records whose image cannot be decoded: over the pixel limit
      (the first named with its size and the limit, and how to raise it), or else not an
      image format PIL reads, empty or truncated.
  """
  from bcdnet_jax.data.transforms import ImageTooLargeError
  problems = _decode_problems(source, threads)
  large = [e for _, e in problems if isinstance(e, ImageTooLargeError)]
  where = f"{source.dataset} split {source.split!r}"
  if large:
    more = f" ({len(large) - 1} more image(s) over the limit)" if len(large) > 1 else ""
    raise DataError(f"{where}: {large[0]}{more}")
  bad = [name for name, _ in problems]
  if bad:
    raise DataError(f"{where}: {len(bad)} undecodable "
                    f"image(s) (not an image PIL can decode, empty or truncated): "
                    f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; remove or "
                    "replace them")


def __getattr__(name: str):
  """The folder-tree names, defined in `data.folders` (imported on use)."""
  if name in ("FolderSource", "check_folder", "open_folder"):
    from bcdnet_jax.data import folders
    return getattr(folders, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
