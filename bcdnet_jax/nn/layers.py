"""Layers of BCDNet in NHWC: learnable bias, RPReLU, (binary) convolutions, BatchNorm.

Everything here computes exactly what the released PyTorch layer computes (up to the
NCHW -> NHWC layout), so converted checkpoints reproduce the authors' outputs.

Mixed precision (`ModelSpec.dtype_policy`): every layer returns its input's dtype, so a
model whose input is cast to bfloat16 stores bfloat16 activations between layers, while
parameters stay float32 and each layer computes its element-wise math and reductions in
`compute_type(x)` (at least float32). In float32 and float64 nothing is cast.

Precision of products: every convolution and matrix product (forward, and the backward
products of the custom VJPs) takes the `precision` of its layer, 'highest' (true float32:
XLA's default computes float32 products as TF32 on NVIDIA GPUs since Ampere and with
bfloat16 passes on TPUs; CPUs compute float32 either way) or 'default' (the backend's
choice). `models.set_dtype_policy` sets it from the policy: 'float32' -> 'highest',
'tf32' and 'bfloat16' -> 'default'. Integer products have no precision.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bcdnet_jax.nn import quantizers as binarize

# PyTorch's default init for conv and linear weights: kaiming_uniform(a=sqrt(5)), which is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_bias_init(fan_in):
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


PRECISIONS = ("highest", "default")


def lax_precision(name: str):
  """'highest' -> `jax.lax.Precision.HIGHEST` (true float32 products on every backend);
  'default' -> None (the backend's default, or `jax_default_matmul_precision` if set)."""
  if name not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
  return jax.lax.Precision.HIGHEST if name == "highest" else None


def _float_precision(dtype, precision: str):
  """The lax precision for products of `dtype` operands: `precision` for float32 and
  float64; None for integers and for bfloat16 / float16 operands (one pass is exact
  for them already; the mixed policy stays as it was)."""
  if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize >= 4:
    return lax_precision(precision)
  return None


def compute_type(x):
  """The type a layer computes in for activations `x`: float32 for bfloat16 / float16
  storage, the activations' own type otherwise (float32, or float64 for comparisons)."""
  return jnp.promote_types(x.dtype, jnp.float32)


# The default kernel init of `QuantConv` / `QuantDense` for fresh networks: torch's default,
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), symmetric about 0 (every weight inside the clipped
# STE's band |W| <= 1 at any fan-in >= 1).
default_kernel_init = torch_default_init


def binary_weight_init(key, shape, dtype=jnp.float32):
  """The released binary convs start at U(0, 0.001); used for fresh stage-2 weights."""
  return jax.random.uniform(key, shape, dtype, 0.0, 1e-3)


class LearnableBias(nnx.Module):
  """x + b per channel (the RSign threshold / RPReLU shifts; torch `moveN`)."""

  def __init__(self, features: int):
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

  def __call__(self, x):
    return (x + self.bias[...]).astype(x.dtype)


class PReLU(nnx.Module):
  """Per-channel PReLU with torch's initial slope 0.25."""

  def __init__(self, features: int, init_slope: float = 0.25):
    self.slope = nnx.Param(jnp.full((features,), init_slope, jnp.float32))

  def __call__(self, x):
    if compute_type(x) != x.dtype:  # bfloat16 activations: keep them narrow for the backward
      return prelu_mixed(x, self.slope[...])
    return jnp.where(x >= 0, x, self.slope[...] * x)


@jax.custom_vjp
def prelu_mixed(x, slope):
  """PReLU of bfloat16 x with a float32 slope, computed in float32.

  Autodiff of the float32 formula would save x converted to float32 for the slope's
  gradient (a third of the mixed policy's saved activations, measured with
  `jax.ad_checkpoint.print_saved_residuals`); this saves x as it is.
  """
  xf = x.astype(compute_type(x))
  return jnp.where(xf >= 0, xf, slope * xf).astype(x.dtype)


def _prelu_mixed_fwd(x, slope):
  return prelu_mixed(x, slope), (x, slope)


def _prelu_mixed_bwd(res, g):
  x, slope = res
  ct = compute_type(x)
  xf, gf = x.astype(ct), g.astype(ct)
  neg = xf < 0
  gx = jnp.where(neg, slope * gf, gf)
  gslope = jnp.sum(jnp.where(neg, gf * xf, 0), axis=tuple(range(x.ndim - 1)))
  return gx.astype(x.dtype), gslope.astype(slope.dtype)


prelu_mixed.defvjp(_prelu_mixed_fwd, _prelu_mixed_bwd)


class RPReLU(nnx.Module):
  """ReActNet's RPReLU: shift, per-channel PReLU, shift."""

  def __init__(self, features: int):
    self.shift_in = LearnableBias(features)
    self.prelu = PReLU(features)
    self.shift_out = LearnableBias(features)

  def __call__(self, x):
    return self.shift_out(self.prelu(self.shift_in(x)))


class BatchNorm(nnx.Module):
  """BatchNorm over all axes but the last, with torch's semantics.

  eps 1e-5, momentum 0.1 in torch terms, normalisation with the biased batch variance
  but the running variance updated with the unbiased one (n / (n - 1)), which is where
  Flax's own BatchNorm differs. `count` is torch's `num_batches_tracked`. Under `jax.jit`
  with a sharded batch the mean is over the global batch (what SyncBN gave the authors).
  """

  def __init__(self, features: int, *, eps: float = 1e-5, momentum: float = 0.1):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.eps = eps
    self.momentum = momentum
    self.use_running_average = False

  def __call__(self, x):
    if self.use_running_average:
      inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
      return ((x - self.mean[...]) * inv + self.bias[...]).astype(x.dtype)
    y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.eps)
    n = x.size // x.shape[-1]
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
    self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    self.count[...] = self.count[...] + 1
    return y


