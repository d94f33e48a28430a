"""The model family: one `BCDNet` class driven by a `ModelSpec`, and the ResNet-50 teacher.

Named presets (`bcdnet_a`, `reactnet_a`, ...) are specs; `create_model(name, stage=...,
**overrides)` builds any of them. Stage 1 and stage 2 differ only in whether binary convs
binarise their weight, so parameter names and shapes are the same in both stages.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bcdnet_jax import errors
from bcdnet_jax.nn import blocks
from bcdnet_jax.nn import quantizers as binarize
from bcdnet_jax.nn.layers import BatchNorm, Conv, Linear, global_avg_pool, max_pool_3x3
from bcdnet_jax.nn.registry import (  # noqa: F401  (re-exported: models.register_model, ...)
  MODELS,
  ModelNameError,
  build_custom,
  config_overrides,
  heads,
  is_custom_name,
  recorded_name,
  register_model,
  resolve_builder,
)

BCDNET_A_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 1024)
REACTNET_A_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


COMPUTE_DTYPES = ("float32", "int8", "bfloat16", "auto")
# Operand type of 'auto' per backend, from bench/train_step.py (README "Speed"): on CPU
# int8 with int32 accumulation made the full-size training step 6 % faster than float32
# (3.38 against 3.58 s; bfloat16 was slower); on an H100 int8 was +4 % at batch 128/256,
# -6 % at 64, with 60 % more memory, and bfloat16 no faster, so GPUs keep float32.
AUTO_COMPUTE_DTYPE = {"cpu": "int8", "gpu": "float32", "cuda": "float32", "rocm": "float32",
                      "tpu": "bfloat16"}


def resolve_compute_dtype(name: str, backend: str | None = None) -> str:
  """'auto' -> the fastest exact operand type on `backend` (default: JAX's default)."""
  if name != "auto":
    return name
  return AUTO_COMPUTE_DTYPE.get(backend or jax.default_backend(), "float32")


DTYPE_POLICIES = ("float32", "tf32", "bfloat16", "auto")
# ModelSpec fields that choose arithmetic, not architecture: free to differ between a run
# and the checkpoint it resumes or starts from.
ARITHMETIC_FIELDS = ("compute_dtype", "dtype_policy")
# Precision of the float32 products per resolved policy (`layers.lax_precision`):
# 'float32' pins them to true float32 on every backend; 'tf32' leaves them to the backend
# (TF32 tensor cores on NVIDIA GPUs since Ampere, one bfloat16 pass on TPUs, float32 on
# CPUs); 'bfloat16' as before: its products are bfloat16 x bfloat16 with float32 sums,
# and its few float32 products (the heads, dynamic embeddings) take the backend's default.
POLICY_PRECISION = {"float32": "highest", "tf32": "default", "bfloat16": "default"}
# Activation storage type of 'auto' per backend. CPU: float32 (bench/train_step.py, 2-core
# AVX2 machine, full-size step at batch 8: 3.49 s with the bfloat16 policy against 3.08 s;
# XLA:CPU widens bfloat16). GPUs stay float32 until bench/device.sh has measured the
# bfloat16 policy against float32 there; TPUs store bfloat16 natively. 'auto' never picks
# 'tf32': on CPU and GPU it is true float32, as the authors trained and evaluated.
AUTO_DTYPE_POLICY = {"cpu": "float32", "gpu": "float32", "cuda": "float32",
                     "rocm": "float32", "tpu": "bfloat16"}


def resolve_dtype_policy(name: str, backend: str | None = None) -> str:
  """'auto' -> the activation type picked for `backend` (default: JAX's default)."""
  if name != "auto":
    return name
  return AUTO_DTYPE_POLICY.get(backend or jax.default_backend(), "float32")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything that decides the architecture; recorded beside checkpoints.

  family: 'mobilenet' (ReActNet-A backbone: 3x3 stem + basic blocks from `channels`),
    'resnet18' (7x7 stem + max-pool + `blocks_per_stage` ResNet-18 blocks at `channels`
    per stage) or 'resnet50' (the real-valued torchvision teacher).
  mlp_groups / mlp_group: the binary MLP stage after the last conv block, `mlp_groups`
    repeats of the block kinds in `mlp_group` ('lsr' long-short-range, 'pw' point-wise),
    at the width of the last conv block.
  strides: mobilenet block strides; empty = the released rule (`block_strides`).
  shift_mode: long-range shift, 'released' (3), 'paper' (h//2, w//2) or an int.
  dynamic: BCDNet-B's dynamic thresholds at every binary conv (or 3x3 ones only).
  compute_dtype: operand type of the stage-2 binary convs' ±1 x ±1 products: 'float32',
    'int8' (int32 accumulation), 'bfloat16' (float32 accumulation), all exact, or 'auto'
    (the fastest exact one on the default backend, `resolve_compute_dtype`); everything
    else stays float32.
  dtype_policy: 'float32' (the reference: everything float32, every convolution and
    matrix product in true float32 on every backend, `jax.lax.Precision.HIGHEST`), 'tf32'
    (float32 storage, products at the backend's default precision: TF32 on NVIDIA GPUs
    since Ampere, bfloat16 passes on TPUs, float32 on CPUs), 'bfloat16' (mixed
    precision: activations stored in bfloat16 between layers, binary convs on exact ±1
    bfloat16 operands with float32 sums; parameters, BN statistics, element-wise math,
    reductions and the logits float32) or 'auto' (`resolve_dtype_policy`: float32 on CPU
    and GPU, bfloat16 on TPU). Like compute_dtype a choice of arithmetic, not of
    architecture.
  activation_sign: surrogate gradient of the activation sign ('approx' as released,
    'ste' clipped or 'identity' straight-through, for ablations).
  builder: with family 'custom', a user's network: a name registered with
    `register_model` or 'module:function' (see `build_custom`); the architecture fields
    above do not apply to it, stage / num_classes / in_channels / compute_dtype /
    dtype_policy do.
  """

  family: str = "mobilenet"
  channels: tuple[int, ...] = BCDNET_A_CHANNELS
  strides: tuple[int, ...] = ()
  blocks_per_stage: tuple[int, ...] = ()
  mlp_groups: int = 0
  mlp_group: tuple[str, ...] = ("lsr", "lsr", "lsr", "pw")
  shift_mode: Any = "released"
  dynamic: bool = False
  dynamic_reduction: int = 4
  dynamic_relu: bool = False
  dynamic_3x3_only: bool = False
  activation_sign: str = "approx"
  compute_dtype: str = "float32"
  dtype_policy: str = "float32"
  stage: int = 2
  num_classes: int = 1000
  in_channels: int = 3
  builder: str = ""

  def validate(self):
    """Checks every field's type and range; raises ValueError naming the field."""
    for name, (check, want) in _FIELD_TYPES.items():
      value = getattr(self, name)
      if not check(value):
        raise ValueError(f"model spec: {name} must be {want}, got {value!r}")
    if self.family not in FAMILIES:
      raise ValueError(f"model spec: unknown family {self.family!r}")
    if (self.family == "custom") != bool(self.builder):
      raise ValueError("model spec: family 'custom' and a builder (a registered model name "
                       f"or module:function) go together, got family={self.family!r}, "
                       f"builder={self.builder!r}")
    if self.stage not in (1, 2):
      raise ValueError(f"model spec: stage must be 1 or 2, got {self.stage!r}")
    if self.num_classes < 1:
      raise ValueError(f"model spec: num_classes must be positive, got {self.num_classes}")
    if not self.channels or any(int(c) < 1 for c in self.channels):
      raise ValueError(f"model spec: channels must be positive ints, got {self.channels}")
    if self.family == "mobilenet":
      for a, b in zip(self.channels[1:], self.channels[2:]):
        if b not in (a, 2 * a):
          raise ValueError(f"model spec: channels {list(self.channels)}: a basic block "
                           f"goes from C to C or 2C, not {a} -> {b}")
      if self.channels[1] not in (self.channels[0], 2 * self.channels[0]):
        raise ValueError(f"model spec: channels {list(self.channels)}: the first block "
                         f"goes from C to C or 2C")
    if self.family == "resnet18" and len(self.blocks_per_stage) != len(self.channels):
      raise ValueError("model spec: resnet18 needs one blocks_per_stage entry per stage "
                       f"width, got {self.blocks_per_stage} for {self.channels}")
    binarize.get_sign(self.activation_sign)
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"model spec: compute_dtype must be one of {COMPUTE_DTYPES}, got "
                       f"{self.compute_dtype!r}")
    if self.dtype_policy not in DTYPE_POLICIES:
      raise ValueError(f"model spec: dtype_policy must be one of {DTYPE_POLICIES}, got "
                       f"{self.dtype_policy!r}")
    bad = set(self.mlp_group) - {"lsr", "pw"}
    if bad:
      raise ValueError(f"model spec: mlp_group kinds must be 'lsr' or 'pw', got {bad}")
    if self.mlp_groups and self.channels[-1] % 4:
      raise ValueError(f"model spec: the MLP stage width {self.channels[-1]} must be "
                       "divisible by 4 (four shift groups)")
    if self.mlp_groups < 0:
      raise ValueError("model spec: mlp_groups must be >= 0")
    for name in ("dynamic_reduction", "in_channels"):
      if getattr(self, name) < 1:
        raise ValueError(f"model spec: {name} must be >= 1, got {getattr(self, name)}")
    if self.family == "resnet18" and any(n < 1 for n in self.blocks_per_stage):
      raise ValueError("model spec: blocks_per_stage must be positive ints, got "
                       f"{list(self.blocks_per_stage)}")
    if isinstance(self.shift_mode, int) and self.shift_mode < 0:
      raise ValueError(f"model spec: shift_mode must be 'released', 'paper' or an int >= 0, "
                       f"got {self.shift_mode!r}")
    if isinstance(self.shift_mode, str) and self.shift_mode not in ("released", "paper"):
      raise ValueError(f"model spec: shift_mode must be 'released', 'paper' or an int >= 0, "
                       f"got {self.shift_mode!r}")
    if self.family == "mobilenet" and self.strides:
      block_strides(self)  # one value of 1 or 2 per block
    return self

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    if not d["builder"]:
      del d["builder"]  # presets' records stay as they were
    for k, v in d.items():
      if isinstance(v, tuple):
        d[k] = list(v)
    return d

  @classmethod
  def from_json(cls, d: dict) -> "ModelSpec":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"model spec: unknown fields {sorted(unknown)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d).validate()


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _ints(v) -> bool:
  return isinstance(v, (tuple, list)) and all(_is_int(x) for x in v)


def _strs(v) -> bool:
  return isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v)


