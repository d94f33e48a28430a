"""Folder trees as sources: root/<split>/<class>/<file>, every file PIL opens (torchvision's
`ImageFolder` order). The tree is checked before anything is read (`check_folder`: the
same classes in every split, at least 2, none empty, no directory links into the tree),
and opening a split reads the start of every file (`FolderSource`: not images, non-regular
files such as FIFOs, images over the pixel limit are named in one line).
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from bcdnet_jax.data.sources import DataError, Source


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path)
                if _visible(d) and os.path.isdir(os.path.join(path, d)))


def _inside(path: str, directory: str) -> bool:
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _class_files(class_dir: str, root: str | None = None) -> list[str]:
  """The visible files under `class_dir` (recursively), as paths relative to it, sorted.

  Symbolic links to directories outside the image folder `root` are followed (images kept
  elsewhere); a link to a directory that contains it (a loop: each image listed again at
  every level until ELOOP) or to one inside `root` (`up -> ..` would list another class's
  images under this one) raises `DataError` naming the link."""
  root_real = os.path.realpath(root or class_dir)
  out = []
  for top, dirs, files in os.walk(class_dir, followlinks=True):
    keep = sorted(d for d in dirs if _visible(d))
    for d in keep:
      path = os.path.join(top, d)
      if not os.path.islink(path):
        continue
      target = os.path.realpath(path)
      loop = _inside(os.path.realpath(top), target)
      if loop or _inside(target, root_real):
        why = ("a directory that contains it (a loop)" if loop else
               "a directory inside the image folder (its images would be listed twice or "
               "under another class)")
        raise DataError(f"image folder {class_dir}: {os.path.relpath(path, class_dir)} is a "
                        f"symbolic link to {target}, {why}; remove the link")
    dirs[:] = keep
    rel = os.path.relpath(top, class_dir)
    out += [f if rel == "." else os.path.join(rel, f) for f in files if _visible(f)]
  return sorted(out)


def check_folder(root: str) -> None:
  """An ImageFolder tree whose splits have the same classes (at least 2), none of them
  without files; the message names the classes at fault (the labels would not mean the
  same)."""
  expected = f"expected {root}/<split>/<class>/<image file>"
  if not os.path.isdir(root):
    what = "is a file, not a directory" if os.path.exists(root) else "does not exist"
    raise DataError(f"image folder {root!r} {what} ({expected})")
  splits = _subdirs(root)
  if not splits:
    raise DataError(f"image folder {root}: no split directories ({expected})")
  classes = {}
  for split in splits:
    sdir = os.path.join(root, split)
    names = _subdirs(sdir)
    if not names:
      raise DataError(f"image folder {sdir}: no class directories (expected "
                      f"{sdir}/<class>/<image file>)")
    if len(names) < 2:  # it would train to loss 0 and score 100 % without a word
      raise DataError(f"image folder {sdir}: one class directory ({names[0]}); a classifier "
                      "needs at least 2 classes, one directory each")
    empty = [n for n in names if not _class_files(os.path.join(sdir, n), root)]
    if empty:
      raise DataError(f"image folder {sdir}: class directories without images: "
                      f"{', '.join(empty[:10])}")
    classes[split] = set(names)
  first = splits[0]
  for split in splits[1:]:
    if classes[split] != classes[first]:
      only_a = sorted(classes[first] - classes[split])
      only_b = sorted(classes[split] - classes[first])
      raise DataError(f"image folder {root}: splits {first!r} and {split!r} have different "
                      f"classes (only in {first}: {only_a[:10]}; only in {split}: "
                      f"{only_b[:10]}); the labels would not mean the same")


# Signatures of the usual photo formats, whose files PIL opens: checking 16 bytes costs
# ~20 us a file against ~150 us for PIL's header parser (1.28 M ImageNet files: ~25 s
# rather than ~3 min at every start). Other files go through PIL.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a",
               b"II*\x00", b"MM\x00*")


NOT_AN_IMAGE = "not an image"


def _image_problem(path: str) -> str | None:
  """None when the file starts like an image: a JPEG, PNG, GIF, TIFF or WebP signature, or
  else PIL recognises its content (its header; the pixels are not decoded). Otherwise why
  not: `NOT_AN_IMAGE`, or a reason naming the file (not a regular file: a FIFO would block
  the read forever; unreadable; over the pixel limit)."""
  import stat

  from PIL import Image, UnidentifiedImageError

  from bcdnet_jax.data import transforms
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    return f"{path}: cannot be read ({e.strerror or e})"
  if not stat.S_ISREG(mode):
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    return f"{path} is {kind}, not a regular file; remove it from the image folder"
  try:
    with open(path, "rb") as f:
      head = f.read(16)
  except OSError as e:
    return f"{path}: cannot be read ({e.strerror or e})"
  if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
    return None
  transforms.set_max_image_pixels(transforms._limit)  # noqa: SLF001 - PIL's warning: ours
  try:
    with Image.open(path):
      return None
  except Image.DecompressionBombError as e:
    return str(transforms._too_large(path, e)).removeprefix("cannot decode image ")  # noqa: SLF001
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
    return NOT_AN_IMAGE


class FolderSource(Source):
  """One split of an ImageFolder tree root/<split>/<class>/<file>.

  Records are the split's files sorted by (class, path within the class directory), the
  label the class's index among the sorted class directory names (torchvision's
  `ImageFolder` order). Every file whose content PIL recognises enters the split, whatever
  its extension (JPEG, PNG, GIF, BMP, WebP, TIFF, ...); opening the source reads the start
  of every file (threads; the usual formats by their signature, others by PIL's header
  parser) and raises `DataError` naming the files that are not images. A file that starts
  like an image but is damaged further on is named by `check_images` or when decoded.
  Hidden files and directories (".DS_Store", ".git") are ignored. Files in
  sub-directories of a class directory belong to that class. The pixels are decoded by
  `check_images` and by the transforms.
  """

  def __init__(self, root: str, split: str, *, threads: int = 8):
    self.root, self.split = root, split
    self.dataset = f"folder:{root}"
    sdir = os.path.join(root, split)
    self.classes = _subdirs(sdir)
    self.num_classes = len(self.classes)
    self.files, labels = [], []
    for label, name in enumerate(self.classes):
      files = _class_files(os.path.join(sdir, name), root)
      self.files += [os.path.join(name, f) for f in files]
      labels += [label] * len(files)
    self.labels = np.asarray(labels, np.int64)
    paths = [os.path.join(sdir, f) for f in self.files]
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
      problems = list(pool.map(_image_problem, paths, chunksize=64))
    named = [p for p in problems if p not in (None, NOT_AN_IMAGE)]
    if named:
      more = f" (and {len(named) - 1} more file(s) like it)" if len(named) > 1 else ""
      raise DataError(f"image folder {sdir}: {named[0]}{more}")
    bad = [f for f, p in zip(self.files, problems) if p == NOT_AN_IMAGE]
    if bad:
      raise DataError(f"image folder {sdir}: {len(bad)} file(s) that are not images PIL "
                      f"can open: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; "
                      "remove or replace them")

  labels_in_memory = True

  def read_labels(self, indices) -> list:
    return [int(v) for v in self.labels[np.asarray(list(indices), np.int64)]]

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    i = self._check_index(index)
    path = os.path.join(self.root, self.split, self.files[i])
    try:
      with open(path, "rb") as f:
        image = f.read()
    except OSError as e:
      raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return {"image": image, "label": int(self.labels[i]), "name": self.files[i]}


def open_folder(root: str, split: str) -> FolderSource:
  check_folder(root)
  splits = _subdirs(root)
  if split not in splits:
    raise DataError(f"image folder {root} has no split {split!r}; splits: "
                    f"{', '.join(splits)}")
  return FolderSource(root, split)
