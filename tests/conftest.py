"""Shared helpers: the golden fixtures made by the authors' PyTorch code."""

import os
import shutil
import tempfile

import numpy as np
import pytest

_OWN_CACHE = None


def pytest_configure(config):
  """One XLA compilation cache for the session and every process the tests start: many
  tests compile the same programs (the fixtures' models, the tiny training step, the
  workers of the multi-process tests), and a cache hit takes milliseconds instead of
  seconds. A fresh directory per session unless JAX_COMPILATION_CACHE_DIR is set."""
  global _OWN_CACHE
  # The suite's time is XLA:CPU compilation, not execution (tiny widths, small images):
  # LLVM's optimisation level 0 halves it (the fixture network's training step: 49 ->
  # 23 s to compile, 0.19 -> 0.26 s to run) and keeps IEEE arithmetic (no fast math), so
  # every tolerance holds. Set in the environment: the processes the tests start inherit it.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="bcdnet-jax-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  # only programs that took a while: caching every small eager op costs more than it saves
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bcdnet_torch")
TINY_CHANNELS = [4, 8, 16, 16, 32, 32, 64, 64, 64, 64, 128]
STAGES = {"a_3f": 1, "a_3": 2}


def fixture_ckpt(name):
  return os.path.join(FIXTURES, f"{name}_tiny.pth.tar")


def fixture_expected(name):
  return np.load(os.path.join(FIXTURES, f"{name}_tiny_expected.npz"))


def tiny_spec(stage, **kw):
  from bcdnet_jax.nn import models
  return models.get_spec("bcdnet_a", stage=stage, num_classes=10, channels=TINY_CHANNELS,
                         **kw)


def nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir with the digits data set prepared (ArrayRecord), once per session."""
  from bcdnet_jax.data import sources
  d = str(tmp_path_factory.mktemp("tfds"))
  sources.open_source("digits", "train", d)
  return d


@pytest.fixture(scope="session")
def converted():
  """name -> (model, numpy state dict) for both fixtures, converted once per session."""
  from bcdnet_jax.interop import convert
  out = {}
  for name, stage in STAGES.items():
    sd = convert.read_torch_checkpoint(fixture_ckpt(name))
    model, _ = convert.from_torch_state_dict(sd, tiny_spec(stage))
    out[name] = (model, sd)
  return out


def small_artefact(tmp_path):
  """A tiny stage-2 BCDNet-A exported to tmp_path/small.bcdnet (3 classes)."""
  from bcdnet_jax.deploy import export
  from bcdnet_jax.nn import models
  model = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                              mlp_groups=1, mlp_group=["pw"])
  model.eval()
  out = tmp_path / "small.bcdnet"
  export.export_model(model, str(out))
  return out


@pytest.fixture(autouse=True)
def _tool_logging():
  """The tools' main() calls log.setup(), after which our logger no longer propagates;
  tests that read the "bcdnet_jax" records through caplog (a root handler) must not depend
  on whether a tool ran in-process before them, so its state is restored after each test."""
  from bcdnet_jax.log import logger
  saved = list(logger.handlers), logger.propagate, logger.level
  yield
  logger.handlers[:] = saved[0]
  logger.propagate = saved[1]
  logger.setLevel(saved[2])
