"""A workdir is owned, locked and verified: a run writes only into an empty directory or its
own run, one live run at a time; nothing is written before the run has proven it can
continue; a checkpoint without its sha256 record is never restored silently, nor called "the
last good" after a non-finite loss; deleted checkpoints and a full disk are one line."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers.configs import small_config

from bcdnet_jax import checkpoint, errors, train
from bcdnet_jax.train import loop, owner
from bcdnet_jax.train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(d) -> dict:
  """{relative path: bytes} of every file under `d` (what must stay unchanged)."""
  out = {}
  for base, _, files in os.walk(d):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, d)] = f.read()
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_dir):
  """A finished 4-step run with checkpoints 2 and 4 (copied by each test that changes it)."""
  wd = str(tmp_path_factory.mktemp("trained") / "run")
  loop.train_and_evaluate(small_config(digits_dir, num_train_steps=4,
                                       checkpoint_every_steps=2), wd)
  return wd


def copy_of(trained, tmp_path) -> str:
  wd = str(tmp_path / "run")
  shutil.copytree(trained, wd)
  os.remove(os.path.join(wd, owner.LOCK))
  return wd


# --- item 1 and 2: a workdir has an owner -----------------------------------------------------

def foreign(d):
  d.mkdir()
  (d / "config.json").write_text('{"my": "settings"}')
  (d / "results.json").write_text('{"top1": 0.77}')


def project(d):  # --workdir=. in a project directory
  d.mkdir()
  (d / "README.md").write_text("mine")
  (d / "src").mkdir()


def pipeline_root(d):
  d.mkdir()
  (d / owner.MARKER).write_text('{"kind": "pipeline"}')
  (d / "config.json").write_text('{"pipeline": "mine"}')
  (d / "results.json").write_text('{"top1": 0.9}')


def legacy_pipeline_root(d):  # written before the marker existed: a stage is a train run
  d.mkdir()
  (d / "stage2" / "checkpoints").mkdir(parents=True)
  (d / "results.json").write_text('{"top1": 0.9}')


@pytest.mark.parametrize("make, mode, needle", [
    (foreign, "train", "is not empty and holds no bcdnet run: a training run would replace "
                       "config.json, results.json there"),
    (project, "train", "is not empty and holds no bcdnet run: a training run writes only into "
                       "an empty directory or its own (it holds README.md, src)"),
    (foreign, "eval", "is not empty and holds no bcdnet run: an evaluation would replace "
                      "config.json, results.json there"),
    (pipeline_root, "eval", "holds a pipeline (multi-stage) run (.bcdnet_run.json): an "
                            "evaluation would replace config.json, results.json there"),
    (legacy_pipeline_root, "eval", "holds a pipeline (multi-stage) run (its records): an "
                                   "evaluation would replace results.json there"),
    (pipeline_root, "train", "holds a pipeline (multi-stage) run (.bcdnet_run.json): a "
                             "training run would replace config.json, results.json there"),
])
def test_a_run_refuses_a_directory_it_does_not_own_before_writing(tmp_path, digits_dir, make,
                                                                  mode, needle):
  wd = tmp_path / "myproj"
  make(wd)
  before = snapshot(wd)
  cfg = small_config(digits_dir, num_train_steps=20)
  if mode == "eval":
    cfg.mode, cfg.checkpoint = "eval", str(tmp_path / "model")
  with pytest.raises(owner.WorkdirError) as e:
    train.run(cfg, str(wd))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"--workdir={wd} ") and needle in msg, msg
  assert msg.endswith("use a new or empty --workdir; nothing done")
  assert snapshot(wd) == before  # nothing written, not even the lock


def test_earlier_versions_workdirs_are_recognised_and_adopted(tmp_path):
  ours = json.dumps({"dataset": "digits", "model": {}, "batch_size": 8})
  train_wd = tmp_path / "t"
  (train_wd / "checkpoints").mkdir(parents=True)
  (train_wd / "model.json").write_text("{}")
  assert owner.check_owner(str(train_wd), "train") == "legacy"
  ev = tmp_path / "e"
  ev.mkdir()
  (ev / "config.json").write_text(ours[:-1] + ', "mode": "eval"}')
  (ev / "results.json").write_text("{}")
  assert owner.check_owner(str(ev), "eval") == "legacy"
  assert owner.check_owner(str(tmp_path / "p"), "pipeline") == "new"
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "slurm-123.out").write_text("log")  # made before the run
  assert owner.check_owner(str(tmp_path / "scheduler"), "train") == "new"
  owner.claim(str(train_wd), "train")
  assert json.loads((train_wd / owner.MARKER).read_text())["kind"] == "train"
  assert owner.check_owner(str(train_wd), "train") == "own"
  with pytest.raises(owner.WorkdirError, match="holds a training run"):
    owner.check_owner(str(train_wd), "eval")


# --- item 4: nothing written before the run has proven it can continue ------------------------

def test_unreadable_model_json_and_another_model_leave_the_workdir_as_it_was(
    trained, tmp_path, digits_dir, caplog):
  wd = copy_of(trained, tmp_path)
  with open(os.path.join(wd, "model.json"), "w") as f:
    f.write("{not json")
  before = snapshot(wd)
  other = small_config(digits_dir, num_train_steps=6)
  other.model.overrides.channels = (16, 32)
  with caplog.at_level("WARNING"), pytest.raises(errors.UserError) as e:
    loop.train_and_evaluate(other, wd)
  msg = str(e.value)
  assert msg.startswith(f"workdir {wd} holds a run of another model (channels: ") and \
      f"requested; recorded in {wd}/checkpoints/4/meta/metadata)" in msg, msg
  assert snapshot(wd) == before  # model.json, config.json, checkpoints unchanged
  # the original command still resumes, from the intact checkpoint, and repairs model.json
  with caplog.at_level("INFO"):
    out = loop.train_and_evaluate(small_config(digits_dir, num_train_steps=6,
                                               checkpoint_every_steps=2), wd)
  assert out["steps"] == 6
  assert "resumed from" in caplog.text and "at step 4" in caplog.text
  assert tuple(checkpoint.read_spec(wd).channels) == (8, 16)


# --- item 3: a checkpoint without its sha256 record ------------------------------------------

def damage_optimiser_state(wd, step):
  """Every float of checkpoint `step`'s optimiser state set to -1 (finite, but AdamW's
  second moment must be >= 0: the update becomes NaN), then its sha256 record deleted."""
  path = os.path.join(wd, "checkpoints", str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  state = ckptr.restore(path)
  state["opt_state"] = __import__("jax").tree.map(
      lambda x: np.full_like(x, -1.0) if np.asarray(x).dtype.kind == "f" else x,
      state["opt_state"])
  shutil.rmtree(path)
  ckptr.save(path, state)
  ckptr.wait_until_finished()
  os.remove(os.path.join(wd, checkpoint.STEP_DIGESTS, f"{step}.json"))


def test_unverified_checkpoint_warns_and_a_nan_after_it_is_not_the_last_good(
    trained, tmp_path, digits_dir, caplog):
  wd = copy_of(trained, tmp_path)
  damage_optimiser_state(wd, 4)
  cfg = small_config(digits_dir, num_train_steps=8, checkpoint_every_steps=100)
  with caplog.at_level("WARNING"), pytest.raises(workdir_lib.TrainingDiverged) as e:
    loop.train_and_evaluate(cfg, wd)
  warned = [r.getMessage() for r in caplog.records if "no sha256 record" in r.getMessage()]
  assert warned and warned[0].startswith("checkpoint 4 has no sha256 record ("
                                         f"{wd}/checkpoint_sha256/4.json missing")
  msg = str(e.value)
  assert msg.startswith("non-finite loss at step 6 (") and "last good" not in msg, msg
  assert "after resuming from checkpoint 4, which had no sha256 record" in msg
  assert msg.endswith("; run the same command to resume from checkpoint 2")
  aside = os.listdir(os.path.join(wd, workdir_lib.DAMAGED_DIR))
  assert [a.split("-")[0] for a in aside] == ["4"]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]
  caplog.clear()
  with caplog.at_level("INFO"):
    out = loop.train_and_evaluate(cfg, wd)  # the rerun: from step 2, finite to the end
  assert out["steps"] == 8 and np.isfinite(out["top1"])
  assert "at step 2" in caplog.text


# --- item 5: the lock, with two real processes -----------------------------------------------

HOLD = ("import sys, time; from bcdnet_jax.train import owner; "
        "owner.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")


def test_a_second_live_run_is_refused_and_a_dead_holder_taken_over(tmp_path, digits_dir):
  wd = str(tmp_path / "locked")
  holder = subprocess.Popen([sys.executable, "-c", HOLD, wd], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(owner.WorkdirError) as e:
      train.run(small_config(digits_dir), wd)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"--workdir={wd} is in use by a live run (host {os.uname().nodename} pid "
        f"{holder.pid} since 20"), msg
    assert os.listdir(wd) == [owner.LOCK]  # nothing written
  finally:
    holder.kill()  # SIGKILL: no clean-up ran; the kernel drops its flock
    holder.wait()
  with owner.WorkdirLock(wd).acquire() as lock:  # its own corpse does not refuse the rerun
    rec = json.loads(open(lock.path).read())
    assert rec["pid"] == os.getpid()


def test_a_holder_is_dead_by_pid_heartbeat_or_its_own_slurm_job(tmp_path, monkeypatch):
  lock = owner.WorkdirLock(str(tmp_path))
  me = lock.record()
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  fresh, old = {"age_s": 5.0}, {"age_s": 3600.0}
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  assert lock.dead({**fresh, "host": me["host"], "pid": os.getpid()}) is None
  assert lock.dead({**fresh, "host": me["host"], "pid": int(dead)}) == f"pid {dead} is gone"
  assert lock.dead({**fresh, "host": "node9", "pid": 1, "slurm_job_id": "12"}) is None
  assert lock.dead({**old, "host": "node9", "pid": 1}) == "no heartbeat for 60 min"
  assert lock.dead({**fresh, "host": "node9", "pid": 1, "slurm_job_id": "77"}) == \
      "it is this SLURM job (77), requeued"


def test_a_run_whose_lock_was_taken_over_stops_before_writing(tmp_path):
  lock = owner.WorkdirLock(str(tmp_path), heartbeat_s=0.05).acquire()
  try:
    other = tmp_path / "other"
    other.write_text(json.dumps({"host": "node9", "pid": 4}))
    os.replace(other, lock.path)  # what a taker-over does to a dead-looking holder
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
      time.sleep(0.05)
    with pytest.raises(owner.WorkdirError, match="another run took its lock over "
                                                 r"\(host node9 pid 4\)"):
      lock.check()
  finally:
    lock.release()


# --- item 8: checkpoints deleted -------------------------------------------------------------

@pytest.mark.parametrize("also_records", [False, True])
def test_deleted_checkpoints_are_refused_not_restarted_silently(trained, tmp_path, digits_dir,
                                                                also_records):
  wd = copy_of(trained, tmp_path)
  shutil.rmtree(os.path.join(wd, "checkpoints"))
  if also_records:
    shutil.rmtree(os.path.join(wd, checkpoint.STEP_DIGESTS))
  else:  # an earlier damaged step set aside does not excuse the missing ones
    os.makedirs(os.path.join(wd, workdir_lib.DAMAGED_DIR, "6-1"))
  before = snapshot(wd)
  with pytest.raises(checkpoint.CheckpointError) as e:
    loop.train_and_evaluate(small_config(digits_dir, num_train_steps=4,
                                         checkpoint_every_steps=2), wd)
  said = ("metrics.jsonl reaches step 4 (past checkpoint_every_steps=2: a checkpoint had "
          "been saved)" if also_records else "checkpoint_sha256/ records checkpoint 4")
  assert str(e.value).startswith(f"{wd}: {said}, but checkpoints/ holds no checkpoint")
  assert str(e.value).endswith("to start again at step 0; nothing done")
  after = snapshot(wd)
  assert {k: v for k, v in after.items() if k != owner.LOCK} == before


# --- issue 24 item 7: a full disk outside the checkpoint save --------------------------------

def test_a_workdir_without_room_for_a_checkpoint_is_one_line(tmp_path, digits_dir, monkeypatch,
                                                              trained):
  wd = copy_of(trained, tmp_path)
  before = snapshot(wd)
  real = os.statvfs

  class Full:
    f_bavail = f_bfree = 3
    f_frsize = 4096
  monkeypatch.setattr(os, "statvfs", lambda p: Full() if p == wd else real(p))
  with pytest.raises(workdir_lib.SaveError) as e:
    train.run(small_config(digits_dir, num_train_steps=6, checkpoint_every_steps=2), wd)
  assert str(e.value).startswith(f"{wd}: its file system has 12.0 KiB free; one "
                                 "checkpoint of this run needs at least ")
  assert str(e.value).endswith("free space (or use another --workdir) and run the same "
                               "command; nothing done")
  after = snapshot(wd)
  assert {k: v for k, v in after.items() if k != owner.LOCK} == before


@pytest.fixture
def tiny_fs(tmp_path):
  """A 64 KiB tmpfs (root only, as on the reporter's machine)."""
  d = tmp_path / "small"
  d.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                    capture_output=True).returncode != 0:
    pytest.skip("mounting a tmpfs needs root (the statvfs test above covers the logic)")
  yield d
  subprocess.run(["umount", str(d)], check=False)