# ModelSpec field -> (type check, what the message asks for): checked first by `validate`,
# so a value of the wrong type (mlp_groups='two') is a ValueError naming the field.
_FIELD_TYPES = {
    "family": (lambda v: isinstance(v, str), "a string"),
    "channels": (_ints, "a list of ints"),
    "strides": (_ints, "a list of ints"),
    "blocks_per_stage": (_ints, "a list of ints"),
    "mlp_groups": (_is_int, "an int"),
    "mlp_group": (_strs, "a list of strings"),
    "shift_mode": (lambda v: isinstance(v, str) or _is_int(v), "'released', 'paper' or an int"),
    "dynamic": (lambda v: isinstance(v, bool), "True or False"),
    "dynamic_reduction": (_is_int, "an int"),
    "dynamic_relu": (lambda v: isinstance(v, bool), "True or False"),
    "dynamic_3x3_only": (lambda v: isinstance(v, bool), "True or False"),
    "activation_sign": (lambda v: isinstance(v, str), "a string"),
    "compute_dtype": (lambda v: isinstance(v, str), "a string"),
    "dtype_policy": (lambda v: isinstance(v, str), "a string"),
    "stage": (_is_int, "1 or 2"),
    "num_classes": (_is_int, "an int"),
    "in_channels": (_is_int, "an int"),
    "builder": (lambda v: isinstance(v, str), "a string"),
}

