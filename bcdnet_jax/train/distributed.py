"""Multi-process start-up with JAX's own multi-controller runtime (`jax.distributed`).

One process per GPU (or per node with `local_device_ids`), all running the same
`main.py`. Under SLURM (`srun`) everything is detected from the SLURM_* variables; outside
it, pass the coordinator address, the process count and this process's id. A single
process needs nothing. Call `initialize` before any other JAX work.

What the user sees, and why it is not JAX's default:
- a wrong flag or SLURM variable is one line `error: ...` naming it (`DistributedError`),
  before anything waits;
- start-up prints at once `waiting for N processes at ADDR (up to T s)`; when they do not
  all register in time, one line says what never registered (our timer fires just before
  JAX's, whose C++ abort prints 26 lines blaming "another task died");
- a process lost mid-run (killed, out of memory, node failure): the others end with one
  line naming it and saying that the same command resumes from the last checkpoint, exit
  code `EXIT_PEER_LOST` (`watch_peers`; JAX's coordination service would abort them in C++
  after its heartbeat time-out, with no Python running). Not for process 0: it hosts JAX's
  coordination service, and when it dies the others' C++ error polling aborts them at once
  (JAX's own `Terminating process because the JAX distributed service detected fatal
  errors ... Failed to send RPC to coordination service`, exit code 134); there is no hook
  for Python before that abort (jaxlib's `missed_heartbeat_callback` cannot take a Python
  function: it fails with std::bad_cast).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import sys
import threading
import time
from typing import Sequence

import jax

from bcdnet_jax import errors

log = logging.getLogger("bcdnet_jax")

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
# sysexits' EX_TEMPFAIL: not a mistake of the user's, and the same command may succeed
EXIT_PEER_LOST = 75
# JAX's own time-outs are set this much later than ours, so our one line comes first
_GRACE_S = 10


class DistributedError(errors.UserError):
  """A flag or SLURM variable of the multi-process start-up, or a start-up that timed out."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """A multi-process start-up: `source` 'flags' (explicit) or 'slurm' (srun's variables)."""
  address: str
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None
  source: str


def under_slurm_multiprocess(env=None) -> bool:
  """True inside an `srun` step of several tasks (what jax's SLURM detection reads); a
  malformed SLURM_NTASKS raises `DistributedError`."""
  env = os.environ if env is None else env
  return all(v in env for v in _SLURM_VARS) and _env_int(env, "SLURM_NTASKS", 1) > 1


def _env_int(env, name: str, minimum: int) -> int:
  text = env[name]
  if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < minimum:
    raise DistributedError(f"{name}={text!r}: must be an integer >= {minimum} (srun sets it; "
                           "unset the SLURM_* variables to run a single process)")
  return int(text)


_NODE = r"[^,\[\]]+(\[\d+(-\d+)?(,\d+(-\d+)?)*\][^,\[\]]*)?"


def _slurm_address(env) -> str:
  """The coordinator address JAX's SLURM detection derives (the first node of the step, a
  port from the job id), after checking the node list's syntax."""
  nodes = env["SLURM_STEP_NODELIST"]
  if not re.fullmatch(rf"{_NODE}(,{_NODE})*", nodes):
    raise DistributedError(f"SLURM_STEP_NODELIST={nodes!r}: not a SLURM node list (such as "
                           "node001 or node[001-004,007]); check the srun command")
  job = _env_int(env, "SLURM_JOB_ID", 0)
  port = env.get("JAX_COORDINATOR_PORT") or str(job % 2**12 + (65535 - 2**12 + 1))
  first = nodes.split(",")[0]
  if "[" in first:
    prefix, rest = first.split("[", 1)
    first = prefix + re.split(r"[,\-\]]", rest)[0]
  return f"{first}:{port}"


def _local_ids(local_device_ids) -> tuple[int, ...] | None:
  if local_device_ids is None:
    return None
  items = [str(i).strip() for i in local_device_ids]
  if not items or not all(re.fullmatch(r"\d+", i) for i in items):
    raise DistributedError(f"--local_device_ids={','.join(items)}: must be comma-separated "
                           "device indices >= 0, such as 0,1,2,3")
  return tuple(int(i) for i in items)


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: Sequence | None = None,
            env=None) -> Setup | None:
  """The start-up asked for by the flags or SLURM variables, checked; None: one process.

  Explicit flags win; otherwise a multi-task SLURM step is detected. Raises
  `DistributedError` naming the flag or variable that is missing, malformed or out of range.
  """
  env = os.environ if env is None else env
  ids = _local_ids(local_device_ids)
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if coordinator_address is not None or (num_processes or 1) > 1 or process_id:
    if num_processes is not None and num_processes < 1:
      raise DistributedError(f"--num_processes={num_processes}: must be >= 1")
    if process_id is not None and process_id < 0:
      raise DistributedError(f"--process_id={process_id}: must be >= 0")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
      raise DistributedError(f"--process_id={process_id}: must be in [0, {num_processes}) "
                             f"for --num_processes={num_processes}")
    missing = [k for k, v in given.items() if v is None]
    if missing:
      have = " ".join(f"{k}={v}" for k, v in given.items() if v is not None)
      raise DistributedError(f"{have}: also give {' and '.join(missing)} (every process "
                             "the same address and count, its own id; under srun give none)")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedError(f"--coordinator_address={coordinator_address}: must be "
                             "HOST:PORT of process 0, such as node001:12345")
    return Setup(coordinator_address, num_processes, process_id, ids, "flags")
  if not under_slurm_multiprocess(env):
    return None
  n = _env_int(env, "SLURM_NTASKS", 1)
  pid = _env_int(env, "SLURM_PROCID", 0)
  if pid >= n:
    raise DistributedError(f"SLURM_PROCID={pid}: must be below SLURM_NTASKS={n}")
  _env_int(env, "SLURM_LOCALID", 0)
  return Setup(_slurm_address(env), n, pid, ids, "slurm")


