import os
import pickle
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from conftest import STAGES, TINY_CHANNELS, fixture_ckpt, fixture_expected, nhwc, tiny_spec  # noqa: E402

from bcdnet_jax import checkpoint  # noqa: E402
from bcdnet_jax.interop import convert, torch_ref  # noqa: E402
from bcdnet_jax.nn import models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OVERRIDE = "channels=" + str(TINY_CHANNELS).replace(" ", "")


def raw_model_dict(name="a_3"):
  return torch.load(fixture_ckpt(name), map_location="cpu", weights_only=True)["model"]


def test_round_trip_is_exact(converted):
  for name in ("a_3f", "a_3"):
    model, _ = converted[name]
    raw = raw_model_dict(name)
    back = convert.to_torch_state_dict(model, prefix="module.")
    assert list(back) == list(raw) or set(back) == set(raw)
    for k, v in raw.items():
      assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
      assert torch.equal(back[k], v), k


def test_exported_state_dict_loads_strictly_into_torch(converted):
  model, _ = converted["a_3"]
  ref = torch_ref.build(model.spec)
  ref.load_state_dict(convert.to_torch_state_dict(model), strict=True)


@pytest.mark.parametrize("variant", ["bare", "state_dict", "no_module_prefix",
                                     "no_num_batches_tracked", "ema"])
def test_checkpoint_variants(tmp_path, variant):
  raw = raw_model_dict()
  if variant == "bare":
    obj = dict(raw)
  elif variant == "state_dict":
    obj = {"state_dict": dict(raw), "epoch": 3}
  elif variant == "no_module_prefix":
    obj = {"model": {k[len("module."):]: v for k, v in raw.items()}}
  elif variant == "no_num_batches_tracked":
    obj = {"model": {k: v for k, v in raw.items() if "num_batches_tracked" not in k}}
  else:
    obj = {"model": {k: torch.zeros_like(v) for k, v in raw.items()}, "ema": dict(raw)}
  path = tmp_path / "ckpt.pth"
  torch.save(obj, path)
  sd = convert.read_torch_checkpoint(str(path), key="ema" if variant == "ema" else None)
  model, report = convert.from_torch_state_dict(sd, tiny_spec(2))
  assert report["tensors_mapped"] == len(sd)
  back = convert.to_torch_state_dict(model, prefix="module.")
  for k, v in raw.items():
    if "num_batches_tracked" in k and variant == "no_num_batches_tracked":
      assert int(back[k]) == 0
    else:
      assert torch.equal(back[k], v), k


def _error(sd_edit, tmp_path):
  raw = dict(raw_model_dict())
  sd_edit(raw)
  path = tmp_path / "bad.pth"
  torch.save({"model": raw}, path)
  sd = convert.read_torch_checkpoint(str(path))
  with pytest.raises(convert.ConversionError) as info:
    convert.from_torch_state_dict(sd, tiny_spec(2), source=str(path))
  return str(info.value)


def test_missing_key_is_named(tmp_path):
  msg = _error(lambda d: d.pop("module.feature.3.binary_pw.weight"), tmp_path)
  assert "1 missing keys: feature.3.binary_pw.weight" in msg


def test_unexpected_key_is_named(tmp_path):
  msg = _error(lambda d: d.__setitem__("module.extra.weight", torch.zeros(3)), tmp_path)
  assert "1 unexpected keys: extra.weight" in msg


def test_shape_mismatch_is_named(tmp_path):
  msg = _error(lambda d: d.__setitem__("module.fc.weight", torch.zeros(11, 128)), tmp_path)
  assert "fc.weight: checkpoint (11, 128), model (10, 128)" in msg


def test_load_state_dict_leaves_model_untouched_on_error(converted):
  model, sd = converted["a_3"]
  model = nnx.clone(model)
  before = np.asarray(model.head.kernel[...]).copy()
  bad = dict(sd)
  bad["fc.weight"] = np.ones_like(sd["fc.weight"])
  del bad["fc_dist.bias"]
  with pytest.raises(convert.ConversionError, match="fc_dist.bias"):
    convert.load_state_dict(model, bad)
  np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), before)


