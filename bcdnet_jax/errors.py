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
  except KeyError as e:  # an unknown field given on the command line
    print(f"error: {_unknown_field(e, argv)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except (flags.Error, AttributeError, TypeError, ValueError, OSError,
          NameError, ImportError) as e:
    cause = e
    while cause is not None and not isinstance(cause, KeyError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None:  # absl wraps ml_collections' KeyError of an unknown field
      print(f"error: {_unknown_field(cause, argv)}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    text = " ".join(str(e).replace(chr(92) + "n", " ").split())
    if isinstance(e, AttributeError) and "get_config" in text:
      text = f"{_config_arg(argv)}: the config file defines no get_config() function"
    print(f"error: {text}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except Exception as e:  # noqa: BLE001 - raised by the config file's own code
    print(f"error: {_config_arg(argv)}: get_config() raised {type(e).__name__}: {e}",
          file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _config_arg(argv) -> str:
  """'--config=FILE' as given on the command line (for messages)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a
    if a == "--config" and i + 1 < len(argv):
      return f"--config={argv[i + 1]}"
  return "--config"


def _unknown_field(e: KeyError, argv) -> str:
  """'--config.learning_rat: unknown field (did you mean learning_rate?)' from the KeyError
  ml_collections raises (its text: the key's repr and its own suggestion)."""
  import re
  text = str(e.args[0]) if e.args else str(e)
  found = re.search(r"'([^'\\]+)", text)
  key = found.group(1) if found else text
  flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
               and a.split("=", 1)[0].rsplit(".", 1)[-1] == key), f"config.{key}")
  if flag.startswith("--config.model.overrides."):
    return (f"{flag}: this config has no such override; model.overrides is set as a whole "
            "in a config file (configs/digits.py shows how) or through its existing keys")
  hint = re.search(r'Did you mean "([^"]+)"', text)
  more = f" (did you mean {hint.group(1)}?)" if hint else ""
  return f"{flag}: unknown field{more}; the fields are those of configs/default.py"


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

