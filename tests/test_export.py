"""The 1-bit deploy artefact: packing, the three inference paths, sizes and bad files.

The binary parts are exact integers on every path (asserted bit for bit on the conv);
logits may differ from the float model's only by float rounding in the real-valued parts
(folded BN, scales): tolerance 1e-5 x max(1, largest |logit|), and identical top-1.
Each test prints the largest difference it saw.
"""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bcdnet_jax import export, models, packed, predict
from conftest import fixture_expected, nhwc

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


def test_xnor_popcount_conv_is_the_exact_integer_conv():
  rng = np.random.default_rng(0)
  # 40 channels: one full word and one partial; zeros in activations and weights.
  s = jnp.asarray(rng.choice([-1.0, 0.0, 1.0], size=(2, 7, 6, 40), p=[0.45, 0.1, 0.45]),
                  jnp.float32)
  w = jnp.asarray(rng.choice([-1.0, 0.0, 1.0], size=(3, 3, 40, 5), p=[0.48, 0.04, 0.48]),
                  jnp.float32)
  wt = jnp.sign(jnp.transpose(w, (3, 0, 1, 2)))
  bits = packed.pack_bits(wt > 0).reshape(5, -1)
  mask = packed.pack_bits(wt != 0).reshape(5, -1)
  assert bits.dtype == jnp.uint32 and bits.shape == (5, 3 * 3 * 2)
  np.testing.assert_array_equal(
      np.asarray(packed.signs_from_bits(bits, mask, 3, 40, jnp.int8)), np.asarray(w, np.int8))
  for stride in (1, 2):
    want = jax.lax.conv_general_dilated(
        s.astype(jnp.int8), w.astype(jnp.int8), (stride, stride), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.int32)
    got = packed.xnor_popcount_conv(s, bits, mask, 3, stride, 1)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


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


@pytest.mark.parametrize("arch,overrides", [
    ("bcdnet_b", dict(channels=[8, 16, 16, 32], mlp_groups=1, mlp_group=["lsr", "pw"],
                      dynamic_relu=True)),
    ("bcdnet_b_r18", dict(channels=[8, 16, 32, 64], blocks_per_stage=[1, 1, 1, 1],
                          mlp_groups=1, shift_mode="paper")),
])
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


def _small_artefact(tmp_path):
  model = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                              mlp_groups=1, mlp_group=["pw"])
  model.eval()
  out = tmp_path / "small.bcdnet"
  export.export_model(model, str(out))
  return out


def test_bad_artefacts_fail_clearly_and_nothing_is_overwritten(tmp_path):
  out = _small_artefact(tmp_path)
  raw = out.read_bytes()
  f = export.load_packed(str(out))
  assert f(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 3)
  with pytest.raises(ValueError, match="path must be one of"):
    f(np.zeros((1, 16, 16, 3), np.float32), path="fp8")
  with pytest.raises(ValueError, match="NHWC"):
    f(np.zeros((1, 3, 16, 16), np.float32))

  def load(data, name):
    p = tmp_path / name
    p.write_bytes(data)
    return export.load_packed(str(p))

  with pytest.raises(export.ArtefactError, match="truncated"):
    load(raw[:-100], "truncated.bcdnet")
  flipped = bytearray(raw)
  flipped[-5] ^= 0xFF
  with pytest.raises(export.ArtefactError, match="corrupted"):
    load(bytes(flipped), "flipped.bcdnet")
  with pytest.raises(export.ArtefactError, match="not a bcdnet-jax deploy artefact"):
    load(b"PK\x03\x04" + raw[4:], "zip.bcdnet")
  with pytest.raises(export.ArtefactError, match="cannot read"):
    export.load_packed(str(tmp_path / "missing.bcdnet"))

  # A header whose architecture does not match the tensors (checksum still valid).
  hlen = struct.unpack("<I", raw[12:16])[0]
  header = json.loads(raw[48:48 + hlen])
  header["program"][1]["out"] = 32  # the block says 8 -> 32, its tensors say 8 -> 16
  tensors = packed.read(str(out))[1]
  bad = tmp_path / "wrong_arch.bcdnet"
  with pytest.raises(export.ArtefactError, match="architecture header implies"):
    packed.write(str(bad), {k: v for k, v in header.items()
                            if k not in ("tensors", "data_bytes")}, tensors)
    export.load_packed(str(bad))
  header["program"][1]["out"] = 16
  header["spec"]["num_classes"] = 5
  with pytest.raises(export.ArtefactError, match="head has 3 classes, the spec says 5"):
    packed.validate(header, tensors)

  # Refuses to overwrite; the existing file is left as it was.
  model = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16])
  with pytest.raises(export.ExportError, match="already exists"):
    export.export_model(model, str(out))
  assert out.read_bytes() == raw
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temp file left
  teacher_spec = models.get_spec("resnet50")
  with pytest.raises(export.ExportError, match="teacher"):
    export.deploy_size_bytes(teacher_spec)


def test_export_and_predict_command_lines(tmp_path, capsys):
  from bcdnet_jax import checkpoint
  import tensorflow as tf
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
  png.write_bytes(tf.io.encode_png(image).numpy())
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


def test_header_bit_flips_nan_weights_and_tiny_inputs_are_refused(tmp_path):
  out = _small_artefact(tmp_path)
  raw = out.read_bytes()
  hlen = struct.unpack("<I", raw[12:16])[0]
  text = raw[48:48 + hlen]
  for needle in (b'"crop_ratio":0.875', b'"stride":2'):
    pos = text.index(needle) + len(needle) - 1
    flipped = bytearray(raw)
    flipped[48 + pos] ^= 0x01  # '5' -> '4', '2' -> '3': still valid JSON
    bad = tmp_path / "flipped_header.bcdnet"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(export.ArtefactError, match="sha256 of the header and data"):
      export.load_packed(str(bad))
  assert oct(out.stat().st_mode & 0o777) != "0o600"  # the umask decides, as for any file
  f = export.load_packed(str(out))
  with pytest.raises(ValueError, match="empty batch"):
    f(np.zeros((0, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match="smaller than the"):
    f(np.zeros((1, 2, 2, 3), np.float32))
  # a NaN weight: export refuses, naming the tensor; nothing written
  m = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                          mlp_groups=1, mlp_group=["pw"])
  m.eval()
  m.head.kernel[...] = m.head.kernel[...].at[1, 1].set(np.nan)
  with pytest.raises(export.ExportError, match=r"non-finite value in deploy tensor .*head"):
    export.export_model(m, str(tmp_path / "nan.bcdnet"))
  assert not (tmp_path / "nan.bcdnet").exists()


def test_predict_argument_mistakes(tmp_path, capsys):
  out = _small_artefact(tmp_path)
  assert predict.main(["--model", str(out), str(tmp_path)]) == 2
  assert "a directory" in capsys.readouterr().err
  assert predict.main(["--model", str(out), "https://example.com/cat.jpg"]) == 2
  assert "a URL" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    predict.main(["--model", str(out), "--top", "-3", str(tmp_path / "x.jpg")])
  assert e.value.code == 2 and "--top must be 1 or more" in capsys.readouterr().err
