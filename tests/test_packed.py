"""The deploy artefact's format and runtime: bit packing, XNOR-popcount, reading and
validating files, refusing damaged ones and bad inputs."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_artefact

from bcdnet_jax.deploy import export, packed
from bcdnet_jax.nn import models


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


def test_bad_artefacts_fail_clearly_and_nothing_is_overwritten(tmp_path):
  out = small_artefact(tmp_path)
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


def test_header_bit_flips_nan_weights_and_tiny_inputs_are_refused(tmp_path):
  out = small_artefact(tmp_path)
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


def _tiny_model():
  m = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                          mlp_groups=1, mlp_group=["pw"])
  m.eval()
  return m


def _with_zeros(model, counts):
  """A copy of `model` with counts[i] exact zero weights in the i-th of its binary convs
  (the basic block's 3x3 conv, 3x3x8x8 weights; its first 1x1 conv, 8x8; the MLP block's
  conv, 16x16)."""
  from flax import nnx
  model = nnx.clone(model)
  convs = [model.features[1].conv3x3, model.features[1].pw_down1, model.mlp[0][0].token_mlp]
  rng = np.random.default_rng(sum(counts))
  for conv, k in zip(convs, counts):
    w = np.array(conv.kernel[...])
    w.reshape(-1)[rng.choice(w.size, k, replace=False)] = 0.0
    conv.kernel[...] = w
  return model


def test_zero_weights_cost_4_bytes_each_and_all_paths_stay_exact(tmp_path):
  """Exact zero weights are stored as positions: the artefact grows by 4 bytes per zero
  (plus one table entry and alignment per conv that has any), not by a mask per conv;
  packed, int8 and float paths give the model's outputs, packed and int8 bit for bit."""
  base = _tiny_model()
  size0 = export.export_model(base, str(tmp_path / "none.bcdnet"))["file_bytes"]
  assert size0 == export.deploy_size_bytes(base.spec)["float32"]["file_bytes"]
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  for counts in ([1, 0, 0], [64, 0, 0], [5, 3, 1], [100, 40, 30]):
    model = _with_zeros(base, counts)
    out = tmp_path / f"z{'_'.join(map(str, counts))}.bcdnet"
    report = export.export_model(model, str(out))
    k, convs = sum(counts), sum(c > 0 for c in counts)
    grown = report["file_bytes"] - size0
    print(f"{counts} zero weights: +{grown} bytes")
    assert report["zero_weights"] == k and report["masked_convs"] == convs
    assert 4 * k <= grown <= 4 * k + 200 * convs, (counts, grown)
    f = export.load_packed(str(out))
    zeros = {n: t for n, t in packed.read(str(out))[1].items() if n.endswith(".zeros")}
    assert sorted(t.size for t in zeros.values()) == sorted(c for c in counts if c)
    ref = np.asarray(model(x))
    got = {p: np.asarray(f(x, path=p)) for p in packed.PATHS}
    np.testing.assert_array_equal(got["packed"], got["int8"])
    for p, y in got.items():
      np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()),
                                 err_msg=p)
  # with zeros, the packed path differs from the same weights read without them
  assert not np.array_equal(got["packed"], np.asarray(export.load_packed(
      str(tmp_path / "none.bcdnet"))(x)))