def _bn_stats(x):
  """Per-channel mean and biased variance, in `compute_type(x)`."""
  axes = tuple(range(x.ndim - 1))
  x = x.astype(compute_type(x))
  mean = jnp.mean(x, axis=axes)
  return mean, jnp.mean(jnp.square(x - mean), axis=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, eps: float):
  """Training-mode BN over all axes but the last: (y, batch mean, biased batch variance).

  The backward is the closed form (two per-channel sums, then one element-wise pass),
  instead of autodiff through mean and variance, which XLA:CPU turned into several
  re-reads of the activations per BN. mean and var are statistics for the running
  averages: their cotangents are ignored (callers stop their gradient). y has x's dtype;
  statistics and arithmetic are in `compute_type(x)`, so bfloat16 activations are saved
  for the backward as they are, not as a float32 copy.
  """
  mean, var = _bn_stats(x)
  y = (x.astype(mean.dtype) - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias
  return y.astype(x.dtype), mean, var


def _bn_fwd(x, scale, bias, eps):
  mean, var = _bn_stats(x)
  rstd = jax.lax.rsqrt(var + eps)
  y = (x.astype(mean.dtype) - mean) * (rstd * scale) + bias
  return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale)


def _bn_bwd(eps, res, cts):
  x, mean, rstd, scale = res
  ct = mean.dtype
  g = cts[0].astype(ct)
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xhat = (x.astype(ct) - mean) * rstd
  gbias = jnp.sum(g, axis=axes)
  gscale = jnp.sum(g * xhat, axis=axes)
  gx = (scale * rstd) * (g - gbias / n - xhat * (gscale / n))
  return gx.astype(x.dtype), gscale.astype(scale.dtype), gbias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def _pointwise(kernel, padding: int) -> bool:
  return kernel.shape[0] == kernel.shape[1] == 1 and padding == 0


