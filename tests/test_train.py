"""The training library path on the digits TFDS dataset with a very small BCDNet."""

import io
import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from helpers.configs import small_config

from bcdnet_jax import checkpoint, data, preprocessing, train
from bcdnet_jax.interop import convert
from bcdnet_jax.nn import models
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train import evaluate as evaluate_lib
from bcdnet_jax.train import loop
from bcdnet_jax.train import pipeline as pipeline_lib
from bcdnet_jax.train import plan as plan_lib
from bcdnet_jax.train import step as step_lib
from bcdnet_jax.train import workdir as workdir_lib
from configs import stage1, stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_params(workdir):
  m = checkpoint.restore_model(workdir)
  return jax.tree.leaves(nnx.state(m))


# --- schedules, optimiser, losses, config checks (no compilation of the model) ----------

class ReleasedCosine:
  """The released scheduler, written from the recipe (BCDNET_REFERENCE.md, "The released
  schedule, exactly"): the loop numbers its iterations k = 1, 2, ... and asks for the
  learning rate of k before that iteration's update; plain Python floats (float64)."""

  def __init__(self, base, peak, warmup, max_iter, floor=0.0):
    self.base, self.peak, self.warmup, self.max_iter, self.floor = (base, peak, warmup,
                                                                     max_iter, floor)

  def get_lr(self, k):
    if self.warmup >= 2 and k < self.warmup:
      return self.base + (self.peak - self.base) * (k - 1) / (self.warmup - 1)
    return self.floor + (self.peak - self.floor) * (
        1 + math.cos(math.pi * (k - self.warmup) / (self.max_iter - self.warmup))) / 2


def _short_config(**kw):
  c = stage1.get_config()
  c.warmup_steps, c.num_train_steps = 3, 10
  c.update(kw)
  return c


@pytest.mark.parametrize("name, config, released", [
    ("stage 1", stage1.get_config, ReleasedCosine(1e-3, 4e-3, 15_000, 300_000)),
    ("stage 2", stage2.get_config, ReleasedCosine(5e-4, 5e-4, 0, 600_000)),
    ("warm-up 3 of 10", _short_config, ReleasedCosine(1e-3, 4e-3, 3, 10)),
])
def test_schedule_equals_the_released_one_at_every_step(name, config, released):
  """Iteration k uses optax count k - 1; in float64 every step's value is the released one
  to the last bit or two (jnp.cos vs math.cos); in float32 within float32 rounding."""
  c = config()
  sched = step_lib.learning_rate_schedule(c, c.num_train_steps)
  k = np.arange(1, c.num_train_steps + 1)
  want = np.array([released.get_lr(int(i)) for i in k])
  with jax.enable_x64(True):
    got = np.asarray(sched(jnp.asarray(k - 1)), np.float64)
  # relative to the peak: near the end 1 + cos(.) cancels, so a relative error of the value
  # itself measures only cos's last bit
  diff = np.abs(got - want).max() / max(want)
  print(f"{name}: {len(k)} steps, float64 max |difference| {diff:.2e} of the peak")
  assert diff <= 1e-15
  got32 = np.asarray(sched(jnp.asarray(k - 1, jnp.int32)), np.float64)
  assert np.abs(got32 - want).max() <= 1e-6 * max(want)
  if name == "stage 2":
    assert got[0] == pytest.approx(5e-4 * (1 + math.cos(math.pi / 600_000)) / 2, rel=1e-15)
  if name == "stage 1":
    assert got[0] == 1e-3 and got[14_999] == pytest.approx(4e-3, rel=1e-15)


