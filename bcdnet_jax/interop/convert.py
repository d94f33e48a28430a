"""PyTorch state dict <-> model state.

One name table per family maps our module paths to the authors' torch module names; the
leaf names and layouts follow from the layer type (conv OIHW <-> HWIO, linear (out, in)
<-> (in, out), learnable biases (1, C, 1, 1) <-> (C,), BN weight/running_* <-> scale/
mean/var). Import is strict: every missing, unexpected or mis-shaped tensor is reported by
name and nothing is changed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bcdnet_jax import errors, fileio
from bcdnet_jax.interop.torch_file import (  # noqa: F401 - re-exported: convert's API
  ConversionError,
  check_zip_crc,
  read_checkpoint_file,
  read_torch_checkpoint,
)
from bcdnet_jax.nn import layers, models, precision

# --- name tables ---------------------------------------------------------------------------
# (regex on our dotted module path, torch module name); first full match wins.
_STEM_MLP_HEAD = [
    (r"features\.0\.conv", r"feature.0.conv1"),
    (r"features\.0\.bn", r"feature.0.bn1"),
    (r"mlp\.(\d+)\.(\d+)\.act\.bias", r"mlp_layer.\1.mlp_layer.\2.move0"),
    (r"mlp\.(\d+)\.(\d+)\.act\.dynamic\.(\w+)", r"mlp_layer.\1.mlp_layer.\2.dyn0.\3"),
    (r"mlp\.(\d+)\.(\d+)\.token_mlp", r"mlp_layer.\1.mlp_layer.\2.binary_conv"),
    (r"mlp\.(\d+)\.(\d+)\.short_mlp", r"mlp_layer.\1.mlp_layer.\2.binary_conv1"),
    (r"mlp\.(\d+)\.(\d+)\.long_mlp", r"mlp_layer.\1.mlp_layer.\2.binary_conv2"),
    (r"mlp\.(\d+)\.(\d+)\.bn", r"mlp_layer.\1.mlp_layer.\2.bn1"),
    (r"mlp\.(\d+)\.(\d+)\.rprelu\.shift_in", r"mlp_layer.\1.mlp_layer.\2.move1"),
    (r"mlp\.(\d+)\.(\d+)\.rprelu\.prelu", r"mlp_layer.\1.mlp_layer.\2.prelu"),
    (r"mlp\.(\d+)\.(\d+)\.rprelu\.shift_out", r"mlp_layer.\1.mlp_layer.\2.move2"),
    (r"head", r"fc"),
    (r"head_dist", r"fc_dist"),
]

# The released BCDNet-A / ReActNet-A layout (`feature.i` basic blocks, `mlp_layer.g.mlp_layer.j`).
MOBILENET_TABLE = _STEM_MLP_HEAD + [
    (r"features\.(\d+)\.act1\.bias", r"feature.\1.move11"),
    (r"features\.(\d+)\.act1\.dynamic\.(\w+)", r"feature.\1.dyn1.\2"),
    (r"features\.(\d+)\.conv3x3", r"feature.\1.binary_3x3"),
    (r"features\.(\d+)\.bn1", r"feature.\1.bn1"),
    (r"features\.(\d+)\.rprelu1\.shift_in", r"feature.\1.move12"),
    (r"features\.(\d+)\.rprelu1\.prelu", r"feature.\1.prelu1"),
    (r"features\.(\d+)\.rprelu1\.shift_out", r"feature.\1.move13"),
    (r"features\.(\d+)\.act2\.bias", r"feature.\1.move21"),
    (r"features\.(\d+)\.act2\.dynamic\.(\w+)", r"feature.\1.dyn2.\2"),
    (r"features\.(\d+)\.pw", r"feature.\1.binary_pw"),
    (r"features\.(\d+)\.pw_down(\d)", r"feature.\1.binary_pw_down\2"),
    (r"features\.(\d+)\.(bn2|bn2_1|bn2_2)", r"feature.\1.\2"),
    (r"features\.(\d+)\.rprelu2\.shift_in", r"feature.\1.move22"),
    (r"features\.(\d+)\.rprelu2\.prelu", r"feature.\1.prelu2"),
    (r"features\.(\d+)\.rprelu2\.shift_out", r"feature.\1.move23"),
]

# ResNet-18 family: no released checkpoint exists, so this is our own layout in the same
# style (`feature.i` blocks with the ReActNet-18 names move0/binary_conv/bn1/move1/...).
RESNET18_TABLE = _STEM_MLP_HEAD + [
    (r"features\.(\d+)\.act\.bias", r"feature.\1.move0"),
    (r"features\.(\d+)\.act\.dynamic\.(\w+)", r"feature.\1.dyn0.\2"),
    (r"features\.(\d+)\.conv3x3", r"feature.\1.binary_conv"),
    (r"features\.(\d+)\.bn", r"feature.\1.bn1"),
    (r"features\.(\d+)\.downsample\.conv", r"feature.\1.downsample.1"),
    (r"features\.(\d+)\.downsample\.bn", r"feature.\1.downsample.2"),
    (r"features\.(\d+)\.rprelu\.shift_in", r"feature.\1.move1"),
    (r"features\.(\d+)\.rprelu\.prelu", r"feature.\1.prelu"),
    (r"features\.(\d+)\.rprelu\.shift_out", r"feature.\1.move2"),
]

# torchvision's ResNet-50 names are ours already (conv1, bn1, layerN.i.convK, downsample.0/1).
RESNET50_TABLE: list[tuple[str, str]] = []

TABLES = {"mobilenet": MOBILENET_TABLE, "resnet18": RESNET18_TABLE,
          "resnet50": RESNET50_TABLE}

# Per layer type: (our attribute, torch leaf name, layout kind).
LEAVES: dict[type, list[tuple[str, str, str]]] = {
    layers.Conv: [("kernel", "weight", "conv")],
    layers.BinaryConv: [("kernel", "weight", "conv")],
    layers.Linear: [("kernel", "weight", "linear"), ("bias", "bias", "plain")],
    layers.BatchNorm: [("scale", "weight", "plain"), ("bias", "bias", "plain"),
                       ("mean", "running_mean", "plain"), ("var", "running_var", "plain"),
                       ("count", "num_batches_tracked", "count")],
    layers.LearnableBias: [("bias", "bias", "bias4d")],
    layers.PReLU: [("slope", "weight", "plain")],
}


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple  # our path to the Variable in the model graph
  torch_key: str
  kind: str  # layout: conv, linear, bias4d, plain, count


def to_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(x, (3, 2, 0, 1))  # HWIO -> OIHW
  if kind == "linear":
    return np.transpose(x, (1, 0))  # (in, out) -> (out, in)
  if kind == "bias4d":
    return x.reshape(1, -1, 1, 1)
  if kind == "count":
    return np.asarray(x, np.int64)
  return x


def from_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(x, (2, 3, 1, 0))  # OIHW -> HWIO
  if kind == "linear":
    return np.transpose(x, (1, 0))
  if kind == "bias4d":
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[2:] != (1, 1):
      return x  # wrong shape: reported by the shape check
    return x.reshape(-1)
  if kind == "count":
    return np.asarray(x, np.int32)
  return x


def _torch_module_name(path: str, table) -> str:
  for pattern, repl in table:
    if re.fullmatch(pattern, path):
      return re.sub(pattern, repl, path)
  return path


def torch_entries(model: nnx.Module) -> list[Entry]:
  """Every Variable of `model` with its torch key and layout kind, in model order."""
  table = TABLES[model.spec.family]
  entries = []
  for path, node in nnx.iter_graph(model):
    spec = LEAVES.get(type(node))
    if spec is None:
      continue
    name = _torch_module_name(".".join(str(p) for p in path), table)
    for attr, leaf, kind in spec:
      if getattr(node, attr, None) is not None:
        entries.append(Entry(tuple(path) + (attr,), f"{name}.{leaf}", kind))
  return entries


def unmapped(model: nnx.Module) -> list[str]:
  """What the name tables miss: Variables no entry covers (a layer type without LEAVES)
  and, for the families with a table, modules no pattern matches. Empty for a complete
  mapping (tests/test_blocks.py asserts it for every preset)."""
  table = TABLES[model.spec.family]
  covered = {e.path for e in torch_entries(model)}
  out = [".".join(map(str, p)) for p, v in nnx.iter_graph(model)
         if isinstance(v, nnx.Variable) and tuple(p) not in covered]
  if table:
    for path, node in nnx.iter_graph(model):
      name = ".".join(str(p) for p in path)
      if type(node) in LEAVES and not any(re.fullmatch(p, name) for p, _ in table):
        out.append(f"{name} (no name-table pattern)")
  return out


def _get(model, path):
  node = model
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


def to_torch_state_dict(model: nnx.Module, *, prefix: str = "", as_numpy: bool = False):
  """The model's state in the authors' key layout (NCHW), as torch tensors.

  `prefix='module.'` gives the keys of the released (DataParallel) checkpoints.
  """
  out = {}
  for e in torch_entries(model):
    out[prefix + e.torch_key] = to_torch_layout(e.kind, np.asarray(_get(model, e.path).get_value()))
  if as_numpy:
    return out
  import torch
  return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}


def state_to_torch_names(model: nnx.Module, state: nnx.State) -> dict[str, np.ndarray]:
  """Maps any state shaped like part of `model` (e.g. gradients) to torch names/layout."""
  flat = {tuple(k): v for k, v in nnx.to_flat_state(state)}
  out = {}
  for e in torch_entries(model):
    if e.path in flat:
      v = flat[e.path]
      out[e.torch_key] = to_torch_layout(
          e.kind, np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v))
  return out


def load_state_dict(model: nnx.Module, sd: Mapping[str, np.ndarray], *,
                    source: str = "state dict") -> dict:
  """Copies a torch-layout state dict into `model`, strictly; returns a report.

  `num_batches_tracked` may be absent (SyncBN checkpoints); anything else missing,
  unexpected or mis-shaped raises ConversionError naming every offending key, and the
  model is left untouched.
  """
  entries = torch_entries(model)
  expected = {e.torch_key for e in entries}
  missing, mismatched, nonfinite, values, defaults = [], [], [], {}, {}
  wrong_dtype = []
  for e in entries:
    var = _get(model, e.path)
    if e.torch_key not in sd:
      if e.kind == "count":  # SyncBN checkpoints have no num_batches_tracked
        defaults[e.path] = np.zeros((), np.int32)
      else:
        missing.append(e.torch_key)
      continue
    raw = np.asarray(sd[e.torch_key])
    x = from_torch_layout(e.kind, raw)
    current = var.get_value()  # an array or, in an abstract model, a ShapeDtypeStruct
    # floats where floats belong (any width: float16 and bfloat16 widen exactly), integers
    # for the BN batch counts; complex, bool or integer weights are not weights
    want_kind = "iu" if e.kind == "count" else "f"
    if raw.dtype.kind not in want_kind:
      wrong_dtype.append(f"{e.torch_key}: {raw.dtype}, expected "
                         f"{'an integer' if e.kind == 'count' else 'a floating'} type")
      continue
    if tuple(x.shape) != tuple(current.shape):
      want = to_torch_layout(e.kind, np.zeros(current.shape, np.float32)).shape
      mismatched.append(f"{e.torch_key}: checkpoint {tuple(raw.shape)}, model {tuple(want)}")
      continue
    values[e.path] = x.astype(current.dtype)
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
      nonfinite.append(f"{e.torch_key} ({int(np.sum(~np.isfinite(x)))} of {x.size})")
  unexpected = sorted(set(sd) - expected)
  if nonfinite:
    raise ConversionError(f"{source}: non-finite values (NaN or infinity) in "
                          f"{len(nonfinite)} tensors: {_first(nonfinite, ', ')}; nothing "
                          "written")
  if wrong_dtype:
    raise ConversionError(f"{source}: {len(wrong_dtype)} tensors of the wrong type: "
                          f"{_first(wrong_dtype, '; ')}; nothing written")
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing keys: {_first(missing, ', ')}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected, ', ')}")
    if mismatched:
      parts.append(f"{len(mismatched)} shape mismatches: {_first(mismatched, '; ')}")
    raise ConversionError(f"{source} does not match {_describe(model)}:\n  "
                          + "\n  ".join(parts))
  for path, x in {**defaults, **values}.items():
    _get(model, path).set_value(jnp.asarray(x))
  n_float = sum(int(np.size(v)) for p, v in values.items() if v.dtype != np.int32)
  return {"tensors_mapped": len(values),
          "values_mapped": n_float,
          "bytes_mapped": int(sum(np.asarray(v).nbytes for v in values.values()))}


def _first(names, sep, n=12):
  more = f"{sep}... and {len(names) - n} more" if len(names) > n else ""
  return sep.join(names[:n]) + more


def _describe(model) -> str:
  s = model.spec
  return f"model family={s.family} stage={s.stage} num_classes={s.num_classes} " \
         f"channels={list(s.channels)}"


def from_torch_state_dict(sd: Mapping[str, np.ndarray], spec: models.ModelSpec, *,
                          source: str = "state dict") -> tuple[nnx.Module, dict]:
  """Builds the model `spec` describes and fills it from a torch-layout state dict.

  The model is made abstractly (shapes only) and every Variable then receives its
  checkpoint value, so no random initialisation is computed and none survives.
  """
  model = models.abstract_model(spec)
  report = load_state_dict(model, sd, source=source)
  return model, report


__all__ = ["ConversionError", "torch_entries", "to_torch_state_dict", "state_to_torch_names",
           "read_torch_checkpoint", "load_state_dict", "from_torch_state_dict"]


# --- the whole conversion --------------------------------------------------------------------

def self_check(model: nnx.Module, sd: Mapping[str, np.ndarray], *, image_size: int = 224,
               batch: int = 2, seed: int = 0, policy: str = "float32") -> dict:
  """Runs the torch reference on the same weights and random images; compares logits.

  The verdict comes from float64 (the torch reference `.double()`, our model cast to
  float64 under `jax.enable_x64`): there no pre-activation lies within rounding of 0, so
  a correct mapping agrees to ~1e-12 relative however wide the network, and a wrong one
  (swapped or transposed tensors, another BN epsilon) does not. In float32 a binary
  activation whose input is within rounding of 0 can flip between any two
  implementations and the difference grows through later layers: reported, with the
  number of flipped binary activations (float32 against float64), not judged. The float32
  run is under dtype policy `policy`: 'float32' (true float32 products on every backend)
  unless told otherwise ('tf32': the backend's default products; see models.ModelSpec).

  Returns {'status': 'skipped', 'reason': ...} where torch or a reference is missing.
  """
  try:
    import torch

    from bcdnet_jax.interop import torch_ref
  except ImportError:
    return {"status": "skipped", "reason": "torch is not installed"}
  if not torch_ref.has_reference(model.spec):
    return {"status": "skipped",
            "reason": f"no torch reference for family={model.spec.family} "
                      f"dynamic={model.spec.dynamic}"}
  ref = torch_ref.build(model.spec)
  # the weights as converted: float16 widens exactly, float64 rounds to the model's float32
  ref.load_state_dict({k: torch.from_numpy(np.array(v, np.float32 if v.dtype.kind == "f"
                                                    else v.dtype)) for k, v in sd.items()},
                      strict=True)
  ref.eval()
  x64 = np.random.default_rng(seed).standard_normal(
      (batch, model.spec.in_channels, image_size, image_size))
  x32 = x64.astype(np.float32)
  with torch.no_grad():
    expected32 = ref(torch.from_numpy(x32)).numpy()
    expected64 = ref.double()(torch.from_numpy(x64)).numpy()
  model = nnx.clone(model)
  model.eval()
  # the float64 verdict always at HIGHEST, whatever `policy` and the backend
  model64 = models.set_dtype_policy(nnx.clone(model), "float32")
  models.set_dtype_policy(model, policy)
  got32, signs32 = precision.logits_and_signs(model, jnp.asarray(x32.transpose(0, 2, 3, 1)))
  with jax.enable_x64(True):
    model64 = models.cast_floating(model64, jnp.float64)
    got64, signs64 = precision.logits_and_signs(model64, jnp.asarray(x64.transpose(0, 2, 3, 1)))
    got64 = np.asarray(got64)
  got32 = np.asarray(got32)
  flipped = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(signs32, signs64))
  scale64 = max(1.0, float(np.max(np.abs(expected64))))
  return {"status": "ran", "image_size": image_size, "batch": batch,
          "policy": models.resolve_dtype_policy(policy),
          "float64_max_abs_logit_diff": float(np.max(np.abs(got64 - expected64))),
          "float64_rel_diff": float(np.max(np.abs(got64 - expected64))) / scale64,
          "max_abs_logit_diff": float(np.max(np.abs(got32 - expected32))),
          "max_abs_logit": float(np.max(np.abs(expected32))),
          "top1_agree": bool(np.all(got32.argmax(-1) == expected32.argmax(-1))),
          "binary_activations": int(sum(np.asarray(a).size for a in signs64)),
          "flipped_binary_activations": flipped,
          "all_finite": bool(np.all(np.isfinite(got64)) and np.all(np.isfinite(expected64)))}


def check_or_raise(chk: dict, tolerance: float) -> None:
  """Raises ConversionError when a self-check that ran is off by more than `tolerance`
  (relative, float64) or is not finite."""
  if chk["status"] == "ran" and not chk["all_finite"]:
    raise ConversionError("self-check failed: the logits are not finite (NaN or infinity); "
                          "nothing written")
  if chk["status"] == "ran" and not chk["float64_rel_diff"] <= tolerance:
    raise ConversionError(
        f"self-check failed: in float64 the logits differ from the torch reference by "
        f"{chk['float64_rel_diff']:.3g} of their scale (> {tolerance:g}): the mapping "
        f"is wrong; nothing written")


MAX_CHECK_IMAGE_SIZE = 1024  # px: random images for a comparison; larger proves nothing more


def convert_file(torch_ckpt: str, arch: str, stage: int, out: str, *,
                 num_classes: int = 1000, overrides: dict | None = None,
                 ckpt_key: str | None = None, check: bool = True,
                 check_image_size: int = 224, check_tolerance: float = 1e-6,
                 check_policy: str = "float32") -> dict:
  """Converts a torch checkpoint into a model directory `out`; returns the report.

  Everything is validated (keys, shapes, the self-check against the torch reference
  when torch can run it) before anything is written; the self-check fails when the
  largest float64 logit difference exceeds `check_tolerance` times max(1, max |logit|).
  """
  import math

  from bcdnet_jax import checkpoint, summary
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConversionError(f"{out}: already exists and is not an empty directory; "
                          "refusing to overwrite it")
  fileio.check_writable(out, ConversionError)
  spec = models.get_spec(arch, stage=stage, num_classes=num_classes, **(overrides or {}))
  if check:  # the self-check's settings, before minutes of reading and checking
    if not (isinstance(check_tolerance, (int, float)) and math.isfinite(check_tolerance)
            and check_tolerance > 0):
      raise ConversionError(f"--check_tolerance: must be a positive finite number (the "
                            "largest float64 logit difference, relative to max(1, max "
                            f"|logit|); default 1e-6), got {check_tolerance!r}")
    summary.check_image_size(spec, check_image_size, "--check_image_size",
                             maximum=MAX_CHECK_IMAGE_SIZE, error=ConversionError)
  sd, integrity = read_checkpoint_file(torch_ckpt, ckpt_key)
  model, report = from_torch_state_dict(sd, spec, source=torch_ckpt)
  report["integrity"] = integrity
  checkpoint.check_space(os.path.abspath(out), nnx.to_pure_dict(nnx.state(model)))
  report.update(source=os.path.abspath(torch_ckpt), arch=arch, stage=stage,
                num_classes=num_classes)
  if check:
    report["self_check"] = chk = self_check(model, sd, image_size=check_image_size,
                                            policy=check_policy)
    check_or_raise(chk, check_tolerance)
  report["out"] = checkpoint.save_model(model, out, extra={"converted_from": report})
  return report


def _parse_override(text: str) -> tuple[str, Any]:
  """`--override KEY=VALUE` -> (key, value): VALUE is a Python literal ([4,8,16], 3, True,
  'paper') or a bare word (paper); anything else is a ConversionError naming the flag."""
  import ast
  if "=" not in text:
    raise ConversionError(f"--override {text!r}: expected KEY=VALUE, e.g. "
                          "channels=[4,8,16]")
  key, value = (part.strip() for part in text.split("=", 1))
  if not key:
    raise ConversionError(f"--override {text!r}: no KEY before '='")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    if re.fullmatch(r"[A-Za-z_][\w.-]*", value):
      return key, value  # a bare string such as shift_mode=paper
    raise ConversionError(
        f"--override {key}={value}: cannot parse the value {value!r} (expected a Python "
        "literal such as [4,8,16], 3, True or 'paper', or a bare word)") from None


def parse_overrides(texts, arch: str, *, stage: int = 2,
                    num_classes: int = 1000) -> dict[str, Any]:
  """Parses `--override KEY=VALUE` flags and checks them against model `arch`.

  Every mistake (not KEY=VALUE, an unknown key, an unparsable value, a value of the wrong
  type or out of range) is a ConversionError whose message names `--override` and the key.
  The overrides are applied in the order given (a repeated key: the last wins), and an
  invalid spec is blamed on the first key whose addition makes it invalid.
  """
  try:  # the spec without overrides: a bad --num_classes is not the overrides' fault
    models.get_spec(arch, stage=stage, num_classes=num_classes)
  except (ValueError, TypeError) as e:
    raise ConversionError(f"--num_classes {num_classes}: {e}") from None
  pairs = [(_parse_override(t), t) for t in texts]
  known = {f.name for f in dataclasses.fields(models.ModelSpec)} - {"stage", "num_classes"}
  known.add("mlp_width")
  overrides: dict[str, Any] = {}
  for (key, value), text in pairs:
    if key not in known:
      raise ConversionError(f"--override {text}: unknown key {key!r}; expected one of "
                            f"{sorted(known)}")
    overrides[key] = value
    try:
      models.get_spec(arch, stage=stage, num_classes=num_classes, **overrides)
    except (ValueError, TypeError) as e:
      raise ConversionError(f"--override {text}: {e}") from None
  return overrides


def main(argv=None) -> int:
  """CLI of convert_torch_ckpt.py."""
  import argparse
  import json
  p = argparse.ArgumentParser(prog="convert_torch_ckpt.py",
                              description="Import a PyTorch BCDNet/ResNet-50 checkpoint.")
  p.add_argument("--torch_ckpt", required=True, help="torch checkpoint file")
  p.add_argument("--arch", required=True, choices=sorted(models.PRESETS))
  p.add_argument("--stage", type=int, default=2, choices=(1, 2))
  p.add_argument("--out", required=True, help="new model directory to write")
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="model spec override, e.g. channels=[4,8,16,16,32,32,64,64,64,64,128]")
  p.add_argument("--ckpt_key", default=None,
                 help="checkpoint entry holding the state dict (default: model, "
                      "state_dict or the file itself); e.g. ema")
  p.add_argument("--no_check", action="store_true", help="skip the torch self-check")
  p.add_argument("--check_image_size", type=int, default=224)
  p.add_argument("--check_tolerance", type=float, default=1e-6,
                 help="largest float64 logit difference, relative to max(1, max |logit|)")
  p.add_argument("--check_policy", default="float32",
                 choices=[p for p in models.DTYPE_POLICIES if p != "bfloat16"],
                 help="dtype policy of the self-check's float32 run: float32 (true float32 "
                      "products on every backend, the default) or tf32 (the backend's "
                      "default products: TF32 on recent NVIDIA GPUs)")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  args = p.parse_args(argv)
  try:
    overrides = parse_overrides(args.override, args.arch, stage=args.stage,
                                num_classes=args.num_classes)
    report = convert_file(args.torch_ckpt, args.arch, args.stage, args.out,
                          num_classes=args.num_classes, overrides=overrides,
                          ckpt_key=args.ckpt_key, check=not args.no_check,
                          check_image_size=args.check_image_size,
                          check_tolerance=args.check_tolerance,
                          check_policy=args.check_policy)
  except ValueError as e:  # ConversionError, CheckpointError (UserErrors), bad specs
    return errors.report(e)
  if args.json:
    print(json.dumps(report))
    return 0
  print(f"converted {report['source']}")
  print(f"  arch {args.arch}, stage {args.stage}, {args.num_classes} classes")
  print(f"  stage {args.stage} as --stage says (a torch checkpoint does not record its "
        "stage, and the self-check cannot tell stage 1 from stage 2)")
  print(f"  file integrity: {report['integrity']}")
  print(f"  tensors mapped: {report['tensors_mapped']} "
        f"({report['values_mapped']:,} values, {report['bytes_mapped'] / 1e6:.2f} MB)")
  chk = report.get("self_check", {"status": "skipped", "reason": "--no_check"})
  if chk["status"] == "ran":
    print(f"  self-check vs torch reference ({chk['batch']} random images at "
          f"{chk['image_size']}px): float64 max |logit diff| = "
          f"{chk['float64_max_abs_logit_diff']:.3g} ({chk['float64_rel_diff']:.2g} of the "
          f"scale)")
    print(f"  {chk['policy']}: max |logit diff| = {chk['max_abs_logit_diff']:.3g} (max |logit| "
          f"{chk['max_abs_logit']:.3g}), top-1 agree: {chk['top1_agree']}, binary "
          f"activations flipped vs float64: {chk['flipped_binary_activations']:,} of "
          f"{chk['binary_activations']:,}")
  else:
    print(f"  self-check skipped: {chk['reason']}")
  print(f"  wrote {report['out']}")
  return 0


def cli() -> None:
  """The `bcdnet-convert` console script (convert_torch_ckpt.py is the same)."""
  errors.run_cli(main)