class _Evil:
  def __reduce__(self):
    return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/x')}",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
  marker = tmp_path / "pwned"
  monkeypatch.setenv("EVIL_MARKER", str(marker))
  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil()}, f)
  with pytest.raises(convert.ConversionError, match="refused to load"):
    convert.read_torch_checkpoint(str(path))
  assert not marker.exists()
  # a plain pickle (not the torch zip format) with the same payload is refused too
  with open(tmp_path / "evil.pkl", "wb") as f:
    pickle.dump(_Evil(), f)
  with pytest.raises(convert.ConversionError):
    convert.read_torch_checkpoint(str(tmp_path / "evil.pkl"))
  assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
  data = open(fixture_ckpt("a_3"), "rb").read()
  (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(convert.ConversionError, match="truncated or another format"):
    convert.read_torch_checkpoint(str(tmp_path / "trunc.pth"))
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(convert.ConversionError, match="not a readable PyTorch checkpoint"):
    convert.read_torch_checkpoint(str(tmp_path / "notes.txt"))
  with pytest.raises(convert.ConversionError, match="no such file"):
    convert.read_torch_checkpoint(str(tmp_path / "absent.pth"))
  with pytest.raises(convert.ConversionError, match="is a directory"):
    convert.read_torch_checkpoint(str(tmp_path))
  torch.save([torch.zeros(2)], tmp_path / "list.pth")
  with pytest.raises(convert.ConversionError, match="expected a dict of tensors"):
    convert.read_torch_checkpoint(str(tmp_path / "list.pth"))
  torch.save({"model": {"a": torch.zeros(1)}}, tmp_path / "ok.pth")
  with pytest.raises(convert.ConversionError, match="no entry 'ema'"):
    convert.read_torch_checkpoint(str(tmp_path / "ok.pth"), key="ema")


@pytest.mark.slow
def test_cli_converts_and_restores(tmp_path, capsys):
  out = tmp_path / "a3"
  rc = convert.main(["--torch_ckpt", fixture_ckpt("a_3"), "--arch", "bcdnet_a",
                     "--stage", "2", "--num_classes", "10", "--override", TINY_OVERRIDE,
                     "--out", str(out), "--check_image_size", "96"])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert "tensors mapped: 378" in text and "max |logit diff|" in text
  model = checkpoint.restore_model(str(out))
  assert model.spec == tiny_spec(2)
  e = fixture_expected("a_3")
  model.eval()
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(nhwc(e["x96"]))))
  assert np.abs(got - e["eval_logits_96"]).max() < 1e-5


@pytest.mark.slow
def test_cli_failure_writes_nothing(tmp_path):
  out = tmp_path / "wrong"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "convert_torch_ckpt.py"), "--torch_ckpt",
       fixture_ckpt("a_3"), "--arch", "bcdnet_a", "--stage", "2", "--out", str(out)],
      capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode != 0
  assert "shape mismatches" in proc.stderr and "feature.0.conv1.weight" in proc.stderr
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".wrong")]


def test_cli_refuses_to_overwrite(tmp_path, capsys):
  out = tmp_path / "existing"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  rc = convert.main(["--torch_ckpt", fixture_ckpt("a_3"), "--arch", "bcdnet_a",
                     "--num_classes", "10", "--override", TINY_OVERRIDE, "--out", str(out)])
  assert rc == 2
  assert "refusing to overwrite" in capsys.readouterr().err
  assert (out / "keep.txt").read_text() == "mine" and os.listdir(out) == ["keep.txt"]


@pytest.mark.slow
def test_self_check_catches_a_wrong_model(converted, tmp_path):
  """A conversion whose outputs disagree with torch is rejected (here: wrong shift)."""
  _, sd = converted["a_3"]
  spec = tiny_spec(2, shift_mode="paper")
  model, _ = convert.from_torch_state_dict(sd, spec)
  ref_spec = tiny_spec(2)
  ref = torch_ref.build(ref_spec)
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
  ref.eval()
  x = np.random.default_rng(0).standard_normal((2, 3, 160, 160)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  model.eval()
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(nhwc(x))))
  assert np.abs(got - expected).max() > 1e-3  # 160 -> 5x5 tokens: shifts 3 vs 2 differ


def _swap(sd, a, b):
  sd = dict(sd)
  sd[a], sd[b] = sd[b], sd[a]
  return sd