def test_learning_rate_continues_the_released_sequence_after_a_resume():
  """AdamW with zero gradients moves p by -lr * wd * p: the learning rate each update used.
  Ten updates straight == two updates, the optimiser state taken to the host (what a
  checkpoint keeps) and eight more: both the released warm-up-3 sequence."""
  c = _short_config(weight_decay=0.5)
  tx, _ = step_lib.make_optimizer(c, c.num_train_steps)
  released = ReleasedCosine(1e-3, 4e-3, 3, 10)

  def lrs(state, n):
    out, p = [], jnp.ones(())
    for _ in range(n):
      updates, state = tx.update(jnp.zeros(()), state, p)
      out.append(-float(updates) / 0.5)
    return out, state

  straight, _ = lrs(tx.init(jnp.ones(())), 10)
  first, state = lrs(tx.init(jnp.ones(())), 2)
  state = jax.tree.map(jnp.asarray, jax.device_get(state))  # resumed in the warm-up
  rest, _ = lrs(state, 8)
  want = [released.get_lr(k) for k in range(1, 11)]
  np.testing.assert_allclose(straight, want, rtol=1e-6, atol=1e-12)
  assert first + rest == straight


def test_adamw_matches_torch_step_by_step():
  torch = pytest.importorskip("torch")
  c = stage1.get_config()
  c.warmup_steps, c.num_train_steps = 3, 10
  tx, sched = step_lib.make_optimizer(c, c.num_train_steps)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5,)).astype(np.float32)
  grads = rng.normal(size=(6, 5)).astype(np.float32)
  p = jnp.asarray(w0)
  opt_state = tx.init(p)
  tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  topt = torch.optim.AdamW([tw], lr=float(sched(0)), betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0.01)
  for t, g in enumerate(grads):
    updates, opt_state = tx.update(jnp.asarray(g), opt_state, p)
    p = optax.apply_updates(p, updates)
    for group in topt.param_groups:
      group["lr"] = float(sched(t))
    tw.grad = torch.from_numpy(g.copy())
    topt.step()
    np.testing.assert_allclose(np.asarray(p), tw.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_losses_match_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 7)).astype(np.float32)
  teacher = rng.normal(size=(4, 7)).astype(np.float32)
  labels = np.array([0, 3, 6, 2])
  ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(torch.from_numpy(logits),
                                                      torch.from_numpy(labels)).item()
  assert math.isclose(float(step_lib.smoothed_cross_entropy(jnp.asarray(logits),
                                                         jnp.asarray(labels), 0.1)),
                      ce, rel_tol=1e-5)
  p = torch.softmax(torch.from_numpy(teacher), -1)
  kd = (-(p * torch.log_softmax(torch.from_numpy(logits), -1)).sum(-1)).mean().item()
  assert math.isclose(float(step_lib.distillation_loss(jnp.asarray(logits),
                                                    jnp.asarray(teacher))), kd, rel_tol=1e-5)


def test_invalid_configs_fail_before_compiling(tmp_path, digits_dir):
  from bcdnet_jax.train import config as config_lib
  cases = [(dict(batch_size=-8), "config.batch_size: must be a positive"),
           (dict(batch_size=10), None),
           (dict(num_train_steps=0, num_epochs=0.0), "config.num_train_steps")]
  for kw, msg in cases:
    c = small_config(digits_dir, **kw)
    with pytest.raises(config_lib.ConfigError, match=msg or "not divisible by the 3 devices"):
      config_lib.validate(c, num_devices=3 if msg is None else 1)
  c = small_config(digits_dir)
  c.model.name = "bcdnet_z"
  with pytest.raises(config_lib.ConfigError, match="config.model.name: must be a model name"):
    loop.train_and_evaluate(c, str(tmp_path / "w"))
  c = small_config(digits_dir, init_from=str(tmp_path / "nothing"))
  with pytest.raises(checkpoint.CheckpointError, match="no such model directory"):
    loop.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # nothing written


# --- end to end ---------------------------------------------------------------------------

