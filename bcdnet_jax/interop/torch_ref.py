"""A PyTorch reference of the released model layouts, written here from the specification.

Used to self-check conversions (`convert_torch_ckpt.py`), to export models for PyTorch
users, and as the speed baseline. It loads the released checkpoints with `strict=True`
and reproduces `tests/fixtures/bcdnet_torch` (tested), so it computes what the authors'
code computes. Covers the 'mobilenet' family (BCDNet-A, ReActNet-A, stage 1 and 2) and the
torchvision ResNet-50 teacher; needs only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bcdnet_jax.nn import models


class _ApproxSign(torch.autograd.Function):

  @staticmethod
  def forward(ctx, x):
    ctx.save_for_backward(x)
    return torch.sign(x)

  @staticmethod
  def backward(ctx, g):
    (x,) = ctx.saved_tensors
    d = torch.where((x >= -1) & (x < 0), 2 + 2 * x,
                    torch.where((x >= 0) & (x < 1), 2 - 2 * x, torch.zeros_like(x)))
    return g * d


class _BinaryWeight(torch.autograd.Function):

  @staticmethod
  def forward(ctx, w):
    ctx.save_for_backward(w)
    return w.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.sign(w)

  @staticmethod
  def backward(ctx, g):
    (w,) = ctx.saved_tensors
    return g * (w.abs() <= 1).to(g.dtype)


class LearnableBias(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

  def forward(self, x):
    return x + self.bias


class BinaryConv2d(nn.Conv2d):
  """Conv of binary activations; binarises its weight in stage 2."""

  def __init__(self, i, o, k=1, stride=1, padding=0, *, binary_weights):
    super().__init__(i, o, k, stride, padding, bias=False)
    self.binary_weights = binary_weights

  def forward(self, x):
    w = _BinaryWeight.apply(self.weight) if self.binary_weights else self.weight
    return F.conv2d(x, w, None, self.stride, self.padding)


def sign(x):
  return _ApproxSign.apply(x)


class FirstConv(nn.Module):

  def __init__(self, i, o):
    super().__init__()
    self.conv1 = nn.Conv2d(i, o, 3, 2, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(o)

  def forward(self, x):
    return self.bn1(self.conv1(x))


class BasicBlock(nn.Module):

  def __init__(self, i, o, stride, bw):
    super().__init__()
    self.stride = stride
    self.move11 = LearnableBias(i)
    self.binary_3x3 = BinaryConv2d(i, i, 3, stride, 1, binary_weights=bw)
    self.bn1 = nn.BatchNorm2d(i)
    self.move12, self.prelu1, self.move13 = LearnableBias(i), nn.PReLU(i), LearnableBias(i)
    self.move21 = LearnableBias(i)
    self.doubles = o == 2 * i
    if self.doubles:
      self.binary_pw_down1 = BinaryConv2d(i, i, binary_weights=bw)
      self.binary_pw_down2 = BinaryConv2d(i, i, binary_weights=bw)
      self.bn2_1, self.bn2_2 = nn.BatchNorm2d(i), nn.BatchNorm2d(i)
    else:
      self.binary_pw = BinaryConv2d(i, o, binary_weights=bw)
      self.bn2 = nn.BatchNorm2d(o)
    self.move22, self.prelu2, self.move23 = LearnableBias(o), nn.PReLU(o), LearnableBias(o)

  def forward(self, x):
    a = self.bn1(self.binary_3x3(sign(self.move11(x))))
    shortcut = F.avg_pool2d(x, 2, 2) if self.stride == 2 else x
    h = self.move13(self.prelu1(self.move12(shortcut + a)))
    g = sign(self.move21(h))
    if self.doubles:
      y = torch.cat([self.bn2_1(self.binary_pw_down1(g)) + h,
                     self.bn2_2(self.binary_pw_down2(g)) + h], dim=1)
    else:
      y = self.bn2(self.binary_pw(g)) + h
    return self.move23(self.prelu2(self.move22(y)))


def _shift(x, sh, sw):
  g0, g1, g2, g3 = torch.chunk(x, 4, dim=1)
  return torch.cat([torch.roll(g0, sh, 2), torch.roll(g1, -sh, 2),
                    torch.roll(g2, sw, 3), torch.roll(g3, -sw, 3)], dim=1)


class MLPBlock(nn.Module):
  """Long-short-range block (`long=True`) or point-wise block."""

  def __init__(self, c, bw, long_range, shift_mode):
    super().__init__()
    self.long_range, self.shift_mode = long_range, shift_mode
    self.move0 = LearnableBias(c)
    self.binary_conv = BinaryConv2d(c, c, binary_weights=bw)
    if long_range:
      self.binary_conv1 = BinaryConv2d(c, c, binary_weights=bw)
      self.binary_conv2 = BinaryConv2d(c, c, binary_weights=bw)
    self.bn1 = nn.BatchNorm2d(c)
    self.move1, self.prelu, self.move2 = LearnableBias(c), nn.PReLU(c), LearnableBias(c)

  def forward(self, x):
    b = sign(self.move0(x))
    y = self.binary_conv(b)
    if self.long_range:
      h, w = x.shape[2:]
      lh, lw = ((3, 3) if self.shift_mode == "released" else
                (h // 2, w // 2) if self.shift_mode == "paper" else
                (self.shift_mode, self.shift_mode))
      y = y + self.binary_conv1(_shift(b, 1, 1)) + self.binary_conv2(_shift(b, lh, lw))
    return self.move2(self.prelu(self.move1(self.bn1(y) + x)))


class MLPGroup(nn.Module):

  def __init__(self, blocks):
    super().__init__()
    self.mlp_layer = nn.ModuleList(blocks)

  def forward(self, x):
    for b in self.mlp_layer:
      x = b(x)
    return x


class TorchBCDNet(nn.Module):
  """BCDNet-A / ReActNet-A in the released key layout; eval returns the heads' mean."""

  def __init__(self, spec: models.ModelSpec):
    super().__init__()
    if spec.family != "mobilenet" or spec.dynamic:
      raise NotImplementedError(f"no torch reference for family={spec.family} "
                                f"dynamic={spec.dynamic}")
    ch, bw = [int(c) for c in spec.channels], spec.stage == 2
    feats = [FirstConv(spec.in_channels, ch[0])]
    for i, s in enumerate(models.block_strides(spec), start=1):
      feats.append(BasicBlock(ch[i - 1], ch[i], s, bw))
    self.feature = nn.ModuleList(feats)
    self.mlp_layer = nn.ModuleList([
        MLPGroup([MLPBlock(ch[-1], bw, kind == "lsr", spec.shift_mode)
                  for kind in spec.mlp_group]) for _ in range(spec.mlp_groups)])
    self.fc = nn.Linear(ch[-1], spec.num_classes)
    self.fc_dist = nn.Linear(ch[-1], spec.num_classes)

  def forward(self, x):
    for f in self.feature:
      x = f(x)
    for g in self.mlp_layer:
      x = g(x)
    z = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    a, b = self.fc(z), self.fc_dist(z)
    return (a, b) if self.training else (a + b) / 2


