"""Two processes on localhost (gloo CPU collectives), each with 2 fake CPU devices."""

import os
import random
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from bcdnet_jax import checkpoint
from bcdnet_jax.train import distributed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "helpers", "train_worker.py")


def launch(workdir, data_dir, steps, devices, *args, env_extra=None):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=flags.strip())
  for k in list(env):
    if k.startswith("SLURM_"):
      del env[k]
  env.update(env_extra or {})
  return subprocess.Popen([sys.executable, WORKER, workdir, data_dir, str(steps), *args],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=400):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def params(workdir, process):
  with np.load(os.path.join(workdir, f"params_{process}.npz")) as z:
    return [z[str(i)] for i in range(len(z.files))]


@pytest.mark.slow
def test_device_and_process_counts_compute_the_same(tmp_path, digits_dir):
  """1 device (here), 8 fake devices, 1 process x 4 devices and 2 processes x 2 devices
  (started through the SLURM detection) give the same losses and parameters: BN and the
  loss are over the global batch whatever the sharding."""
  import json

  from helpers.configs import small_config

  from bcdnet_jax.train import loop
  job = str(random.randint(10_000, 99_999))
  runs = {n: str(tmp_path / n) for n in ("one", "eight", "four", "multi")}
  procs = [launch(runs["multi"], digits_dir, 4, 2, env_extra={
      "SLURM_JOB_ID": job, "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
      "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1"})
      for i in range(2)]
  procs.append(launch(runs["four"], digits_dir, 4, 4))
  procs.append(launch(runs["eight"], digits_dir, 4, 8))
  ref = loop.train_and_evaluate(
      small_config(digits_dir, num_train_steps=4, checkpoint_every_steps=2), runs["one"],
      return_params=True)
  outs = [finish(p) for p in procs]
  for rc, out in outs:
    assert rc == 0, out[-3000:]
  assert "PROCESSES 2 DEVICES 4" in outs[0][1] and "PROCESSES 2 DEVICES 4" in outs[1][1]
  assert "process 1 of 2" in outs[1][1]
  assert "PROCESSES 1 DEVICES 4" in outs[2][1] and "PROCESSES 1 DEVICES 8" in outs[3][1]

  def losses(wd):
    return [json.loads(line)["loss"] for line in open(os.path.join(wd, "metrics.jsonl"))
            if '"loss"' in line]

  assert len(losses(runs["one"])) == 4
  for name in ("eight", "four", "multi"):
    np.testing.assert_allclose(losses(runs[name]), losses(runs["one"]), rtol=1e-5)
  p0, p1 = params(runs["multi"], 0), params(runs["multi"], 1)
  for a, b in zip(p0, p1):
    np.testing.assert_array_equal(a, b)  # replicated: identical on both processes
  for name in ("four", "eight"):
    for a, b in zip(p0, params(runs[name], 0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(p0, jax.tree.leaves(ref["params"])):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)
  # only process 0 wrote the results; the 2-process checkpoint restores in this process
  assert os.path.exists(os.path.join(runs["multi"], "results.json"))
  restored = checkpoint.restore_model(runs["multi"])
  for a, b in zip(jax.tree.leaves(nnx.state(restored, nnx.Param)), p0):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow
def test_dead_process_fails_the_others_and_restart_resumes(tmp_path, digits_dir):
  wd = str(tmp_path / "run")
  port = str(random.randint(20_000, 40_000))
  common = ["--coordinator_address", f"localhost:{port}", "--num_processes", "2",
            "--heartbeat_timeout_s", "20"]
  start = time.time()
  survivor = launch(wd, digits_dir, 6, 2, *common, "--process_id", "0")
  victim = launch(wd, digits_dir, 6, 2, *common, "--process_id", "1", "--kill_at", "3")
  rc_victim, _ = finish(victim)
  rc, out = finish(survivor)
  assert rc_victim == -9
  assert time.time() - start < 300  # an error, not a hang
  # one line naming the lost process, before JAX's own abort (~10 s of 20; ours after 5)
  assert rc == distributed.EXIT_PEER_LOST, out[-3000:]
  assert out.rstrip().splitlines()[-1] == (
      "error: process 1 of 2 was lost (no sign of life for 5 s: killed, out of memory, or "
      "its node failed); process 0 stops too; rerun the same command to resume from the "
      "last checkpoint"), out[-3000:]
  assert "Terminating process" not in out and "Traceback" not in out, out[-3000:]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]

  port = str(random.randint(40_001, 60_000))
  common[1] = f"localhost:{port}"
  procs = [launch(wd, digits_dir, 6, 2, *common, "--process_id", str(i)) for i in range(2)]
  outs = [finish(p) for p in procs]
  for rc, out in outs:
    assert rc == 0, out[-3000:]
  assert "at step 2" in outs[0][1]  # resumed from the last checkpoint
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4", "6"]


