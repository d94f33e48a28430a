"""Configuration checks: every field of configs/default.py by one table, the recipe's teacher
and stage-1 start, the one-command recipe, and the checks every entry point shares."""

import errno
import os

import ml_collections
import pytest
from helpers.configs import small_config

from bcdnet_jax import train
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train import pipeline as pipeline_lib
from configs import default, digits, imagenet, stage1, stage2

# One out-of-range or wrong-type value per field of configs/default.py.
BAD = {
    "model.name": "bcdnet_z", "model.stage": 3, "model.num_classes": -1,
    "model.overrides": "channels=4", "model.compute_dtype": "fp8",
    "model.dtype_policy": "float16", "dataset": "", "data_dir": 3, "train_split": "",
    "eval_split": " ", "image_size": 0, "eval_crop_ratio": 2.0,
    "color_jitter": (0.2, 0.2, 0.2), "crop_scale": (1.0, 0.5), "random_flip": "yes",
    "check_images": None, "data_workers": -1, "max_image_pixels": -1, "batch_size": 0,
    "eval_batch_size": -8,
    "base_batch_size": 0, "num_train_steps": -1, "num_epochs": float("nan"),
    "learning_rate": 0.0, "warmup_steps": -5, "warmup_init_lr": -1e-3,
    "weight_decay": -0.01, "adam_b1": 1.0, "adam_b2": -0.1, "adam_eps": 0.0,
    "label_smoothing": 1.0, "teacher_dir": 0, "init_from": False, "checkpoint": 1.5,
    "mode": "evaluate", "eval_datasets": ["imagenet_v2"], "pipeline": {"stage1": 3},
    "seed": -1, "log_every_steps": -1, "eval_every_steps": 1.5,
    "checkpoint_every_steps": -100, "keep_checkpoints": 0,
    "diagnostics_every_steps": -2, "diagnostics_warn_after": 0, "diagnostics_flip_min": -0.1,
    "diagnostics_flip_max": 1.5, "diagnostics_sign_balance": (0.9, 0.1),
}


def with_value(field, value):
  d = default.get_config().to_dict()
  parent, _, leaf = field.rpartition(".")
  (d[parent] if parent else d)[leaf] = value
  return ml_collections.ConfigDict(d)


def test_every_default_field_has_a_line_in_the_table():
  fields = set(config_lib.leaves(default.get_config()))
  assert fields == set(config_lib.FIELDS), (
      f"fields without a line in bcdnet_jax/config.FIELDS: {fields - set(config_lib.FIELDS)}; "
      f"lines for no field: {set(config_lib.FIELDS) - fields}")
  assert set(BAD) == fields  # and this test has a bad value for each


@pytest.mark.parametrize("field", sorted(BAD))
def test_each_field_out_of_range_is_one_line_naming_it(field):
  c = with_value(field, BAD[field])
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert msg.startswith(f"config.{field}: must be ") and "\n" not in msg, msg


def test_the_default_and_shipped_configs_pass_the_table():
  for mod in (default, stage1, stage2, digits, imagenet):
    config_lib.check_fields(mod.get_config())
  from configs import eval as eval_config
  config_lib.validate(eval_config.get_config())  # 0 = the recorded size, in eval mode only


def test_the_issue_cases_in_training_write_nothing(tmp_path, digits_dir):
  cases = {"base_batch_size": 0, "keep_checkpoints": -1, "warmup_steps": -5,
           "crop_scale": (1.0, 0.5), "keep_checkpoints=0": 0}
  for key, value in cases.items():
    field = key.split("=")[0]
    c = small_config(digits_dir, **{field: value})
    with pytest.raises(config_lib.ConfigError, match=f"^config.{field}: must be "):
      train.run(c, str(tmp_path / "w"))
  # unknown fields of a pipeline stage are named too
  c = small_config(digits_dir)
  c.pipeline = ml_collections.ConfigDict({"s1": {"num_trian_steps": 3}})
  with pytest.raises(config_lib.ConfigError, match="config.pipeline.s1.num_trian_steps: unknown"):
    train.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# --- the recipe cannot be run wrong by omission ---------------------------------------------

def test_recipe_configs_require_the_teacher_and_stage2_its_start(tmp_path):
  for mod in (stage1, stage2):
    c = mod.get_config()
    with pytest.raises(config_lib.ConfigError, match="config.teacher_dir: ") as e:
      config_lib.validate(c)
    assert config_lib.TEACHER_COMMAND in str(e.value)
    assert "--torch_ckpt resnet50-19c8e357.pth --arch resnet50 --out runs/ckpt/resnet50" in str(
        e.value)
  c = stage2.get_config()
  c.teacher_dir = "ckpt/resnet50"
  with pytest.raises(config_lib.ConfigError,
                     match="config.init_from: stage 2 .*--config.init_from=none"):
    config_lib.validate(c)
  c.init_from = "runs/stage1"
  config_lib.validate(c)
  c = stage1.get_config()
  c.teacher_dir = "ckpt/resnet50"
  config_lib.validate(c)  # stage 1 starts from scratch in the recipe
  assert config_lib.deviations(c) == []
  # the explicit opt-outs are deviations
  c = stage2.get_config()
  c.teacher_dir, c.init_from = "none", "none"
  config_lib.validate(c)
  devs = config_lib.deviations(c)
  assert len(devs) == 2 and devs[0].startswith("teacher_dir=none") and devs[1].startswith(
      "init_from=none")
  # evaluation needs neither
  c = stage2.get_config()
  c.mode, c.checkpoint = "eval", "x"
  config_lib.validate(c)


