"""Who a workdir belongs to, and who is writing in it now.

A run writes only into a missing or empty directory, or into one holding its own kind of
run, recognised by the record the run wrote there first:

    WORKDIR/.bcdnet_run.json   {"kind": "train" | "pipeline" | "eval", "run_id", "created"}
    WORKDIR/.bcdnet_lock       the lock of the run writing there now (see `WorkdirLock`)

Anything else (a project directory, `--workdir=.`, an evaluation into a pipeline) is refused
before anything is written, naming the files the run would have replaced. A workdir written
before these records existed is recognised by its own records (`legacy_kind`) and adopted.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from bcdnet_jax import errors, fileio
from bcdnet_jax.log import logger as log

MARKER = ".bcdnet_run.json"
LOCK = ".bcdnet_lock"
# what each kind writes at the top of its workdir (the files a refused run names)
WRITES = {
    "train": ("config.json", "model.json", "results.json", "metrics.jsonl",
              "diagnostics.jsonl", "checkpoints", "checkpoint_sha256", "damaged_checkpoints",
              "tensorboard", "report", "eval"),
    "pipeline": ("config.json", "results.json", "report", "eval"),
    "eval": ("config.json", "results.json"),
}
KIND_NAMES = {"train": "a training run", "pipeline": "a pipeline (multi-stage) run",
              "eval": "an evaluation"}
# scheduler logs (#SBATCH --output=WORKDIR/slurm-%j.out) exist before the run starts; a run
# never writes such names, so they are not a reason to refuse
IGNORED_SUFFIXES = (".out", ".err", ".log")


class WorkdirError(errors.ConfigError):
  """A workdir that belongs to something else, or that another live run is writing."""


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_marker(workdir: str) -> dict | None:
  rec = _read_json(os.path.join(workdir, MARKER))
  return rec if isinstance(rec, dict) and rec.get("kind") in WRITES else None


def _our_config(path: str) -> dict | None:
  """config.json when it is one this project wrote (its fields), else None."""
  cfg = _read_json(path)
  if isinstance(cfg, dict) and {"dataset", "model", "batch_size"} <= set(cfg):
    return cfg
  return None


def legacy_kind(workdir: str, look_inside: bool = True) -> str | None:
  """The kind of a workdir written before `.bcdnet_run.json` existed, from its records:
  training: a checkpoints/ directory, or model.json beside our config.json; evaluation:
  our config.json with mode "eval"; pipeline: our config.json with a pipeline, or a
  subdirectory (a stage) that is a training workdir. None when nothing there is ours."""
  cfg = _our_config(os.path.join(workdir, "config.json"))
  if cfg is not None and cfg.get("mode") == "eval":
    return "eval"
  if cfg is not None and cfg.get("pipeline"):
    return "pipeline"
  if os.path.isdir(os.path.join(workdir, "checkpoints")) or (
      cfg is not None and os.path.isfile(os.path.join(workdir, "model.json"))):
    return "train"
  if look_inside and any(kind_of(os.path.join(workdir, e), look_inside=False) == "train"
                         for e in os.listdir(workdir)):
    return "pipeline"
  return None


def kind_of(workdir: str, look_inside: bool = True) -> str | None:
  if not os.path.isdir(workdir):
    return None
  marker = read_marker(workdir)
  return marker["kind"] if marker else legacy_kind(workdir, look_inside)


def _entries(workdir: str) -> list[str]:
  return sorted(e for e in os.listdir(workdir) if e not in (MARKER, LOCK)
                and not e.endswith(IGNORED_SUFFIXES) and not e.startswith(f"{LOCK}.stale-"))


def check_owner(workdir: str, kind: str, stages=(), flag: str = "--workdir") -> str:
  """'new' (missing or empty), 'own' (its record says `kind`) or 'legacy' (an earlier
  version's run of `kind`); raises WorkdirError naming what a run of `kind` would replace
  otherwise. Writes nothing."""
  if not os.path.isdir(workdir) or not _entries(workdir):
    return "new"
  marker = read_marker(workdir)
  found = marker["kind"] if marker else legacy_kind(workdir)
  if found == kind:
    return "own" if marker else "legacy"
  entries = _entries(workdir)
  mine = set(WRITES[kind]) | set(stages)
  clash = [e for e in entries if e in mine]
  what = (f"holds {KIND_NAMES[found]} ({MARKER if marker else 'its records'})" if found
          else "is not empty and holds no bcdnet run")
  if clash:
    would = f"{KIND_NAMES[kind]} would replace {', '.join(clash[:6])} there"
  else:
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4
                                       else "")
    would = f"{KIND_NAMES[kind]} writes only into an empty directory or its own (it holds "\
            f"{shown})"
  raise WorkdirError(f"{flag}={workdir} {what}: {would}; use a new or empty --workdir; "
                     "nothing done")


def claim(workdir: str, kind: str) -> None:
  """Writes the workdir's record (process 0, after `check_owner`), once; a legacy workdir
  is adopted with one line."""
  if read_marker(workdir) is not None:
    return
  if os.path.isdir(workdir) and any(
      not os.path.isdir(p) or os.listdir(p)  # an empty checkpoints/ is this run's own
      for p in (os.path.join(workdir, e) for e in _entries(workdir))):
    log.info("%s: a %s workdir written before %s records existed; adopted", workdir, kind,
             MARKER)
  fileio.write_json(os.path.join(workdir, MARKER), {
      "kind": kind, "run_id": uuid.uuid4().hex,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


# --- the lock ---------------------------------------------------------------------------

STALE_AFTER_S = 600  # a holder on another host silent this long is dead
HEARTBEAT_S = 30
NO_KERNEL_LOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # another user's process: alive
  return True


class WorkdirLock:
  """An exclusive lock on a workdir, held by the run writing there (process 0).

  What it relies on: `flock` on WORKDIR/.bcdnet_lock (the kernel drops it when the holder
  dies, SIGKILL included; on NFS Linux maps it to a POSIX lock the server drops when the
  client's lease ends), plus a record in that file: host, pid, SLURM_JOB_ID, since, and a
  heartbeat (the file's mtime, touched every 30 s by a thread). A holder is taken over as
  dead when it is on this host and its pid is gone (a forked child that inherited the lock
  keeps it otherwise), or on another host when its heartbeat is older than 10 minutes or it
  is this same SLURM job (a requeue: the earlier incarnation is gone). On a file system
  without flock (Lustre mounted without -o flock), the record alone decides by the same
  rules. A taken-over holder that still lives notices (the lock file is no longer its
  own) and stops before its next checkpoint.
  """

  def __init__(self, workdir: str, stale_after_s: float = STALE_AFTER_S,
               heartbeat_s: float = HEARTBEAT_S):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK)
    self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
    self.fd = None
    self.lost = None
    self._stop = threading.Event()
    self._thread = None

  def record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}

  def holder(self) -> dict | None:
    rec = _read_json(self.path)
    if not isinstance(rec, dict) or "pid" not in rec:
      return None
    try:
      rec["age_s"] = time.time() - os.stat(self.path).st_mtime
    except OSError:
      return None
    return rec

  def dead(self, rec: dict) -> str | None:
    """Why the holder `rec` is dead (then it is taken over), or None."""
    me = self.record()
    if rec.get("host") == me["host"]:
      return None if _pid_alive(rec.get("pid")) else f"pid {rec.get('pid')} is gone"
    if me["slurm_job_id"] and rec.get("slurm_job_id") == me["slurm_job_id"]:
      return f"it is this SLURM job ({me['slurm_job_id']}), requeued"
    if rec["age_s"] > self.stale_after_s:
      return f"no heartbeat for {rec['age_s'] / 60:.0f} min"
    return None

  def busy(self, rec: dict | None) -> WorkdirError:
    who = (f"host {rec.get('host')} pid {rec.get('pid')}"
           + (f" (SLURM job {rec['slurm_job_id']})" if rec.get("slurm_job_id") else "")
           + f" since {rec.get('since')}") if rec else "another process"
    return WorkdirError(f"--workdir={self.workdir} is in use by a live run ({who}; lock "
                        f"{self.path}); wait for it to end or use another --workdir")

  def acquire(self) -> WorkdirLock:
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(3):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~fileio.umask())
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) + NO_KERNEL_LOCK:
          os.close(fd)
          raise
        rec = self.holder()
        why = self.dead(rec) if rec else None
        if e.errno in NO_KERNEL_LOCK and (rec is None or why):
          pass  # no kernel lock here: the record alone says it is free
        elif why is None:
          os.close(fd)
          raise self.busy(rec) from None
        else:  # a dead holder's kernel lock (another host's NFS lease): set its file aside
          os.close(fd)
          os.replace(self.path, f"{self.path}.stale-{int(time.time())}")
          log.warning("%s: took over the lock of %s pid %s (%s)", self.workdir,
                      rec.get("host"), rec.get("pid"), why)
          continue
      if os.fstat(fd).st_ino != _inode(self.path):  # replaced while we locked: again
        os.close(fd)
        continue
      try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.record()).encode(), 0)
      except OSError:  # a full disk: the caller says so in one line; the lock is dropped
        os.close(fd)
        raise
      self.fd = fd
      self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
      self._thread.start()
      return self
    raise self.busy(self.holder())

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if _inode(self.path) != os.fstat(self.fd).st_ino:
          self.lost = self.holder() or {}
          return
        os.utime(self.path)
      except OSError:
        pass  # a hiccup of a network file system: the next beat tries again

  def check(self) -> None:
    """Raises WorkdirError when another run took the lock over (this one was thought dead)."""
    if self.lost is not None:
      raise WorkdirError(f"--workdir={self.workdir}: another run took its lock over "
                         f"(host {self.lost.get('host')} pid {self.lost.get('pid')}) after "
                         "this one's heartbeat stopped; this run stops without writing more")

  def release(self) -> None:
    self._stop.set()
    if self.fd is None:
      return
    try:
      if self.lost is None and _inode(self.path) == os.fstat(self.fd).st_ino:
        os.ftruncate(self.fd, 0)  # free for a record-only file system at once
    except OSError:
      pass
    os.close(self.fd)
    self.fd = None

  def __enter__(self):  # acquired by `acquire` (or `lock`): `with` only releases
    return self

  def __exit__(self, *exc):
    self.release()


def _inode(path: str):
  try:
    return os.stat(path).st_ino
  except FileNotFoundError:
    return None


class NoLock:
  """What processes other than 0 hold: nothing (process 0 holds the run's lock)."""

  def check(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def lock(workdir: str):
  """The workdir's lock for this process: `WorkdirLock` on process 0, `NoLock` elsewhere.
  With several processes, all agree: when process 0 is refused, every process stops."""
  import jax
  if jax.process_count() == 1:
    return WorkdirLock(workdir).acquire()
  import numpy as np
  from jax.experimental import multihost_utils
  held, refused = NoLock(), None
  if jax.process_index() == 0:
    try:
      held = WorkdirLock(workdir).acquire()
    except WorkdirError as e:
      refused = e
  ok = multihost_utils.broadcast_one_to_all(np.int32(refused is None))
  if refused is not None:
    raise refused
  if not int(ok):
    raise WorkdirError(f"--workdir={workdir}: process 0 could not take the workdir's lock "
                       "(its line says why)")
  return held