FAMILIES = ("mobilenet", "resnet18", "resnet50", "custom")


PRESETS: dict[str, dict] = {
    # The released model: ReActNet-A backbone with the last 512-channel blocks and the
    # 1024 -> 1024 block replaced by 3 MLP groups at 7 x 7 tokens.
    "bcdnet_a": dict(family="mobilenet", channels=BCDNET_A_CHANNELS, mlp_groups=3),
    "bcdnet_b": dict(family="mobilenet", channels=BCDNET_A_CHANNELS, mlp_groups=3,
                     dynamic=True),
    "reactnet_a": dict(family="mobilenet", channels=REACTNET_A_CHANNELS, mlp_groups=0),
    "reactnet_r18": dict(family="resnet18", channels=(64, 128, 256, 512),
                         blocks_per_stage=(4, 4, 4, 4), mlp_groups=0),
    # Not published: the last two 3x3 blocks of stage 4 become two groups of three
    # long-short-range blocks (three 1x1 binary convs cost one 3x3 conv), so the binary
    # operation count equals reactnet_r18's exactly.
    "bcdnet_a_r18": dict(family="resnet18", channels=(64, 128, 256, 512),
                         blocks_per_stage=(4, 4, 4, 2), mlp_groups=2,
                         mlp_group=("lsr", "lsr", "lsr")),
    "bcdnet_b_r18": dict(family="resnet18", channels=(64, 128, 256, 512),
                         blocks_per_stage=(4, 4, 4, 2), mlp_groups=2,
                         mlp_group=("lsr", "lsr", "lsr"), dynamic=True),
    "resnet50": dict(family="resnet50", channels=(64, 128, 256, 512),
                     blocks_per_stage=(3, 4, 6, 3)),
}


