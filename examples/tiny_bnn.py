"""Two small binary networks built only from `bcdnet_jax.nn` (docs/building-bnns.md).

`create`: an `nnx.Sequential` (real stem, two binary convs, real head). Train it on digits:

    python main.py --config=configs/digits.py --workdir=runs/tiny \\
        --config.model.name=examples.tiny_bnn:create

`create_blocks`: a class built from the blocks the deploy runtime knows (a stem, ReActNet
basic blocks, one head), so `python -m bcdnet_jax export` folds it into a 1-bit artefact.
Both take `stage`: 1 gives real weights (the same `kernel` parameters), 2 binary ones.
"""

from __future__ import annotations

from flax import nnx

from bcdnet_jax.nn import blocks, layers, models


def create(*, num_classes: int = 10, in_channels: int = 3, stage: int = 2,
           rngs: nnx.Rngs) -> nnx.Sequential:
  """32x32 images -> logits: stem 3x3 conv + BN, then twice sign -> binary 3x3 conv
  (stride 2) -> BN, global average pool, dense head."""
  kq = "scaled_sign" if stage == 2 else None  # stage 1: real weights, same parameters
  return nnx.Sequential(
      layers.Conv(in_channels, 32, 3, 1, 1, rngs=rngs),
      layers.BatchNorm(32),
      blocks.BinaryActivation(32),
      layers.QuantConv(32, 64, 3, 2, 1, kernel_quantizer=kq, rngs=rngs),
      layers.BatchNorm(64),
      blocks.BinaryActivation(64),
      layers.QuantConv(64, 64, 3, 2, 1, kernel_quantizer=kq, rngs=rngs),
      layers.BatchNorm(64),
      layers.global_avg_pool,
      layers.Linear(64, num_classes, rngs=rngs),
  )


class TinyBlocks(nnx.Module):
  """A class form: `features` (a stem and ReActNet basic blocks) then one head, the layout
  `bcdnet_jax.deploy.export` walks (features -> mlp -> mean pool -> head)."""

  def __init__(self, *, num_classes: int, in_channels: int, stage: int, rngs: nnx.Rngs):
    bw = stage == 2
    self.features = nnx.List([
        models.Stem(in_channels, 16, 3, max_pool=False, rngs=rngs),   # 32 -> 16 px
        blocks.BasicBlock(16, 32, 2, binary_weights=bw, rngs=rngs),   # 16 -> 8 px
        blocks.BasicBlock(32, 32, 1, binary_weights=bw, rngs=rngs),
    ])
    self.mlp = nnx.List([])
    self.head = layers.Linear(32, num_classes, rngs=rngs)

  def __call__(self, x):
    for layer in self.features:
      x = layer(x)
    return self.head(layers.global_avg_pool(x))


@models.register_model("tiny_blocks")
def create_blocks(*, num_classes: int = 10, in_channels: int = 3, stage: int = 2,
                  rngs: nnx.Rngs) -> TinyBlocks:
  return TinyBlocks(num_classes=num_classes, in_channels=in_channels, stage=stage, rngs=rngs)
