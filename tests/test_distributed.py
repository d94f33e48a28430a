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
            "--heartbeat_timeout_s", "5"]
  start = time.time()
  survivor = launch(wd, digits_dir, 6, 2, *common, "--process_id", "0")
  victim = launch(wd, digits_dir, 6, 2, *common, "--process_id", "1", "--kill_at", "3")
  rc_victim, _ = finish(victim)
  rc, out = finish(survivor)
  assert rc_victim == -9
  assert rc != 0 and time.time() - start < 300  # an error, not a hang
  assert "heartbeat timeout" in out or "another task died" in out, out[-3000:]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]

  port = str(random.randint(40_001, 60_000))
  common[1] = f"localhost:{port}"
  procs = [launch(wd, digits_dir, 6, 2, *common, "--process_id", str(i)) for i in range(2)]
  outs = [finish(p) for p in procs]
  for rc, out in outs:
    assert rc == 0, out[-3000:]
  assert "at step 2" in outs[0][1]  # resumed from the last checkpoint
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4", "6"]


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
  with pytest.raises(ValueError, match="together"):
    distributed.initialize("localhost:1234")


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