WRONG_MAPPINGS = {
    # two tensors of equal shape exchanged
    "swapped": lambda sd: _swap(sd, "feature.3.bn1.weight", "feature.3.bn2.weight"),
    # a square 1x1 kernel transposed (in and out channels exchanged)
    "transposed": lambda sd: {**sd, "feature.3.binary_pw.weight":
                              sd["feature.3.binary_pw.weight"].transpose(1, 0, 2, 3).copy()},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a_3", "a_3f"])
def test_float64_self_check_passes_on_both_fixtures(converted, name):
  _, sd = converted[name]
  model, _ = convert.from_torch_state_dict(sd, tiny_spec(STAGES[name]))
  chk = convert.self_check(model, sd, image_size=64)
  print(f"\n{name}: float64 rel diff {chk['float64_rel_diff']:.2g}, float32 "
        f"{chk['max_abs_logit_diff']:.2g}, flipped {chk['flipped_binary_activations']} of "
        f"{chk['binary_activations']}")
  assert chk["float64_rel_diff"] < 1e-12 and chk["binary_activations"] > 0
  assert chk["all_finite"] and chk["policy"] == "float32"


@pytest.mark.slow
def test_wrong_mappings_fail_the_float64_self_check(converted):
  """Simulated mapping bugs (inside our model only; torch reads the file as it is)."""
  _, sd = converted["a_3"]
  spec = tiny_spec(2)
  for name, corrupt in WRONG_MAPPINGS.items():
    wrong, _ = convert.from_torch_state_dict(corrupt(sd), spec)
    bad = convert.self_check(wrong, sd, image_size=64)
    print(f"\n  {name}: float64 rel diff {bad['float64_rel_diff']:.2g}")
    assert bad["float64_rel_diff"] > 1e-6, name
    with pytest.raises(convert.ConversionError, match="in float64 the logits differ"):
      convert.check_or_raise(bad, 1e-6)
  wrong, _ = convert.from_torch_state_dict(sd, spec)
  wrong.set_attributes(eps=1e-3, raise_if_not_found=False)  # BN epsilon 1e-3, not 1e-5
  bad = convert.self_check(wrong, sd, image_size=64)
  print(f"  bn epsilon: float64 rel diff {bad['float64_rel_diff']:.2g}")
  assert bad["float64_rel_diff"] > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("stage,seed", [(1, 0), (2, 1)])
def test_full_width_released_checkpoints_convert_with_default_flags(tmp_path, stage, seed):
  """Random full-width checkpoints in the released layout: float32 comparisons differ
  (binary activations flip), the float64 check passes."""
  from helpers.released import random_released_checkpoint
  path = str(tmp_path / f"bcdnet_a_{stage}.pth.tar")
  random_released_checkpoint(models.get_spec("bcdnet_a", stage=stage), path, seed)
  report = convert.convert_file(path, "bcdnet_a", stage, str(tmp_path / "out"))
  chk = report["self_check"]
  print(f"\nstage {stage} seed {seed}: float64 rel {chk['float64_rel_diff']:.2g}, float32 "
        f"{chk['max_abs_logit_diff']:.3g} (max |logit| {chk['max_abs_logit']:.3g}), flipped "
        f"{chk['flipped_binary_activations']:,} of {chk['binary_activations']:,}")
  assert chk["status"] == "ran" and chk["float64_rel_diff"] < 1e-12
  assert report["tensors_mapped"] == 378 and os.path.isdir(report["out"])


def test_resnet50_from_torchvision_layout(tmp_path):
  """A torchvision-layout ResNet-50 state dict converts and computes the same logits."""
  spec = models.get_spec("resnet50", num_classes=5, channels=[4, 8, 16, 32],
                         blocks_per_stage=[1, 2, 1, 1])
  torch.manual_seed(0)
  ref = torch_ref.build(spec)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
  keys = set(ref.state_dict())
  assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer2.1.bn3.running_var",
          "fc.bias"} <= keys
  torch.save(ref.state_dict(), tmp_path / "resnet50.pth")
  report = convert.convert_file(str(tmp_path / "resnet50.pth"), "resnet50", 2,
                                str(tmp_path / "teacher"), num_classes=5,
                                overrides=dict(channels=[4, 8, 16, 32],
                                               blocks_per_stage=[1, 2, 1, 1]),
                                check_image_size=64, check_policy="tf32")
  assert report["self_check"]["status"] == "ran"
  assert report["self_check"]["policy"] == "tf32"  # float32 run's policy; float64 verdict
  assert report["self_check"]["float64_rel_diff"] < 1e-12
  assert report["tensors_mapped"] == len(keys)
  teacher = checkpoint.restore_model(str(tmp_path / "teacher"))
  assert isinstance(teacher, models.ResNet50)