@pytest.mark.slow
def test_train_save_resume_evaluate(tmp_path, digits_dir, caplog):
  wd = str(tmp_path / "run")
  with caplog.at_level("INFO", logger="bcdnet_jax"):
    res = loop.train_and_evaluate(small_config(digits_dir), wd)
  # progress says it is compiling, then how long the first step took; the ETA counts
  # only the steps after it
  text = caplog.text
  assert text.index("compiling the training step") < text.index("first step done after")
  assert "step 1/6" in text and "ETA (after the next steps)" in text
  assert "step 2/6" in text and "ETA 0h00m" in text
  for k in ("top1", "top5", "num_eval_examples", "steps", "wall_time_s"):
    assert k in res
  assert res["steps"] == 6 and res["num_eval_examples"] == 359
  on_disk = json.load(open(os.path.join(wd, "results.json")))
  assert on_disk["top1"] == res["top1"]
  assert json.load(open(os.path.join(wd, "config.json")))["batch_size"] == 16
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
  assert any(f.startswith("events") for f in os.listdir(os.path.join(wd, "tensorboard")))
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert all("images_per_s" in r and "learning_rate" in r for r in rows if "loss" in r)
  # running again finds the finished run: nothing trained or evaluated, results.json (its
  # wall_time_s of the run that trained) unchanged
  written = open(os.path.join(wd, "results.json"), "rb").read()
  again = loop.train_and_evaluate(small_config(digits_dir), wd)
  assert again["steps"] == 6 and again["top1"] == res["top1"]
  assert open(os.path.join(wd, "results.json"), "rb").read() == written
  # evaluation mode on the workdir gives the same numbers
  c = small_config(digits_dir, mode="eval", checkpoint=wd)
  with caplog.at_level("INFO", logger="bcdnet_jax"):
    ev = evaluate_lib.evaluate(c, str(tmp_path / "eval"))
  assert ev["top1"] == res["top1"] and ev["top5"] == res["top5"]
  stage = small_config(digits_dir).model.stage  # and it says which stage it evaluates
  assert f"evaluating {wd}: stage-{stage} mobilenet model, 10 classes (stage {stage}: " \
      in caplog.text
  # stage 2 from a stage-1 run; init_from an incompatible architecture fails, writes nothing
  bad = small_config(digits_dir, init_from=wd)
  bad.model.overrides = ml_collections.ConfigDict(dict(channels=(8, 16, 32), mlp_groups=1))
  with pytest.raises(config_lib.ConfigError, match="architecture differs"):
    loop.train_and_evaluate(bad, str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_resume_after_kill_equals_straight_run(tmp_path, digits_dir):
  """8 steps straight == 4 steps + the process SIGKILLed during step 5 + resumed."""
  straight = str(tmp_path / "straight")
  loop.train_and_evaluate(small_config(digits_dir, num_train_steps=8,
                                        checkpoint_every_steps=4), straight)
  resumed = str(tmp_path / "resumed")
  script = (
      "import os, signal, sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
      "from helpers.configs import small_config; from bcdnet_jax.train import loop\n"
      "c = small_config(%r, num_train_steps=8, checkpoint_every_steps=4)\n"
      "loop.train_and_evaluate(c, sys.argv[1], step_hook=lambda s: s == 5 and "
      "os.kill(os.getpid(), signal.SIGKILL))\n" % (ROOT, os.path.join(ROOT, "tests"),
                                                    digits_dir))
  proc = subprocess.run([sys.executable, "-c", script, resumed], capture_output=True,
                        text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["4"]
  cfg = small_config(digits_dir, num_train_steps=8, checkpoint_every_steps=4)
  res = loop.train_and_evaluate(cfg, resumed)
  assert res["steps"] == 8
  for a, b in zip(final_params(straight), final_params(resumed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits(tmp_path, digits_dir):
  wd = str(tmp_path / "pre")
  out = loop.train_and_evaluate(
      small_config(digits_dir, num_train_steps=8, checkpoint_every_steps=100), wd,
      step_hook=lambda s: os.kill(os.getpid(), signal.SIGUSR1) if s == 2 else None)
  assert out == {"preempted": True, "steps": 2}
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["2"]
  assert not os.path.exists(os.path.join(wd, "results.json"))


@pytest.mark.slow
def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, digits_dir):
  wd = str(tmp_path / "nan")
  cfg = small_config(digits_dir, learning_rate=1e36, num_train_steps=6,
                     checkpoint_every_steps=1)
  with pytest.raises(workdir_lib.TrainingDiverged, match="last good checkpoint"):
    loop.train_and_evaluate(cfg, wd)
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")))
  assert steps and steps[-1] < 6
  for x in final_params(wd):
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.slow
def test_eval_of_converted_fixture_equals_direct_model_call(tmp_path, digits_dir):
  from conftest import TINY_CHANNELS, fixture_ckpt
  out = str(tmp_path / "a3")
  convert.convert_file(fixture_ckpt("a_3"), "bcdnet_a", 2, out, num_classes=10,
                       overrides=dict(channels=TINY_CHANNELS), check=False)
  c = small_config(digits_dir, mode="eval", checkpoint=out, image_size=32, eval_batch_size=64)
  res = evaluate_lib.evaluate(c, str(tmp_path / "ev"), return_predictions=True)
  model = checkpoint.restore_model(out)
  model.eval()
  source = data.open_source("digits", "test", digits_dir)
  batches, _, total = data.eval_batches(source, plan_lib.data_config(c), 64, 64)
  preds, labels = [], []
  fwd = nnx.jit(lambda m, x: m(preprocessing.normalize(x)))
  for batch in batches:
    m = batch["mask"].astype(bool)
    preds.append(np.asarray(fwd(model, jnp.asarray(batch["image"]))).argmax(-1)[m])
    labels.append(batch["labels"][m].argmax(-1))
  preds, labels = np.concatenate(preds), np.concatenate(labels)
  assert len(preds) == total == res["num_eval_examples"]
  np.testing.assert_array_equal(res["predictions"], preds)
  assert math.isclose(res["top1"], float(np.mean(preds == labels)))


@pytest.mark.slow
def test_distillation_from_a_frozen_teacher(tmp_path, digits_dir):
  """KD path: the teacher is restored, used in eval mode, and never saved with the student."""
  teacher = models.create_model("resnet50", num_classes=10, channels=[4, 4, 8, 8],
                                blocks_per_stage=[1, 1, 1, 1], seed=1)
  tdir = checkpoint.save_model(teacher, str(tmp_path / "teacher"))
  wd = str(tmp_path / "kd")
  loop.train_and_evaluate(small_config(digits_dir, num_train_steps=2, teacher_dir=tdir), wd)
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))
          if '"loss"' in line]
  # (CE + KD) / 2 with KD against a 10-way teacher distribution
  for r in rows:
    assert math.isclose(r["loss"], (r["ce"] + r["second_loss"]) / 2, rel_tol=1e-5)
  meta = json.load(open(os.path.join(wd, "checkpoints", "2", "meta", "metadata")))
  assert meta["step"] == 2
  assert isinstance(checkpoint.restore_model(wd), models.BCDNet)
  tree = json.load(open(os.path.join(wd, "checkpoints", "2", "state", "_METADATA")))
  keys = list(tree["tree_metadata"])
  assert {k.split(",")[0].strip("('") for k in keys} == {"params", "batch_stats",
                                                           "opt_state", "step"}
  assert not any("layer1" in k for k in keys)  # no teacher weights in the student's state
  # a teacher with the wrong number of classes is rejected before training
  bad = models.create_model("resnet50", num_classes=7, channels=[4, 4, 8, 8],
                            blocks_per_stage=[1, 1, 1, 1])
  bdir = checkpoint.save_model(bad, str(tmp_path / "bad_teacher"))
  with pytest.raises(config_lib.ConfigError, match="teacher has 7 classes"):
    loop.train_and_evaluate(small_config(digits_dir, teacher_dir=bdir), str(tmp_path / "x"))