def test_imagenet_config_is_stage1_then_stage2_then_three_test_sets():
  c = imagenet.get_config()
  assert list(c.pipeline) == ["stage1", "stage2"]
  assert c.eval_datasets == "imagenet2012,imagenet_v2,imagenet2012_real"
  with pytest.raises(config_lib.ConfigError, match="config.teacher_dir"):
    pipeline_lib.run_pipeline(c, "/tmp/unused-bcdnet-workdir", None)
  for name, mod in (("stage1", stage1), ("stage2", stage2)):
    got = pipeline_lib.stage_config(c, name, c.pipeline[name], set()).to_dict()
    want = mod.get_config().to_dict()
    for key in ("pipeline", "eval_datasets"):
      got.pop(key), want.pop(key)
    assert got == want, name  # every value of configs/stageN.py, and only those
  assert pipeline_lib.stage_config(c, "stage1", c.pipeline.stage1, set()).num_train_steps == 300_000
  assert pipeline_lib.stage_config(c, "stage2", c.pipeline.stage2, set()).num_train_steps == 600_000


# --- the checks every entry point shares ----------------------------------------------------

def test_workdir_that_is_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
  f = tmp_path / "file"
  f.write_text("x")
  for wd in (f, f / "sub"):
    with pytest.raises(config_lib.ConfigError, match="is a file, not a directory; nothing"):
      config_lib.check_workdir(str(wd))
  config_lib.check_workdir(str(tmp_path / "new" / "deeper"))  # creatable: fine
  assert not (tmp_path / "new").exists()

  def refuse(directory):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  monkeypatch.setattr(config_lib, "_probe_write", refuse)
  with pytest.raises(config_lib.ConfigError, match=r"cannot write in .*\(read-only file "
                     r"system\); nothing done"):
    config_lib.check_workdir(str(tmp_path / "w"))


def test_predict_arguments_follow_the_same_rules():
  from bcdnet_jax.train import config
  config.check_preprocessing(0, 0.0, recorded_allowed=True)
  with pytest.raises(config.ConfigError, match=r"--crop_ratio: must be in \(0, 1\]"):
    config.check_preprocessing(0, 2.0, names=("--image_size", "--crop_ratio"),
                               recorded_allowed=True)
  with pytest.raises(config.ConfigError, match="--image_size: must be a positive"):
    config.check_preprocessing(-3, 0.0, names=("--image_size", "--crop_ratio"),
                               recorded_allowed=True)


# --- config files and command lines that mislead: one line naming the real cause ----------

CONFIG_FILES = {
    "a_dict": ("def get_config():\n  return {'mode': 'train', 'batch_size': 8}\n",
               "get_config() returns a dict, not an ml_collections.ConfigDict"),
    "no_mode": ("from configs import digits\n\ndef get_config():\n  c = digits.get_config()\n"
                "  del c['mode']\n  return c\n", "config.mode is missing; start from "
                "configs/default.py"),
    "no_pipeline": ("from configs import digits\n\ndef get_config():\n"
                    "  c = digits.get_config()\n  del c['pipeline']\n  return c\n",
                    "config.pipeline is missing"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_config_file_without_the_fields_is_one_line_naming_file_and_field(
    name, tmp_path, monkeypatch):
  from helpers.cli import run_main
  text, needle = CONFIG_FILES[name]
  path = tmp_path / f"{name}.py"
  path.write_text(text)
  rc, err = run_main([f"--config={path}", f"--workdir={tmp_path / 'w'}"], monkeypatch)
  assert rc == 2 and len(err) == 1, err
  assert err[0].startswith(f"error: --config={path}: ") and needle in err[0], err
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("flag, needle", [
    ("--config.pipeline.stage1.batch_size=-3",
     "--config.pipeline.stage1.batch_size: batch_size is a known field, but pipeline stage "
     "stage1 of this config does not set it, so it cannot be overridden there; "
     "--config.batch_size=VALUE sets it for every stage"),
    ("--config.model.overrides.channels=(16,32)",
     "config.model.overrides: channels=(16, 32) make 1 block(s) after the stem, but "
     "strides=(1, 2, 1, 2) has 4 value(s); strides needs one value (1 or 2) per block, "
     "len(channels) - 1: set both, e.g. '--config.model.overrides.strides=(2,)'"),
], ids=["stage_field_not_in_stage", "channels_and_strides"])
def test_misleading_lines_name_the_real_cause(flag, needle, tmp_path, monkeypatch):
  from helpers.cli import run_main
  rc, err = run_main(["--config=configs/digits.py", f"--workdir={tmp_path / 'w'}", flag],
                     monkeypatch)
  errors = [line for line in err if line.startswith("error: ")]
  assert rc == 2 and len(errors) == 1 and err[-1] == errors[0], err
  assert errors[0].startswith("error: ") and needle in errors[0], err
  assert not (tmp_path / "w").exists()


def test_dangling_symlink_workdir_says_so(tmp_path):
  link = tmp_path / "runs"
  link.symlink_to(tmp_path / "gone")
  for wd in (link, link / "sub"):
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.check_workdir(str(wd))
    assert str(e.value) == (f"--workdir={wd}: {link} is a dangling symlink to "
                            f"{tmp_path / 'gone'} (which does not exist); create that "
                            "directory or remove the link; nothing done")
  assert not (tmp_path / "gone").exists() and link.is_symlink()
