"""Scalars and histograms for TensorBoard (through tensorboardX: no TensorFlow), and the
same values as JSON lines beside them.

Only process 0 writes. A resumed run continues the same files: JSON lines at or after the
step it resumes from are dropped first, so `metrics.jsonl` never holds a step twice (the
steps after the last checkpoint are trained again and logged again).
"""

from __future__ import annotations

import json
import os

import numpy as np


def _drop_from(path: str, step: int) -> None:
  """Rewrites `path` (JSON lines with a "step") without the lines whose step >= `step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) >= step:
        continue
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a kill: dropped
    keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) != len(lines):
    from bcdnet_jax import fileio
    with fileio.replacing(path) as tmp, open(tmp, "w") as f:
      f.writelines(keep)


class MetricWriter:
  """TensorBoard event files in `workdir/tensorboard/` and JSON lines in
  `workdir/<name>.jsonl` (one object per `write` call: {"step": int, key: float, ...}).

  `start_step`: the step the run (re)starts from; JSON lines from it on are dropped.
  `active`: False on every process but 0 (then every call does nothing).
  """

  def __init__(self, workdir: str, *, start_step: int = 0, active: bool = True,
               jsonl: tuple[str, ...] = ("metrics",)):
    self.active = active
    if not active:
      return
    import logging

    from tensorboardX import SummaryWriter

    # tensorboardX warns once per tensor holding a NaN (dozens of lines when a run
    # diverges); the run's own check stops it with one line naming the step
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
    self._files = {}
    for name in jsonl:
      path = os.path.join(workdir, f"{name}.jsonl")
      _drop_from(path, start_step + 1)
      self._files[name] = open(path, "a")

  def scalars(self, step: int, values: dict, *, jsonl: str | None = "metrics",
              prefix: str = "") -> None:
    """TensorBoard scalars `prefix + key` and one JSON line in `<jsonl>.jsonl`."""
    if not self.active:
      return
    for k, v in values.items():
      self._tb.add_scalar(prefix + k, float(v), global_step=int(step))
    if jsonl is not None:
      self.json_line(step, values, jsonl=jsonl)

  def json_line(self, step: int, values: dict, *, jsonl: str = "metrics") -> None:
    if not self.active:
      return
    f = self._files[jsonl]
    f.write(json.dumps({"step": int(step), **{k: _plain(v) for k, v in values.items()}})
            + "\n")
    f.flush()

  def histogram(self, step: int, name: str, values) -> None:
    """A TensorBoard histogram of the finite `values` (none: nothing written). TensorBoard's
    own bins end at about 1e20; larger magnitudes (a diverging run) get numpy's bins."""
    if not self.active:
      return
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
      return
    bins = "tensorflow"
    if np.abs(v).max() >= 1e20:
      lo, hi = float(v.min()), float(v.max())
      hi = hi if hi > lo else lo + abs(lo) * 1e-6
      bins = np.linspace(lo, hi, 31)
    self._tb.add_histogram(name, v, global_step=int(step), bins=bins)

  def flush(self) -> None:
    if self.active:
      self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      for f in self._files.values():
        f.close()


def _plain(v):
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if isinstance(v, dict):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, str):
    return v
  return float(v)


def read_jsonl(path: str) -> list[dict]:
  """The objects of a JSON-lines file, one per step in step order, skipping a last line cut
  by a kill. Lines of the same step merge, a later value replacing an earlier one: an
  evaluation logged at a training step's number joins that step's line, and a step logged
  again (files written before resumes dropped repeated steps) counts once."""
  by_step = {}
  if not os.path.exists(path):
    return []
  with open(path) as f:
    for line in f:
      try:
        obj = json.loads(line)
        by_step.setdefault(int(obj["step"]), {}).update(obj)
      except (ValueError, KeyError, TypeError):
        continue
  return [by_step[s] for s in sorted(by_step)]