def test_a_teacher_dir_that_holds_no_resnet50_is_refused_before_anything(tmp_path, digits_dir):
  """issue 24: a converted BCDNet as teacher_dir failed inside the step with a shape error;
  now one line naming the field and what the directory holds, and no workdir written."""
  student = models.create_model("bcdnet_a", stage=2, num_classes=10, channels=[8, 16],
                                mlp_groups=1, mlp_group=("lsr", "pw"))
  tdir = checkpoint.save_model(student, str(tmp_path / "not_a_teacher"))
  wd = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError) as e:
    train.run(small_config(digits_dir, teacher_dir=tdir), str(wd))
  assert str(e.value) == (
      f"config.teacher_dir: {tdir} holds a stage-2 mobilenet model, not the ResNet-50 "
      "teacher; convert torchvision's weights with python -m bcdnet_jax convert --torch_ckpt "
      "resnet50-19c8e357.pth --arch resnet50 --out runs/ckpt/resnet50")
  assert not wd.exists()


# --- the ImageNet test sets, as tiny builders of the same feature layout ---------------------

import tensorflow_datasets as tfds  # noqa: E402


def _tiny_images(n, seed):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (40, 48, 3)).astype(np.uint8) for _ in range(n)]


class TinyImagenetV2(tfds.core.GeneratorBasedBuilder):
  """imagenet_v2's layout (image, label, file_name; split 'test'), 10 classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i, img in enumerate(_tiny_images(23, 0)):
      yield i, {"image": img, "label": i % 10, "file_name": f"{i}.jpeg"}


REAL_SETS = [[3], [], [1, 4], [7], [], [0, 2, 9], [5], [6, 8]]


class TinyImagenet2012Real(tfds.core.GeneratorBasedBuilder):
  """imagenet2012_real's layout: original_label, real_label (a set, maybe empty)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "original_label": tfds.features.ClassLabel(num_classes=10),
        "real_label": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=10)),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i, img in enumerate(_tiny_images(21, 1)):
      labels = REAL_SETS[i % len(REAL_SETS)]
      yield i, {"image": img, "original_label": labels[0] if labels else 0,
                "real_label": labels, "file_name": f"{i}.jpeg"}


