"""Checkpoints in the released layout with random weights, for converter tests."""

import numpy as np
import torch

from bcdnet_jax.interop import torch_ref
from bcdnet_jax.nn import models


def random_released_checkpoint(spec: models.ModelSpec, path: str, seed: int) -> dict:
  """Writes `{'model': {'module.' + name: tensor}, 'optimizer': ..., 'last_iter': ...}`
  with torch's initialisation plus random BN statistics and affine parameters, the
  released file's layout; returns the state dict (numpy, without the prefix)."""
  torch.manual_seed(seed)
  ref = torch_ref.build(spec)
  rng = np.random.default_rng(seed)
  sd = {}
  for name, value in ref.state_dict().items():
    v = value.numpy().copy()
    if name.endswith("running_mean") or name.endswith(".bias") and v.ndim == 1:
      v = rng.normal(0.0, 0.1, v.shape).astype(v.dtype)
    elif name.endswith("running_var"):
      v = rng.uniform(0.5, 2.0, v.shape).astype(v.dtype)
    elif v.ndim == 1 and v.dtype.kind == "f":
      v = (v + rng.normal(0.0, 0.1, v.shape)).astype(v.dtype)
    sd[name] = v
  torch.save({"model": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()},
              "optimizer": {}, "last_iter": 1}, path)
  return sd
