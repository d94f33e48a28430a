"""The global example stream: which record each row of each global batch reads.

Training walks one stream of positions 0, 1, 2, ...: position `q` is example
`permutation(epoch)[q % n]` of the split, `epoch = q // n`, with a fresh seeded permutation
of the whole split every epoch (`np.random.default_rng([seed, epoch]).permutation(n)`, the
released recipe's global shuffle of the index list). Global batch `s` is positions
[s * G, (s + 1) * G), so a batch may straddle two epochs; process p of P takes rows
[p * L, (p + 1) * L) of it (L = G / P) and reads only those records. Everything is a
function of the step: resuming at step k reads nothing before it (O(batch), not O(k)), and
the global batches are the same on any number of processes and devices. Augmentation
randomness is keyed by (seed, position) (`transforms.rng`), so the images are too.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the split's records in `epoch`, new for every (seed, epoch).

  Args:
    num_examples: records in the split.
    seed: the run's seed.
    epoch: the epoch, from 0.

  Returns:
    int64 [num_examples], a permutation of `range(num_examples)`; read-only (it is
    cached).
  """
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


class TrainOrder:
  """The rows of this process in the global training stream.

  Global batch `step` is stream positions `[step * global_batch, (step + 1) *
  global_batch)`; position q reads record `epoch_permutation(n, seed, q // n)[q % n]`.
  `records(step)` gives this process's rows of it.

  Args:
    num_examples: records in the split (n > 0).
    global_batch: rows per step over all processes; a multiple of `process_count`.
    seed: the run's seed.
    process_index: this process, in `[0, process_count)`.
    process_count: processes reading the stream.

  Raises:
    ValueError: an empty split, a batch that is not a positive multiple of the process
      count, or a process index out of range.
  """

  def __init__(self, num_examples: int, global_batch: int, seed: int, *,
               process_index: int = 0, process_count: int = 1):
    if num_examples <= 0:
      raise ValueError(f"an empty split cannot be trained on ({num_examples} examples)")
    if global_batch <= 0 or global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not a positive multiple of the "
                       f"{process_count} processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process {process_index} of {process_count}")
    self.num_examples = int(num_examples)
    self.global_batch = int(global_batch)
    self.local_batch = global_batch // process_count
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count

  def steps_per_epoch(self) -> float:
    return self.num_examples / self.global_batch

  def positions(self, step: int) -> np.ndarray:
    """Stream positions of this process's rows of global batch `step`: int64 [local]."""
    start = step * self.global_batch + self.process_index * self.local_batch
    return np.arange(start, start + self.local_batch, dtype=np.int64)

  def record(self, position: int) -> int:
    """The record index at stream position `position`."""
    epoch, offset = divmod(int(position), self.num_examples)
    return int(epoch_permutation(self.num_examples, self.seed, epoch)[offset])

  def records(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(record indices, stream positions) of this process's rows of global batch `step`."""
    pos = self.positions(step)
    return np.array([self.record(q) for q in pos], np.int64), pos


class EvalOrder:
  """Evaluation in split order, padded.

  Global batch b is positions `[b * G, (b + 1) * G)` of `0 .. num_examples - 1` (G the
  global batch), process p takes rows `[p * L, (p + 1) * L)` (L = G / process_count);
  positions past the end are padding (record -1, masked out). Every process has
  `num_batches` batches and every example is in exactly one row of one process.

  Args:
    num_examples: records in the split.
    global_batch: rows per batch over all processes; a multiple of `process_count`.
    process_index: this process, in `[0, process_count)`.
    process_count: processes evaluating.

  Raises:
    ValueError: a batch that is not a positive multiple of the process count.
  """

  def __init__(self, num_examples: int, global_batch: int, *, process_index: int = 0,
               process_count: int = 1):
    if global_batch <= 0 or global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not a positive multiple of the "
                       f"{process_count} processes")
    self.num_examples = int(num_examples)
    self.global_batch = int(global_batch)
    self.local_batch = global_batch // process_count
    self.process_index = process_index
    self.num_batches = -(-self.num_examples // self.global_batch)

  def records(self, batch: int) -> np.ndarray:
    """Record indices of this process's rows of global batch `batch`, -1 for padding:
    int64 [local]."""
    start = batch * self.global_batch + self.process_index * self.local_batch
    pos = np.arange(start, start + self.local_batch, dtype=np.int64)
    return np.where(pos < self.num_examples, pos, -1)
