"""Stopping a run cleanly: SIGTERM / SIGUSR1 (SLURM's --signal) and SIGINT (Ctrl-C) ask for
a checkpoint and an exit with code 0 after the current step; every process agrees on the
step."""

from __future__ import annotations

import signal

import jax
import numpy as np

from bcdnet_jax.log import logger as log


class Preemption:
  """A context manager holding the stop request of SIGTERM / SIGUSR1 / SIGINT.

  A second Ctrl-C interrupts at once (KeyboardInterrupt), except while a checkpoint is
  being written (`saving`): interrupting Orbax's writer threads would leave a half-written
  step and a flood of thread tracebacks, so the save finishes first.
  """

  def __init__(self):
    self.requested = False
    self.saving = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      if self.saving:
        log.warning("received SIGINT again: the checkpoint being written finishes first "
                    "(seconds), then the run exits")
        return
      raise KeyboardInterrupt
    log.warning("received %s: checkpointing and exiting after this step%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else "")
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was asked to stop, agreed by all processes at this step.

    Processes signalled a step apart (or only one of them) would otherwise save at
    different steps, and the first collective of the save would wait forever for the
    others; so with several processes the flag is all-gathered every step (one tiny
    collective).
    """
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
