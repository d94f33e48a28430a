"""Shared helpers: the golden fixtures made by the authors' PyTorch code."""

import os

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bcdnet_torch")
TINY_CHANNELS = [4, 8, 16, 16, 32, 32, 64, 64, 64, 64, 128]
STAGES = {"a_3f": 1, "a_3": 2}


def fixture_ckpt(name):
  return os.path.join(FIXTURES, f"{name}_tiny.pth.tar")


def fixture_expected(name):
  return np.load(os.path.join(FIXTURES, f"{name}_tiny_expected.npz"))


def tiny_spec(stage, **kw):
  from bcdnet_jax import models
  return models.get_spec("bcdnet_a", stage=stage, num_classes=10, channels=TINY_CHANNELS,
                         **kw)


def nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir with the digits data set prepared, once per session."""
  from bcdnet_jax import data
  d = str(tmp_path_factory.mktemp("tfds"))
  data.get_builder("digits", d)
  return d


@pytest.fixture(scope="session")
def converted():
  """name -> (model, numpy state dict) for both fixtures, converted once per session."""
  from bcdnet_jax import convert
  out = {}
  for name, stage in STAGES.items():
    sd = convert.read_torch_checkpoint(fixture_ckpt(name))
    model, _ = convert.from_torch_state_dict(sd, tiny_spec(stage))
    out[name] = (model, sd)
  return out
