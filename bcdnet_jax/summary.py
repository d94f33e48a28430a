"""Per-layer parameter and operation accounting of a named model (the CLI).

The counting is `bcdnet_jax.nn.stats` (any model built from `bcdnet_jax.nn` layers); this
module applies it to a preset, registered or `module:function` model and adds the deploy
artefact's size. Conventions (the paper's, the default):

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
"""

from __future__ import annotations

import argparse
import json

from bcdnet_jax import errors
from bcdnet_jax.nn import models, stats

LayerStats = stats.LayerStats
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


def layer_stats(spec: models.ModelSpec, image_size: int = 224) -> list[LayerStats]:
  """One LayerStats per conv / linear call of `spec`'s model on one image
  (`bcdnet_jax.nn.stats.layer_stats` of the abstract model)."""
  return stats.layer_stats(models.abstract_model(spec),
                           (image_size, image_size, spec.in_channels))


def summarize(spec: models.ModelSpec, image_size: int = 224, *,
              count_both_heads: bool = False) -> dict:
  """Totals for `spec` at `image_size` (`bcdnet_jax.nn.stats.summary` of its model, plus
  the deploy artefact's sizes for exportable stage-2 models)."""
  abstract = models.abstract_model(spec)
  result = stats.summary(abstract, (image_size, image_size, spec.in_channels),
                         count_both_heads=count_both_heads)
  fp32 = result["size_bytes_fp32"]
  deploy = {}
  if spec.stage == 2 and spec.family not in ("resnet50", "custom"):
    from bcdnet_jax.deploy import export
    for dt, d in export.deploy_size_bytes(spec, abstract=abstract).items():
      deploy[f"deploy_bytes_{dt.replace('float', 'fp')}"] = d["file_bytes"]
      deploy[f"deploy_compression_{dt.replace('float', 'fp')}"] = fp32 / d["file_bytes"]
  result.pop("input_shape")
  return {**deploy, "arch": spec.family, "stage": spec.stage, "image_size": image_size,
          **result}


def format_table(result: dict) -> str:
  lines = [stats.format_table(result)]
  r = result
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
  try:
    spec = models.get_spec(args.arch, stage=args.stage or 2, num_classes=num_classes)
  except ValueError as e:
    raise SummaryError(f"--arch {args.arch}: {e}") from None
  return spec, 224 if args.image_size is None else args.image_size, None


class SummaryError(errors.UserError):
  """A flag of `bcdnet_jax summary` out of its range; the message names it."""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch",
                 help=f"a preset ({', '.join(sorted(models.PRESETS))}), a registered "
                 "model name or module:function")
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
  errors.run_cli(main)


if __name__ == "__main__":
  cli()
