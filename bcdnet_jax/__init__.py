"""BCDNet in JAX / Flax NNX (see README.md).

Sub-packages, by audience:
    nn        the binary-network library: quantizers, layers, blocks, models (jax + flax only)
    data      the input pipeline: TFDS / folder sources, epoch order, PIL transforms, Grain
    train     the experiment harness behind main.py: step, plan, loop, evaluation, pipelines
    deploy    export to a packed artefact, its XNOR-popcount runtime, predict
    interop   PyTorch checkpoints in (convert) and the torch reference of the released layouts

The entry points below are imported on first use, so `import bcdnet_jax` stays cheap.
"""

import importlib as _importlib
import os as _os

# Set before TensorFlow or JAX is first imported; a value already in the environment wins.
# Only `bcdnet-prepare` imports TensorFlow now (TFDS' ImageNet builders); its oneDNN kernels
# print "E0000 ... oneDNN supports DT_INT32 only on platforms with AVX-512", an error-looking
# line about a fallback, so they are off. Level 1 drops the C++ INFO lines of TensorFlow and
# XLA (CPU feature notes); warnings and errors still show.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

_LAZY = {
    "create_model": "bcdnet_jax.nn.models",
    "ModelSpec": "bcdnet_jax.nn.models",
    "restore_model": "bcdnet_jax.checkpoint",
    "load_packed": "bcdnet_jax.deploy.packed",
    "summary": "bcdnet_jax.summary",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    module = _importlib.import_module(_LAZY[name])
    # `summary` is the module (summary.summary is its function of a model)
    return module if name == "summary" else getattr(module, name)
  raise AttributeError(f"module 'bcdnet_jax' has no attribute {name!r}")