@pytest.mark.slow
def test_eval_on_imagenet_v2_and_real_layouts(tmp_path, digits_dir):
  for cls in (TinyImagenetV2, TinyImagenet2012Real):
    cls(data_dir=digits_dir, file_format="array_record").download_and_prepare()
  model = models.create_model("bcdnet_a", stage=2, num_classes=10, seed=3,
                              channels=[4, 8, 16, 16, 32, 32, 64, 64, 64, 64, 128])
  out = checkpoint.save_model(model, str(tmp_path / "m"))
  c = small_config(digits_dir, mode="eval", checkpoint=out, image_size=32, eval_batch_size=8,
                   eval_crop_ratio=0.875)
  c.eval_datasets = "tiny_imagenet_v2:test,tiny_imagenet2012_real:validation"
  res = evaluate_lib.evaluate(c, str(tmp_path / "ev"))
  sets = res["datasets"]
  assert list(sets) == ["tiny_imagenet_v2:test", "tiny_imagenet2012_real:validation"]
  # by hand: the model on the same preprocessing, ReaL = prediction in the label set
  model.eval()
  fwd = nnx.jit(lambda m, x: m(preprocessing.normalize(x)))
  for name, key in (("tiny_imagenet_v2", "label"), ("tiny_imagenet2012_real", "real_label")):
    source = data.open_source(name, "test" if key == "label" else "validation", digits_dir)
    assert source.multi_label == (key == "real_label")
    hits1, hits5, n = 0, 0, 0
    for i in range(len(source)):
      ex = source[i]
      x = data.eval_transform(ex["image"], image_size=32, crop_ratio=0.875)
      logits = np.asarray(fwd(model, jnp.asarray(x[None])))[0]
      truth = set(np.atleast_1d(ex["label"]).tolist())
      if not truth:
        continue  # ReaL: images without labels do not count
      n += 1
      hits1 += int(logits.argmax()) in truth
      hits5 += bool(truth & set(np.argsort(-logits)[:5].tolist()))
    got = sets[f"{name}:{'test' if key == 'label' else 'validation'}"]
    assert got["num_eval_examples"] == n and math.isclose(got["top1"], hits1 / n)
    assert math.isclose(got["top5"], hits5 / n)
  assert sets["tiny_imagenet2012_real:validation"]["num_images"] == 21
  assert sets["tiny_imagenet2012_real:validation"]["num_eval_examples"] == 21 - 6  # 6 empty
  written = json.load(open(tmp_path / "ev" / "results.json"))
  assert written["datasets"] == sets and written["top1"] == sets["tiny_imagenet_v2:test"]["top1"]


