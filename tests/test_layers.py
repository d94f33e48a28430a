import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bcdnet_jax.nn import layers


def test_batchnorm_matches_torch_semantics():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (4, 5, 5, 6)).astype(np.float32)
  bn = layers.BatchNorm(6)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
  y = np.asarray(bn(jnp.asarray(x)))
  mean = x.mean(axis=(0, 1, 2))
  var_b = x.var(axis=(0, 1, 2))  # biased: used to normalise
  n = 4 * 5 * 5
  expected = ((x - mean) / np.sqrt(var_b + 1e-5) * np.asarray(bn.scale[...])
              + np.asarray(bn.bias[...]))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  # running statistics: momentum 0.1, running_var updated with the UNBIASED variance
  np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * var_b * n / (n - 1), rtol=1e-5)
  assert int(bn.count[...]) == 1
  # evaluation uses the running statistics and changes nothing
  bn.use_running_average = True
  before = np.asarray(bn.mean[...])
  y_eval = np.asarray(bn(jnp.asarray(x)))
  np.testing.assert_allclose(
      y_eval, (x - before) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
      * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), before)
  assert int(bn.count[...]) == 1


def test_module_eval_switches_batchnorm():
  m = layers.BatchNorm(3)
  m.eval()
  assert m.use_running_average
  m.train()
  assert not m.use_running_average


def np_group_shift(x, sh, sw):
  g = np.split(x, 4, axis=-1)
  return np.concatenate([np.roll(g[0], sh, 1), np.roll(g[1], -sh, 1),
                         np.roll(g[2], sw, 2), np.roll(g[3], -sw, 2)], axis=-1)


@pytest.mark.parametrize("sh,sw", [(1, 1), (3, 3), (2, 1), (0, 0)])
def test_group_shift_is_circular(sh, sw):
  x = np.arange(2 * 5 * 6 * 8, dtype=np.float32).reshape(2, 5, 6, 8)
  got = np.asarray(layers.group_shift(jnp.asarray(x), sh, sw))
  np.testing.assert_array_equal(got, np_group_shift(x, sh, sw))
  # torch.roll semantics: the element at index i moves to i + shift (with wrap-around)
  assert got[0, (0 + sh) % 5, 0, 0] == x[0, 0, 0, 0]
  # group 1 moves the other way along H; groups 2 and 3 move along W
  assert got[0, (0 - sh) % 5, 0, 2] == x[0, 0, 0, 2]
  assert got[0, 0, (0 + sw) % 6, 4] == x[0, 0, 0, 4]
  assert got[0, 0, (0 - sw) % 6, 6] == x[0, 0, 0, 6]


def test_group_shift_needs_four_groups():
  with pytest.raises(ValueError, match="divisible by 4"):
    layers.group_shift(jnp.zeros((1, 3, 3, 6)), 1, 1)


def test_long_range_shift_modes():
  assert layers.long_range_shifts("released", 7, 7) == (3, 3)
  assert layers.long_range_shifts("released", 3, 3) == (3, 3)  # wraps fully at 3x3
  assert layers.long_range_shifts("paper", 7, 7) == (3, 3)
  assert layers.long_range_shifts("paper", 14, 6) == (7, 3)
  assert layers.long_range_shifts(2, 7, 7) == (2, 2)
  with pytest.raises(ValueError, match="unknown shift mode"):
    layers.long_range_shifts("zeros", 7, 7)


def test_learnable_bias_prelu_rprelu():
  x = jnp.asarray(np.linspace(-2, 2, 12, dtype=np.float32).reshape(1, 1, 3, 4))
  r = layers.RPReLU(4)
  r.shift_in.bias[...] = jnp.asarray([0.1, -0.2, 0.3, 0.0])
  r.prelu.slope[...] = jnp.asarray([0.25, 0.1, 0.5, 1.0])
  r.shift_out.bias[...] = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  h = np.asarray(x) + np.array([0.1, -0.2, 0.3, 0.0])
  expected = np.where(h >= 0, h, np.array([0.25, 0.1, 0.5, 1.0]) * h) + np.array([1, 2, 3, 4])
  np.testing.assert_allclose(np.asarray(r(x)), expected, rtol=1e-6)
  assert float(layers.PReLU(1).slope[...][0]) == 0.25  # torch's initial slope


