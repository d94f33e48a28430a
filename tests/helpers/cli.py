"""main.py called in this process (no interpreter start, no re-import of JAX): for the
mistakes that end before any training work."""

import contextlib
import io
import sys


def run_main(argv, monkeypatch) -> tuple[int, list[str]]:
  """(exit code, stderr lines) of `python main.py *argv`; SystemExit is caught."""
  from absl import flags

  import main as main_module
  from bcdnet_jax.train import flags as cli_flags
  full = ["main.py", *argv]
  monkeypatch.setattr(sys, "argv", full)
  flags.FLAGS.unparse_flags()
  err = io.StringIO()
  rc = 0
  with contextlib.redirect_stderr(err):
    try:
      cli_flags.parse_flags(full)
      main_module.main([])
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else 1
    finally:
      flags.FLAGS.unparse_flags()
  return rc, err.getvalue().strip().splitlines()
