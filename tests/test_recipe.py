"""The recipe as one resumable command, and bad input at run time: every entry point's shared
checks, disk full, Ctrl-C, divergence before any checkpoint, and the noise of a clean run."""

import errno
import json
import os
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers.configs import small_config

from bcdnet_jax import checkpoint, runtime, train
from bcdnet_jax.deploy import predict
from bcdnet_jax.nn import models
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train import loop
from bcdnet_jax.train import preemption as preemption_lib
from bcdnet_jax.train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
NOISE_ENV = ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL", "TQDM_DISABLE")


def pipeline_config(data_dir, **kw):
  """small_config as a 2-stage pipeline (4 + 4 steps), then the test split as eval set."""
  c = small_config(data_dir, checkpoint_every_steps=2, **kw)
  c.init_from = ""  # stage 2 starts from stage 1: the pipeline fills it
  c.eval_datasets = "digits:test"
  c.pipeline = ml_collections.ConfigDict(dict(
      s1=dict(model=dict(stage=1), num_train_steps=4),
      s2=dict(model=dict(stage=2), num_train_steps=4)))
  return c


@pytest.mark.slow
def test_pipeline_resumes_after_a_kill_mid_stage2_and_evaluates_the_sets(tmp_path, digits_dir):
  wd = str(tmp_path / "run")
  # killed in stage 2's last step, after steps 1-3 were logged and step 2 saved (steps 1-4
  # of stage 1 came before)
  script = (
      "import os, signal, sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
      "from test_recipe import pipeline_config; from bcdnet_jax.train import pipeline\n"
      "calls = []\n"
      "def hook(step):\n"
      "  calls.append(step)\n"
      "  if len(calls) == 8: os.kill(os.getpid(), signal.SIGKILL)\n"
      "pipeline.run_pipeline(pipeline_config(%r), sys.argv[1], hook)\n"
      % (ROOT, TESTS, digits_dir))
  proc = subprocess.run([sys.executable, "-c", script, wd], capture_output=True, text=True,
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert os.path.exists(os.path.join(wd, "s1", "results.json"))
  assert sorted(os.listdir(os.path.join(wd, "s2", "checkpoints"))) == ["2"]
  assert not os.path.exists(os.path.join(wd, "results.json"))
  stage1_results = open(os.path.join(wd, "s1", "results.json"), "rb").read()

  # the same command again, through main.py with a fresh environment (no noise settings
  # inherited from this process) and a data directory still to prepare (TFDS' progress bars)
  cfg_file = tmp_path / "pipe.py"
  cfg_file.write_text(
      f"import sys\nsys.path.insert(0, {TESTS!r})\n"
      "from test_recipe import pipeline_config\n\n\n"
      f"def get_config():\n  return pipeline_config({str(tmp_path / 'tfds')!r})\n")
  env = {k: v for k, v in os.environ.items() if k not in NOISE_ENV}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         f"--config={cfg_file}", f"--workdir={wd}"], capture_output=True,
                        text=True, cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"), timeout=600)
  err = proc.stderr
  assert proc.returncode == 0, err[-3000:]
  # stage 1 was not trained or evaluated again; stage 2 continued from its checkpoint
  assert "s1 finished at step 4 earlier: its results.json is kept" in err, err[-3000:]
  assert "s2/checkpoints at step 2" in err
  assert open(os.path.join(wd, "s1", "results.json"), "rb").read() == stage1_results
  rows = [json.loads(line) for line in open(os.path.join(wd, "s2", "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # step 3 logged once
  # nothing that looks like a failure on a clean run
  for noise in ("E0000", "oneDNN", "read_only", "read only", "Traceback", "\x1b[", "\r"):
    assert noise not in err, (noise, err[-3000:])
  final = json.load(open(os.path.join(wd, "results.json")))
  s2 = json.load(open(os.path.join(wd, "s2", "results.json")))
  assert final["steps"] == 4 and final["stage"] == 2 and final["top1"] == s2["top1"]
  import jax
  assert final["environment"]["jax"] == jax.__version__  # what the numbers were measured with
  assert final["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
  assert list(final["datasets"]) == ["digits:test"]
  assert final["datasets"]["digits:test"]["top1"] == s2["top1"]  # same model, same split
  assert final["wall_time_s"] == pytest.approx(
      json.loads(stage1_results)["wall_time_s"] + s2["wall_time_s"])
  recorded = json.load(open(os.path.join(wd, "config.json")))
  assert len(recorded["deviations"]) == 1
  assert recorded["deviations"][0].startswith("teacher_dir=none: no distillation")
  assert json.load(open(os.path.join(wd, "s2", "config.json")))["init_from"] == os.path.join(
      wd, "s1")

  # a finished pipeline run again: nothing trained or evaluated, results.json unchanged
  before = open(os.path.join(wd, "results.json"), "rb").read()
  again = train.run(pipeline_config(digits_dir), wd)
  assert again["datasets"] == final["datasets"]
  assert open(os.path.join(wd, "results.json"), "rb").read() == before


def _fail_on_compile(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("compiled before the check")
  monkeypatch.setattr(runtime.Runtime, "jit_eval_step", refuse)
  monkeypatch.setattr(runtime.Runtime, "jit_train_step", refuse)


@pytest.mark.slow
def test_evaluation_checks_sizes_and_workdir_before_any_work(tmp_path, digits_dir, monkeypatch):
  from configs import eval as eval_config
  model = models.create_model("bcdnet_a", stage=2, num_classes=10, channels=[8, 16],
                              mlp_groups=1, mlp_group=["lsr", "pw"])
  mdir = checkpoint.save_model(model, str(tmp_path / "m"))
  _fail_on_compile(monkeypatch)

  def cfg(**kw):
    c = eval_config.get_config()
    c.checkpoint, c.dataset, c.data_dir, c.eval_split = mdir, "digits", digits_dir, "test"
    for k, v in kw.items():
      c[k] = v
    return c
  with pytest.raises(config_lib.ConfigError, match="^config.image_size: 30 px images do not fit"):
    train.run(cfg(image_size=30), str(tmp_path / "ev"))
  with pytest.raises(config_lib.ConfigError, match=r"^config.eval_crop_ratio: must be in \(0, 1\]"):
    train.run(cfg(eval_crop_ratio=2.0), str(tmp_path / "ev"))
  f = tmp_path / "a_file"
  f.write_text("x")
  with pytest.raises(config_lib.ConfigError, match="is a file, not a directory; nothing done"):
    train.run(cfg(), str(f))
  # training: the same size rule, and the workdir, before compiling or writing
  with pytest.raises(config_lib.ConfigError, match="^config.image_size: 30 px images do not fit"):
    train.run(small_config(digits_dir, image_size=30), str(tmp_path / "tr"))
  with pytest.raises(config_lib.ConfigError, match="is a file, not a directory"):
    train.run(small_config(digits_dir), str(f))
  assert not (tmp_path / "ev").exists() and not (tmp_path / "tr").exists()
  assert f.read_text() == "x"


@pytest.mark.slow
def test_predict_shares_the_checks_and_warns_on_tiny_images(tmp_path, capsys):
  from conftest import small_artefact
  from PIL import Image
  art = str(small_artefact(tmp_path))
  img = tmp_path / "one.png"
  Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(img)
  big = tmp_path / "big.png"
  Image.fromarray(np.full((224, 300, 3), 90, np.uint8)).save(big)
  for args, needle in ((["--image_size", "30"], "error: --image_size: 30 px images do not "
                        "fit the strides"),
                       (["--crop_ratio", "2"], "error: --crop_ratio: must be in (0, 1]")):
    assert predict.main(["--model", art, *args, str(img)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(needle), err
  assert predict.main(["--model", art, str(img), str(big)]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"warning: {img} is 1x1 px, far below the model's 224 px input: it is "
                 "upscaled, and the prediction says little"]


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_and_loses_nothing(tmp_path, digits_dir,
                                                             monkeypatch, caplog):
  from absl import logging as absl_logging
  wd = str(tmp_path / "run")
  cfg = small_config(digits_dir, num_train_steps=4, checkpoint_every_steps=2)
  real_save = ocp.CheckpointManager.save

  def save(self, step, *a, **k):
    if step == 4:
      # as orbax does: each failed writer thread logged with its traceback, then the error
      # raised (tensorstore's text, as a real full disk gave it, caused by the OSError)
      try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      except OSError as cause:
        absl_logging.error("_SignalingThread.run() raised an exception", exc_info=True)
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: Failed to write "
                         "76858 bytes to file 8: No space left on device "
                         "[os_error_code='28']") from cause
    return real_save(self, step, *a, **k)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with caplog.at_level("INFO"), pytest.raises(workdir_lib.SaveError) as e:
    loop.train_and_evaluate(cfg, wd)
  assert not [r for r in caplog.records if r.levelname == "ERROR"]  # held back, summarised
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("disk full while saving checkpoint 4")
  assert "nothing was lost: the last good checkpoint (step 2) is kept" in msg
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  assert loop.train_and_evaluate(cfg, wd)["steps"] == 4  # space freed: it resumes


def test_disk_full_is_recognised_in_orbax_errors_and_nothing_else():
  assert workdir_lib.disk_full(OSError(errno.ENOSPC, "x")) == "No space left on device"
  assert workdir_lib.disk_full(OSError(errno.EDQUOT, "x")) == "Disk quota exceeded"
  wrapped = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/w/4.orbax-checkpoint-"
                       "tmp/_sharding\": Failed to write 76858 bytes to file 8: No space "
                       "left on device [os_error_code='28']")
  assert workdir_lib.disk_full(wrapped) == "No space left on device"
  try:
    try:
      raise OSError(errno.ENOSPC, "full")
    except OSError as cause:
      raise RuntimeError("commit failed") from cause
  except RuntimeError as e:
    assert workdir_lib.disk_full(e) == "No space left on device"
  assert workdir_lib.disk_full(OSError(errno.EACCES, "denied")) is None
  assert workdir_lib.disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None


@pytest.mark.slow
def test_second_ctrl_c_waits_for_a_checkpoint_being_written():
  """A second Ctrl-C interrupts a training step at once, but not a checkpoint save (Orbax's
  writer threads would leave a half-written step and thread tracebacks)."""
  p = preemption_lib.Preemption()
  p._handle(signal.SIGINT, None)
  assert p.requested
  p.saving = True
  p._handle(signal.SIGINT, None)  # waits for the save: no exception
  p.saving = False
  with pytest.raises(KeyboardInterrupt):
    p._handle(signal.SIGINT, None)


def test_ctrl_c_saves_and_stops_like_sigterm(tmp_path, digits_dir):
  wd = str(tmp_path / "int")
  before = signal.getsignal(signal.SIGINT)
  out = loop.train_and_evaluate(
      small_config(digits_dir, num_train_steps=8, checkpoint_every_steps=100), wd,
      step_hook=lambda s: os.kill(os.getpid(), signal.SIGINT) if s == 2 else None)
  assert out == {"preempted": True, "steps": 2}
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["2"]
  assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.slow
def test_divergence_before_any_checkpoint_says_so(tmp_path, digits_dir):
  cfg = small_config(digits_dir, learning_rate=1e36, num_train_steps=6,
                     checkpoint_every_steps=100)
  with pytest.raises(workdir_lib.TrainingDiverged) as e:
    loop.train_and_evaluate(cfg, str(tmp_path / "nan"))
  assert "no checkpoint had been saved yet" in str(e.value)
  assert "None" not in str(e.value)


def test_metrics_jsonl_holds_each_step_once_after_a_resume(tmp_path):
  from bcdnet_jax.train import metric_writer
  w = metric_writer.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    w.scalars(step, {"loss": float(step)})
  w.close()
  # resumed from the checkpoint of step 3: steps 4 and 5 are trained and logged again
  w = metric_writer.MetricWriter(str(tmp_path), start_step=3)
  for step in (4, 5):
    w.scalars(step, {"loss": 10.0 + step})
  w.close()
  rows = metric_writer.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 14.0, 15.0]


def test_evaluation_refuses_a_training_workdir(tmp_path, digits_dir):
  """Evaluating into a training run's workdir would replace its config.json and
  results.json: refused before any work, the files unchanged."""
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "model.json").write_text("{}")
  (wd / "results.json").write_text('{"steps": 5}')
  c = small_config(digits_dir, mode="eval", checkpoint=str(wd))
  with pytest.raises(config_lib.ConfigError, match="holds a training run or a model"):
    train.run(c, str(wd))
  assert (wd / "results.json").read_text() == '{"steps": 5}'
  assert sorted(os.listdir(wd)) == ["model.json", "results.json"]


def test_a_rerun_with_other_values_says_which(tmp_path, caplog):
  """A resumed run that uses other values than the recorded config.json names them."""
  path = tmp_path / "config.json"
  path.write_text(json.dumps({"batch_size": 8, "crop_scale": [0.08, 1.0],
                              "model": {"name": "bcdnet_a", "stage": 2}}))
  same = {"batch_size": 8, "crop_scale": (0.08, 1.0), "model": {"name": "bcdnet_a", "stage": 2}}
  with caplog.at_level("WARNING", logger="bcdnet_jax"):
    workdir_lib.log_config_changes(str(path), same)
    assert "differs" not in caplog.text  # tuples and lists are the same values
    workdir_lib.log_config_changes(str(path), {**same, "batch_size": 4,
                                          "model": {"name": "bcdnet_a", "stage": 1}})
  assert "batch_size: 8 -> 4" in caplog.text and "model.stage: 2 -> 1" in caplog.text