def test_non_finite_tensor_and_unwritable_output_are_refused(converted, tmp_path):
  _, sd = converted["a_3"]
  bad = dict(sd)
  bad["feature.3.bn1.weight"] = np.array(sd["feature.3.bn1.weight"]).copy()
  bad["feature.3.bn1.weight"][2] = np.nan
  path = tmp_path / "nan.pth"
  torch.save({"model": {f"module.{k}": torch.from_numpy(np.array(v)) for k, v in
                        bad.items()}}, path)
  with pytest.raises(convert.ConversionError,
                     match=r"non-finite .* feature\.3\.bn1\.weight \(1 of 16\)"):
    convert.convert_file(str(path), "bcdnet_a", 2, str(tmp_path / "out"), num_classes=10,
                         overrides=dict(channels=TINY_CHANNELS))
  assert not (tmp_path / "out").exists()
  # an output below a file, and a read-only directory (simulated: the tests run as root):
  # refused at once, before the checkpoint is read
  (tmp_path / "file").write_text("x")
  with pytest.raises(convert.ConversionError, match="is not a directory"):
    convert.convert_file("/nonexistent.pth", "bcdnet_a", 2, str(tmp_path / "file" / "out"))
  real_access = os.access
  monkey = pytest.MonkeyPatch()
  monkey.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else
                 real_access(p, mode))
  try:
    with pytest.raises(convert.ConversionError, match="not writable"):
      convert.convert_file("/nonexistent.pth", "bcdnet_a", 2, str(tmp_path / "out2"))
  finally:
    monkey.undo()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_every_saved_float_dtype_converts_exactly(tmp_path, dtype):
  """The fixture's tensors saved in each floating type torch has: the model holds exactly
  the saved values (float16 and bfloat16 widen to float32 exactly; float32 values saved as
  float64 come back bit for bit), and the CLI converts the file."""
  raw = raw_model_dict()
  saved = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
           for k, v in raw.items()}
  path = tmp_path / f"a3_{dtype}.pth"
  torch.save({"model": saved}, path)
  sd = convert.read_torch_checkpoint(str(path))
  model, report = convert.from_torch_state_dict(sd, tiny_spec(2), source=str(path))
  assert report["tensors_mapped"] == len(raw)
  back = convert.to_torch_state_dict(model, prefix="module.")
  for k, v in saved.items():
    want = v.float() if v.is_floating_point() else v
    assert torch.equal(back[k], want), k
  out = tmp_path / "out"
  assert convert.main(["--torch_ckpt", str(path), "--arch", "bcdnet_a", "--num_classes", "10",
                       "--override", TINY_OVERRIDE, "--out", str(out), "--no_check"]) == 0
  restored = checkpoint.restore_model(str(out))
  np.testing.assert_array_equal(np.asarray(restored.head.kernel[...]),
                                np.asarray(model.head.kernel[...]))


def _cli_error(capsys, argv):
  rc = convert.main(argv)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
  return err


@pytest.mark.parametrize("kind", ["complex", "integer", "bool", "float_count"])
def test_tensors_of_the_wrong_type_are_one_error_line(tmp_path, capsys, kind):
  raw = dict(raw_model_dict())
  key = ("module.feature.3.bn1.num_batches_tracked" if kind == "float_count"
         else "module.feature.3.bn1.weight")
  v = raw[key]
  raw[key] = {"complex": v.to(torch.complex64), "integer": v.to(torch.int64),
              "bool": v > 0, "float_count": v.to(torch.float32)}[kind]
  path = tmp_path / "wrong.pth"
  torch.save({"model": raw}, path)
  out = tmp_path / "out"
  err = _cli_error(capsys, ["--torch_ckpt", str(path), "--arch", "bcdnet_a", "--num_classes",
                            "10", "--override", TINY_OVERRIDE, "--out", str(out)])
  assert "1 tensors of the wrong type" in err and key[len("module."):] in err
  assert not out.exists()