def test_conv2d_matches_torch_conv():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 9, 9)).astype(np.float32)
  w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
  expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                        stride=2, padding=1).numpy()
  got = layers.conv2d(jnp.asarray(x.transpose(0, 2, 3, 1)),
                      jnp.asarray(w.transpose(2, 3, 1, 0)), 2, 1)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-5)


def test_binary_conv_same_parameter_in_both_stages():
  x = jnp.sign(jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 3)), jnp.float32))
  c1 = layers.BinaryConv(3, 2, 3, 1, 1, binary_weights=False, rngs=nnx.Rngs(0))
  c2 = layers.BinaryConv(3, 2, 3, 1, 1, binary_weights=True, rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(c1)) == jax.tree.structure(nnx.state(c2))
  # fresh stage-2 weights start at U(0, 0.001) as released
  k = np.asarray(c2.kernel[...])
  assert (k >= 0).all() and (k <= 1e-3).all()
  w = np.asarray(c1.kernel[...])
  c2.kernel[...] = jnp.asarray(w)
  wb = np.abs(w).mean(axis=(0, 1, 2), keepdims=True) * np.sign(w)
  np.testing.assert_allclose(np.asarray(c2(x)), np.asarray(layers.conv2d(x, wb, 1, 1)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(c1(x)), np.asarray(layers.conv2d(x, w, 1, 1)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_low_precision_binary_conv_equals_float32_forward_and_gradients(dtype):
  rng = np.random.default_rng(3)
  x = jnp.sign(jnp.asarray(rng.normal(size=(2, 6, 6, 8)), jnp.float32))
  x = x.at[0, 0, 0, 0].set(0.0)  # sign(0) = 0 activations too
  conv = layers.BinaryConv(8, 16, 3, 1, 1, binary_weights=True, rngs=nnx.Rngs(0))
  conv.kernel[...] = jnp.asarray(rng.normal(0, 0.7, (3, 3, 8, 16)), jnp.float32)
  low = nnx.clone(conv)
  low.compute_dtype = dtype
  probe = jnp.asarray(rng.normal(size=(2, 6, 6, 16)), jnp.float32)

  def run(c):
    gc, gx = nnx.grad(lambda c, x: jnp.sum(c(x) * probe), argnums=(0, 1))(c, x)
    return np.asarray(c(x)), [np.asarray(gc.kernel[...]), np.asarray(gx)]

  y32, g32 = run(conv)
  y16, g16 = run(low)
  assert jnp.dtype(y16.dtype) == jnp.float32
  # the ±1 sums are exact integers in both; only the final scaling may round differently
  np.testing.assert_allclose(y16, y32, rtol=1e-6, atol=1e-6)
  for a, b in zip(g16, g32):
    np.testing.assert_array_equal(a, b)  # backward is the float32 one


@pytest.mark.parametrize("k,stride,padding",
                         [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3), (3, 2, 0)])
def test_conv2d_gradients_equal_xla_native(k, stride, padding):
  """conv2d's formulations (1x1 as matrix products, strided input gradients as placed
  taps, weight gradients as shifted products) are the exact convolution and gradient:
  equal to XLA's convolution and its autodiff up to summation order."""
  rng = np.random.default_rng(k + stride)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
  native = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = native(x, w)
  probe = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  want = jax.grad(lambda x, w: jnp.sum(native(x, w) * probe), argnums=(0, 1))(x, w)
  got = jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, stride, padding) * probe),
                 argnums=(0, 1))(x, w)
  np.testing.assert_allclose(np.asarray(layers.conv2d(x, w, stride, padding)),
                             np.asarray(y), rtol=1e-6, atol=1e-5)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_batch_norm_closed_form_backward_equals_autodiff():
  """batch_norm_train's hand-written backward is the gradient of its forward formula."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(3, 4, 5, 6)), jnp.float32)
  scale = jnp.asarray(rng.normal(size=6), jnp.float32)
  bias = jnp.asarray(rng.normal(size=6), jnp.float32)
  probe = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def reference(x, scale, bias):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias

  y, mean, var = layers.batch_norm_train(x, scale, bias, 1e-5)
  np.testing.assert_allclose(np.asarray(y), np.asarray(reference(x, scale, bias)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(var), np.asarray(x).var(axis=(0, 1, 2)), rtol=1e-5)
  want = jax.grad(lambda *a: jnp.sum(reference(*a) * probe), argnums=(0, 1, 2))(x, scale, bias)
  got = jax.grad(lambda *a: jnp.sum(layers.batch_norm_train(*a, 1e-5)[0] * probe),
                 argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
