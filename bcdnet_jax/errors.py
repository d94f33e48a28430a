"""How the command-line tools report mistakes: one line and exit code 2.

Every error type the library raises for bad input (a config field, a data set, a
checkpoint, a torch file, an artefact, an image) derives from `UserError` through its own
module's class, so entry points catch one type; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import sys

EXIT_USER_ERROR = 2  # argparse's code for a usage error; the same for every CLI here


class UserError(ValueError):
  """Bad input named by the message (file, key, shape or config field)."""


class ConfigError(UserError):
  """An invalid configuration or flag value, reported before anything is compiled or
  written (`bcdnet_jax.train.config` checks every field)."""


def report(e: BaseException, prog: str = "error") -> int:
  print(f"{prog}: {e}", file=sys.stderr)
  return EXIT_USER_ERROR


@contextlib.contextmanager
def one_line():
  """Turns a `UserError` into one line on stderr and exit code 2."""
  try:
    yield
  except UserError as e:
    sys.exit(report(e))


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def run_cli(main) -> None:
  """Runs a tool's `main()` and exits with its code; Ctrl-C is one line and exit code 130,
  not a KeyboardInterrupt traceback."""
  try:
    code = main()
  except KeyboardInterrupt:
    print("interrupted (Ctrl-C); files are written whole or not at all: rerun the same "
          "command (an --out written before the interruption needs --overwrite)",
          file=sys.stderr)
    code = EXIT_INTERRUPTED
  sys.exit(code)


def first_non_finite(named_arrays) -> str | None:
  """'name (k of n)' of the first float array with a NaN or infinity, else None."""
  import numpy as np
  for name, x in named_arrays:
    x = np.asarray(x)
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
      return f"{name} ({int(np.sum(~np.isfinite(x)))} of {x.size} values)"
  return None