def get_spec(name: str, *, stage: int = 2, num_classes: int = 1000,
             **overrides) -> ModelSpec:
  """The preset `name` with overrides applied (e.g. channels=[...], mlp_groups=1), or the
  spec of a user's network: `name` registered with `register_model`, or 'module:function'
  (family 'custom'; overrides: in_channels and the arithmetic fields only)."""
  if name not in PRESETS:
    if not is_custom_name(name):
      raise ModelNameError(f"unknown model name {name!r}; expected one of "
                           f"{sorted(PRESETS)}, a name registered with register_model (in "
                           "a module this process has imported), or module:function")
    resolve_builder(name)  # importable, callable
    allowed = {"in_channels", *ARITHMETIC_FIELDS}
    bad = sorted(set(overrides) - allowed)
    if bad:
      raise ValueError(f"override {bad[0]!r} does not apply to the custom model {name!r} "
                       f"(only {sorted(allowed)} do; its builder decides the architecture)")
    return ModelSpec(family="custom", builder=recorded_name(name), stage=stage,
                     num_classes=num_classes,
                     **overrides).validate()
  fields = {f.name for f in dataclasses.fields(ModelSpec)}
  kw = dict(PRESETS[name])
  mlp_width = overrides.pop("mlp_width", None)
  for k, v in overrides.items():
    if k not in fields:
      raise ValueError(f"unknown override {k!r} for model {name!r}; expected one of "
                       f"{sorted(fields - {'stage', 'num_classes'}) + ['mlp_width']}")
    kw[k] = tuple(v) if isinstance(v, list) else v
  if mlp_width is not None:
    if not _is_int(mlp_width) or mlp_width < 1:
      raise ValueError(f"model spec: mlp_width must be a positive int, got {mlp_width!r}")
    # The MLP stage runs at the width of the last conv block (no projection between).
    ch = list(kw["channels"])
    if "channels" in overrides and ch[-1] != mlp_width:
      raise ValueError(f"override mlp_width={mlp_width} contradicts channels[-1]={ch[-1]}")
    ch[-1] = int(mlp_width)
    kw["channels"] = tuple(ch)
  kw.update(stage=stage, num_classes=num_classes)
  return ModelSpec(**kw).validate()


def block_strides(spec: ModelSpec) -> tuple[int, ...]:
  """Strides of the basic blocks after the stem.

  The released rule, kept literally: stride 2 where the width changes, except into a
  64-channel block. At full width that is "all width changes but 32 -> 64"; at reduced
  width (the fixtures' [4, 8, 16, ...]) it strides at 4 -> 8 but not at 32 -> 64, which
  is what the authors' code computes. `spec.strides` overrides it.
  """
  ch = [int(c) for c in spec.channels]
  if spec.strides:
    if len(spec.strides) != len(ch) - 1 or set(spec.strides) - {1, 2}:
      raise ValueError(f"model spec: strides must be {len(ch) - 1} values of 1 or 2 (one "
                       f"per block after the stem), got {list(spec.strides)}")
    return tuple(int(s) for s in spec.strides)
  return tuple(2 if (ch[i] != ch[i - 1] and ch[i] != 64) else 1 for i in range(1, len(ch)))


