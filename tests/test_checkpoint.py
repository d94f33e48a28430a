import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from bcdnet_jax import checkpoint
from bcdnet_jax.nn import models


@pytest.fixture(scope="module")
def small_model():
  m = models.create_model("bcdnet_b", stage=1, num_classes=3, channels=[8, 16, 16],
                          mlp_groups=1, seed=7)
  m.features[1].bn1.count[...] = 5  # non-default BN state must survive too
  return m


def test_save_restore_round_trip(tmp_path, small_model):
  d = checkpoint.save_model(small_model, str(tmp_path / "m"))
  assert sorted(os.listdir(d)) == ["model.json", "state"]
  restored = checkpoint.restore_model(d)
  assert restored.spec == small_model.spec and isinstance(restored, models.BCDNet)
  a = jax.tree.leaves(nnx.state(small_model))
  b = jax.tree.leaves(nnx.state(restored))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(restored.features[1].bn1.count[...]) == 5


def test_refuses_to_overwrite(tmp_path, small_model):
  d = tmp_path / "m"
  d.mkdir()
  (d / "mine.txt").write_text("keep")
  with pytest.raises(checkpoint.CheckpointError, match="refusing to overwrite"):
    checkpoint.save_model(small_model, str(d))
  assert os.listdir(d) == ["mine.txt"]
  assert [p for p in os.listdir(tmp_path)] == ["m"]  # no temporary left behind


def test_restore_errors(tmp_path, small_model):
  with pytest.raises(checkpoint.CheckpointError, match="no such model directory"):
    checkpoint.restore_model(str(tmp_path / "absent"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="no model.json"):
    checkpoint.restore_model(str(tmp_path / "empty"))
  d = checkpoint.save_model(small_model, str(tmp_path / "m"))
  meta = json.load(open(os.path.join(d, "model.json")))
  meta["spec"]["channels"] = [8, 16, 32]  # a different architecture than the weights
  json.dump(meta, open(os.path.join(d, "model.json"), "w"))
  with pytest.raises(checkpoint.CheckpointError, match="cannot restore|shape"):
    checkpoint.restore_model(d)
  meta["spec"]["familly"] = "x"
  json.dump(meta, open(os.path.join(d, "model.json"), "w"))
  with pytest.raises(checkpoint.CheckpointError, match="unknown fields"):
    checkpoint.restore_model(d)
  open(os.path.join(d, "model.json"), "w").write("{not json")
  with pytest.raises(checkpoint.CheckpointError, match="unreadable architecture record"):
    checkpoint.restore_model(d)


def test_model_directory_integrity_and_non_finite_weights(tmp_path, small_model):
  d = checkpoint.save_model(small_model, str(tmp_path / "m"))
  meta = json.load(open(os.path.join(d, "model.json")))
  assert meta["preprocessing"] == {"image_size": 224, "crop_ratio": 0.875,
                                   "mean_rgb": [0.485, 0.456, 0.406],
                                   "stddev_rgb": [0.229, 0.224, 0.225]}
  assert meta["state_sha256"] and oct(os.stat(d).st_mode & 0o777) != "0o700"
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "state")) for f in fs]
  victim = max(files, key=os.path.getsize)
  raw = bytearray(open(victim, "rb").read())
  raw[len(raw) // 2] ^= 0x01  # one flipped bit
  open(victim, "wb").write(bytes(raw))
  with pytest.raises(checkpoint.CheckpointError,
                     match=f"{os.path.basename(victim)}: corrupted"):
    checkpoint.restore_model(d)
  # a NaN weight is refused when saving, and named when restoring an older directory
  bad = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                            mlp_groups=1, mlp_group=["pw"])
  bad.head.kernel[...] = bad.head.kernel[...].at[0, 0].set(np.nan)
  with pytest.raises(checkpoint.CheckpointError, match=r"head.*kernel.*1 non-finite"):
    checkpoint.save_model(bad, str(tmp_path / "nan"))
  assert not (tmp_path / "nan").exists()
  good = checkpoint.save_model(models.create_model(
      "bcdnet_a", stage=2, num_classes=3, channels=[8, 16], mlp_groups=1, mlp_group=["pw"]),
      str(tmp_path / "old"))
  meta = json.load(open(os.path.join(good, "model.json")))
  del meta["state_sha256"]  # as written before checksums existed
  json.dump(meta, open(os.path.join(good, "model.json"), "w"))
  import orbax.checkpoint as ocp
  state = nnx.to_pure_dict(nnx.state(bad))
  import shutil
  shutil.rmtree(os.path.join(good, "state"))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(good, "state"), state)
  ckptr.wait_until_finished()
  with pytest.raises(checkpoint.CheckpointError, match=r"head.*kernel.*non-finite"):
    checkpoint.restore_model(good)
