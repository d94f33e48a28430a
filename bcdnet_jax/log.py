"""The project's one logger, "bcdnet_jax", and its set-up for the command-line tools."""

import logging
import sys

logger = logging.getLogger("bcdnet_jax")


class _StderrHandler(logging.StreamHandler):
  """Writes to `sys.stderr` as it is at each record, not as it was at set-up: a tool run
  in-process after stderr was redirected (pytest's capture, contextlib.redirect_stderr)
  still prints where stderr now goes, never into a closed stream."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def setup(level: int = logging.INFO) -> logging.Logger:
  """Our progress lines on stderr as `HH:MM:SS message`; the libraries' INFO chatter
  (orbax, absl) stays quiet. Idempotent: a second call only sets the level."""
  if not logger.handlers:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(level)
  logger.propagate = False
  return logger
