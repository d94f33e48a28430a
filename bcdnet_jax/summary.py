"""Per-layer parameter and operation accounting, read off the model itself.

The model is traced abstractly (no weights allocated) on one image while every conv and
linear layer reports what it computed. Conventions (the paper's, the default):

- BOPs: multiply-accumulates of binary convolutions whose weights are binary (stage 2).
  In stage 1 those layers have real weights and count as FLOPs.
- FLOPs: multiply-accumulates of real-valued convs and linear layers (stem, ResNet-18
  shortcuts, BCDNet-B's dynamic embeddings, the teacher) and ONE classifier head: the
  two heads are averaged at evaluation, and the paper counts one (`--count_both_heads`
  counts both). Element-wise work (BN, biases, PReLU, adds, pooling) is not counted.
- OPs = BOPs / 64 + FLOPs.
- Size: float32 parameters and BN running statistics (`size_bytes_fp32`) against 1 bit
  per binary weight plus a float32 scale per output channel and float32 for everything
  else (`size_bytes_packed`), and the exact size of the deploy artefact that
  `bcdnet_jax.deploy.export` writes (BN and scales folded, one head; `deploy_bytes_fp32` and
  `deploy_bytes_fp16` for float32 / float16 real-valued parts; stage-2 binary models).

    python -m bcdnet_jax summary --arch bcdnet_a --stage 2 [--image_size 224] [--json]
    python -m bcdnet_jax summary --checkpoint DIR    (a model directory: its stage said)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from bcdnet_jax import errors
from bcdnet_jax.nn import layers, models

MAX_IMAGE_SIZE = 4096  # px: an abstract trace is cheap, but nobody runs a BNN on more


def check_image_size(spec: models.ModelSpec, size: int, flag: str, *,
                     maximum: int = MAX_IMAGE_SIZE, error=errors.UserError) -> None:
  """Raises `error` naming `flag` unless `size` px square images are a positive size of
  at most `maximum` px that the strides of `spec`'s model can take (an abstract trace of
  the evaluation forward: no weights allocated, nothing compiled)."""
  if not isinstance(size, int) or size < 1:
    raise error(f"{flag}: must be a positive number of pixels, got {size!r}")
  if size > maximum:
    raise error(f"{flag}: at most {maximum} px, got {size}")
  try:
    models.check_image_size(spec, size, flag)
  except errors.UserError as e:
    raise error(str(e)) from None
  except ZeroDivisionError:  # a token shift on a feature map shrunk to nothing
    raise error(f"{flag}: {size} px images shrink to nothing in the strides of "
                f"{spec.family} (the released models take 224)") from None


@dataclasses.dataclass
class LayerStats:
  name: str
  kind: str
  output_shape: tuple
  binary_params: int
  real_params: int
  binary_macs: int
  real_macs: int


@contextlib.contextmanager
def _recording(records: list, binary_weights: bool):
  """Temporarily wraps the conv/linear layers' __call__ to report their work."""
  originals = {}

  def wrap(cls):
    orig = cls.__call__

    def call(self, x, *args, **kwargs):
      y = orig(self, x, *args, **kwargs)
      records.append((self, tuple(x.shape), tuple(y.shape), binary_weights))
      return y

    originals[cls] = orig
    cls.__call__ = call

  try:
    for cls in (layers.Conv, layers.BinaryConv, layers.Linear):
      wrap(cls)
    yield
  finally:
    for cls, orig in originals.items():
      cls.__call__ = orig


def layer_stats(spec: models.ModelSpec, image_size: int = 224) -> list[LayerStats]:
  """One LayerStats per conv / linear call of `spec`'s model on one image."""
  graphdef, state = nnx.split(models.abstract_model(spec))
  records: list = []
  names: dict = {}

  def forward(state, x):
    model = nnx.merge(graphdef, state)
    model.eval()
    for path, node in nnx.iter_graph(model):
      if isinstance(node, nnx.Module):
        names[id(node)] = ".".join(str(p) for p in path)
    with _recording(records, spec.stage == 2):
      return model(x)

  x = jax.ShapeDtypeStruct((1, image_size, image_size, spec.in_channels), jnp.float32)
  jax.eval_shape(forward, state, x)
  out = []
  for module, _, y_shape, binary in records:
    k = module.kernel.get_value().shape
    n_kernel = math.prod(k)
    n_bias = module.bias.get_value().size if getattr(module, "bias", None) is not None else 0
    if isinstance(module, layers.Linear):
      macs = n_kernel
    else:
      macs = math.prod(y_shape[1:3]) * n_kernel
    is_binary = isinstance(module, layers.BinaryConv) and binary
    out.append(LayerStats(
        name=names.get(id(module), "?"), kind=type(module).__name__,
        output_shape=y_shape[1:],
        binary_params=n_kernel if is_binary else 0,
        real_params=n_bias + (0 if is_binary else n_kernel),
        binary_macs=macs if is_binary else 0, real_macs=0 if is_binary else macs))
  return out


