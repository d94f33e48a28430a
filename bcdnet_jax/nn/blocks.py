"""BCDNet's blocks, each written as the paper's figure reads (NHWC).

- `BasicBlock`: ReActNet-A's block (3x3 binary conv, then 1x1 binary conv, or two 1x1
  convs concatenated when the width doubles).
- `LongShortRangeBlock`: the binary MLP block mixing tokens with three binary 1x1 convs on
  the unshifted, short-range-shifted and long-range-shifted binary tokens.
- `PointwiseBlock`: one binary 1x1 conv closing each MLP group.
- `ResNet18Block`: the Bi-Real / ReActNet (ResNet-18) block, one binary 3x3 conv.
- `DynamicThreshold`: BCDNet-B's contextual dynamic embedding, usable at any binary site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bcdnet_jax.nn import quantizers as binarize
from bcdnet_jax.nn.layers import (
  BatchNorm,
  BinaryConv,
  Conv,
  LearnableBias,
  Linear,
  RPReLU,
  avg_pool_2x2,
  global_avg_pool,
  group_shift,
  long_range_shifts,
)


class DynamicThreshold(nnx.Module):
  """BCDNet-B's contextual dynamic embedding for one binary convolution.

  e = W1 GAP(x) (d = C_in / reduction, no bias, optional ReLU). The binarisation threshold
  becomes the static learnable bias plus alpha = W2 e, and beta = W3 e is added after the
  binary conv, before BN. W2 and W3 start at zero, so a fresh BCDNet-B computes exactly
  what BCDNet-A computes.
  """

  def __init__(self, in_features: int, out_features: int, *, reduction: int = 4,
               relu: bool = False, rngs: nnx.Rngs):
    d = max(1, in_features // reduction)
    zeros = nnx.initializers.zeros_init()
    self.embed = Linear(in_features, d, use_bias=False, rngs=rngs)
    self.alpha = Linear(d, in_features, use_bias=False, kernel_init=zeros, rngs=rngs)
    self.beta = Linear(d, out_features, use_bias=False, kernel_init=zeros, rngs=rngs)
    self.relu = relu

  def __call__(self, x):
    """Returns (alpha, beta) shaped (N, 1, 1, C) to broadcast over tokens."""
    e = self.embed(global_avg_pool(x))
    if self.relu:
      e = jax.nn.relu(e)
    return self.alpha(e)[:, None, None, :], self.beta(e)[:, None, None, :]


class BinaryActivation(nnx.Module):
  """sign(x + b) with a learnable per-channel threshold b (ReActNet's RSign), plus
  BCDNet-B's dynamic part if enabled.

  Two forms:
  - plain, `BinaryActivation(features)`: returns the binary array only (x's shape and
    dtype, values -1, 0, 1), so it fits `nnx.Sequential`;
  - the blocks' form, `BinaryActivation(in_features, out_features, dynamic=...)`: returns
    (binary array, beta), beta the post-conv offset for the `out_features` channels of the
    conv it feeds (0.0 without dynamics), both in x's dtype.
  `sign`: the quantizer, a registered name ('approx' as released, 'ste', 'identity') or a
  callable of one array (`quantizers.get`). `rngs` is needed only with `dynamic`.
  """

  def __init__(self, in_features: int, out_features: int | None = None, *,
               dynamic: dict | None = None, sign="approx", rngs: nnx.Rngs | None = None):
    if dynamic is not None and out_features is None:
      raise ValueError("BinaryActivation: dynamic thresholds need out_features (the width "
                       "of the conv whose offset beta they compute)")
    if binarize.get(sign) is None:
      raise ValueError("BinaryActivation: sign must be a quantizer name or a callable, "
                       "not None")
    self.bias = LearnableBias(in_features)
    self.dynamic = (DynamicThreshold(in_features, out_features, rngs=rngs, **dynamic)
                    if dynamic is not None else None)
    self.sign = binarize.get(sign)
    self.plain = out_features is None

  def __call__(self, x):
    if self.dynamic is None:
      s = self.sign(binarize.observe_sign_input(self.bias(x), self))
      return s if self.plain else (s, 0.0)
    alpha, beta = self.dynamic(x)
    # rounding the threshold's sum to x's type keeps its sign and the sign's saved input narrow
    t = (self.bias(x) + alpha).astype(x.dtype)
    return self.sign(binarize.observe_sign_input(t, self)), beta.astype(x.dtype)


class BasicBlock(nnx.Module):
  """ReActNet-A basic block from `in_features` to `out_features` (= in or 2 x in).

  a = BN1(conv3x3(sign(x + b11)));  h = RPReLU1(shortcut(x) + a)
  g = sign(h + b21);  y = BN2(conv1x1(g)) + h, or when the width doubles
  y = concat(BN2_1(conv1x1_1(g)) + h, BN2_2(conv1x1_2(g)) + h);  out = RPReLU2(y)
  """

  def __init__(self, in_features: int, out_features: int, stride: int, *,
               binary_weights: bool, dynamic: dict | None = None,
               dynamic_3x3_only: bool = False, sign: str = "approx", rngs: nnx.Rngs):
    if out_features not in (in_features, 2 * in_features):
      raise ValueError(f"BasicBlock goes from C to C or 2C channels, got "
                       f"{in_features} -> {out_features}")
    i, o = in_features, out_features
    self.stride = stride
    self.act1 = BinaryActivation(i, i, dynamic=dynamic, sign=sign, rngs=rngs)
    self.conv3x3 = BinaryConv(i, i, 3, stride, 1, binary_weights=binary_weights, rngs=rngs)
    self.bn1 = BatchNorm(i)
    self.rprelu1 = RPReLU(i)
    self.act2 = BinaryActivation(i, o, dynamic=None if dynamic_3x3_only else dynamic,
                                 sign=sign, rngs=rngs)
    self.doubles = o == 2 * i
    if self.doubles:
      self.pw_down1 = BinaryConv(i, i, binary_weights=binary_weights, rngs=rngs)
      self.pw_down2 = BinaryConv(i, i, binary_weights=binary_weights, rngs=rngs)
      self.bn2_1 = BatchNorm(i)
      self.bn2_2 = BatchNorm(i)
    else:
      self.pw = BinaryConv(i, o, binary_weights=binary_weights, rngs=rngs)
      self.bn2 = BatchNorm(o)
    self.rprelu2 = RPReLU(o)

  def __call__(self, x):
    b, beta = self.act1(x)
    a = self.bn1(self.conv3x3(b) + beta)
    shortcut = avg_pool_2x2(x) if self.stride == 2 else x
    h = self.rprelu1(shortcut + a)
    g, beta = self.act2(h)
    if self.doubles:
      beta1, beta2 = (jnp.split(beta, 2, axis=-1) if not isinstance(beta, float)
                      else (beta, beta))
      y = jnp.concatenate([self.bn2_1(self.pw_down1(g) + beta1) + h,
                           self.bn2_2(self.pw_down2(g) + beta2) + h], axis=-1)
    else:
      y = self.bn2(self.pw(g) + beta) + h
    return self.rprelu2(y)


class LongShortRangeBlock(nnx.Module):
  """Long-short-range binary MLP block (the authors' ShiftBlock).

  b = sign(x + b0);  y = BN(P0(b) + P1(short(b)) + P2(long(b))) + x;  out = RPReLU(y)
  P0, P1, P2 are token-wise binary MLPs (1x1 binary convs C -> C); short/long are the
  circular channel-group shifts by 1 and by the long range.
  """

  def __init__(self, features: int, *, binary_weights: bool, shift_mode="released",
               dynamic: dict | None = None, sign: str = "approx", rngs: nnx.Rngs):
    c = features
    self.act = BinaryActivation(c, c, dynamic=dynamic, sign=sign, rngs=rngs)
    self.token_mlp = BinaryConv(c, c, binary_weights=binary_weights, rngs=rngs)
    self.short_mlp = BinaryConv(c, c, binary_weights=binary_weights, rngs=rngs)
    self.long_mlp = BinaryConv(c, c, binary_weights=binary_weights, rngs=rngs)
    self.bn = BatchNorm(c)
    self.rprelu = RPReLU(c)
    self.shift_mode = shift_mode

  def __call__(self, x):
    b, beta = self.act(x)
    lh, lw = long_range_shifts(self.shift_mode, x.shape[1], x.shape[2])
    y = (self.token_mlp(b) + self.short_mlp(group_shift(b, 1, 1))
         + self.long_mlp(group_shift(b, lh, lw)))
    return self.rprelu(self.bn(y + beta) + x)


class PointwiseBlock(nnx.Module):
  """Point-wise binary block: y = BN(P(sign(x + b0))) + x;  out = RPReLU(y)."""

  def __init__(self, features: int, *, binary_weights: bool, dynamic: dict | None = None,
               sign: str = "approx", rngs: nnx.Rngs):
    c = features
    self.act = BinaryActivation(c, c, dynamic=dynamic, sign=sign, rngs=rngs)
    self.token_mlp = BinaryConv(c, c, binary_weights=binary_weights, rngs=rngs)
    self.bn = BatchNorm(c)
    self.rprelu = RPReLU(c)

  def __call__(self, x):
    b, beta = self.act(x)
    return self.rprelu(self.bn(self.token_mlp(b) + beta) + x)


class Downsample(nnx.Module):
  """Real-valued ResNet-18 shortcut: 2x2 average pool (if strided), 1x1 conv, BN."""

  def __init__(self, in_features: int, out_features: int, stride: int, *,
               rngs: nnx.Rngs):
    self.stride = stride
    self.conv = Conv(in_features, out_features, 1, rngs=rngs)
    self.bn = BatchNorm(out_features)

  def __call__(self, x):
    if self.stride == 2:
      x = avg_pool_2x2(x)
    return self.bn(self.conv(x))


class ResNet18Block(nnx.Module):
  """Bi-Real-18 / ReActNet (ResNet-18) block with one binary 3x3 conv.

  out = RPReLU(BN(conv3x3(sign(x + b0))) + shortcut(x)), the shortcut real-valued
  (`Downsample`) where the block strides or changes width, identity otherwise.
  """

  def __init__(self, in_features: int, out_features: int, stride: int, *,
               binary_weights: bool, dynamic: dict | None = None, sign: str = "approx",
               rngs: nnx.Rngs):
    self.act = BinaryActivation(in_features, out_features, dynamic=dynamic, sign=sign,
                                rngs=rngs)
    self.conv3x3 = BinaryConv(in_features, out_features, 3, stride, 1,
                              binary_weights=binary_weights, rngs=rngs)
    self.bn = BatchNorm(out_features)
    self.downsample = (Downsample(in_features, out_features, stride, rngs=rngs)
                       if stride != 1 or in_features != out_features else None)
    self.rprelu = RPReLU(out_features)

  def __call__(self, x):
    b, beta = self.act(x)
    shortcut = self.downsample(x) if self.downsample is not None else x
    return self.rprelu(self.bn(self.conv3x3(b) + beta) + shortcut)


class Bottleneck(nnx.Module):
  """torchvision's ResNet-50 bottleneck (stride on the 3x3 conv, "v1.5")."""

  expansion = 4

  def __init__(self, in_features: int, width: int, stride: int, *, rngs: nnx.Rngs):
    out = width * self.expansion
    self.conv1 = Conv(in_features, width, 1, rngs=rngs)
    self.bn1 = BatchNorm(width)
    self.conv2 = Conv(width, width, 3, stride, 1, rngs=rngs)
    self.bn2 = BatchNorm(width)
    self.conv3 = Conv(width, out, 1, rngs=rngs)
    self.bn3 = BatchNorm(out)
    self.downsample = (nnx.List([Conv(in_features, out, 1, stride, rngs=rngs),
                                 BatchNorm(out)])
                       if stride != 1 or in_features != out else None)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.downsample is not None:
      conv, bn = self.downsample
      x = bn(conv(x))
    return jax.nn.relu(x + y)