class Stem(nnx.Module):
  """Real-valued first conv + BN (3x3 stride 2 for ReActNet-A; 7x7 + max-pool for R18)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               max_pool: bool, rngs: nnx.Rngs):
    self.conv = Conv(in_features, out_features, kernel_size, 2, kernel_size // 2,
                     rngs=rngs)
    self.bn = BatchNorm(out_features)
    self.max_pool = max_pool

  def __call__(self, x):
    x = self.bn(self.conv(x))
    return max_pool_3x3(x) if self.max_pool else x


class BCDNet(nnx.Module):
  """BCDNet / ReActNet on either backbone, built from a `ModelSpec`.

  `model(x)` maps normalised NHWC float32 images to logits: in training mode the pair
  (fc, fc_dist) of the two heads, in evaluation mode (`model.eval()`) their mean.
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    spec.validate()
    self.spec = spec
    bw = spec.stage == 2
    dyn = (dict(reduction=spec.dynamic_reduction, relu=spec.dynamic_relu)
           if spec.dynamic else None)
    mlp_dyn = None if spec.dynamic_3x3_only else dyn
    sg = spec.activation_sign
    ch = [int(c) for c in spec.channels]
    if spec.family == "mobilenet":
      features: list[nnx.Module] = [Stem(spec.in_channels, ch[0], 3, max_pool=False,
                                         rngs=rngs)]
      for i, stride in enumerate(block_strides(spec), start=1):
        features.append(blocks.BasicBlock(
            ch[i - 1], ch[i], stride, binary_weights=bw, dynamic=dyn,
            dynamic_3x3_only=spec.dynamic_3x3_only, sign=sg, rngs=rngs))
    else:
      features = [Stem(spec.in_channels, ch[0], 7, max_pool=True, rngs=rngs)]
      prev = ch[0]
      for s, (width, n) in enumerate(zip(ch, spec.blocks_per_stage)):
        for j in range(n):
          stride = 2 if (s > 0 and j == 0) else 1
          features.append(blocks.ResNet18Block(prev, width, stride, binary_weights=bw,
                                               dynamic=dyn, sign=sg, rngs=rngs))
          prev = width
    self.features = nnx.List(features)
    width = ch[-1]
    groups = []
    for _ in range(spec.mlp_groups):
      group = []
      for kind in spec.mlp_group:
        if kind == "lsr":
          group.append(blocks.LongShortRangeBlock(width, binary_weights=bw,
                                                  shift_mode=spec.shift_mode,
                                                  dynamic=mlp_dyn, sign=sg, rngs=rngs))
        else:
          group.append(blocks.PointwiseBlock(width, binary_weights=bw, dynamic=mlp_dyn,
                                             sign=sg, rngs=rngs))
      groups.append(nnx.List(group))
    self.mlp = nnx.List(groups)
    self.head = Linear(width, spec.num_classes, rngs=rngs)
    self.head_dist = Linear(width, spec.num_classes, rngs=rngs)
    self.deterministic = False
    self.activation_dtype = ""  # "": the input's; set by `set_dtype_policy`

  def features_and_pool(self, x):
    for layer in self.features:
      x = layer(x)
    for group in self.mlp:
      for block in group:
        x = block(x)
    return global_avg_pool(x)

  def __call__(self, x):
    _check_images(x, self.spec.in_channels)
    z = self.features_and_pool(_to_activation_dtype(x, self.activation_dtype))
    logits, logits_dist = self.head(z), self.head_dist(z)
    if self.deterministic:
      return (logits + logits_dist) / 2
    return logits, logits_dist


