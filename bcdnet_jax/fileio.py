"""Writing files and directories so that nobody ever sees half of one.

Everything the library writes (model directories, artefacts, JSON records) is written
next to its final place and renamed into it, with the permissions the umask gives (what
`open`/`mkdir` would give: shared storage for SLURM jobs needs group-readable files).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def check_writable(path: str, error=OSError) -> None:
  """Raises `error` at once when `path` cannot be created there (a read-only directory,
  or a file where a directory should be), instead of after minutes of work."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.isdir(parent):
    if os.path.exists(parent):
      raise error(f"{path}: {parent} is not a directory")
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise error(f"{path}: cannot write there ({parent} is not writable); nothing done")


@contextlib.contextmanager
def replacing(path: str):
  """Yields a temporary file path beside `path`; on success it replaces `path` whole."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  os.close(fd)
  try:
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def new_directory(path: str):
  """Yields a temporary directory beside `path` (which must not exist, or be empty); on
  success it is renamed to `path`, on failure removed."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
    yield tmp
    if os.path.isdir(path):
      os.rmdir(path)  # empty: the caller checked
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_json(path: str, obj, **kw) -> None:
  with replacing(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, **{"indent": 2, "default": str, **kw})