def test_zero_positions_round_trip_and_bad_ones_are_refused(tmp_path):
  rng = np.random.default_rng(5)
  s = rng.choice([-1, 0, 1], size=(5, 3, 3, 40), p=[0.45, 0.1, 0.45])
  zerobits = packed.pack_bits(jnp.asarray(s == 0)).reshape(5, -1)
  pos = export.zero_positions(zerobits)
  assert pos.dtype == np.int32 and pos.size == int(np.sum(s == 0))
  mask = packed.mask_from_zeros(pos, zerobits.shape)
  np.testing.assert_array_equal(
      np.asarray(packed.signs_from_bits(packed.pack_bits(jnp.asarray(s > 0)).reshape(5, -1),
                                        jnp.asarray(mask), 3, 40, jnp.int8)),
      s.transpose(1, 2, 3, 0))

  out = tmp_path / "z.bcdnet"
  export.export_model(_with_zeros(_tiny_model(), [3, 0, 0]), str(out))
  header, tensors = packed.read(str(out))
  header = {k: v for k, v in header.items() if k not in ("tensors", "data_bytes")}
  name = "features.1.conv3x3.zeros"
  nbits = tensors["features.1.conv3x3.bits"].size * 32
  for bad, words in [(np.array([4, 2, 9], np.int32), "increasing"),
                     (np.array([1, nbits], np.int32), "within"),
                     (np.array([1, 2], np.int64), "int32")]:
    p = tmp_path / "bad.bcdnet"
    packed.write(str(p), header, {**tensors, name: bad})
    with pytest.raises(export.ArtefactError, match=words):
      export.load_packed(str(p))
  # an artefact of the previous format (dense masks) is refused by its version
  raw = bytearray(out.read_bytes())
  raw[8:12] = struct.pack("<I", 2)
  (tmp_path / "v2.bcdnet").write_bytes(bytes(raw))
  with pytest.raises(export.ArtefactError, match="format version 2, this runtime reads "
                                                 "version 3"):
    export.load_packed(str(tmp_path / "v2.bcdnet"))


def _resigned(src, dst, edit):
  """A copy of artefact `src` whose header `edit` changed, written with a valid sha256 (as
  a buggy or hostile writer would): only the range checks can refuse it."""
  header, tensors = packed.read(str(src))
  edit(header)
  packed.write(str(dst), header, dict(tensors))
  return dst


def _set(path, value):
  def edit(header):
    *keys, last = path
    d = header
    for k in keys:
      d = d[k]
    d[last] = value
  return edit


@pytest.mark.parametrize("path,value,words", [
    (("preprocess", "crop_ratio"), 0, "preprocess: crop_ratio must be in (0, 1], got 0"),
    (("preprocess", "crop_ratio"), 1.5, "preprocess: crop_ratio must be in (0, 1], got 1.5"),
    (("preprocess", "image_size"), 0, "preprocess: image_size must be a positive integer"),
    (("preprocess", "image_size"), -224, "preprocess: image_size must be a positive integer"),
    (("preprocess", "image_size"), 100000, "preprocess.image_size must be at most 4096 px"),
    (("preprocess", "stddev_rgb"), [0.2, 0.0, 0.2], "preprocess: mean_rgb/stddev_rgb must be"),
    (("spec", "num_classes"), 0, "spec.num_classes must be a positive integer, got 0"),
    (("real_dtype",), "int4", "real_dtype must be one of ('float32', 'float16')"),
    (("program", 1, "stride"), 0, "program[1] (basic 'features.1'): field stride must be 1 or 2"),
    (("program", 0, "kernel"), 0, "program[0] (stem 'features.0'): field kernel must be an odd"),
    (("program", 0, "in"), -3, "program[0] (stem 'features.0'): field in must be a positive"),
])
def test_signed_headers_with_values_out_of_range_are_refused(tmp_path, capsys, path, value,
                                                             words):
  from bcdnet_jax.deploy import predict
  bad = _resigned(small_artefact(tmp_path), tmp_path / "bad.bcdnet", _set(path, value))
  with pytest.raises(packed.ArtefactError) as e:
    export.load_packed(str(bad))
  assert str(e.value).startswith(f"{bad}: header field {words}") or \
      str(e.value).startswith(f"{bad}: {words}"), str(e.value)
  # predict: one line, exit 2, before any image is read
  assert predict.main(["--model", str(bad), str(tmp_path / "absent.png")]) == 2
  assert capsys.readouterr().err == f"error: {e.value}\n"