def summarize(spec: models.ModelSpec, image_size: int = 224, *,
              count_both_heads: bool = False) -> dict:
  """Totals for `spec` at `image_size` (see the module docstring for conventions)."""
  stats = layer_stats(spec, image_size)
  abstract = models.abstract_model(spec)
  params = models.count_params(abstract)
  bn_stats = sum(math.prod(v.shape) for path, v in nnx.to_flat_state(
      nnx.state(abstract, nnx.BatchStat)) if path[-1] in ("mean", "var"))
  bops = sum(s.binary_macs for s in stats)
  flops = sum(s.real_macs for s in stats
              if count_both_heads or not s.name.endswith("head_dist"))
  binary_params = sum(s.binary_params for s in stats)
  binary_out_channels = sum(s.output_shape[-1] for s in stats if s.binary_params)
  fp32 = 4 * (params + bn_stats)
  packed = (binary_params + 7) // 8 + 4 * (params - binary_params + bn_stats
                                           + binary_out_channels)
  deploy = {}
  if spec.stage == 2 and spec.family != "resnet50":
    from bcdnet_jax.deploy import export
    for dt, d in export.deploy_size_bytes(spec, abstract=abstract).items():
      deploy[f"deploy_bytes_{dt.replace('float', 'fp')}"] = d["file_bytes"]
      deploy[f"deploy_compression_{dt.replace('float', 'fp')}"] = fp32 / d["file_bytes"]
  return {
      **deploy,
      "arch": spec.family, "stage": spec.stage, "image_size": image_size,
      "params": params, "binary_params": binary_params,
      "real_params": params - binary_params, "bn_statistics": bn_stats,
      "bops": bops, "flops": flops, "ops": bops / 64 + flops,
      "size_bytes_fp32": fp32, "size_bytes_packed": packed,
      "compression": fp32 / packed,
      "layers": [dataclasses.asdict(s) for s in stats],
  }


def format_table(result: dict) -> str:
  rows = [("layer", "type", "output", "bin params", "real params", "BOPs", "FLOPs")]
  for s in result["layers"]:
    rows.append((s["name"], s["kind"], "x".join(map(str, s["output_shape"])),
                 f"{s['binary_params']:,}", f"{s['real_params']:,}",
                 f"{s['binary_macs']:,}", f"{s['real_macs']:,}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  r = result
  lines += ["",
            f"parameters      {r['params']:,} ({r['binary_params']:,} binary)",
            f"BOPs            {r['bops']:.4g}",
            f"FLOPs           {r['flops']:.4g}",
            f"OPs             {r['ops']:.4g}  (BOPs / 64 + FLOPs)",
            f"size fp32       {r['size_bytes_fp32'] / 1e6:.1f} MB (parameters + BN statistics)",
            f"size 1-bit      {r['size_bytes_packed'] / 1e6:.1f} MB "
            f"({r['compression']:.1f}x smaller)"]
  if "deploy_bytes_fp32" in r:
    lines += [f"deploy artefact {r['deploy_bytes_fp32'] / 1e6:.2f} MB "
              f"({r['deploy_compression_fp32']:.1f}x smaller; BN and scales folded, one head)",
              f"  with fp16     {r['deploy_bytes_fp16'] / 1e6:.2f} MB "
              f"({r['deploy_compression_fp16']:.1f}x smaller)"]
  return "\n".join(lines)


def _spec_and_size(args) -> tuple[models.ModelSpec, int, str | None]:
  """(spec, image size, a line saying what the model directory holds) from the flags:
  --arch/--stage/--num_classes, or --checkpoint DIR's recorded architecture and image
  size. Raises SummaryError naming the flag."""
  from bcdnet_jax import checkpoint
  if args.checkpoint:
    given = [f for f in ("arch", "stage", "num_classes") if getattr(args, f) is not None]
    if given:
      raise SummaryError(f"--{given[0]}: not with --checkpoint (the model directory "
                         "records its architecture)")
    spec = checkpoint.read_spec(args.checkpoint)
    size = args.image_size or checkpoint.read_preprocessing(args.checkpoint)["image_size"]
    return spec, size, checkpoint.describe(args.checkpoint)
  if args.arch is None:
    raise SummaryError("--arch or --checkpoint is required")
  num_classes = 1000 if args.num_classes is None else args.num_classes
  if num_classes < 1:
    raise SummaryError(f"--num_classes: must be 1 or more, got {num_classes}")
  spec = models.get_spec(args.arch, stage=args.stage or 2, num_classes=num_classes)
  return spec, 224 if args.image_size is None else args.image_size, None


class SummaryError(errors.UserError):
  """A flag of `bcdnet_jax summary` out of its range; the message names it."""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", choices=sorted(models.PRESETS))
  p.add_argument("--checkpoint", default=None,
                 help="model directory or training workdir: its recorded architecture "
                      "and image size (instead of --arch/--stage/--num_classes)")
  p.add_argument("--stage", type=int, default=None, choices=(1, 2), help="default 2")
  p.add_argument("--image_size", type=int, default=None, help="default 224 (or recorded)")
  p.add_argument("--num_classes", type=int, default=None, help="default 1000")
  p.add_argument("--count_both_heads", action="store_true")
  p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
  args = p.parse_args(argv)
  try:
    spec, size, holds = _spec_and_size(args)
    check_image_size(spec, size, "--image_size" if args.image_size is not None else
                     f"the image size recorded in {args.checkpoint}", error=SummaryError)
  except errors.UserError as e:
    return errors.report(e)
  result = summarize(spec, size, count_both_heads=args.count_both_heads)
  result["arch"] = args.arch or spec.family
  if holds:
    print(holds)
  if args.json:
    print(json.dumps(result))
  else:
    print(format_table(result))
  return 0


def cli() -> None:
  """The `bcdnet-summary` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