def test_eval_dataset_names_and_missing_real_hint():
  assert data.parse_eval_dataset("imagenet_v2", "validation") == (
      "imagenet_v2/matched-frequency", "test")
  assert data.parse_eval_dataset("imagenet_v2/topimages", "x") == ("imagenet_v2/topimages",
                                                                   "test")
  assert data.parse_eval_dataset("imagenet2012_real", "x") == ("imagenet2012_real",
                                                               "validation")
  assert data.parse_eval_dataset("digits:test", "x") == ("digits", "test")
  assert data.parse_eval_dataset("folder:/a/b:val", "x") == ("folder:/a/b", "val")
  with pytest.raises(data.DataError, match="ILSVRC2012_img_val.tar"):
    data.open_source("imagenet2012_real", "validation", "/nonexistent/tfds")


# --- hardening: bad input is named, nothing already written is damaged ----------------------

@pytest.mark.slow
def test_digits_model_evaluates_and_predicts_at_its_own_size(tmp_path, digits_dir):
  """The recorded preprocessing (16 px here) is the default of eval, export and predict:
  all three give the training run's accuracy without any size flag."""
  from bcdnet_jax import preprocessing
  from bcdnet_jax.deploy import export, predict
  from configs import eval as eval_config
  wd = str(tmp_path / "run")
  res = loop.train_and_evaluate(small_config(digits_dir, num_train_steps=4), wd)
  meta = json.load(open(os.path.join(wd, "model.json")))
  assert meta["preprocessing"]["image_size"] == 16 and meta["preprocessing"]["crop_ratio"] == 1
  c = eval_config.get_config()
  c.checkpoint, c.dataset, c.data_dir, c.eval_split = wd, "digits", digits_dir, "test"
  ev = train.run(c, str(tmp_path / "ev"))
  assert ev["preprocessing"]["image_size"] == 16 and ev["top1"] == res["top1"]
  # an explicit, different size is allowed (and logged)
  c.image_size = 32
  assert train.run(c, str(tmp_path / "ev32"))["preprocessing"]["image_size"] == 32
  # export + predict on the test images as files: the same predictions as evaluation
  art = str(tmp_path / "digits.bcdnet")
  export.export_checkpoint(wd, art)
  assert export.load_packed(art).header["preprocess"]["image_size"] == 16
  source = data.open_source("digits", "test", digits_dir)
  files = []
  for i in range(40):
    path = tmp_path / f"{i}.png"
    path.write_bytes(source[i]["image"])
    files.append(str(path))
  model = export.load_packed(art)
  pre = preprocessing.resolve(model.header["preprocess"])
  top, _ = predict.predict(model, predict.load_images(files, pre), k=1)
  restored = checkpoint.restore_model(wd)
  restored.eval()
  batches, _, _ = data.eval_batches(source, dataclasses_replace(plan_lib.data_config(
      small_config(digits_dir)), image_size=16, eval_crop_ratio=1.0), 40, 40)
  batch = next(batches)
  direct = np.asarray(nnx.jit(lambda m, x: m(preprocessing.normalize(x)))(
      restored, jnp.asarray(batch["image"])))
  np.testing.assert_array_equal(top[:, 0], direct.argmax(-1))


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


