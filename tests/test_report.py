"""bcdnet-report: plots and page of a finished, resumed, in-progress and pipeline run, bad
workdirs as one error line, and the page rendered in headless Chromium with every image."""

import json
import os
import re
import subprocess

import ml_collections
import numpy as np
import pytest
from helpers import browser
from helpers.configs import small_config
from PIL import Image

from bcdnet_jax import train
from bcdnet_jax.train import loop, report

LAYERS = ["features.1.conv3x3", "features.1.pw", "mlp.0.0.token_mlp"]
SIGNS = ["features.1.act1", "features.1.act2"]


def _write_jsonl(path, lines):
  with open(path, "w") as f:
    f.writelines(json.dumps(d) + "\n" for d in lines)


def synthetic_pipeline(root, *, steps=(20, 30), finished=True, repeat_step=None):
  """A digits-like pipeline workdir written by hand: stage1 (no flips) and stage2."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  for i, (name, n) in enumerate(zip(("stage1", "stage2"), steps)):
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump({"num_train_steps": n, "init_from": os.path.join(root, "stage1") if i else ""},
                f)
    metrics = [{"step": s, "loss": 2.5 / s, "ce": 2.6 / s, "second_loss": 2.4 / s,
                "accuracy": 1 - 1 / s, "accuracy_dist": 1 - 1.2 / s,
                "learning_rate": 1e-3 * (1 - s / n) + 1e-6, "images_per_s": 300.0 + s}
               for s in range(1, n + 1)]
    diags = []
    for s in range(5, n + 1, 5):
      d_line = {"step": s}
      for layer in LAYERS:
        if i == 1:
          d_line[f"{layer}/flip_ratio"] = float(rng.uniform(0, 0.1))
          d_line[f"{layer}/clip_fraction"] = float(rng.uniform(0, 0.01))
        d_line[f"{layer}/grad_norm"] = float(rng.uniform(1, 10))
      for site in SIGNS:
        d_line[f"{site}/pos_fraction"] = float(rng.uniform(0.3, 0.7))
        d_line[f"{site}/band_fraction"] = float(rng.uniform(0.5, 0.9))
      diags.append(d_line)
    if repeat_step is not None:  # a line a resumed run logged again
      metrics.append(dict(metrics[repeat_step - 1], loss=99.0))
      diags.append(dict(diags[0]))
    metrics.append({"step": n, "eval_top1": 0.9 + i / 20, "eval_top5": 1.0})
    _write_jsonl(os.path.join(d, "metrics.jsonl"), metrics)
    _write_jsonl(os.path.join(d, "diagnostics.jsonl"), diags)
    if finished:
      with open(os.path.join(d, "results.json"), "w") as f:
        json.dump({"top1": 0.9 + i / 20, "top5": 1.0, "num_eval_examples": 359, "steps": n,
                   "dataset": "digits", "eval_split": "test"}, f)
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump({"pipeline": {"stage1": {}, "stage2": {}}}, f)
  return root


def check_report(out_dir, expect_heatmaps):
  """Every PNG valid with its expected size, each referenced by index.html; returns the
  page and {file: (w, h)}."""
  with open(os.path.join(out_dir, "index.html")) as f:
    page = f.read()
  pngs = sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))
  assert pngs == sorted(["training.png"] + list(expect_heatmaps))
  sizes = {}
  for p in pngs:
    with open(os.path.join(out_dir, p), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
    with Image.open(os.path.join(out_dir, p)) as im:
      im.verify()
    with Image.open(os.path.join(out_dir, p)) as im:
      sizes[p] = im.size
    m = re.search(rf"<img src='{re.escape(p)}' width='(\d+)' height='(\d+)'", page)
    assert m, p
    assert (int(m[1]), int(m[2])) == sizes[p]
  assert sizes["training.png"] == report.TRAINING_PIXELS
  return page, sizes


ALL_HEATMAPS = [f for f, *_ in report.HEATMAPS]


def test_pipeline_report_puts_both_stages_on_one_axis(tmp_path):
  wd = synthetic_pipeline(str(tmp_path / "run"))
  index = report.build(wd)
  assert index == os.path.join(wd, "report", "index.html")
  page, sizes = check_report(os.path.join(wd, "report"), ALL_HEATMAPS)
  assert sizes["flip_ratio.png"] == report.heatmap_pixels(len(LAYERS))
  assert sizes["sign_balance.png"] == report.heatmap_pixels(len(SIGNS))
  stages = report.find_stages(wd)
  assert [(s.name, s.offset) for s in stages] == [("stage1", 0), ("stage2", 20)]
  layers, steps, m = report._matrix(stages, "flip_ratio")
  assert layers == LAYERS and steps == [25, 30, 35, 40, 45, 50]  # stage 2 only, shifted
  layers, steps, m = report._matrix(stages, "pos_fraction")
  assert steps == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50] and not np.isnan(m).any()
  # the evaluation table: both stages
  assert re.search(r"<td>stage1</td><td>digits:test</td><td>90\.00 %</td>", page)
  assert re.search(r"<td>stage2</td><td>digits:test</td><td>95\.00 %</td>", page)
  assert "stage1: step 20 of 20 logged, finished" in page


def test_resumed_run_counts_each_step_once(tmp_path):
  wd = synthetic_pipeline(str(tmp_path / "run"), repeat_step=7)
  stages = report.find_stages(wd)
  steps = [m["step"] for m in stages[0].metrics]
  assert steps == list(range(1, 21))
  assert stages[0].metrics[6]["loss"] == 99.0  # the later line of a step wins
  assert stages[0].metrics[19]["eval_top1"] == 0.9 and "loss" in stages[0].metrics[19]
  report.build(wd)
  check_report(os.path.join(wd, "report"), ALL_HEATMAPS)


def test_pipeline_in_progress_before_its_config_is_written(tmp_path):
  wd = synthetic_pipeline(str(tmp_path / "run"))
  os.remove(os.path.join(wd, "config.json"))  # the pipeline writes it at the end
  os.remove(os.path.join(wd, "stage2", "results.json"))
  lines = open(os.path.join(wd, "stage2", "metrics.jsonl")).readlines()[:12]
  with open(os.path.join(wd, "stage2", "metrics.jsonl"), "w") as f:
    f.writelines(lines + ['{"step": 13, "loss": 0.'])  # a line cut by a kill
  stages = report.find_stages(wd)
  assert [(s.name, s.offset, s.total_steps) for s in stages] == [("stage1", 0, 20),
                                                                 ("stage2", 20, 30)]
  assert [m["step"] for m in stages[1].metrics] == list(range(1, 13))
  page, _ = check_report(os.path.dirname(report.build(wd)), ALL_HEATMAPS)
  assert "stage2: step 12 of 30 logged, in progress" in page
  assert "<td>stage2</td>" not in page and "<td>stage1</td>" in page
  with open(os.path.join(wd, "stage2", "config.json"), "w") as f:  # relative to the cwd of training
    json.dump({"num_train_steps": 30, "init_from": "some/where/run/stage1"}, f)
  assert [s.name for s in report.find_stages(wd)] == ["stage1", "stage2"]


def test_multi_set_evaluation_table(tmp_path):
  wd = str(tmp_path / "eval")
  os.makedirs(wd)
  _write_jsonl(os.path.join(wd, "metrics.jsonl"), [{"step": 1, "loss": 1.0}])
  with open(os.path.join(wd, "results.json"), "w") as f:
    json.dump({"steps": 0, "datasets": {
        "imagenet2012:validation": {"top1": 0.7, "top5": 0.9, "num_eval_examples": 50000},
        "imagenet_v2:test": {"top1": 0.6, "top5": 0.8, "num_eval_examples": 10000}}}, f)
  page, _ = check_report(os.path.dirname(report.build(wd)), [])
  assert "<td>imagenet_v2:test</td><td>60.00 %</td><td>80.00 %</td><td>10000</td>" in page
  assert "No binarisation diagnostics" in page


def test_bad_workdirs_are_one_error_line(tmp_path, capsys):
  assert report.main([str(tmp_path / "missing")]) == 2
  assert capsys.readouterr().err.strip().endswith("missing: not a directory")
  assert report.main([str(tmp_path)]) == 2  # empty: not a workdir
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "not a training workdir" in err and "\n" not in err
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"num_train_steps": 5}, f)
  assert report.main([str(tmp_path)]) == 2
  assert "no metrics yet" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "report" / "index.html")


def test_folders_that_are_not_one_workdir_are_one_error_line(tmp_path, capsys):
  # two unrelated single-stage runs side by side: not the stages of one pipeline
  for name in ("a", "b"):
    os.makedirs(tmp_path / "many2" / name)
    _write_jsonl(tmp_path / "many2" / name / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    with open(tmp_path / "many2" / name / "config.json", "w") as f:
      json.dump({"num_train_steps": 1, "init_from": ""}, f)
  synthetic_pipeline(str(tmp_path / "pipes" / "p1"))  # two pipeline workdirs side by side
  synthetic_pipeline(str(tmp_path / "pipes" / "p2"))
  os.makedirs(tmp_path / "misc" / "junk")  # unrelated things
  with open(tmp_path / "misc" / "notes.txt", "w") as f:
    f.write("x")
  for d, subs in (("many2", "a, b"), ("pipes", "p1, p2"), ("misc", None)):
    before = sorted(os.listdir(tmp_path / d))
    assert report.main([str(tmp_path / d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / d} is not a training "
                                                   "workdir (no metrics.jsonl, no pipeline "
                                                   "config.json)"), err
    assert (f"it contains the workdirs {subs}: pass one of them" in err) == bool(subs), err
    assert sorted(os.listdir(tmp_path / d)) == before  # nothing written
  # a stage of a pipeline in progress alone, or each of the runs: accepted
  assert report.main([str(tmp_path / "many2" / "a")]) == 0


def test_out_that_cannot_be_written_is_one_error_line(tmp_path, capsys):
  wd = synthetic_pipeline(str(tmp_path / "run"))
  with open(tmp_path / "afile", "w") as f:
    f.write("keep")
  assert report.main([wd, "--out", str(tmp_path / "afile")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "afile: is a file, not a directory" in err, err
  assert open(tmp_path / "afile").read() == "keep"
  # any other OSError (a file in the path; a read-only directory when not root)
  assert report.main([wd, "--out", str(tmp_path / "afile" / "report")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "cannot write the report there" in err, err
  assert open(tmp_path / "afile").read() == "keep"
  os.makedirs(tmp_path / "ro")
  os.chmod(tmp_path / "ro", 0o555)
  try:
    if not os.access(tmp_path / "ro", os.W_OK):  # root writes anyway
      assert report.main([wd, "--out", str(tmp_path / "ro" / "report")]) == 2
      err = capsys.readouterr().err
      assert err.count("\n") == 1 and "cannot write the report there" in err, err
  finally:
    os.chmod(tmp_path / "ro", 0o755)


_IMG_CHECK = """<script>window.addEventListener('load', function () {
  var r = [];
  document.querySelectorAll('img').forEach(function (i) {
    r.push({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,
            w: i.naturalWidth, h: i.naturalHeight});
  });
  var p = document.createElement('pre'); p.id = 'img-check';
  p.textContent = JSON.stringify(r); document.body.appendChild(p);
});</script>"""


def rendered_images(out_dir, chrome):
  """[{src, ok, w, h}] of every <img> of index.html once Chromium (the command line
  `chrome`) has loaded the page."""
  with open(os.path.join(out_dir, "index.html")) as f:
    page = f.read()
  probe = os.path.join(out_dir, "_probe.html")  # beside it: the same relative image paths
  with open(probe, "w") as f:
    f.write(page.replace("</body>", _IMG_CHECK + "</body>"))
  dom = subprocess.run(chrome + ["--virtual-time-budget=10000", "--dump-dom",
                                      "file://" + probe],
                       capture_output=True, text=True, timeout=120).stdout
  os.remove(probe)
  m = re.search(r'<pre id="img-check">(.*?)</pre>', dom, re.S)
  assert m, dom[-2000:]
  return json.loads(m[1].replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.slow
def test_page_renders_every_image_in_headless_chromium(tmp_path):
  chrome = browser.chromium()  # skipped without Chromium, unless BCDNET_REQUIRE_BROWSER=1
  wd = synthetic_pipeline(str(tmp_path / "run"))
  out = os.path.dirname(report.build(wd))
  imgs = rendered_images(out, chrome)
  assert sorted(i["src"] for i in imgs) == sorted(["training.png"] + ALL_HEATMAPS)
  for i in imgs:
    assert i["ok"], i
    with Image.open(os.path.join(out, i["src"])) as im:
      assert (i["w"], i["h"]) == im.size
  shot = str(tmp_path / "shot.png")
  subprocess.run(chrome + [f"--screenshot={shot}", "--window-size=1280,2400",
                                "file://" + os.path.join(out, "index.html")],
                 capture_output=True, timeout=120, check=True)
  with Image.open(shot) as im:
    px = np.asarray(im.convert("RGB"))
  assert px.shape[:2] == (2400, 1280)
  # the plots' colours are on the page, not only white and text
  assert len(np.unique(px.reshape(-1, 3), axis=0)) > 500
  # the check can fail: a missing plot is reported broken
  os.remove(os.path.join(out, "sign_band.png"))
  broken = [i["src"] for i in rendered_images(out, chrome) if not i["ok"]]
  assert broken == ["sign_band.png"]


@pytest.mark.slow
def test_report_of_real_runs_in_progress_resumed_and_pipeline(tmp_path, digits_dir):
  wd = str(tmp_path / "run")
  cfg = small_config(digits_dir, num_train_steps=6, checkpoint_every_steps=2,
                     diagnostics_every_steps=2)

  class Killed(Exception):
    pass

  def stop_at_5(step):
    if step == 5:
      raise Killed

  with pytest.raises(Killed):
    loop.train_and_evaluate(cfg, wd, step_hook=stop_at_5)
  assert report.main([wd]) == 0  # in progress: steps 1-4 logged, no results
  page, sizes = check_report(os.path.join(wd, "report"), ALL_HEATMAPS)
  assert "run: step 4 of 6 logged, in progress" in page and "No evaluation results" in page
  assert report._matrix(report.find_stages(wd), "flip_ratio")[1] == [2, 4]

  loop.train_and_evaluate(cfg, wd)  # resumed from step 4
  report.build(wd)
  page, _ = check_report(os.path.join(wd, "report"), ALL_HEATMAPS)
  (stage,) = report.find_stages(wd)
  assert [m["step"] for m in stage.metrics] == [1, 2, 3, 4, 5, 6]
  assert [d["step"] for d in stage.diagnostics] == [2, 4, 6]
  assert "run: step 6 of 6 logged, finished" in page
  assert re.search(r"<td>run</td><td>digits:test</td><td>\d+\.\d\d %</td>", page)

  # a pipeline (the digits demo's shape) writes its report at the end
  pcfg = small_config(digits_dir, diagnostics_every_steps=-1)
  pcfg.pipeline = ml_collections.ConfigDict({
      "stage1": {"model": {"stage": 1}, "num_train_steps": 2},
      "stage2": {"model": {"stage": 2}, "num_train_steps": 3}})
  pwd = str(tmp_path / "pipeline")
  train.run(pcfg, pwd)
  page, _ = check_report(os.path.join(pwd, "report"), ALL_HEATMAPS)
  stages = report.find_stages(pwd)
  assert [(s.name, s.offset) for s in stages] == [("stage1", 0), ("stage2", 2)]
  assert report._matrix(stages, "flip_ratio")[1] == [3, 4, 5]  # stage 2's steps 1-3
  assert report._matrix(stages, "pos_fraction")[1] == [1, 2, 3, 4, 5]
  assert "<td>stage1</td>" in page and "<td>stage2</td>" in page


@pytest.mark.parametrize("require, outcome", [(None, pytest.skip.Exception),
                                               ("0", pytest.skip.Exception),
                                               ("1", pytest.fail.Exception)])
def test_without_chromium_the_browser_test_skips_unless_ci_requires_it(monkeypatch, require,
                                                                       outcome):
  """One skip reason on a machine without Chromium; a failure where .ci/run requires it."""
  monkeypatch.setattr(browser.shutil, "which", lambda name: None)
  if require is None:
    monkeypatch.delenv(browser.REQUIRE_VAR, raising=False)
  else:
    monkeypatch.setenv(browser.REQUIRE_VAR, require)
  with pytest.raises(outcome) as e:
    browser.chromium()
  msg = str(e.value)
  assert msg.startswith("no headless Chromium on PATH (") and "apt-get install -y chromium" in msg
  assert ("BCDNET_REQUIRE_BROWSER is set" in msg) == (require == "1"), msg
  monkeypatch.setattr(browser.shutil, "which", lambda name: f"/usr/bin/{name}")
  assert browser.chromium()[:2] == ["/usr/bin/chromium", "--headless"]


@pytest.mark.parametrize("kind", ["evaluation", "model directory", "converted model"])
def test_evaluation_workdirs_and_model_directories_are_named_as_such(tmp_path, capsys, kind):
  d = tmp_path / "d"
  d.mkdir()
  if kind == "evaluation":
    (d / "config.json").write_text(json.dumps({"mode": "eval", "checkpoint": "runs/x"}))
    (d / "results.json").write_text(json.dumps({"top1": 0.5}))
    what = "is an evaluation workdir (results.json of evaluating a model of runs/x)"
  else:
    (d / "state").mkdir()
    meta = {"spec": {}, "converted_from": {"source": "/w/a_3.pth.tar"}} \
        if kind == "converted model" else {"spec": {}}
    (d / "model.json").write_text(json.dumps(meta))
    what = ("is a model directory converted from /w/a_3.pth.tar" if kind == "converted model"
            else "is a model directory") + " (model.json and state/: weights, no training log)"
  assert report.main([str(d)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {d} {what}"), err
  assert err.endswith(": report draws a training run: pass the workdir main.py trained (it "
                      "holds metrics.jsonl)\n") and err.count("\n") == 1
  assert not (d / "report").exists()
