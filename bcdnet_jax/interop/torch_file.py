"""Reading PyTorch checkpoint files safely: the zip archive's CRC-32s checked, then
`torch.load(weights_only=True)` (no pickled code runs), then the state dict found in the
layouts people save (`{'model': ...}`, `{'state_dict': ...}`, bare, `module.` prefixes).

Split from `convert` (which re-exports everything here): the file, not the mapping.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from bcdnet_jax import errors


class ConversionError(errors.UserError):
  """A checkpoint that cannot be imported; the message names what is wrong."""


def read_torch_checkpoint(path: str, *, key: str | None = None) -> dict[str, np.ndarray]:
  """Loads a torch checkpoint safely (weights_only: no pickled code runs) as numpy.

  Accepts the released `{'model': ...}` dict, `{'state_dict': ...}`, a bare state dict,
  keys with or without `module.`; `key` picks another entry (e.g. 'ema'). The zip
  archive torch.save writes is checked against its CRC-32s first (torch.load does not
  check them: one flipped byte would load as a wrong weight); ConversionError names the
  damaged member. The legacy (pre-1.6, non-zip) format stores no checksum to check.
  """
  return read_checkpoint_file(path, key)[0]


def check_zip_crc(path: str) -> int:
  """Checks every member of torch's zip archive against its CRC-32 (a few ms per MB);
  returns the number of members. Raises ConversionError naming the first damaged one."""
  import zipfile
  try:
    with zipfile.ZipFile(path) as z:
      bad = z.testzip()
      n = len(z.infolist())
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or "
                          f"another format): {type(e).__name__}: {e}") from None
  if bad is not None:
    raise ConversionError(f"{path}: corrupted: zip member {bad!r} fails its CRC-32 check "
                          "(the file changed after torch.save wrote it: copy or download "
                          "it again); nothing written")
  return n


def read_checkpoint_file(path: str, key: str | None = None
                         ) -> tuple[dict[str, np.ndarray], str]:
  """`read_torch_checkpoint`'s state dict and what was checked of the file's integrity,
  in words (for the converter's report)."""
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file")
  if os.path.isdir(path):
    raise ConversionError(f"{path}: is a directory, expected a torch checkpoint file")
  try:
    import torch
  except ImportError as e:
    raise ConversionError("reading PyTorch checkpoints needs torch: "
                          "pip install 'bcdnet-jax[torch]'") from e
  import pickle
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except OSError as e:
    raise ConversionError(f"{path}: cannot read: {e}") from None
  if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
    # torch.save writes a zip archive (or, legacy, a pickle: protocol >= 2 starts with
    # 0x80); anything else would reach the unpickler and read as a refused pickle
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (neither torch's zip "
                          f"format nor a pickle; starts with {magic!r})")
  if magic.startswith(b"PK"):
    integrity = f"CRC-32 of its {check_zip_crc(path)} zip members checked"
  else:
    integrity = ("not checkable: the legacy (pre-1.6, non-zip) torch format stores no "
                 "checksum")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(
        f"{path}: refused to load: the file holds pickled objects other than tensors "
        f"(loading it could execute code; only weights_only loading is allowed): "
        f"{first}") from None
  except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or "
                          f"another format): {type(e).__name__}: {e}") from None
  return _extract_state_dict(obj, path, key), integrity


def _extract_state_dict(obj: Any, path: str, key: str | None) -> dict[str, np.ndarray]:
  import torch
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a dict of tensors, found "
                          f"{type(obj).__name__}")
  if key is not None:
    if key not in obj:
      raise ConversionError(f"{path}: no entry {key!r}; entries: {sorted(obj)}")
    sd = obj[key]
  elif "model" in obj and isinstance(obj["model"], Mapping):
    sd = obj["model"]
  elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    sd = obj["state_dict"]
  else:
    sd = obj
  if not isinstance(sd, Mapping) or not sd:
    raise ConversionError(f"{path}: no state dict found (entries: {sorted(obj)})")
  bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
  if bad:
    nested = [k for k in bad if isinstance(sd[k], Mapping)]
    hint = (f"; {', '.join(map(repr, nested))} hold{'s' if len(nested) == 1 else ''} a dict: "
            f"pass --ckpt_key {nested[0]} to convert it (e.g. --ckpt_key ema for the "
            "averaged weights, --ckpt_key model for the trained ones)"
            if nested and key is None else "")
    raise ConversionError(f"{path}: not a state dict: entries that are not tensors: "
                          f"{bad[:10]}{hint}")
  keys = list(sd)
  if all(k.startswith("module.") for k in keys):
    keys = [k[len("module."):] for k in keys]
  return {k: _to_numpy(v, k, path) for k, v in zip(keys, sd.values())}


def _to_numpy(t, key: str, path: str) -> np.ndarray:
  """A saved tensor as numpy, exactly: bfloat16 (which numpy lacks) widens to float32,
  which holds every bfloat16 value; float16/32/64 and integers keep their type. Types
  numpy cannot hold (float8, quantized, sparse) are a ConversionError naming the key."""
  import torch
  if t.dtype == torch.bfloat16:
    t = t.float()
  try:
    return t.detach().cpu().numpy()
  except (TypeError, RuntimeError) as e:
    raise ConversionError(f"{path}: tensor {key!r} ({t.dtype}, layout {t.layout}) cannot be "
                          f"read: {e}") from None
