"""Multi-process start-up with JAX's own multi-controller runtime (`jax.distributed`).

One process per GPU (or per node with `local_device_ids`), all running the same
`main.py`. Under SLURM (`srun`) everything is detected from the SLURM_* variables; outside
it, pass the coordinator address, the process count and this process's id. A single
process needs nothing. Call `initialize` before any other JAX work.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax

log = logging.getLogger("bcdnet_jax")

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def under_slurm_multiprocess() -> bool:
  """True inside an `srun` step of several tasks (what jax's SLURM detection reads)."""
  return (all(v in os.environ for v in _SLURM_VARS)
          and int(os.environ.get("SLURM_NTASKS", "1")) > 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None, *,
               initialization_timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> dict:
  """Starts jax.distributed when several processes are asked for; returns a summary.

  Explicit arguments win; otherwise a multi-task SLURM step is detected; otherwise this is
  a single process and nothing is started. A process that dies is noticed by the others
  within `heartbeat_timeout_s`, which then fail with an error instead of hanging.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if explicit and (coordinator_address is None or num_processes is None
                   or process_id is None):
    raise ValueError("distributed start-up needs --coordinator_address, --num_processes "
                     "and --process_id together (or none of them, under srun)")
  if explicit or under_slurm_multiprocess():
    # CPU processes exchange collectives through gloo; GPUs use NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=initialization_timeout_s,
                  heartbeat_timeout_seconds=heartbeat_timeout_s)
    if local_device_ids is not None:
      kwargs["local_device_ids"] = list(local_device_ids)
    if explicit:
      jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    else:
      jax.distributed.initialize(**kwargs)  # cluster detection from SLURM_*
  info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
          "backend": jax.default_backend()}
  log.info("process %d of %d: %d local / %d global %s devices", info["process_index"],
           info["process_count"], info["local_devices"], info["global_devices"],
           info["backend"])
  return info

