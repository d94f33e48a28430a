"""The normalised input equals torchvision's float32 `ToTensor` + `Normalize` bit for bit, for
every (pixel value, channel) pair, where the pipeline computes it: inside the jitted train
and eval steps and in `predict`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from bcdnet_jax import preprocessing, runtime
from bcdnet_jax.deploy import predict
from bcdnet_jax.nn import models
from bcdnet_jax.train import step as train
from configs import default

MEAN, STD = preprocessing.MEAN_RGB, preprocessing.STDDEV_RGB


def _all_values() -> np.ndarray:
  """uint8 [1, 16, 16, 3]: each channel holds every value 0..255 once (in a different
  order per channel)."""
  return np.stack([np.roll(np.arange(256), 85 * c) for c in range(3)],
                  -1).reshape(1, 16, 16, 3).astype(np.uint8)


def _torch(images: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
  """torchvision's definition: `x.float().div(255)` then `.sub(mean).div(std)` per channel."""
  x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float().div(255)
  x = x.sub(torch.tensor(mean)[:, None, None]).div(torch.tensor(std)[:, None, None])
  return x.permute(0, 2, 3, 1).numpy()


def _differences(a, b) -> int:
  return int(np.sum(np.asarray(a).view(np.uint32) != np.asarray(b).view(np.uint32)))


def test_table_and_normalize_equal_torch_on_every_value_and_channel():
  x = _all_values()
  assert _differences(preprocessing.table().reshape(-1), _torch(
      np.arange(256, dtype=np.uint8)[None, :, None, None].repeat(3, 3)).reshape(-1)) == 0
  assert _differences(preprocessing.normalize(x), _torch(x)) == 0
  assert _differences(jax.jit(preprocessing.normalize)(jnp.asarray(x)), _torch(x)) == 0
  # the formula jitted (what the steps did before): XLA's reciprocal multiplications differ
  formula = jax.jit(lambda v: (v.astype(jnp.float32) / 255 - jnp.asarray(MEAN)) /
                    jnp.asarray(STD))
  assert _differences(formula(jnp.asarray(x)), _torch(x)) > 100
  other = ((0.5, 0.25, 0.125), (0.3, 0.6, 0.9))  # a model's own recorded mean/std
  assert _differences(preprocessing.normalize(x, *other), _torch(x, *other)) == 0
  with pytest.raises(TypeError, match="uint8"):
    preprocessing.normalize(x.astype(np.float32))


@pytest.fixture
def seen(monkeypatch):
  """The values `preprocessing.normalize` produces inside the jitted steps (a host callback
  on its output)."""
  out, real = [], preprocessing.normalize

  def spy(images, *args):
    y = real(images, *args)
    jax.debug.callback(lambda v: out.append(np.asarray(v)), y)
    return y
  monkeypatch.setattr(preprocessing, "normalize", spy)
  return out


def _tiny(stage):
  return models.create_model("bcdnet_b", stage=stage, num_classes=5, channels=[8, 16, 16],
                             mlp_groups=1)


def test_train_step_normalises_as_torch(seen):
  cfg = default.get_config()
  train_def, _, params, batch_stats = train.split_model(_tiny(1))
  tx, _ = train.make_optimizer(cfg, 10)
  step = jax.jit(train.make_train_step(train_def, tx, cfg))
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  batch = {"image": jnp.asarray(_all_values()), "label": jnp.zeros(1, jnp.int32)}
  jax.block_until_ready(step(state, batch, None))
  assert len(seen) == 1 and _differences(seen[0], _torch(_all_values())) == 0


def test_eval_step_normalises_as_torch(seen):
  model = _tiny(2)
  model.eval()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  step = jax.jit(runtime.make_eval_step(graphdef, MEAN, STD))
  batch = {"image": jnp.asarray(_all_values()), "labels": jnp.ones((1, 5), jnp.float32),
           "mask": jnp.ones(1, jnp.float32)}
  jax.block_until_ready(step({"params": params, "batch_stats": stats}, batch))
  assert len(seen) == 1 and _differences(seen[0], _torch(_all_values())) == 0


def test_predict_normalises_as_torch(tmp_path):
  path = str(tmp_path / "all.png")
  Image.fromarray(_all_values()[0]).save(path)  # lossless; 16 px at crop ratio 1: no resize
  pre = preprocessing.record(16, 1.0)
  images = predict.load_images([path], pre)
  assert _differences(images, _torch(_all_values())) == 0
