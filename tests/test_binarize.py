import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcdnet_jax.nn import quantizers as binarize

# Exact zeros, the boundary points -1, 0, 1 and values on every piece.
X = np.array([-2.0, -1.0, -0.75, -0.5, -1e-7, 0.0, 1e-7, 0.25, 0.5, 0.999, 1.0, 1.5],
             np.float32)


def np_approx_grad(x):
  return np.where((x >= -1) & (x < 0), 2 + 2 * x, np.where((x >= 0) & (x < 1), 2 - 2 * x, 0))


@pytest.mark.parametrize("name", ["approx", "ste", "identity"])
def test_forward_is_torch_sign(name):
  f = binarize.get_sign(name)
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray(X))), np.sign(X))
  assert float(f(jnp.float32(0.0))) == 0.0  # sign(0) = 0 as torch.sign


def test_approx_sign_backward():
  g = jax.grad(lambda x: jnp.sum(binarize.approx_sign(x) * jnp.arange(1, 13)))(jnp.asarray(X))
  np.testing.assert_allclose(np.asarray(g), np_approx_grad(X) * np.arange(1, 13), rtol=1e-6)
  # The boundaries: 0 at -1, 2 at 0, 0 at 1 and outside.
  d = jax.grad(lambda x: binarize.approx_sign(x))
  assert [float(d(jnp.float32(v))) for v in (-1.0, 0.0, 1.0, -1.5)] == [0.0, 2.0, 0.0, 0.0]


def test_ste_sign_backward_clipped():
  g = jax.grad(lambda x: jnp.sum(binarize.ste_sign(x) * 3.0))(jnp.asarray(X))
  np.testing.assert_array_equal(np.asarray(g), np.where(np.abs(X) <= 1, 3.0, 0.0))


def test_identity_ste_backward():
  g = jax.grad(lambda x: jnp.sum(binarize.identity_ste_sign(x)))(jnp.asarray(X))
  np.testing.assert_array_equal(np.asarray(g), np.ones_like(X))


def test_binarize_weight_forward_and_backward():
  rng = np.random.default_rng(0)
  w = rng.normal(0, 0.8, (3, 3, 4, 5)).astype(np.float32)
  w[0, 0, 0, 0] = 0.0
  w[1, 1, 1, 1] = 1.0
  w[2, 2, 2, 2] = -1.0
  scale = np.abs(w).mean(axis=(0, 1, 2), keepdims=True)
  out = np.asarray(binarize.binarize_weight(jnp.asarray(w)))
  np.testing.assert_allclose(out, scale * np.sign(w), rtol=1e-6)
  assert out[0, 0, 0, 0] == 0.0
  # Backward: incoming gradient passes where |W| <= 1 (boundaries included), unscaled,
  # and nothing flows through the scale (as the authors' gradients show).
  probe = rng.normal(size=w.shape).astype(np.float32)
  g = jax.grad(lambda w: jnp.sum(binarize.binarize_weight(w) * probe))(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(g), np.where(np.abs(w) <= 1, probe, 0.0))
  assert (np.abs(w) > 1).any() and (np.asarray(g)[np.abs(w) > 1] == 0).all()


def test_weight_scale_is_constant():
  w = jnp.asarray(np.random.default_rng(1).normal(size=(1, 1, 3, 2)), jnp.float32)
  g = jax.grad(lambda w: jnp.sum(binarize.weight_scale(w)))(w)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_unknown_sign_name():
  with pytest.raises(ValueError, match="unknown sign function 'nope'"):
    binarize.get_sign("nope")