def test_unreadable_checkpoints_are_one_error_line(tmp_path, capsys):
  data = open(fixture_ckpt("a_3"), "rb").read()
  (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 3])
  (tmp_path / "text.pth").write_text("not a checkpoint")
  with open(tmp_path / "evil.pth", "wb") as f:
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil()}, f)
  torch.save({"model": {"module.fc.weight": torch.zeros(2), "module.note": "hello"}},
             tmp_path / "strings.pth")
  torch.save({"model": {"module.fc.weight": torch.zeros(2, dtype=torch.float8_e4m3fn)}},
             tmp_path / "fp8.pth")
  expected = {"trunc.pth": "truncated or another format", "text.pth": "not a readable",
              "evil.pth": "refused to load", "strings.pth": "entries that are not tensors",
              "fp8.pth": "cannot be read"}
  for name, words in expected.items():
    err = _cli_error(capsys, ["--torch_ckpt", str(tmp_path / name), "--arch", "bcdnet_a",
                              "--out", str(tmp_path / f"out_{name}")])
    assert words in err and name in err, err
    assert not (tmp_path / f"out_{name}").exists()


@pytest.mark.parametrize("override,words", [
    ("channels=[4,8,16", "cannot parse the value '[4,8,16'"),
    ("mlp_groups=two", "mlp_groups must be an int, got 'two'"),
    ("mlp_groups=-1", "mlp_groups must be >= 0"),
    ("mlp_groups", "expected KEY=VALUE"),
    ("widths=[4,8]", "unknown key 'widths'"),
    ("channels=[4,8,'a']", "channels must be a list of ints"),
    ("channels=[4,8,17]", "a basic block goes from C to C or 2C"),
    ("shift_mode=middle", "shift_mode must be 'released', 'paper' or an int"),
    ("dynamic=1", "dynamic must be True or False"),
    ("dynamic_reduction=0", "dynamic_reduction must be >= 1"),
    ("strides=[1,2]", "strides must be 10 values of 1 or 2"),
    ("mlp_width=wide", "mlp_width must be a positive int"),
    ("dtype_policy=float8", "dtype_policy must be one of"),
])
def test_every_bad_override_is_one_error_line_naming_flag_and_key(tmp_path, capsys, override,
                                                                 words):
  out = tmp_path / "out"
  err = _cli_error(capsys, ["--torch_ckpt", fixture_ckpt("a_3"), "--arch", "bcdnet_a",
                            "--num_classes", "10", "--override", TINY_OVERRIDE,
                            "--override", override, "--out", str(out)])
  assert f"--override {override}" in err or f"--override {override!r}" in err, err
  assert words in err, err
  assert not out.exists()


def test_overrides_parse_literals_and_bare_words():
  got = convert.parse_overrides([TINY_OVERRIDE, "shift_mode=paper", "mlp_groups=1",
                                 "dynamic=True"], "bcdnet_a", num_classes=10)
  assert got == dict(channels=TINY_CHANNELS, shift_mode="paper", mlp_groups=1, dynamic=True)
  assert set(models._FIELD_TYPES) == {f.name for f in
                                      models.dataclasses.fields(models.ModelSpec)}


def _flip_byte_in_member(src, dst, member_suffix="/data/0", at=5):
  """A copy of torch zip file `src` with one bit flipped inside a tensor's bytes."""
  import struct
  import zipfile
  data = bytearray(open(src, "rb").read())
  with zipfile.ZipFile(src) as z:
    info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
  n, m = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
  data[info.header_offset + 30 + n + m + at] ^= 0x01
  open(dst, "wb").write(data)
  return info.filename


def test_bit_flipped_checkpoint_is_refused_naming_the_zip_member(tmp_path, capsys):
  """One flipped bit in a weight: torch.load reads the wrong value without a word; the
  converter checks the archive's CRC-32s first and names the member."""
  bad = tmp_path / "flipped.pth.tar"
  member = _flip_byte_in_member(fixture_ckpt("a_3"), bad)
  loaded = torch.load(bad, map_location="cpu", weights_only=True)["model"]  # no complaint
  assert any(not torch.equal(v, raw_model_dict()[k]) for k, v in loaded.items())
  out = tmp_path / "out"
  err = _cli_error(capsys, ["--torch_ckpt", str(bad), "--arch", "bcdnet_a", "--num_classes",
                            "10", "--override", TINY_OVERRIDE, "--out", str(out)])
  assert f"zip member {member!r} fails its CRC-32 check" in err, err
  assert not out.exists() and os.listdir(tmp_path) == ["flipped.pth.tar"]


