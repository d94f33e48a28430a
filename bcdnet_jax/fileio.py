"""Writing files and directories so that nobody ever sees half of one.

Everything the library writes (model directories, artefacts, JSON records) is written
next to its final place and renamed into it, with the permissions the umask gives (what
`open`/`mkdir` would give: shared storage for SLURM jobs needs group-readable files).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
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


DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


def disk_full(e: BaseException) -> str | None:
  """'No space left on device' (or the quota's) when `e` or its causes say so, else None:
  an OSError, or tensorstore's RESOURCE_EXHAUSTED text that orbax raises as ValueError."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_FULL:
      return DISK_FULL[e.errno]
    for code, text in DISK_FULL.items():
      if text in str(e) or f"os_error_code='{code}'" in str(e):
        return text
    e = e.__cause__ or e.__context__
  return None


class HoldErrors:
  """A logging filter that holds back ERROR records (orbax's writer threads report each
  failed write with a traceback) until `release` re-emits them; a caller that turns the
  failure into one line (a full disk) drops them instead."""

  def __init__(self):
    self.records = []

  def filter(self, record) -> bool:
    if record.levelno >= logging.ERROR:
      self.records.append(record)
      return False
    return True

  def release(self, logger) -> None:
    records, self.records = self.records, []
    logger.removeFilter(self)
    for record in records:
      logger.handle(record)