def conv(x, kernel, stride: int, padding: int, acc=None, precision: str = "highest"):
  """NHWC x HWIO cross-correlation, formulated the way XLA:CPU runs fastest.

  A 1x1 convolution is a matrix product over tokens, and XLA:CPU runs it as `dot` 1.4-4x
  faster than as a convolution (bench: 7x7x1024 token-wise MLPs 54 -> 99 GFLOP/s in
  float32, 86 -> 121 GOP/s in int8). `acc` is the accumulation type (int32 for int8).
  A real kernel is cast to the activations' type (bfloat16 under the mixed policy; the
  backends accumulate bfloat16 products in float32). `precision`: 'highest' or 'default'
  (`lax_precision`), ignored for integer operands.
  """
  if kernel.dtype != x.dtype and jnp.issubdtype(x.dtype, jnp.floating):
    kernel = kernel.astype(x.dtype)
  prec = _float_precision(x.dtype, precision)
  if _pointwise(kernel, padding):
    xs = x[:, ::stride, ::stride] if stride > 1 else x
    n, h, w, c = xs.shape
    y = jax.lax.dot_general(xs.reshape(n * h * w, c), kernel.reshape(c, -1),
                            (((1,), (0,)), ((), ())), precision=prec,
                            preferred_element_type=acc)
    return y.reshape(n, h, w, -1)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=prec,
      preferred_element_type=acc)