def _never_registered(setup: Setup, timeout_s: int) -> str:
  """What the time-out means, from this process's side: process 0 knows the others did not
  all register; another process checks whether anything listens at the address."""
  n, i = setup.num_processes, setup.process_id
  if i == 0:
    others = "process 1" if n == 2 else f"processes 1-{n - 1} (some or all)"
    what = f"{others} had not registered at {setup.address}"
  else:
    host, _, port = setup.address.rpartition(":")
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
      what = (f"the coordinator at {setup.address} is up, but not all {n} processes "
              "had registered")
    except OSError as e:
      what = (f"nothing answered at {setup.address} ({e.strerror or e}): process 0 (the "
              "coordinator) not started, or at another address")
  how = ("srun -n / SLURM_NTASKS" if setup.source == "slurm"
         else "--num_processes and --coordinator_address")
  return (f"process {i} of {n}: after {timeout_s} s, {what}; start all {n} with the same "
          f"{how} (--initialization_timeout_s waits longer)")


def _exit_with(line: str, code: int) -> None:
  """One line and an immediate exit: JAX's exit handlers would wait on the lost processes
  and abort with a page of C++ log."""
  print(line, file=sys.stderr, flush=True)
  os._exit(code)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence | None = None, *,
               initialization_timeout_s: int = 300, heartbeat_timeout_s: int = 100,
               resume_hint: str = "rerun the same command to resume from the last "
               "checkpoint") -> dict:
  """Starts jax.distributed when several processes are asked for; returns a summary.

  Checks the flags and SLURM variables first (`resolve`). A start-up in which not all
  processes register within `initialization_timeout_s` ends this process with one line
  (exit code 2); a process lost later ends the others after `heartbeat_timeout_s` / 4
  (`watch_peers`), with `resume_hint` on the same line, exit code `EXIT_PEER_LOST`.
  """
  for name, value in (("--initialization_timeout_s", initialization_timeout_s),
                      ("--heartbeat_timeout_s", heartbeat_timeout_s)):
    if not isinstance(value, int) or value < 2:
      raise DistributedError(f"{name}={value}: must be an integer >= 2 (seconds)")
  setup = resolve(coordinator_address, num_processes, process_id, local_device_ids)
  if setup is not None:
    _start(setup, initialization_timeout_s, heartbeat_timeout_s)
    watch_peers(setup, heartbeat_timeout_s, resume_hint)
  info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
          "backend": jax.default_backend()}
  log.info("process %d of %d: %d local / %d global %s devices", info["process_index"],
           info["process_count"], info["local_devices"], info["global_devices"],
           info["backend"])
  return info


def _start(setup: Setup, timeout_s: int, heartbeat_timeout_s: int) -> None:
  print(f"process {setup.process_id}: waiting for {setup.num_processes} processes at "
        f"{setup.address} (up to {timeout_s} s)", file=sys.stderr, flush=True)
  timer = threading.Timer(timeout_s, lambda: _exit_with(
      f"error: {_never_registered(setup, timeout_s)}", errors.EXIT_USER_ERROR))
  timer.daemon = True
  timer.start()
  # CPU processes exchange collectives through gloo; GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(initialization_timeout=timeout_s + _GRACE_S,
                heartbeat_timeout_seconds=heartbeat_timeout_s)
  if setup.local_device_ids is not None:
    kwargs["local_device_ids"] = list(setup.local_device_ids)
  try:
    if setup.source == "flags":
      jax.distributed.initialize(setup.address, setup.num_processes, setup.process_id,
                                 **kwargs)
    else:
      jax.distributed.initialize(**kwargs)  # JAX's own detection from SLURM_*
  finally:
    timer.cancel()