class ResNet50(nnx.Module):
  """torchvision's real-valued ResNet-50 (the distillation teacher); one head."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    spec.validate()
    self.spec = spec
    base = int(spec.channels[0])
    self.conv1 = Conv(spec.in_channels, base, 7, 2, 3, rngs=rngs)
    self.bn1 = BatchNorm(base)
    prev = base
    for s, (width, n) in enumerate(zip(spec.channels, spec.blocks_per_stage)):
      layer = []
      for j in range(n):
        stride = 2 if (s > 0 and j == 0) else 1
        layer.append(blocks.Bottleneck(prev, int(width), stride, rngs=rngs))
        prev = int(width) * blocks.Bottleneck.expansion
      setattr(self, f"layer{s + 1}", nnx.List(layer))
    self.num_stages = len(spec.channels)
    self.fc = Linear(prev, spec.num_classes, rngs=rngs)
    self.deterministic = False
    self.activation_dtype = ""

  def __call__(self, x):
    _check_images(x, self.spec.in_channels)
    x = _to_activation_dtype(x, self.activation_dtype)
    x = max_pool_3x3(jnp.maximum(self.bn1(self.conv1(x)), 0))
    for s in range(self.num_stages):
      for block in getattr(self, f"layer{s + 1}"):
        x = block(x)
    return self.fc(global_avg_pool(x))


def _check_images(x, channels):
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"expected NHWC images with {channels} channels, got shape "
                     f"{tuple(x.shape)} (NCHW input must be transposed to NHWC)")


def _to_activation_dtype(x, dtype: str):
  return x.astype(dtype) if dtype else x


def set_dtype_policy(model: nnx.Module, policy: str) -> nnx.Module:
  """Makes `model` (BCDNet or ResNet50) compute under `policy` (see ModelSpec); in place.

  'float32' and 'tf32' leave the input's type alone, so a model cast to float64 computes
  in float64; 'bfloat16' casts the images to bfloat16 on entry and every layer keeps it.
  Every conv and dense layer gets the policy's product precision (`POLICY_PRECISION`).
  """
  if policy not in DTYPE_POLICIES:
    raise ValueError(f"dtype_policy must be one of {DTYPE_POLICIES}, got {policy!r}")
  resolved = resolve_dtype_policy(policy)
  model.activation_dtype = "bfloat16" if resolved == "bfloat16" else ""
  model.set_attributes(precision=POLICY_PRECISION[resolved], raise_if_not_found=False)
  return model


def _construct(spec: ModelSpec, seed) -> nnx.Module:
  if spec.family == "custom":
    model = build_custom(spec, seed)
  else:
    cls = ResNet50 if spec.family == "resnet50" else BCDNet
    model = cls(spec, rngs=nnx.Rngs(seed))
  dtype = resolve_compute_dtype(spec.compute_dtype)
  if dtype != "float32":
    model.set_attributes(compute_dtype=dtype, raise_if_not_found=False)
  return set_dtype_policy(model, spec.dtype_policy)


def build(spec: ModelSpec, *, seed: int = 0) -> nnx.Module:
  """Instantiates the model a spec describes (training mode)."""
  spec.validate()
  return _construct(spec, seed)


def create_model(name: str, *, stage: int = 2, num_classes: int = 1000, seed: int = 0,
                 **overrides) -> nnx.Module:
  """Builds model `name` ('bcdnet_a', 'bcdnet_b', 'reactnet_a', 'reactnet_r18',
  'bcdnet_a_r18', 'bcdnet_b_r18', 'resnet50') for `stage` 1 or 2.

  Overrides are ModelSpec fields (channels, blocks_per_stage, mlp_groups, mlp_group,
  shift_mode, dynamic*, ...) plus `mlp_width` (the width of the last block and the MLP
  stage). Returned in training mode; call `.eval()` for inference.
  """
  return build(get_spec(name, stage=stage, num_classes=num_classes, **overrides),
               seed=seed)


def abstract_model(spec: ModelSpec) -> nnx.Module:
  """The model with shapes only (no allocation), for counting and restoring."""
  return nnx.eval_shape(lambda: _construct(spec, 0))



def check_image_size(spec: ModelSpec, image_size: int, name: str = "config.image_size") -> None:
  """Fails before any compilation when the model's strides cannot take `image_size` px
  images (an abstract trace of the evaluation forward; no weights allocated).

  Raises:
    errors.ConfigError: naming `name`, the size and the model's block strides.
  """
  model = abstract_model(spec)
  model.eval()
  try:
    nnx.eval_shape(lambda m, x: m(x), model,
                   jax.ShapeDtypeStruct((1, image_size, image_size, spec.in_channels),
                                        jnp.float32))
  except (TypeError, ValueError) as e:
    arch = (spec.builder if spec.family == "custom"
            else f"{spec.family} {list(block_strides(spec))}")
    raise errors.ConfigError(f"{name}: {image_size} px images do not fit the strides of "
                             f"{arch}: "
                             f"{str(e).splitlines()[0][:200]}") from None

def cast_floating(model: nnx.Module, dtype) -> nnx.Module:
  """A copy of `model` whose floating parameters and statistics are `dtype`.

  For float64 (the precision in which two implementations of a binary network can be
  compared without sign flips) call it inside `jax.enable_x64(True)`; the model then
  computes in float64 throughout (tested against the torch reference in float64).
  """
  def cast(a):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return a
    if isinstance(a, jax.ShapeDtypeStruct):  # an abstract model
      return jax.ShapeDtypeStruct(a.shape, dtype)
    return a.astype(dtype)

  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(cast, state))


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (BN running statistics excluded)."""
  state = nnx.state(model, nnx.Param)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))