def conv_input_grad(g, kernel, in_shape, stride: int, padding: int,
                    precision: str = "highest"):
  """dL/dx of `conv` for the output gradient g (the transposed convolution).

  1x1: g W^T as one matrix product (no kernel transpose). Strided k x k on CPU: one
  product g W^T giving every tap's contribution, placed at stride with interior-padded
  adds; XLA:CPU's own transposed conv dilates g with zeros and ran 1.4-2x slower there.
  Unit stride, and strided convs on accelerators, keep XLA's transposed conv.
  """
  k = kernel.shape[0]
  n, ho, wo, o = g.shape
  _, h, w, c = in_shape
  zero = jnp.zeros((), g.dtype)
  if not _pointwise(kernel, padding) and (stride == 1 or jax.default_backend() != "cpu"):
    _, vjp = jax.vjp(lambda x: conv(x, kernel, stride, padding, precision=precision),
                     jnp.zeros(in_shape, g.dtype))
    return vjp(g)[0]  # the transposed conv keeps the forward's precision
  taps = jax.lax.dot_general(g.reshape(-1, o), kernel.astype(g.dtype).reshape(-1, o),
                             (((1,), (1,)), ((), ())),
                             precision=_float_precision(g.dtype, precision),
                             preferred_element_type=g.dtype)
  taps = taps.reshape(n, ho, wo, k, k, c)
  # Canvas row i is input row i - padding; tap (dy, dx) of output (y, x) lands on
  # canvas (stride * y + dy, stride * x + dx).
  hc = max(stride * (ho - 1) + k, h + padding)
  wc = max(stride * (wo - 1) + k, w + padding)
  out = None
  for dy in range(k):
    for dx in range(k):
      placed = jax.lax.pad(taps[:, :, :, dy, dx], zero, (
          (0, 0, 0), (dy, hc - dy - stride * (ho - 1) - 1, stride - 1),
          (dx, wc - dx - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
      out = placed if out is None else out + placed
  return out[:, padding:padding + h, padding:padding + w]


def conv_weight_grad(x, g, kernel_size: int, stride: int, padding: int,
                     precision: str = "highest"):
  """dL/dW of `conv` as kernel_size^2 matrix products x_shifted^T g.

  The same sum as XLA's own weight-gradient convolution, which XLA:CPU runs 2-7x slower
  (measured with bench/train_step.py: 6.15 -> 4.63 s per full-size step on this CPU).
  Accumulated and returned in `compute_type(g)`: a bfloat16 policy never rounds a
  weight gradient to bfloat16.
  """
  acc = compute_type(g)
  prec = _float_precision(g.dtype, precision)
  _, _, _, c = x.shape
  _, ho, wo, o = g.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  g2 = g.reshape(-1, o)
  taps = []
  for dy in range(kernel_size):
    for dx in range(kernel_size):
      xs = xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
      taps.append(jax.lax.dot_general(xs.reshape(-1, c), g2, (((0,), (0,)), ((), ())),
                                      precision=prec, preferred_element_type=acc))
  return jnp.stack(taps).reshape(kernel_size, kernel_size, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, kernel, stride: int = 1, padding: int = 0, precision: str = "highest"):
  """NHWC x HWIO cross-correlation with symmetric zero padding (torch's Conv2d).

  Its gradient is the exact one, computed by `conv_input_grad` and `conv_weight_grad`
  (formulations XLA:CPU runs faster than autodiff of its convolution), with the forward's
  `precision` ('highest' or 'default', see `lax_precision`).
  """
  return conv(x, kernel, stride, padding, precision=precision)


def _conv2d_fwd(x, kernel, stride, padding, precision):
  return conv(x, kernel, stride, padding, precision=precision), (x, kernel)


def _conv2d_bwd(stride, padding, precision, res, g):
  x, kernel = res
  gx = conv_input_grad(g, kernel, x.shape, stride, padding, precision)
  gw = conv_weight_grad(x, g, kernel.shape[0], stride, padding, precision)
  return gx.astype(x.dtype), gw.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nnx.Module):
  """Real-valued convolution without bias (stem, shortcuts, the ResNet-50 teacher)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int,
               stride: int = 1, padding: int = 0, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(torch_default_init(
        rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
    self.stride = stride
    self.padding = padding
    self.precision = "highest"  # set by models.set_dtype_policy

  def __call__(self, x):
    return conv2d(x, self.kernel[...], self.stride, self.padding, self.precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def binary_conv_lowp(x, kernel, stride, padding, dtype, precision="highest"):
  """conv(x, mean|W| * sign(W)) with the ±1 x ±1 products in `dtype` (int8 or bfloat16).

  x (values in {-1, 0, 1}) and sign(W) are exact in int8 and bfloat16, and their integer
  sums are exact in int32 (int8) or float32 (bfloat16, below 2^24 terms), so the result
  equals the float32 convolution up to the final per-channel scaling; only that rounds
  (and the cast to x's dtype, bfloat16 under the mixed policy).
  The backward is the float32 one (the released STE), recomputed from the saved operands,
  its products at `precision`.
  """
  acc = jnp.int32 if jnp.issubdtype(dtype, jnp.integer) else jnp.float32
  y = conv(x.astype(dtype), jnp.sign(kernel).astype(dtype), stride, padding, acc, precision)
  return (y.astype(jnp.float32) * binarize.weight_scale(kernel).reshape(-1)).astype(x.dtype)


def _binary_conv_lowp_fwd(x, kernel, stride, padding, dtype, precision):
  return binary_conv_lowp(x, kernel, stride, padding, dtype, precision), (x, kernel)


def _binary_conv_lowp_bwd(stride, padding, dtype, precision, res, g):
  x, kernel = res
  _, vjp = jax.vjp(lambda x, k: conv2d(x, binarize.binarize_weight(k), stride, padding,
                                       precision), x, kernel)
  return vjp(g)


binary_conv_lowp.defvjp(_binary_conv_lowp_fwd, _binary_conv_lowp_bwd)


def _lowp_ok(quantizer) -> bool:
  # The exact low-precision path (`binary_conv_lowp`) computes the scaled weight sign only.
  return quantizer is binarize.binarize_weight


class QuantConv(nnx.Module):
  """Convolution with optional input and kernel quantizers (larq's `QuantConv2D`), NHWC.

  y = conv(q_in(x), q_k(W)), no bias, W an HWIO `kernel` (kh, kw, in, out) float32.
  `input_quantizer` / `kernel_quantizer`: None (no quantization), a registered name
  ('approx', 'ste', 'identity', 'scaled_sign', see `quantizers`) or a callable of one
  array. A binary network usually signs activations in a separate `BinaryActivation` (with
  its learnable threshold) and gives the conv `kernel_quantizer='scaled_sign'`; the input
  quantizer is a convenience for the plain case. `kernel_init` defaults to
  `default_kernel_init`, symmetric about 0, so a fresh network's weight signs are mixed
  (the presets' `BinaryConv` keeps the released U(0, 1e-3) instead).
  `stride`, `padding` (symmetric zeros, torch's Conv2d) and `dilation` are ints; output
  size (H + 2 padding - dilation (k - 1) - 1) // stride + 1.

  Arithmetic: `compute_dtype` 'int8' (int32 accumulation) or 'bfloat16' computes the
  scaled-sign products exactly on low-precision operands (`binary_conv_lowp`); it assumes
  the conv's input holds only -1, 0, 1 (an input quantizer, or a sign before it). With
  bfloat16 activations (the mixed policy) 'float32' means bfloat16 operands.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 1,
               stride: int = 1, padding: int = 0, dilation: int = 1, *,
               input_quantizer=None, kernel_quantizer=None, kernel_init=None,
               rngs: nnx.Rngs):
    for name, v in (("in_features", in_features), ("out_features", out_features),
                    ("kernel_size", kernel_size), ("stride", stride),
                    ("dilation", dilation)):
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"QuantConv: {name} must be a positive int, got {v!r}")
    if not isinstance(padding, int) or padding < 0:
      raise ValueError(f"QuantConv: padding must be an int >= 0, got {padding!r}")
    init = kernel_init or default_kernel_init
    self.kernel = nnx.Param(init(
        rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
    self.stride = stride
    self.padding = padding
    self.dilation = dilation
    self.input_quantizer = binarize.get(input_quantizer)
    self.kernel_quantizer = binarize.get(kernel_quantizer)
    self.compute_dtype = "float32"
    self.precision = "highest"  # set by models.set_dtype_policy

  @property
  def binary_weights(self) -> bool:
    """Whether the kernel is quantized (the released stage 2)."""
    return self.kernel_quantizer is not None

  def weight(self):
    """The kernel the convolution uses: q_k(W), or W without a kernel quantizer."""
    w = self.kernel[...]
    return self.kernel_quantizer(w) if self.kernel_quantizer is not None else w

  def __call__(self, x):
    if self.input_quantizer is not None:
      x = self.input_quantizer(x)
    if self.dilation != 1:
      return _dilated_conv(x, self.weight(), self.stride, self.padding, self.dilation,
                           self.precision)
    operands = self.compute_dtype
    if operands == "float32" and jnp.dtype(x.dtype).itemsize < 4:
      operands = x.dtype  # ±1 is exact in bfloat16 / float16: no float32 copy
    if _lowp_ok(self.kernel_quantizer) and operands != "float32":
      return binary_conv_lowp(x, self.kernel[...], self.stride, self.padding,
                              jnp.dtype(operands), self.precision)
    return conv2d(x, self.weight(), self.stride, self.padding, self.precision)


def _dilated_conv(x, kernel, stride, padding, dilation, precision):
  """Dilated NHWC x HWIO convolution (autodiff gradient: no model of the project uses it)."""
  if kernel.dtype != x.dtype and jnp.issubdtype(x.dtype, jnp.floating):
    kernel = kernel.astype(x.dtype)
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=_float_precision(x.dtype, precision))


class BinaryConv(QuantConv):
  """The presets' binary convolution: a `QuantConv` as released.

  Stage 2 (`binary_weights=True`): kernel quantizer 'scaled_sign' (mean|W| * sign(W) per
  output channel, clipped STE) and the released U(0, 1e-3) start; stage 1: real weights
  with torch's default init. The parameter is the same real `kernel` in both stages, so a
  stage-1 state loads into a stage-2 model unchanged. The input is expected to be binary
  already (the block's `BinaryActivation` signs it, shared by several convs).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 1,
               stride: int = 1, padding: int = 0, *, binary_weights: bool,
               rngs: nnx.Rngs):
    super().__init__(in_features, out_features, kernel_size, stride, padding,
                     kernel_quantizer="scaled_sign" if binary_weights else None,
                     kernel_init=binary_weight_init if binary_weights else torch_default_init,
                     rngs=rngs)


class Linear(nnx.Module):
  """Dense layer with torch's default init; `kernel` is (in, out)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               kernel_init=None, rngs: nnx.Rngs):
    init = kernel_init or torch_default_init
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))
    self.bias = (nnx.Param(_torch_bias_init(in_features)(rngs.params(), (out_features,)))
                 if use_bias else None)
    self.precision = "highest"  # set by models.set_dtype_policy

  def __call__(self, x):
    with jax.named_scope("dense"):  # kept float32 under the mixed policy (tests look for it)
      y = jnp.matmul(x, self.kernel[...], precision=_float_precision(x.dtype, self.precision))
      return y + self.bias[...] if self.bias is not None else y


class QuantDense(nnx.Module):
  """Dense layer with optional input and kernel quantizers (larq's `QuantDense`).

  y = q_in(x) @ q_k(W) + b, `kernel` (in, out) float32, `bias` (out,) or None. The
  quantizers are as in `QuantConv` ('scaled_sign' scales per output unit, over `in`);
  `kernel_init` defaults to `default_kernel_init` (symmetric). x: (..., in) -> (..., out).
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               input_quantizer=None, kernel_quantizer=None, kernel_init=None,
               rngs: nnx.Rngs):
    init = kernel_init or default_kernel_init
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))
    self.bias = (nnx.Param(_torch_bias_init(in_features)(rngs.params(), (out_features,)))
                 if use_bias else None)
    self.input_quantizer = binarize.get(input_quantizer)
    self.kernel_quantizer = binarize.get(kernel_quantizer)
    self.precision = "highest"  # set by models.set_dtype_policy

  @property
  def binary_weights(self) -> bool:
    return self.kernel_quantizer is not None

  def __call__(self, x):
    if self.input_quantizer is not None:
      x = self.input_quantizer(x)
    w = self.kernel[...]
    if self.kernel_quantizer is not None:
      w = self.kernel_quantizer(w)
    y = jnp.matmul(x, w.astype(x.dtype), precision=_float_precision(x.dtype, self.precision))
    return y + self.bias[...] if self.bias is not None else y


def avg_pool_2x2(x):
  """2x2 average pooling, stride 2, floor mode (torch's AvgPool2d(2, 2))."""
  return nnx.avg_pool(x.astype(compute_type(x)), (2, 2), strides=(2, 2),
                      padding="VALID").astype(x.dtype)


def max_pool_3x3(x):
  """3x3 max pooling, stride 2, padding 1 (torch's MaxPool2d(3, 2, 1))."""
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def group_shift(x, shift_h: int, shift_w: int):
  """Circular shift of four channel groups: +h, -h along H, +w, -w along W.

  The channels split into 4 equal consecutive groups g0..g3; g0 rolls by +shift_h along
  H, g1 by -shift_h, g2 by +shift_w along W, g3 by -shift_w, with wrap-around (torch.roll:
  the element at index i moves to i + shift). This is the released long/short-range
  token mixing; the paper's figure draws zero padding, the released code wraps.
  """
  c = x.shape[-1]
  if c % 4:
    raise ValueError(f"group_shift needs channels divisible by 4, got {c}")
  g0, g1, g2, g3 = jnp.split(x, 4, axis=-1)
  return jnp.concatenate([
      jnp.roll(g0, shift_h, axis=1), jnp.roll(g1, -shift_h, axis=1),
      jnp.roll(g2, shift_w, axis=2), jnp.roll(g3, -shift_w, axis=2)], axis=-1)


def long_range_shifts(mode: str | int, height: int, width: int) -> tuple[int, int]:
  """The long-range shift: 3 as released, (h//2, w//2) as in the paper, or an int."""
  if mode == "released":
    return 3, 3
  if mode == "paper":
    return height // 2, width // 2
  if isinstance(mode, int) and not isinstance(mode, bool):
    return mode, mode
  raise ValueError(f"unknown shift mode {mode!r}; expected 'released', 'paper' or an int")


def global_avg_pool(x):
  """Mean over tokens in `compute_type(x)`: features reach the heads in float32."""
  return jnp.mean(x.astype(compute_type(x)), axis=(1, 2))


__all__: Sequence[str] = [
    "LearnableBias", "PReLU", "RPReLU", "BatchNorm", "Conv", "QuantConv", "BinaryConv",
    "QuantDense", "Linear", "default_kernel_init",
    "conv2d", "avg_pool_2x2", "max_pool_3x3", "group_shift", "long_range_shifts",
    "global_avg_pool",
]