@pytest.mark.slow
def test_main_on_a_64k_filesystem_is_one_line_and_exit_2(tiny_fs, digits_dir):
  p = subprocess.run(
      [sys.executable, "main.py", "--config=configs/digits.py", "--config.num_train_steps=20",
       f"--config.data_dir={digits_dir}", f"--workdir={tiny_fs}/w"], cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  err = [ln for ln in p.stderr.splitlines() if "error" in ln.lower() or "Traceback" in ln]
  assert p.returncode == 2, p.stderr[-3000:]
  assert len(err) == 1 and err[0].startswith(f"error: {tiny_fs}/w/stage1: its file "
                                             "system has "), p.stderr[-3000:]


class _Manager:
  def __init__(self, directory, latest):
    self.directory, self._latest = directory, latest

  def latest_step(self):
    return self._latest


@pytest.mark.parametrize("resumed, latest, says", [
    (None, 10, "x; the last good checkpoint (step 10) is kept in /w/checkpoints"),
    (workdir_lib.Resumed(10, True), 20, "x; the last good checkpoint (step 20) is kept in "
                                        "/w/checkpoints"),  # saved by this run: finite
    (workdir_lib.Resumed(10, True), 10, "x, after resuming from checkpoint 10 (intact: its "
                                        "sha256 record matches; kept in /w/checkpoints): the "
                                        "run diverges from it and a rerun repeats this; lower "
                                        "config.learning_rate, or move checkpoints/10 aside to "
                                        "resume from an older step"),
])
def test_a_divergence_names_the_last_good_checkpoint_only_when_it_is(resumed, latest, says):
  assert str(workdir_lib.diverged(_Manager("/w/checkpoints", latest), "x", resumed)) == says