@pytest.mark.slow
def test_start_up_waiting_in_vain_says_so_at_once_and_names_what_never_registered(tmp_path):
  """SLURM_NTASKS=2 with one task launched (process 0), and process 1 alone with nothing at
  the coordinator's address: a line at once, then one line on the time-out, exit 2."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  for k in list(env):
    if k.startswith("SLURM_"):
      del env[k]
  job = random.randint(10_000, 99_999)
  port = random.randint(20_000, 40_000)
  main = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/digits.py",
          "--initialization_timeout_s=2"]
  runs = {
      "slurm_one_task": (["--workdir", str(tmp_path / "a")], dict(
          SLURM, SLURM_JOB_ID=str(job), SLURM_NTASKS="2", SLURM_PROCID="0")),
      "flags_no_coordinator": (["--workdir", str(tmp_path / "b"), "--num_processes=2",
                                "--process_id=1", f"--coordinator_address=localhost:{port}"],
                               {})}
  procs = {name: subprocess.Popen(main + argv, env=dict(env, **extra), cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, (argv, extra) in runs.items()}
  outs = {name: p.communicate(timeout=120) for name, p in procs.items()}
  address = f"localhost:{job % 4096 + 61440}"
  want = {
      "slurm_one_task": (f"process 0: waiting for 2 processes at {address} (up to 2 s)",
                         f"error: process 0 of 2: after 2 s, process 1 had not registered at "
                         f"{address}; start all 2 with the same srun -n / SLURM_NTASKS "
                         "(--initialization_timeout_s waits longer)"),
      "flags_no_coordinator": (
          f"process 1: waiting for 2 processes at localhost:{port} (up to 2 s)",
          f"error: process 1 of 2: after 2 s, nothing answered at localhost:{port} "
          "(Connection refused): process 0 (the coordinator) not started, or at another "
          "address; start all 2 with the same --num_processes and --coordinator_address "
          "(--initialization_timeout_s waits longer)")}
  for name, (first, last) in want.items():
    lines = outs[name][1].strip().splitlines()
    assert procs[name].returncode == 2 and lines == [first, last], (name, lines)
  assert not os.listdir(tmp_path)


def test_single_process_needs_nothing(monkeypatch):
  for k in list(os.environ):
    if k.startswith("SLURM_"):
      monkeypatch.delenv(k)
  info = distributed.initialize()
  assert info["process_count"] == 1 and info["process_index"] == 0
  assert not distributed.under_slurm_multiprocess()
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "n1")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("SLURM_PROCID", "0")
  monkeypatch.setenv("SLURM_LOCALID", "0")
  assert not distributed.under_slurm_multiprocess()  # a one-task srun stays single
  with pytest.raises(distributed.DistributedError, match="also give --num_processes and "
                     "--process_id"):
    distributed.initialize("localhost:1234")


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_LOCALID": "0"}
START_UP = {  # name -> (flags, SLURM variables, the one line)
    "ntasks_not_int": ([], dict(SLURM, SLURM_NTASKS="abc", SLURM_PROCID="0"),
                       "SLURM_NTASKS='abc': must be an integer >= 1 (srun sets it"),
    "procid_out_of_range": ([], dict(SLURM, SLURM_NTASKS="2", SLURM_PROCID="5"),
                            "SLURM_PROCID=5: must be below SLURM_NTASKS=2"),
    "malformed_nodelist": ([], dict(SLURM, SLURM_NTASKS="2", SLURM_PROCID="0",
                                    SLURM_STEP_NODELIST="node[001"),
                           "SLURM_STEP_NODELIST='node[001': not a SLURM node list"),
    "no_coordinator": (["--num_processes=2"], {},
                       "--num_processes=2: also give --coordinator_address and --process_id"),
    "local_device_ids": (["--local_device_ids=a"], {},
                         "--local_device_ids=a: must be comma-separated device indices"),
    "process_id_out_of_range": (["--process_id=5", "--num_processes=2",
                                 "--coordinator_address=localhost:1234"], {},
                                "--process_id=5: must be in [0, 2) for --num_processes=2"),
    "process_id_alone_out_of_range": (["--process_id=5", "--num_processes=2"], {},
                                      "--process_id=5: must be in [0, 2) for "
                                      "--num_processes=2"),
    "process_id_without_address": (["--process_id=1", "--num_processes=2"], {},
                                   "--num_processes=2 --process_id=1: also give "
                                   "--coordinator_address"),
    "negative_process_id": (["--process_id=-1"], {},
                            "--process_id=-1: must be >= 0"),
    "bad_address": (["--process_id=0", "--num_processes=2", "--coordinator_address=node1"],
                    {}, "--coordinator_address=node1: must be HOST:PORT of process 0"),
    "timeout": (["--initialization_timeout_s=0"], {},
                "--initialization_timeout_s=0: must be an integer >= 2 (seconds)"),
}


@pytest.mark.parametrize("name", sorted(START_UP))
def test_bad_start_up_flags_and_variables_are_one_line(name, tmp_path, monkeypatch):
  """Each before anything waits or is written: one line naming the flag or variable."""
  from helpers.cli import run_main
  argv, env, needle = START_UP[name]
  for k in list(os.environ):
    if k.startswith("SLURM_"):
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  wd = tmp_path / "w"
  rc, err = run_main(["--config=configs/digits.py", f"--workdir={wd}", *argv], monkeypatch)
  assert rc == 2 and err == [err[-1]] and err[-1].startswith(f"error: {needle}"), err
  assert not wd.exists()


def test_slurm_address_is_the_first_node_and_the_job_port():
  for nodes, host in (("node001", "node001"), ("node[003-004,007],gpu1", "node003"),
                      ("gpu-a[12,14]-x,b", "gpu-a12")):
    setup = distributed.resolve(env=dict(SLURM, SLURM_STEP_NODELIST=nodes, SLURM_NTASKS="4",
                                         SLURM_PROCID="3"))
    assert setup == distributed.Setup(f"{host}:{4242 % 4096 + 61440}", 4, 3, None, "slurm")


class _FakeStore:
  """JAX's key-value store as the watch uses it; `silent` peers stop counting, `down`
  makes every call fail (the coordinator gone)."""

  def __init__(self, silent=(), down=False):
    self.kv, self.silent, self.down, self.calls = {}, set(silent), down, 0

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Socket closed")
    self.kv[key] = value
    self.calls += 1
    for pid in (1, 2):  # the peers beat too, unless silent
      if pid not in self.silent:
        self.kv[f"{distributed._ALIVE}{pid}"] = str(self.calls)

  def key_value_dir_get(self, prefix):
    return sorted((k, v) for k, v in self.kv.items() if k.startswith(prefix))


@pytest.mark.parametrize("store, line", [
    (_FakeStore(silent={2}), "error: process 2 of 3 was lost (no sign of life for 0.6 s: "
     "killed, out of memory, or its node failed); process 0 stops too; RESUME"),
    (_FakeStore(down=True), "error: process 0 of 3 (the coordinator, h:1) was lost (no "
     "sign of life for 0.6 s: killed, out of memory, or its node failed); process 0 stops "
     "too; RESUME"),
], ids=["peer_silent", "coordinator_down"])
def test_peer_watch_names_the_lost_process(store, line, monkeypatch):
  exits = []
  watch = distributed._PeerWatch(store, distributed.Setup("h:1", 3, 0, None, "flags"), 0.6,
                                 "RESUME")

  def record(text, code):
    exits.append((text, code))
    watch.stopped.set()  # ends the watch as os._exit would end the process
  monkeypatch.setattr(distributed, "_exit_with", record)
  start = time.monotonic()
  watch.start()
  watch.join(5)
  assert exits == [(line, distributed.EXIT_PEER_LOST)]
  assert 0.6 <= time.monotonic() - start < 3


def test_peer_watch_takes_a_finished_peer_for_done_not_lost(monkeypatch):
  monkeypatch.setattr(distributed, "_exit_with", lambda *a: pytest.fail(f"lost: {a}"))
  store = _FakeStore(silent={1, 2})
  store.kv.update({f"{distributed._ALIVE}1": distributed._DONE,
                   f"{distributed._ALIVE}2": distributed._DONE})
  watch = distributed._PeerWatch(store, distributed.Setup("h:1", 3, 0, None, "flags"), 0.3,
                                 "RESUME")
  watch.start()
  time.sleep(1.0)
  watch.stop()
  watch.join(2)
  assert not watch.is_alive() and store.kv[f"{distributed._ALIVE}0"] == distributed._DONE


@pytest.mark.slow
def test_signalled_processes_agree_on_the_stop_step_and_exit_cleanly(tmp_path, digits_dir):
  """SIGTERM a step apart (process 0 after step 3, process 1 after step 4), and to one
  process only: every task checkpoints the same step and exits 0, no hang; the same
  command then resumes and finishes."""
  runs = {"apart": str(tmp_path / "apart"), "one": str(tmp_path / "one")}
  ports = random.sample(range(20_000, 60_000), 3)
  signals = {"apart": (3, 4), "one": (None, 3)}
  procs = {}
  start = time.time()
  for (name, wd), port in zip(runs.items(), ports):
    common = ["--coordinator_address", f"localhost:{port}", "--num_processes", "2",
              "--checkpoint_every", "100"]
    for i, at in enumerate(signals[name]):
      extra = ["--signal_at", str(at)] if at is not None else []
      procs[name, i] = launch(wd, digits_dir, 40, 1, *common, "--process_id", str(i), *extra)
  outs = {key: finish(p, timeout=300) for key, p in procs.items()}
  for key, (rc, out) in outs.items():
    assert rc == 0, (key, out[-3000:])
  assert time.time() - start < 300
  for name, wd in runs.items():
    stops = {outs[name, i][1].split("PREEMPTED AT ")[1].split()[0] for i in range(2)}
    assert len(stops) == 1, (name, stops)  # the same step on both processes
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == [stops.pop()]
  # the same command resumes from the preemption checkpoint and finishes
  common = ["--coordinator_address", f"localhost:{random.randint(20_000, 60_000)}",
            "--num_processes", "2", "--checkpoint_every", "100"]
  procs = [launch(runs["apart"], digits_dir, 8, 1, *common, "--process_id", str(i))
           for i in range(2)]
  for rc, out in (finish(p) for p in procs):
    assert rc == 0 and "PROCESSES 2" in out, out[-3000:]
  assert "8" in os.listdir(os.path.join(runs["apart"], "checkpoints"))
