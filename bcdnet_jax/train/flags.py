"""`main.py`'s command line: absl flag parsing where every mistake in `--config` (a
missing file, a syntax or name error in it, an unknown field such as --config.bach_size, a
value of the wrong type) is one `error:` line and exit code 2, not a traceback."""

from __future__ import annotations

import re
import sys

from bcdnet_jax import errors
from bcdnet_jax.train import config as config_lib


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
    sys.exit(errors.EXIT_USER_ERROR)
  except KeyError as e:  # an unknown field given on the command line
    print(f"error: {_unknown_field(e, argv)}", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  except (flags.Error, AttributeError, TypeError, ValueError, OSError,
          NameError, ImportError) as e:
    cause = e
    while cause is not None and not isinstance(cause, KeyError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None:  # absl wraps ml_collections' KeyError of an unknown field
      print(f"error: {_unknown_field(cause, argv)}", file=sys.stderr)
      sys.exit(errors.EXIT_USER_ERROR)
    text = " ".join(str(e).replace(chr(92) + "n", " ").split())
    if isinstance(e, AttributeError) and "get_config" in text:
      text = f"{_config_arg(argv)}: the config file defines no get_config() function"
    print(f"error: {text}", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  except Exception as e:  # noqa: BLE001 - raised by the config file's own code
    print(f"error: {_config_arg(argv)}: get_config() raised {type(e).__name__}: {e}",
          file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)


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
  text = str(e.args[0]) if e.args else str(e)
  found = re.search(r"'([^'\\]+)", text)
  key = found.group(1) if found else text
  flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
               and a.split("=", 1)[0].rsplit(".", 1)[-1] == key), f"config.{key}")
  stage_field = re.match(r"--config\.pipeline\.([^.]+)\.(.+)", flag)
  if stage_field and _is_config_field(stage_field.group(2)):
    stage, field = stage_field.groups()
    return (f"{flag}: {field} is a known field, but pipeline stage {stage} of this config "
            f"does not set it, so it cannot be overridden there; --config.{field}=VALUE "
            "sets it for every stage (the command line beats the stages' own values), or "
            f"add it to the stage's overrides in {_config_arg(argv)[len('--config='):]}")
  if flag.startswith("--config.model.overrides."):
    return (f"{flag}: this config has no such override; model.overrides is set as a whole "
            "in a config file (configs/digits.py shows how) or through its existing keys")
  hint = re.search(r'Did you mean "([^"]+)"', text)
  more = f" (did you mean {hint.group(1)}?)" if hint else ""
  return f"{flag}: unknown field{more}; the fields are those of configs/default.py"


def _is_config_field(name: str) -> bool:
  """Whether `name` ('batch_size', 'model.stage') is a field of configs/default.py."""
  return name in config_lib.FIELDS


def config_overrides(argv) -> set[str]:
  """The config fields set on the command line (`--config.a.b=v` -> 'a.b')."""
  out = set()
  for a in argv[1:]:
    if a.startswith("--config."):
      out.add(a[len("--config."):].split("=", 1)[0])
  return out