# --- a process lost mid-run -----------------------------------------------------------------

_ALIVE = "bcdnet_jax/alive/"
_DONE = "done"


class _PeerWatch(threading.Thread):
  """Every process counts up its own key in JAX's key-value store and reads the others'
  every `beat_s`; a peer whose count stands still for `lost_after_s`, or a coordinator that
  stops answering for as long, ends this process with one line. `lost_after_s` is a quarter
  of JAX's heartbeat time-out: JAX's service declares a process dead after about half of it
  (measured: 5.5 s for 10 s), then aborts every other process in C++. Python threads run
  while the main thread waits in a collective (XLA releases the GIL), which is where the
  survivors of a lost process are."""

  def __init__(self, client, setup: Setup, lost_after_s: float, resume_hint: str):
    super().__init__(name="bcdnet-peer-watch", daemon=True)
    self.client, self.setup, self.lost_after_s = client, setup, lost_after_s
    self.beat_s = max(0.2, min(5.0, lost_after_s / 5))
    self.resume_hint = resume_hint
    self.stopped = threading.Event()

  def _key(self, pid: int) -> str:
    return f"{_ALIVE}{pid}"

  def run(self) -> None:
    n, me = self.setup.num_processes, self.setup.process_id
    count, start = 0, time.monotonic()
    seen: dict[int, tuple[str, float]] = {}
    last_answer = start
    while not self.stopped.wait(self.beat_s if count else 0):
      count += 1
      now = time.monotonic()
      try:
        self.client.key_value_set(self._key(me), str(count), allow_overwrite=True)
        entries = self.client.key_value_dir_get(_ALIVE)
        last_answer = now
      except Exception:  # noqa: BLE001 - whatever the RPC raises, the coordinator is silent
        if now - last_answer > self.lost_after_s and not self.stopped.is_set():
          self._lost([0], "the coordinator")
        continue
      for key, value in entries:
        pid = int(key.rstrip("/").rsplit("/", 1)[-1])
        if seen.get(pid, ("",))[0] != value:
          seen[pid] = (value, now)
      lost = [p for p in range(n) if p != me and seen.get(p, ("",))[0] != _DONE
              and now - seen.get(p, ("", start))[1] > self.lost_after_s]
      if lost and not self.stopped.is_set():
        self._lost(lost, "")

  def _lost(self, pids: list[int], role: str) -> None:
    n = self.setup.num_processes
    who = (f"process {pids[0]} of {n}" if len(pids) == 1
           else f"processes {', '.join(map(str, pids))} of {n}")
    role = f" ({role}, {self.setup.address})" if role else ""
    _exit_with(f"error: {who}{role} was lost (no sign of life for "
               f"{self.lost_after_s:g} s: killed, out of memory, or its node failed); process "
               f"{self.setup.process_id} stops too; {self.resume_hint}", EXIT_PEER_LOST)

  def stop(self) -> None:
    """A normal exit: the others must not take this process for lost."""
    if self.stopped.is_set():
      return
    self.stopped.set()
    try:
      self.client.key_value_set(self._key(self.setup.process_id), _DONE,
                                allow_overwrite=True)
    except Exception:  # noqa: BLE001 - exiting anyway
      pass


_watch: _PeerWatch | None = None


def watch_peers(setup: Setup, heartbeat_timeout_s: int, resume_hint: str) -> None:
  """Starts the `_PeerWatch` of this process (after `jax.distributed.initialize`)."""
  global _watch
  import atexit

  from jax._src import distributed as jax_distributed  # the client JAX connected
  client = getattr(jax_distributed.global_state, "client", None)
  if client is None or _watch is not None:
    return
  _watch = _PeerWatch(client, setup, heartbeat_timeout_s / 4, resume_hint)
  _watch.start()
  # registered after JAX's own exit handler, so it runs before JAX shuts the client down
  atexit.register(_watch.stop)


def await_lost_peer() -> None:
  """Called with an exception in flight in a multi-process run: a collective that failed
  because a peer died (gloo: 'Connection closed by peer') is followed within the watch's
  time by its one line and exit; otherwise this returns after that time and the caller
  re-raises (a single process returns at once)."""
  if _watch is None or not _watch.is_alive():
    return
  _watch.join(_watch.lost_after_s + 3 * _watch.beat_s)
