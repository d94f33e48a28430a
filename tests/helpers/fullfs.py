"""A small file system that is full, for the disk-full tests of the command-line tools.

A 64 KiB tmpfs mounted inside the test's tmp_path and filled to the last block, so every
write there fails with ENOSPC as on a real full disk (no monkeypatching: the tools' own
writers, Orbax's included, meet the real error). Mounting needs root, which CI has
(`.ci/run` runs as root); elsewhere the test is skipped with that reason.
"""

import contextlib
import os
import subprocess

import pytest


@contextlib.contextmanager
def full_filesystem(parent, size: str = "64k"):
  """Yields a directory on a full tmpfs of `size` under `parent`; unmounted afterwards."""
  path = os.path.join(str(parent), "full_fs")
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"a full file system needs `mount -t tmpfs` (root): {proc.stderr.strip()}")
  try:
    with open(os.path.join(path, "filler"), "wb", buffering=0) as f:
      try:
        while True:
          f.write(b"\0" * 4096)
      except OSError:
        pass
    yield path
  finally:
    subprocess.run(["umount", "-l", path], check=False)


def listing(path) -> list[str]:
  """The names in `path` but the filler (what a tool left behind)."""
  return sorted(n for n in os.listdir(path) if n != "filler")