class Bottleneck(nn.Module):

  def __init__(self, i, width, stride):
    super().__init__()
    o = width * 4
    self.conv1, self.bn1 = nn.Conv2d(i, width, 1, bias=False), nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3, self.bn3 = nn.Conv2d(width, o, 1, bias=False), nn.BatchNorm2d(o)
    self.downsample = (nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False),
                                     nn.BatchNorm2d(o)) if stride != 1 or i != o else None)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchResNet50(nn.Module):
  """torchvision's ResNet-50 layout (same state-dict keys), without torchvision."""

  def __init__(self, spec: models.ModelSpec):
    super().__init__()
    base = int(spec.channels[0])
    self.conv1 = nn.Conv2d(spec.in_channels, base, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(base)
    prev = base
    for s, (width, n) in enumerate(zip(spec.channels, spec.blocks_per_stage)):
      layer = []
      for j in range(n):
        layer.append(Bottleneck(prev, int(width), 2 if (s > 0 and j == 0) else 1))
        prev = int(width) * 4
      setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
    self.num_stages = len(spec.channels)
    self.fc = nn.Linear(prev, spec.num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def has_reference(spec: models.ModelSpec) -> bool:
  return spec.family == "resnet50" or (spec.family == "mobilenet" and not spec.dynamic)


def build(spec: models.ModelSpec) -> nn.Module:
  """The torch reference of `spec` (raises NotImplementedError where there is none)."""
  if spec.family == "resnet50":
    return TorchResNet50(spec)
  return TorchBCDNet(spec)
