"""The 1-bit deploy artefact: folding a model, the three inference paths against the float
model, sizes, the export and predict command lines (the format itself: test_packed.py).

The binary parts are exact integers on every path (asserted bit for bit on the conv);
logits may differ from the float model's only by float rounding in the real-valued parts
(folded BN, scales): tolerance 1e-5 x max(1, largest |logit|), and identical top-1.
Each test prints the largest difference it saw.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_expected, nhwc, small_artefact
from flax import nnx

from bcdnet_jax.deploy import export, packed, predict
from bcdnet_jax.nn import models

ATOL = 1e-5


def _randomise(model, seed=1):
  """Non-trivial BN statistics, thresholds and (BCDNet-B) dynamic weights, so every fold
  and every dynamic term matters (numpy on the host: no per-shape compilation)."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  new = [x + rng.normal(0, 0.3 if x.ndim == 1 else 0.05, x.shape).astype(np.float32)
         if x.dtype == jnp.float32 else x for x in map(np.asarray, leaves)]
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, new))
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
    if path[-1] == "var":
      v.set_value(np.abs(np.asarray(v.get_value())) + 0.5)
  return model


def _all_paths(f, x):
  return {p: np.asarray(f(x, path=p)) for p in packed.PATHS}


@pytest.mark.slow
def test_converted_fixture_artefact_reproduces_the_authors_logits(converted, tmp_path):
  """Stage-2 fixture -> artefact: every path gives the authors' evaluation logits."""
  model, _ = converted["a_3"]
  e = fixture_expected("a_3")
  model.eval()
  try:
    out = tmp_path / "a3.bcdnet"
    report = export.export_model(model, str(out))
  finally:
    model.train()
  assert report["masked_convs"] == 0 and out.stat().st_size == report["file_bytes"]
  f = export.load_packed(str(out))
  got = _all_paths(f, jnp.asarray(nhwc(e["x96"])))
  for path, y in got.items():
    diff = np.abs(y - e["eval_logits_96"]).max()
    print(f"a_3 artefact path={path}: max |diff| vs authors' eval_logits_96 {diff:.3g}")
    assert diff < ATOL
    np.testing.assert_array_equal(y.argmax(-1), e["eval_logits_96"].argmax(-1))
  # The stage-1 fixture has real weights: nothing 1-bit to export.
  with pytest.raises(export.ExportError, match="stage 1"):
    export.export_model(converted["a_3f"][0], str(tmp_path / "a3f.bcdnet"))


@pytest.mark.slow
def test_full_size_bcdnet_a_paths_equal_float_model_and_size(tmp_path):
  model = _randomise(models.create_model("bcdnet_a", stage=2))
  model.eval()
  out = tmp_path / "bcdnet_a.bcdnet"
  report = export.export_model(model, str(out))
  fp32_bytes = 184_738_624  # parameters + BN statistics in float32 (test_summary)
  ratio = fp32_bytes / report["file_bytes"]
  print(f"bcdnet_a artefact: {report['file_bytes']:,} bytes, {ratio:.2f}x smaller")
  assert ratio >= 18
  sizes = export.deploy_size_bytes(model.spec)
  expected = sizes["float32"]
  assert report["binary_bytes"] == expected["binary_bytes"]
  assert report["real_bytes"] == expected["real_bytes"]
  assert report["file_bytes"] == expected["file_bytes"]  # summary's figure is the file's

  f = export.load_packed(str(out))
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
  graphdef, state = nnx.split(model)
  ref = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
  got = _all_paths(f, x)
  for path, y in got.items():
    diff = np.abs(y - ref).max()
    scale = max(1.0, float(np.abs(ref).max()))
    print(f"bcdnet_a path={path}: max |diff| {diff:.3g} (max |logit| {scale:.3g})")
    assert diff < ATOL * scale
    np.testing.assert_array_equal(y.argmax(-1), ref.argmax(-1))
  np.testing.assert_array_equal(got["packed"], got["int8"])  # same integers, same floats

  half = tmp_path / "bcdnet_a_fp16.bcdnet"
  r16 = export.export_model(model, str(half), real_dtype="float16")
  print(f"bcdnet_a fp16 artefact: {r16['file_bytes']:,} bytes, "
        f"{fp32_bytes / r16['file_bytes']:.2f}x smaller")
  assert fp32_bytes / r16["file_bytes"] >= 23
  assert r16["file_bytes"] == sizes["float16"]["file_bytes"]

  # A handful of exact zero weights in three layers (a 3x3 conv, a token-wise
  # MLP conv, a 1x1 conv): 4 bytes each, not a dense mask per layer (format 2
  # grew by 336,192 bytes for such a checkpoint)
  convs = [model.features[2].conv3x3, model.mlp[1][0].long_mlp, model.features[3].pw]
  for conv, k in zip(convs, (2, 2, 1)):
    w = np.array(conv.kernel[...])
    w.reshape(-1)[:k] = 0.0
    conv.kernel[...] = w
  rz = export.export_model(model, str(tmp_path / "zeros.bcdnet"))
  grown = rz["file_bytes"] - report["file_bytes"]
  print(f"bcdnet_a with 5 zero weights: {rz['file_bytes']:,} bytes (+{grown})")
  assert rz["zero_weights"] == 5 and 20 <= grown <= 20 + 3 * 200


