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


def parse_flags(argv):
  """absl flag parsing where a bad --config (missing file, a syntax or name error in it,
  unknown field such as --config.bach_size, a value of the wrong type) is one line, not a
  traceback."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      # A config file that failed to load is an object that raises on first use
      getattr(flags.FLAGS.config, "mode", None)
    return rest
  except SyntaxError as e:  # the config file itself (a 50-line traceback otherwise)
    where = f"{e.filename}, line {e.lineno}" if e.filename else "the config file"
    code = f": {e.text.strip()}" if e.text else ""
    print(f"error: {where}: {e.msg}{code}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
          NameError, ImportError) as e:
    text = " ".join(str(e).replace(chr(92) + "n", " ").split())
    print(f"error: {text}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def config_overrides(argv) -> set[str]:
  """The config fields set on the command line (`--config.a.b=v` -> 'a.b')."""
  out = set()
  for a in argv[1:]:
    if a.startswith("--config."):
      out.add(a[len("--config."):].split("=", 1)[0])
  return out


def first_non_finite(named_arrays) -> str | None:
  """'name (k of n)' of the first float array with a NaN or infinity, else None."""
  import numpy as np
  for name, x in named_arrays:
    x = np.asarray(x)
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
      return f"{name} ({int(np.sum(~np.isfinite(x)))} of {x.size} values)"
  return None

