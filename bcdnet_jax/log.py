"""The project's one logger, "bcdnet_jax", and its set-up for the command-line tools."""

import logging

logger = logging.getLogger("bcdnet_jax")


def setup(level: int = logging.INFO) -> logging.Logger:
  """Our progress lines on stderr as `HH:MM:SS message`; the libraries' INFO chatter
  (orbax, absl) stays quiet. Idempotent: a second call only sets the level."""
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(level)
  logger.propagate = False
  return logger