@pytest.mark.parametrize("arch,overrides", [
    ("bcdnet_b", dict(channels=[8, 16, 16, 32], mlp_groups=1, mlp_group=["lsr", "pw"],
                      dynamic_relu=True)),
    ("bcdnet_b_r18", dict(channels=[8, 16, 32, 64], blocks_per_stage=[1, 1, 1, 1],
                          mlp_groups=1, shift_mode="paper")),
])
@pytest.mark.slow
def test_dynamic_thresholds_and_resnet18_blocks_export_exactly(arch, overrides, tmp_path):
  model = _randomise(models.create_model(arch, stage=2, num_classes=7, **overrides))
  model.eval()
  # Exact zero weights (sign 0) in a 3x3 and a token-wise conv: the packed path's
  # zero-weight correction must reproduce them.
  for conv in (model.features[1].conv3x3, model.mlp[0][0].token_mlp):
    k = np.array(conv.kernel[...])
    k.reshape(-1)[::7] = 0.0
    conv.kernel[...] = k
  out = str(tmp_path / "m.bcdnet")
  export.export_model(model, out)
  x = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
  graphdef, state = nnx.split(model)
  ref = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
  f = export.load_packed(out)
  y = np.asarray(f(x))  # default path: packed
  print(f"{arch} packed: max |diff| {np.abs(y - ref).max():.3g}")
  np.testing.assert_allclose(y, ref, atol=ATOL * max(1.0, float(np.abs(ref).max())), rtol=0)
  np.testing.assert_array_equal(y, np.asarray(f(x, path="int8")))  # same integers