@pytest.mark.slow
def test_resume_with_another_model_is_refused_and_leaves_the_workdir_intact(tmp_path,
                                                                          digits_dir):
  wd = str(tmp_path / "run")
  loop.train_and_evaluate(small_config(digits_dir, num_train_steps=2), wd)
  before = {f: open(os.path.join(wd, f), "rb").read() for f in ("model.json", "config.json")}
  other = small_config(digits_dir, num_train_steps=4)
  other.model.overrides = ml_collections.ConfigDict(dict(channels=(8, 8), mlp_groups=1,
                                                         mlp_group=("lsr", "pw")))
  with pytest.raises(config_lib.ConfigError, match=r"holds a run of another model \(channels"):
    loop.train_and_evaluate(other, wd)
  for f, content in before.items():
    assert open(os.path.join(wd, f), "rb").read() == content
  checkpoint.restore_model(wd)  # the earlier run still restores


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, digits_dir, caplog):
  wd = str(tmp_path / "run")
  cfg = small_config(digits_dir, num_train_steps=4, checkpoint_every_steps=2)
  loop.train_and_evaluate(cfg, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]
  # flip one byte of the biggest file of step 4
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(wd, "checkpoints", "4"))
           for f in fs]
  victim = max(files, key=os.path.getsize)
  raw = bytearray(open(victim, "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(victim, "wb").write(bytes(raw))
  with caplog.at_level("WARNING", logger="bcdnet_jax"):
    restored = checkpoint.restore_model(wd)
  assert "checkpoint 4 is damaged" in caplog.text and "corrupted" in caplog.text
  assert restored is not None
  # resuming trains from step 2 again, and says which checkpoint it skipped
  caplog.clear()
  with caplog.at_level("INFO", logger="bcdnet_jax"):
    res = loop.train_and_evaluate(cfg, wd)
  assert res["steps"] == 4 and "at step 2" in caplog.text
  # a deleted file in the newest checkpoint: the same fallback
  os.remove(min((os.path.join(d, f) for d, _, fs in os.walk(
      os.path.join(wd, "checkpoints", "4")) for f in fs), key=os.path.getsize))
  with caplog.at_level("WARNING", logger="bcdnet_jax"):
    checkpoint.restore_model(wd)
  assert "missing" in caplog.text


def test_config_mistakes_are_named_before_any_work(tmp_path, digits_dir):
  for kw, msg in [(dict(mode="evaluate"), "config.mode: must be one of .*got 'evaluate'"),
                  (dict(eval_crop_ratio=0.0), "config.eval_crop_ratio: must be in"),
                  (dict(image_size=34), "config.image_size: 34 px images do not fit"),
                  (dict(data_workers=-1), "config.data_workers: must be an integer >= 0")]:
    c = small_config(digits_dir, **kw)
    with pytest.raises(config_lib.ConfigError, match=msg):
      train.run(c, str(tmp_path / "w"))
  for field, value in [("compute_dtype", "fp8"), ("dtype_policy", "float16")]:
    c = small_config(digits_dir)
    c.model[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.model.{field}: must be .*'{value}'"):
      train.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_command_line_beats_pipeline_stage_values(digits_dir):
  from configs import digits
  c = digits.get_config()
  stage = pipeline_lib.stage_config(c, "stage1", c.pipeline.stage1, {"num_train_steps"})
  assert stage.num_train_steps == c.num_train_steps  # the top level, not the stage's 600
  stage = pipeline_lib.stage_config(c, "stage1", c.pipeline.stage1, set())
  assert stage.num_train_steps == 600 and stage.model.stage == 1


@pytest.mark.slow
def test_main_reports_known_errors_in_one_line(tmp_path, digits_dir):
  def main(*args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()
  wd = str(tmp_path / "w")
  bad_syntax = tmp_path / "bad.py"
  bad_syntax.write_text("def get_config(:\n  return None\n")
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  raising = tmp_path / "raising.py"
  raising.write_text("def get_config():\n  return 1 / 0\n")
  no_get = tmp_path / "no_get.py"
  no_get.write_text("x = 1\n")
  cases = [(["--config=configs/digits.py", f"--workdir={wd}", "--config.bach_size=3"],
            "--config.bach_size: unknown field (did you mean batch_size?)"),
           (["--config=configs/digits.py", f"--workdir={wd}", "--config.typo_field=1"],
            "--config.typo_field: unknown field; the fields are those of configs/default.py"),
           (["--config=" + str(raising), f"--workdir={wd}"],
            f"--config={raising}: get_config() raised ZeroDivisionError: division by zero"),
           (["--config=" + str(no_get), f"--workdir={wd}"],
            f"--config={no_get}: the config file defines no get_config() function"),
           (["--config=configs/nope.py", f"--workdir={wd}"], "nope.py"),
           (["--config=configs/digits.py", f"--workdir={wd}", "--config.mode=evaluate"],
            "config.mode: must be one of ('train', 'eval'), got 'evaluate'"),
           (["--config=configs/eval.py", f"--workdir={wd}",
             f"--config.checkpoint={tmp_path / 'none'}"], "no such model directory"),
           (["--config=" + str(bad_syntax), f"--workdir={wd}"],
            f"{bad_syntax}, line 1: invalid syntax: def get_config(:"),
           (["--config=configs/eval.py", f"--workdir={a_file}",
             f"--config.checkpoint={tmp_path / 'none'}"], "is a file, not a directory"),
           (["--config=configs/stage1.py", f"--workdir={wd}"],
            "config.teacher_dir: the released recipe distils from a ResNet-50 teacher")]
  for args, needle in cases:
    rc, err = main(*args)
    assert rc == 2, err
    last = err[-1]
    assert last.startswith("error: ") and needle in last, err[-5:]
    assert not any("Traceback" in line for line in err), err[-5:]
  assert not os.path.exists(wd)


def test_folder_dataset_problems_are_named(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)

  def tree(root, classes, per_class=3):
    for split, names in classes.items():
      for c in names:
        os.makedirs(os.path.join(root, split, c), exist_ok=True)
        for i in range(per_class):
          Image.fromarray(rng.integers(0, 255, (20, 24, 3)).astype(np.uint8)).save(
              os.path.join(root, split, c, f"{i}.jpg"))
  ok = str(tmp_path / "ok")
  tree(ok, {"train": ["cat", "dog"], "validation": ["cat", "dog"]})
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (96, 96, 3)).astype(np.uint8)).save(buf, "JPEG")
  # a truncated validation JPEG (PIL reads its header): training fails before any step
  cut = os.path.join(ok, "validation", "cat", "cut.jpg")
  open(cut, "wb").write(buf.getvalue()[:len(buf.getvalue()) // 2])
  c = small_config(str(tmp_path / "tfds"), dataset=f"folder:{ok}", eval_split="validation")
  with pytest.raises(data.DataError, match=r"undecodable image\(s\).*cut\.jpg"):
    loop.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")
  # a truncated training image (validation clean): the run stops and names the file
  os.rename(cut, os.path.join(ok, "train", "dog", "cut.jpg"))
  with pytest.raises(data.DataError, match=r"split 'train'.*cut\.jpg"):
    loop.train_and_evaluate(c, str(tmp_path / "wd2"))
  # ... and check_images finds it before training
  c.check_images = True
  with pytest.raises(data.DataError, match=r"undecodable image\(s\).*cut\.jpg"):
    loop.train_and_evaluate(c, str(tmp_path / "wd3"))
  assert not os.path.exists(tmp_path / "wd3" / "checkpoints")
  # class mismatch between the splits: named before any work
  mism = str(tmp_path / "mism")
  tree(mism, {"train": ["cat", "dog"], "validation": ["cat", "cow"]})
  c = small_config(str(tmp_path / "tfds"), dataset=f"folder:{mism}", eval_split="validation")
  with pytest.raises(data.DataError, match=r"different classes .*dog.*cow"):
    loop.train_and_evaluate(c, str(tmp_path / "wd4"))