@pytest.mark.parametrize("legacy", [False, True])
def test_the_report_says_what_was_checked_of_the_file_and_where_the_stage_comes_from(
    tmp_path, capsys, legacy):
  path = tmp_path / "a3.pth"
  torch.save({"model": raw_model_dict()}, path, _use_new_zipfile_serialization=not legacy)
  assert convert.main(["--torch_ckpt", str(path), "--arch", "bcdnet_a", "--num_classes", "10",
                       "--override", TINY_OVERRIDE, "--out", str(tmp_path / "out"),
                       "--no_check"]) == 0
  text = capsys.readouterr().out
  want = ("file integrity: not checkable: the legacy (pre-1.6, non-zip) torch format stores "
          "no checksum" if legacy else "file integrity: CRC-32 of its 384 zip members checked")
  assert want in text, text
  assert ("stage 2 as --stage says (a torch checkpoint does not record its stage, and the "
          "self-check cannot tell stage 1 from stage 2)") in text
  assert checkpoint.describe(str(tmp_path / "out")).startswith(
      f"{tmp_path / 'out'}: stage-2 mobilenet model, 10 classes (stage 2: binary activations "
      "and weights), converted from ")


def test_a_dict_of_state_dicts_without_ckpt_key_names_the_flag(tmp_path, capsys):
  path = tmp_path / "ema.pth"
  torch.save({"ema": raw_model_dict(), "epoch": 3}, path)
  err = _cli_error(capsys, ["--torch_ckpt", str(path), "--arch", "bcdnet_a", "--num_classes",
                            "10", "--override", TINY_OVERRIDE, "--out", str(tmp_path / "o")])
  assert "entries that are not tensors: ['ema', 'epoch']; 'ema' holds a dict: pass " \
         "--ckpt_key ema to convert it" in err, err
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,words", [
    (["--num_classes", "0"], "--num_classes 0: model spec: num_classes must be positive"),
    (["--num_classes", "-1"], "--num_classes -1: model spec: num_classes must be positive"),
    (["--check_tolerance", "nan"], "--check_tolerance: must be a positive finite number"),
    (["--check_tolerance", "-1"], "--check_tolerance: must be a positive finite number"),
    (["--check_image_size", "0"], "--check_image_size: must be a positive number of pixels"),
    (["--check_image_size", "7"], "--check_image_size: 7 px images shrink to nothing"),
    (["--check_image_size", "30"], "--check_image_size: 30 px images do not fit the strides"),
    (["--check_image_size", "5000"], "--check_image_size: at most 1024 px, got 5000"),
])
def test_out_of_range_flags_are_refused_at_once_naming_the_flag(tmp_path, capsys, flags,
                                                                  words):
  import time
  out = tmp_path / "out"
  start = time.time()
  err = _cli_error(capsys, ["--torch_ckpt", fixture_ckpt("a_3"), "--arch", "bcdnet_a",
                            "--num_classes", "10", "--override", TINY_OVERRIDE,
                            "--out", str(out)] + flags)
  assert err.startswith(f"error: {words}"), err
  assert "--override" not in err and time.time() - start < 10  # no self-check ran
  assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("when", ["before", "while writing"])
def test_out_on_a_full_filesystem_is_one_line_and_leaves_nothing(tmp_path, capsys,
                                                                 monkeypatch, when):
  """Refused before the self-check from the free space; and, should the disk fill while
  Orbax writes (the space check skipped here), one line too, the partial copy removed."""
  from helpers.fullfs import full_filesystem, listing
  if when == "while writing":
    monkeypatch.setattr(checkpoint, "check_space", lambda *a: None)
  words = {"before": "not enough space there (No space left on device: the model "
                     "directory needs about",
           "while writing": "cannot write the model directory there (No space left on "
                            "device); nothing written (the partial copy is removed)"}[when]
  with full_filesystem(tmp_path) as full:
    err = _cli_error(capsys, ["--torch_ckpt", fixture_ckpt("a_3"), "--arch", "bcdnet_a",
                              "--num_classes", "10", "--override", TINY_OVERRIDE,
                              "--out", os.path.join(full, "a3"), "--no_check"])
    assert f"{os.path.join(full, 'a3')}: {words}" in err, err
    assert listing(full) == []