@pytest.mark.slow
def test_export_and_predict_command_lines(tmp_path, capsys):
  from PIL import Image

  from bcdnet_jax import checkpoint
  model = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                              mlp_groups=1, mlp_group=["pw"])
  ckpt = checkpoint.save_model(model, str(tmp_path / "ckpt"))
  out = str(tmp_path / "m.bcdnet")
  assert export.main(["--checkpoint", ckpt, "--out", out, "--float16", "--verify",
                      "--verify_image_size", "32"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["real_dtype"] == "float16"
  assert all(v["top1_equal"] for v in report["verify"].values())
  assert export.main(["--checkpoint", ckpt, "--out", out]) == 2  # exists
  assert "already exists" in capsys.readouterr().err

  image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  png = tmp_path / "img.png"
  Image.fromarray(image).save(png)
  assert predict.main(["--model", out, "--json", str(png), str(png)]) == 0
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [r["image"] for r in res] == [str(png)] * 2
  assert len(res[0]["top"]) == 3 and res[0]["top"] == res[1]["top"]
  assert res[0]["top"][0]["name"].startswith("class ")
  assert abs(sum(t["prob"] for t in res[0]["top"]) - 1) < 1e-5

  bad = tmp_path / "notes.jpg"
  bad.write_text("not an image")
  assert predict.main(["--model", out, str(bad)]) == 2
  assert "notes.jpg: not a decodable image" in capsys.readouterr().err
  assert predict.main(["--model", out, str(tmp_path / "nope.jpg")]) == 2
  assert "nope.jpg: cannot read" in capsys.readouterr().err
  assert predict.main(["--model", str(png), str(png)]) == 2
  assert "not a bcdnet-jax deploy artefact" in capsys.readouterr().err
  names = predict.class_names(1000)
  assert names[0] == "tench" and names[999] == "toilet tissue" and len(set(names)) >= 998


def test_export_out_mistakes_are_one_line_and_create_nothing(tmp_path, capsys):
  ckpt = str(tmp_path / "no_ckpt")  # the --out check comes before reading the checkpoint
  missing = tmp_path / "nonexist" / "x.bcdnet"
  assert export.main(["--checkpoint", ckpt, "--out", str(missing)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"its directory {tmp_path / 'nonexist'} does not exist" in err
  assert not os.path.exists(tmp_path / "nonexist")
  with pytest.raises(export.ExportError, match="does not exist"):
    export.export_model(None, str(missing))
  assert not os.path.exists(tmp_path / "nonexist")
  os.makedirs(tmp_path / "adir")
  for extra in ([], ["--overwrite"]):
    assert export.main(["--checkpoint", ckpt, "--out", str(tmp_path / "adir")] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adir: is a directory" in err, err
  (tmp_path / "old.bcdnet").write_text("keep")
  assert export.main(["--checkpoint", ckpt, "--out", str(tmp_path / "old.bcdnet")]) == 2
  err = capsys.readouterr().err
  assert "already exists" in err and "(pass --overwrite)" in err and "overwrite=True" not in err
  assert (tmp_path / "old.bcdnet").read_text() == "keep"


def test_predict_argument_mistakes(tmp_path, capsys):
  out = small_artefact(tmp_path)
  assert predict.main(["--model", str(out), str(tmp_path)]) == 2
  assert "a directory" in capsys.readouterr().err
  assert predict.main(["--model", str(out), "https://example.com/cat.jpg"]) == 2
  assert "a URL" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    predict.main(["--model", str(out), "--top", "-3", str(tmp_path / "x.jpg")])
  assert e.value.code == 2 and "--top must be 1 or more" in capsys.readouterr().err
  assert predict.main(["--model", str(out), str(tmp_path) + "/"]) == 2
  err = capsys.readouterr().err
  assert f"(e.g. {tmp_path}/*.jpg)" in err and "//" not in err
  for flags, what in ((["--image_size", "100000"], "--image_size: at most 4096 px"),
                      (["--crop_ratio", "0.001"], "--crop_ratio: 0.001 resizes to")):
    assert predict.main(["--model", str(out)] + flags + [str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: " + what), err


def test_predict_prints_the_good_images_and_a_line_per_bad_one(tmp_path, capsys):
  from PIL import Image
  out = small_artefact(tmp_path)
  good = tmp_path / "good.png"
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(good)
  bad = tmp_path / "bad.jpg"
  bad.write_text("not an image")
  argv = ["--model", str(out), "--image_size", "32", str(bad), str(good),
          str(tmp_path / "nope.jpg")]
  assert predict.main(argv) == 2
  o = capsys.readouterr()
  assert o.out.splitlines()[0] == str(good) and "%" in o.out.splitlines()[1]
  lines = o.err.strip().splitlines()
  assert lines.pop(0).endswith(f"image_size=32 overrides {out}'s recorded image_size=224")
  assert lines[0].startswith(f"error: {bad}: not a decodable image")
  assert lines[1].startswith(f"error: {tmp_path / 'nope.jpg'}: cannot read"), lines
  assert predict.main(argv + ["--json"]) == 2
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [r["image"] for r in res] == [str(good)]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
  """A model directory of a tiny stage-2 BCDNet-A (3 classes)."""
  from bcdnet_jax import checkpoint
  model = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                              mlp_groups=1, mlp_group=["pw"])
  return checkpoint.save_model(model, str(tmp_path_factory.mktemp("ckpt") / "small"))


def _export_error(capsys, argv):
  rc = export.main(argv)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
  return err


@pytest.mark.parametrize("flags,words", [
    (["--verify_image_size", "0"], "--verify_image_size: must be a positive number of pixels"),
    (["--verify_image_size", "-8"], "--verify_image_size: must be a positive number of pixels"),
    (["--verify_image_size", "20000"], "--verify_image_size: at most 1024 px, got 20000"),
    (["--verify_image_size", "3"], "--verify_image_size: 3 px is under the 4 px the "
                                   "artefact's strides need"),
    (["--verify_batch", "0"], "--verify_batch: must be 1 to 256 images, got 0"),
])
def test_verify_sizes_out_of_range_are_refused_before_writing(tmp_path, capsys, small_ckpt,
                                                              flags, words):
  out = tmp_path / "m.bcdnet"
  err = _export_error(capsys, ["--checkpoint", small_ckpt, "--out", str(out), "--verify"]
                      + flags)
  assert err.startswith(f"error: {words}"), err
  assert not out.exists() and os.listdir(tmp_path) == []


def test_a_pipeline_root_names_its_stages(tmp_path, capsys, small_ckpt):
  import shutil
  root = tmp_path / "digits"
  for stage in ("stage1", "stage2"):
    shutil.copytree(small_ckpt, root / stage)
  (root / "config.json").write_text(json.dumps({"pipeline": {"stage1": {}, "stage2": {}}}))
  err = _export_error(capsys, ["--checkpoint", str(root), "--out", str(tmp_path / "m.bcdnet")])
  assert err == (f"error: {root}: not a model directory (no model.json); it holds the model "
                 f"directories stage1, stage2: pass one, e.g. {root / 'stage2'} (a "
                 "pipeline's last stage is its result)")
  assert not (tmp_path / "m.bcdnet").exists()


def test_export_out_on_a_full_filesystem_is_one_line(tmp_path, capsys, small_ckpt):
  from helpers.fullfs import full_filesystem, listing
  with full_filesystem(tmp_path) as full:
    out = os.path.join(full, "m.bcdnet")
    err = _export_error(capsys, ["--checkpoint", small_ckpt, "--out", out])
    assert err == (f"error: {out}: cannot write the artefact there (No space left on "
                   "device); nothing written"), err
    assert listing(full) == []


def test_float16_verify_measures_what_float16_storage_changes(tmp_path, capsys, small_ckpt):
  """--float16 --verify prints, per path, float16 and float32 storage against the float
  model and float16 against float32: the numbers are those of the two artefacts run on
  the same images, and nothing claims exactness."""
  out16, out32 = str(tmp_path / "m16.bcdnet"), str(tmp_path / "m32.bcdnet")
  assert export.main(["--checkpoint", small_ckpt, "--out", out16, "--float16", "--verify",
                      "--verify_image_size", "32", "--verify_batch", "6"]) == 0
  o = capsys.readouterr()
  res = json.loads(o.out.strip().splitlines()[-1])["verify"]
  assert export.main(["--checkpoint", small_ckpt, "--out", out32]) == 0
  capsys.readouterr()
  x = jax.random.normal(jax.random.key(0), (6, 32, 32, 3))  # verify's images (seed 0)
  for path in packed.PATHS:
    y16 = np.asarray(export.load_packed(out16)(x, path=path))
    y32 = np.asarray(export.load_packed(out32)(x, path=path))
    vs = res[path]["vs_float32"]
    assert vs["max_abs_diff"] == pytest.approx(float(np.abs(y16 - y32).max()), rel=1e-6)
    assert vs["max_abs_diff"] > 0 and vs["images"] == 6
    assert vs["top1_agree"] == int(np.sum(y16.argmax(-1) == y32.argmax(-1)))
    assert res[path]["float32"]["max_abs_diff"] < res[path]["max_abs_diff"]
  assert "float16 storage against float32 storage" in o.out and "not exact" in o.out
  assert "top-1 equal" not in o.out and "    float16 packed max |logit diff| " in o.out
  assert o.out.splitlines()[1] == (f"  from {small_ckpt}: stage-2 mobilenet model, 3 "
                                   "classes (stage 2: binary activations and weights)")
  assert o.err == ""


def test_a_model_without_preprocessing_record_is_said_by_export_and_asked_by_predict(
    tmp_path, capsys, small_ckpt):
  import re
  import shutil

  from PIL import Image
  ckpt = tmp_path / "old"
  shutil.copytree(small_ckpt, ckpt)
  meta = json.loads((ckpt / "model.json").read_text())
  del meta["preprocessing"]  # as model directories written before the record existed
  (ckpt / "model.json").write_text(json.dumps(meta))
  out = str(tmp_path / "m.bcdnet")
  assert export.main(["--checkpoint", str(ckpt), "--out", out]) == 0
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and re.fullmatch(r"\d\d:\d\d:\d\d " + re.escape(
      f"{ckpt} records no preprocessing (image size, crop ratio); the artefact records none "
      "either, so predict will ask for --image_size"), err[0]), err
  assert export.load_packed(out).header["preprocess"] is None
  png = tmp_path / "x.png"
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(png)
  assert predict.main(["--model", out, str(png)]) == 2
  e = capsys.readouterr().err
  assert e == (f"error: {out} records no preprocessing (the image size and crop ratio the "
               "model expects): pass --image_size (224 for the ImageNet models; "
               "--crop_ratio defaults to 0.875)\n"), e
  assert predict.main(["--model", out, "--image_size", "32", str(png)]) == 0
  o = capsys.readouterr()
  assert o.out.startswith(str(png)) and o.err.splitlines()[-1].endswith(
      f"{out} records no preprocessing: using --image_size 32, crop ratio 0.875 and "
      "ImageNet's mean and standard deviation")


def test_verify_fails_and_removes_an_artefact_that_is_not_the_model(tmp_path, capsys,
                                                                    small_ckpt, monkeypatch):
  """A wrong fold (simulated: the loaded artefact's logits negated) makes --verify fail in
  one line, exit 2, with the artefact removed; an exact one passes."""
  out = str(tmp_path / "m.bcdnet")
  real = export.load_packed

  def negated(path):
    f = real(path)
    return lambda x, path="packed": -f(x, path=path)

  monkeypatch.setattr(export, "load_packed", negated)
  assert export.main(["--checkpoint", small_ckpt, "--out", out, "--verify",
                      "--verify_image_size", "32"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --verify: the artefact's packed path "
                                             "differs from the float model by "), err
  assert err[0].endswith(f"the export is not exact (a block folded wrongly?); {out} removed")
  assert not os.path.exists(out)
  monkeypatch.setattr(export, "load_packed", real)
  assert export.main(["--checkpoint", small_ckpt, "--out", out, "--verify",
                      "--verify_image_size", "32"]) == 0
  assert os.path.exists(out)
