"""Export a stage-2 model to a 1-bit deploy artefact (`bcdnet_jax.deploy.packed` runs it).

What is folded, and why each fold is exact in exact arithmetic:
- a binary conv and the BatchNorm after it: BN(mean|W| * D + beta) = k * D + g * beta + c
  with g = gamma / sqrt(var + eps), k = g * mean|W| and c = bias - mean * g, per output
  channel, D the integer ±1 product; BCDNet-B's beta = W3 e is folded as (W3 * g) e;
- the two heads: evaluation averages them, and (W1 z + b1 + W2 z + b2) / 2 = W z + b;
- the stem's BatchNorm becomes a per-channel affine after the stem conv.
Binary weights are stored as sign bits, 32 per uint32 word along the input channels; the
rare weights that are exactly 0 (sign 0, as torch.sign) as the int32 positions of their
sign bits (`<conv>.zeros`), so the file grows by 4 bytes per zero weight, not by a mask.
Real-valued tensors are float32, or float16 with `real_dtype='float16'` (computed in
float32 after loading; not exact: float16 rounds every real-valued tensor, and
`--float16 --verify` measures what that changes against float32 storage).

    python -m bcdnet_jax export --checkpoint DIR --out model.bcdnet [--float16] [--verify]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcdnet_jax import errors, fileio, preprocessing
from bcdnet_jax.deploy import packed
from bcdnet_jax.deploy.packed import FORMAT, ArtefactError, DeployModel, load_packed, pack_bits
from bcdnet_jax.log import logger as log

__all__ = ["FORMAT", "ArtefactError", "ExportError", "export_checkpoint", "export_model",
           "load_packed", "verify"]
REAL_DTYPES = packed.REAL_DTYPES


class ExportError(errors.UserError):
  """A model or checkpoint that cannot be exported; the message says why."""


# --- folding ---------------------------------------------------------------------------------

def _fold_bn(bn):
  g = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.eps)
  return g, bn.bias[...] - bn.mean[...] * g


class _Writer:
  """Collects the program and its tensors while walking a model."""

  def __init__(self, real_dtype: str):
    self.program: list[dict] = []
    self.tensors: dict[str, jax.Array] = {}
    self.real = jnp.dtype(real_dtype)

  def real_tensor(self, name, x):
    self.tensors[name] = jnp.asarray(x).astype(self.real)

  def binary_conv(self, name, kernel, g):
    """Sign bits (O, kh*kw*W), k = g * mean|W| of an HWIO kernel, and (not written; the
    exporter turns it into `.zeros` positions) the packed indicator of exact zeros."""
    s = jnp.sign(jnp.transpose(kernel, (3, 0, 1, 2)))
    o = kernel.shape[-1]
    self.tensors[name + ".bits"] = pack_bits(s > 0).reshape(o, -1)
    self.tensors[name + ".zerobits"] = pack_bits(s == 0).reshape(o, -1)
    self.tensors[name + ".has_zero"] = jnp.any(s == 0)
    self.real_tensor(name + ".k", jnp.mean(jnp.abs(kernel), axis=(0, 1, 2)) * g)

  def activation(self, name, act, g_out):
    self.real_tensor(name + ".threshold", act.bias.bias[...])
    if act.dynamic is not None:
      d = act.dynamic
      self.real_tensor(name + ".embed", d.embed.kernel[...])
      self.real_tensor(name + ".alpha", d.alpha.kernel[...])
      self.real_tensor(name + ".beta", d.beta.kernel[...] * g_out[None, :])

  def rprelu(self, name, r):
    self.real_tensor(name + ".shift_in", r.shift_in.bias[...])
    self.real_tensor(name + ".slope", r.prelu.slope[...])
    self.real_tensor(name + ".shift_out", r.shift_out.bias[...])

  def affine_conv(self, name, conv, bn):
    g, c = _fold_bn(bn)
    self.real_tensor(name + ".kernel", conv.kernel[...])
    self.real_tensor(name + ".scale", g)
    self.real_tensor(name + ".shift", c)


# One fold function per module class of `model.features` / `model.mlp`: it writes the
# block's deploy tensors and its program op (a kind `packed.OPS` can run) and returns the
# block's output width. Adding a block kind: a fold here, an `OpKind` in packed.OPS, a
# name-table entry in convert (tests/test_blocks.py checks all three for every preset);
# docs/building-bnns.md walks through it.

def _fold_stem(layer, n, c, w):
  out = layer.conv.kernel.shape[-1]
  w.affine_conv(n, layer.conv, layer.bn)
  w.program.append(dict(op="stem", name=n, kernel=layer.conv.kernel.shape[0],
                        max_pool=layer.max_pool, **{"in": c, "out": out}))
  return out


def _fold_basic(layer, n, c, w):
  out = 2 * c if layer.doubles else c
  g1, c1 = _fold_bn(layer.bn1)
  w.binary_conv(n + ".conv3x3", layer.conv3x3.kernel[...], g1)
  w.real_tensor(n + ".c1", c1)
  w.activation(n + ".act1", layer.act1, g1)
  w.rprelu(n + ".rprelu1", layer.rprelu1)
  if layer.doubles:
    (ga, ca), (gb, cb) = _fold_bn(layer.bn2_1), _fold_bn(layer.bn2_2)
    g2, c2 = jnp.concatenate([ga, gb]), jnp.concatenate([ca, cb])
    kernel = jnp.concatenate([layer.pw_down1.kernel[...], layer.pw_down2.kernel[...]],
                             axis=-1)
  else:
    (g2, c2), kernel = _fold_bn(layer.bn2), layer.pw.kernel[...]
  w.binary_conv(n + ".pw", kernel, g2)
  w.real_tensor(n + ".c2", c2)
  w.activation(n + ".act2", layer.act2, g2)
  w.rprelu(n + ".rprelu2", layer.rprelu2)
  w.program.append(dict(op="basic", name=n, stride=layer.stride, doubles=layer.doubles,
                        **{"in": c, "out": out}))
  return out


def _fold_r18(layer, n, c, w):
  out = layer.conv3x3.kernel.shape[-1]
  g, cc = _fold_bn(layer.bn)
  w.binary_conv(n + ".conv3x3", layer.conv3x3.kernel[...], g)
  w.real_tensor(n + ".c", cc)
  w.activation(n + ".act", layer.act, g)
  w.rprelu(n + ".rprelu", layer.rprelu)
  if layer.downsample is not None:
    w.affine_conv(n + ".down", layer.downsample.conv, layer.downsample.bn)
  w.program.append(dict(op="r18", name=n, stride=layer.conv3x3.stride,
                        downsample=layer.downsample is not None, **{"in": c, "out": out}))
  return out


def _fold_token_mlp(convs, kind):
  def fold(block, n, c, w):
    g, cc = _fold_bn(block.bn)
    for conv in convs:
      w.binary_conv(f"{n}.{conv}", getattr(block, conv).kernel[...], g)
    w.real_tensor(n + ".c", cc)
    w.activation(n + ".act", block.act, g)
    w.rprelu(n + ".rprelu", block.rprelu)
    extra = {"shift_mode": block.shift_mode} if kind == "lsr" else {}
    w.program.append(dict(op=kind, name=n, **extra, **{"in": c}))
    return c
  return fold


def fold_functions() -> dict[type, Callable]:
  """Module class -> fold function (imports the model modules lazily: the runtime needs
  neither)."""
  from bcdnet_jax.nn import blocks, models
  return {models.Stem: _fold_stem, blocks.BasicBlock: _fold_basic,
          blocks.ResNet18Block: _fold_r18,
          blocks.LongShortRangeBlock: _fold_token_mlp(
              ("token_mlp", "short_mlp", "long_mlp"), "lsr"),
          blocks.PointwiseBlock: _fold_token_mlp(("token_mlp",), "pw")}


def _walk(model, w: _Writer) -> None:
  folds = fold_functions()
  named = [(f"features.{i}", layer) for i, layer in enumerate(model.features)]
  named += [(f"mlp.{gi}.{j}", block) for gi, group in enumerate(getattr(model, "mlp", ()))
            for j, block in enumerate(group)]
  c = model.spec.in_channels
  for n, layer in named:
    fold = folds.get(type(layer))
    if fold is None:
      raise ExportError(_cannot_fold(n, layer))
    c = fold(layer, n, c, w)
  heads = [model.head] + ([model.head_dist] if getattr(model, "head_dist", None) is not None
                          else [])
  w.real_tensor("head.kernel", sum(h.kernel[...] for h in heads) / len(heads))
  w.real_tensor("head.bias", sum(h.bias[...] for h in heads) / len(heads))
  w.program.append(dict(op="head", name="head", **{"in": c, "out": model.spec.num_classes}))


ADD_BLOCK_KIND = "docs/building-bnns.md, 'Adding a block kind'"


def _cannot_fold(path: str, module) -> str:
  names = ", ".join(sorted(c.__name__ for c in fold_functions() if c.__name__ != "Stem"))
  return (f"cannot export module {path}: no fold function for {type(module).__name__} (the "
          f"deploy runtime folds a model's features: a Stem first, then {names}; its mlp "
          f"groups of those; Linear head/head_dist; to add a block kind see "
          f"{ADD_BLOCK_KIND})")


def check_foldable(model) -> None:
  """Raises ExportError (one line naming the module path and type) unless `model` has the
  layout the exporter walks: `features` (an `nnx.List` starting with a `Stem`, then blocks
  of `fold_functions`), optional `mlp` (a list of lists of such blocks), a `Linear`
  `head` and optional `head_dist`, and no other module. Its forward is then taken to be
  features -> mlp -> global average pool -> mean of the heads (`verify` checks it)."""
  from flax import nnx

  from bcdnet_jax.nn import layers, models
  folds = fold_functions()
  containers = (nnx.List, nnx.Dict, nnx.Sequential)
  feats = getattr(model, "features", None)
  first = next(iter(feats), None) if feats is not None else None
  if first is not None and not isinstance(first, models.Stem):
    raise ExportError(_cannot_fold("features.0", first))
  for path, node in nnx.iter_graph(model):
    if not path or not isinstance(node, nnx.Module) or isinstance(node, containers):
      continue
    top, name = path[0], ".".join(str(p) for p in path)
    if top in ("head", "head_dist") and len(path) == 1:
      if type(node) is not layers.Linear:
        raise ExportError(_cannot_fold(name, node))
    elif top in ("features", "mlp"):
      depth = 2 if top == "features" else 3
      if len(path) == depth and type(node) not in folds:
        raise ExportError(_cannot_fold(name, node))
    else:
      raise ExportError(_cannot_fold(name, node))
  if feats is None or first is None or getattr(model, "head", None) is None:
    raise ExportError(f"cannot export {type(model).__name__}: it has no features list "
                      f"starting with a Stem and no Linear head (see {ADD_BLOCK_KIND})")


def _check_exportable(spec) -> None:
  if spec.family == "resnet50":
    raise ExportError("resnet50 is the real-valued teacher: nothing to binarise; export "
                      "a stage-2 BCDNet / ReActNet model")
  if spec.stage != 2:
    raise ExportError(f"the model is stage {spec.stage}: its weights are real-valued, so a "
                      "1-bit artefact would not compute what it computes; export a stage-2 "
                      "model (train stage 2 from it first)")


def deploy_tensors(model, real_dtype: str = "float32", *, abstract: bool = False
                   ) -> tuple[list[dict], dict]:
  """(program, tensors) of a stage-2 model in evaluation semantics (running BN stats).

  The walk is traced once under `jax.jit` (or `jax.eval_shape` with `abstract=True`,
  giving shapes only) instead of running hundreds of small ops eagerly. Tensors come in
  the walk's order, which is the file's.
  """
  from flax import nnx
  if real_dtype not in REAL_DTYPES:
    raise ExportError(f"real_dtype must be one of {REAL_DTYPES}, got {real_dtype!r}")
  _check_exportable(model.spec)
  if model.spec.family == "custom":
    check_foldable(model)
  graphdef, state = nnx.split(model)
  program, order = [], []

  def walk(state):
    w = _Writer(real_dtype)
    _walk(nnx.merge(graphdef, state), w)
    program[:], order[:] = w.program, list(w.tensors)
    return w.tensors

  out = jax.eval_shape(walk, state) if abstract else jax.jit(walk)(state)
  return program, {k: out[k] for k in order}


def deploy_size_bytes(spec, *, abstract=None) -> dict[str, dict]:
  """Exact artefact sizes of `spec` from shapes alone (no weights allocated), per real
  dtype: {'float32': {binary_bytes, real_bytes, file_bytes}, 'float16': {...}}.

  Assumes no weight is exactly 0 (the usual case; each zero weight adds 4 bytes of
  position, plus one table entry and alignment per conv that has any) and an empty
  `source` path in the header (`export_model`'s default).
  """
  from bcdnet_jax.nn import models
  _check_exportable(spec)
  program, shapes = deploy_tensors(abstract if abstract is not None
                                   else models.abstract_model(spec), abstract=True)
  shapes = {k: v for k, v in shapes.items() if not k.endswith(_INTERNAL)}
  out = {}
  for dt in REAL_DTYPES:
    meta = {k: (v.dtype if k.endswith(".bits") else np.dtype(dt), v.shape)
            for k, v in shapes.items()}
    nbytes = {k: math.prod(shape) * np.dtype(d).itemsize for k, (d, shape) in meta.items()}
    binary = sum(v for k, v in nbytes.items() if k.endswith(".bits"))
    out[dt] = {"binary_bytes": binary, "real_bytes": sum(nbytes.values()) - binary,
               "file_bytes": packed.file_size(_header(spec, program, dt, ""), meta)}
  return out


# Tensors of the traced walk that are not written as they are.
_INTERNAL = (".zerobits", ".has_zero")


def zero_positions(zerobits) -> np.ndarray:
  """Packed zero indicators (O, cols) uint32 -> the sorted int32 positions of their set
  bits in the flat bit array of `.bits` (word-major, bit i of a word = channel i of it)."""
  words = np.ascontiguousarray(np.asarray(zerobits), dtype="<u4")
  flat = np.unpackbits(words.view(np.uint8), bitorder="little")
  return np.flatnonzero(flat).astype(np.int32)


_DEFAULT_PRE = "default"  # ImageNet's record (preprocessing.DEFAULT); None: no record


def _header(spec, program, real_dtype, source, preprocess=_DEFAULT_PRE) -> dict:
  if preprocess == _DEFAULT_PRE:
    preprocess = preprocessing.DEFAULT
  return {"format": FORMAT, "spec": spec.to_json(), "program": program,
          "real_dtype": real_dtype, "source": source,
          "preprocess": None if preprocess is None else dict(preprocess)}


# --- writing and loading ---------------------------------------------------------------------

def check_out(out: str, overwrite: bool = False, flag: str = "overwrite=True") -> None:
  """Raises ExportError unless the artefact file `out` can be written: not a directory,
  its parent directory exists (none is created) and is writable, and an existing file only
  with `overwrite` (`flag` is how the caller spells it in the message)."""
  if os.path.isdir(out):
    raise ExportError(f"{out}: is a directory; pass the path of the artefact file to write")
  if os.path.exists(out) and not overwrite:
    raise ExportError(f"{out}: already exists; refusing to overwrite it (pass {flag})")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    what = "is not a directory" if os.path.exists(parent) else "does not exist"
    raise ExportError(f"{out}: its directory {parent} {what}; nothing written (create the "
                      "directory first)")
  fileio.check_writable(out, ExportError)


def build_artefact(model, *, real_dtype: str = "float32", source: str = "",
                   preprocess=_DEFAULT_PRE) -> tuple[dict, dict, dict]:
  """(header, arrays, counts) of `model`'s artefact, validated, in memory: what
  `export_model` writes and what `DeployModel(header, arrays)` runs. `preprocess=None`
  records none (predict then asks for --image_size)."""
  program, tensors = deploy_tensors(model, real_dtype)
  bad = errors.first_non_finite(tensors.items())
  if bad:
    raise ExportError(f"{source or 'model'}: non-finite value in deploy tensor {bad}; "
                      "nothing written")
  arrays = {}
  masked = zero_weights = 0
  for name, x in tensors.items():
    if name.endswith(".has_zero"):
      continue
    if name.endswith(".zerobits"):
      # Weights exactly 0 have sign 0 (as torch.sign): their positions, only if any.
      if bool(tensors[name[:-len(".zerobits")] + ".has_zero"]):
        arrays[name[:-len(".zerobits")] + ".zeros"] = pos = zero_positions(x)
        masked += 1
        zero_weights += pos.size
      continue
    arrays[name] = np.asarray(x)
  header = _header(model.spec, program, real_dtype, source, preprocess)
  packed.validate(header, arrays, source or "model")
  return header, arrays, {"masked_convs": masked, "zero_weights": zero_weights}


def export_model(model, out: str, *, real_dtype: str = "float32", overwrite: bool = False,
                 source: str = "", preprocess=_DEFAULT_PRE) -> dict:
  """Writes the deploy artefact of `model` to `out`; returns a report of what it holds.

  The file is written next to `out` and renamed into place, so an existing file is
  replaced only with `overwrite=True`, and never by a half-written one; a full disk is an
  ExportError (nothing written, an existing file kept).
  """
  out = os.path.abspath(out)
  check_out(out, overwrite)
  header, arrays, counts = build_artefact(model, real_dtype=real_dtype, source=source,
                                          preprocess=preprocess)
  try:
    with fileio.replacing(out) as tmp:
      size = packed.write(tmp, header, arrays)
  except OSError as e:  # a full disk, a quota, a directory removed meanwhile
    why = fileio.disk_full(e) or e.strerror or str(e)
    kept = " (the existing file is kept)" if os.path.exists(out) else ""
    raise ExportError(f"{out}: cannot write the artefact there ({why}); nothing "
                      f"written{kept}") from None
  binary = sum(a.nbytes for k, a in arrays.items() if k.endswith((".bits", ".zeros")))
  return {"path": out, "file_bytes": size, "binary_bytes": binary,
          "real_bytes": sum(a.nbytes for a in arrays.values()) - binary,
          "tensors": len(arrays), **counts, "real_dtype": real_dtype}


def recorded_preprocessing(checkpoint_dir: str):
  """The preprocessing recorded in a model directory, or None (logged) when it records
  none: the artefact then records none either, rather than ImageNet's 224 px that a 32 px
  model would silently get."""
  from bcdnet_jax import checkpoint
  if checkpoint.read_meta(checkpoint_dir).get("preprocessing"):
    return checkpoint.read_preprocessing(checkpoint_dir)
  log.warning("%s records no preprocessing (image size, crop ratio); the "
              "artefact records none either, so predict will ask for --image_size",
              checkpoint_dir)
  return None


def export_checkpoint(checkpoint_dir: str, out: str, **kw) -> dict:
  """Exports the model in a model directory or training workdir (see `checkpoint`)."""
  from bcdnet_jax import checkpoint
  spec = checkpoint.read_spec(checkpoint_dir)
  _check_exportable(spec)
  model = checkpoint.restore_model(checkpoint_dir)
  model.eval()
  return export_model(model, out, source=os.path.abspath(checkpoint_dir),
                      preprocess=recorded_preprocessing(checkpoint_dir), **kw)


def _compare(y, ref) -> dict:
  """Largest |difference| of logits `y` from `ref` (N, classes), and top-1 agreement."""
  agree = int(np.sum(y.argmax(-1) == ref.argmax(-1)))
  return {"max_abs_diff": float(np.max(np.abs(y - ref))),
          "max_logit": float(np.max(np.abs(ref))), "top1_agree": agree,
          "images": int(ref.shape[0]), "top1_equal": agree == ref.shape[0]}


def verify(model, predict: DeployModel, *, batch: int = 4, image_size: int = 64,
           seed: int = 0, float32: DeployModel | None = None) -> dict:
  """Per path: the largest |logit difference| against the float model and the top-1
  agreement (of `batch` random `image_size` px images); with `float32` (the same model
  stored in float32, e.g. against a float16 artefact) also `vs_float32`, what the storage
  type changes, and `float32`, that artefact's own comparison with the float model.

  The float model runs under the 'float32' policy (true float32 products, whatever policy
  it was trained with), the arithmetic of the artefact's real-valued parts."""
  from flax import nnx

  from bcdnet_jax.nn import models
  model = models.set_dtype_policy(nnx.clone(model), "float32")
  model.eval()
  x = jax.random.normal(jax.random.key(seed), (batch, image_size, image_size,
                                               model.spec.in_channels))
  graphdef, state = nnx.split(model)
  ref = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
  out = {}
  if not np.all(np.isfinite(ref)):
    raise ExportError("verify: the float model's logits are not finite (NaN or infinity)")
  for path in packed.PATHS:
    y = np.asarray(predict(x, path=path))
    if not np.all(np.isfinite(y)):
      raise ExportError(f"verify: the artefact's {path} path gives non-finite logits")
    out[path] = _compare(y, ref)
    if float32 is not None:
      y32 = np.asarray(float32(x, path=path))
      out[path]["float32"] = _compare(y32, ref)
      out[path]["vs_float32"] = _compare(y, y32)
  return out


MAX_VERIFY_IMAGE_SIZE = 1024  # px: random images for a comparison; larger proves nothing more
MAX_VERIFY_BATCH = 256
# A path's largest |logit difference| from the float model, relative to max(1, max |logit|),
# above which --verify fails. Exact folds measure ~1e-7; a sign flipped where a
# pre-activation sits within float32 rounding of 0 can move logits by ~1e-3; a wrong fold
# (a block kind folded wrongly, a scale lost) moves them by O(1).
VERIFY_RTOL = 1e-2


def check_verified(res: dict, out: str) -> None:
  """Raises ExportError (after removing `out`) when a path of the float32-stored
  artefact (with --float16: of the in-memory float32 one) is not the float model's."""
  for path, r in res.items():
    q = r.get("float32", r)
    tol = VERIFY_RTOL * max(1.0, q["max_logit"])
    if q["max_abs_diff"] > tol:
      os.remove(out)
      raise ExportError(
          f"--verify: the artefact's {path} path differs from the float model by "
          f"{q['max_abs_diff']:.3g} (max |logit| {q['max_logit']:.3g}; at most {tol:.3g} "
          f"allowed): the export is not exact (a block folded wrongly?); {out} removed")


def _print_verify(res: dict, real_dtype: str, batch: int, size: int) -> None:
  print(f"  verify: {batch} random {size}x{size} images, each path against the float "
        "model (float32 products)")
  for path, r in res.items():
    rows = [(real_dtype, r)] + ([("float32", r["float32"])] if "float32" in r else [])
    for name, q in rows:
      print(f"    {name} {path:6s} max |logit diff| {q['max_abs_diff']:.3g} (max |logit| "
            f"{q['max_logit']:.3g}), top-1 agree {q['top1_agree']}/{q['images']}")
  if "vs_float32" in res["packed"]:
    worst = max(res.values(), key=lambda q: q["vs_float32"]["max_abs_diff"])["vs_float32"]
    changed = max(q["vs_float32"]["images"] - q["vs_float32"]["top1_agree"]
                  for q in res.values())
    print(f"  float16 storage against float32 storage (an in-memory float32 artefact, same "
          f"images): logits change by up to {worst['max_abs_diff']:.3g}, top-1 changes on "
          f"{changed} of {worst['images']}; not exact: float16 rounds every real-valued "
          "tensor, so measure the accuracy on your test set before deploying it")


def _check_args(a) -> None:
  """Everything about the flags that can be wrong, before anything is read or written."""
  from bcdnet_jax import checkpoint, summary
  check_out(a.out, a.overwrite, "--overwrite")  # before minutes of restoring
  spec = checkpoint.read_spec(a.checkpoint)
  _check_exportable(spec)
  if a.verify:
    summary.check_image_size(spec, a.verify_image_size, "--verify_image_size",
                             maximum=MAX_VERIFY_IMAGE_SIZE, error=ExportError)
    from bcdnet_jax.nn import models
    program, _ = deploy_tensors(models.abstract_model(spec), abstract=True)
    if a.verify_image_size < packed.min_image_size(program):
      raise ExportError(f"--verify_image_size: {a.verify_image_size} px is under the "
                        f"{packed.min_image_size(program)} px the artefact's strides need")
    if not 1 <= a.verify_batch <= MAX_VERIFY_BATCH:
      raise ExportError(f"--verify_batch: must be 1 to {MAX_VERIFY_BATCH} images, got "
                        f"{a.verify_batch}")


def main(argv=None) -> int:
  from bcdnet_jax import log as log_lib
  log_lib.setup()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="model directory (convert_torch_ckpt.py) or training workdir")
  p.add_argument("--out", required=True, help="artefact file to write")
  p.add_argument("--float16", action="store_true", help="store real-valued tensors in fp16")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--verify", action="store_true",
                 help="compare every path with the float model on random images (with "
                      "--float16: also what float16 storage changes against float32)")
  p.add_argument("--verify_image_size", type=int, default=64)
  p.add_argument("--verify_batch", type=int, default=4, help="random images of --verify")
  a = p.parse_args(argv)
  try:
    from bcdnet_jax import checkpoint
    _check_args(a)
    model = checkpoint.restore_model(a.checkpoint)
    model.eval()
    dtype = "float16" if a.float16 else "float32"
    report = export_model(model, a.out, overwrite=a.overwrite, real_dtype=dtype,
                          source=os.path.abspath(a.checkpoint),
                          preprocess=recorded_preprocessing(a.checkpoint))
    print(f"wrote {report['path']}: {report['file_bytes']:,} bytes "
          f"({report['binary_bytes']:,} binary, {report['real_bytes']:,} real-valued "
          f"{report['real_dtype']})")
    print(f"  from {checkpoint.describe(a.checkpoint)}")
    if a.verify:
      f32 = (DeployModel(*build_artefact(model, source=a.checkpoint)[:2], "float32")
             if a.float16 else None)
      res = verify(model, load_packed(a.out), batch=a.verify_batch,
                   image_size=a.verify_image_size, float32=f32)
      _print_verify(res, dtype, a.verify_batch, a.verify_image_size)
      check_verified(res, a.out)
      report["verify"] = res
  except (errors.UserError, ValueError) as e:
    return errors.report(e)
  print(json.dumps(report))
  return 0


def cli() -> None:
  """The `bcdnet-export` console script."""
  errors.run_cli(main)


if __name__ == "__main__":
  cli()
