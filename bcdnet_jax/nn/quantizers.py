"""Sign functions with surrogate gradients, and weight binarisation.

Forward passes are `jnp.sign`, so sign(0) = 0 exactly as `torch.sign` in the released
model. Only the backward passes differ, each written as a `jax.custom_vjp` so that the
gradient is the documented surrogate and not whatever autodiff of a formula gives.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp


def _approx_sign_grad(x):
  # Derivative of the piecewise polynomial ApproxSign (Bi-Real / ReActNet):
  # 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere.
  return jnp.where((x >= -1) & (x < 0), 2 + 2 * x,
                   jnp.where((x >= 0) & (x < 1), 2 - 2 * x, 0)).astype(x.dtype)


@jax.custom_vjp
def approx_sign(x):
  """Activation binarisation: sign forward, ApproxSign derivative backward."""
  return jnp.sign(x)


def _approx_sign_fwd(x):
  return jnp.sign(x), x


def _approx_sign_bwd(x, g):
  return (g * _approx_sign_grad(x),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


@jax.custom_vjp
def ste_sign(x):
  """Clipped straight-through sign: gradient 1 where |x| <= 1, else 0."""
  return jnp.sign(x)


def _ste_sign_fwd(x):
  return jnp.sign(x), x


def _ste_sign_bwd(x, g):
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


@jax.custom_vjp
def identity_ste_sign(x):
  """Plain (unclipped) straight-through sign, for ablations: gradient 1 everywhere."""
  return jnp.sign(x)


identity_ste_sign.defvjp(lambda x: (jnp.sign(x), None), lambda _, g: (g,))


ACTIVATION_SIGNS: dict[str, Callable] = {
    "approx": approx_sign,
    "ste": ste_sign,
    "identity": identity_ste_sign,
}


def get_sign(name: str) -> Callable:
  """Returns the sign function called `name` (one of ACTIVATION_SIGNS)."""
  try:
    return ACTIVATION_SIGNS[name]
  except KeyError:
    raise ValueError(f"unknown sign function {name!r}; expected one of "
                     f"{sorted(ACTIVATION_SIGNS)}") from None


def weight_scale(w):
  """Per-output-channel scale mean|W| of an HWIO kernel, a constant for autodiff."""
  return jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=(0, 1, 2), keepdims=True))


@jax.custom_vjp
def binarize_weight(w):
  """Stage-2 weight of an HWIO kernel: mean|W| per output channel * sign(W).

  Backward is the released one: the clipped straight-through estimator applied to the
  incoming gradient as it is, g * 1{|W| <= 1}, with no gradient through the scale and
  the scale not multiplied into the gradient either (the authors' numbers show this).
  """
  return weight_scale(w) * jnp.sign(w)


def _binarize_weight_fwd(w):
  return binarize_weight(w), w


def _binarize_weight_bwd(w, g):
  # -1 <= w <= 1 rather than |w| <= 1: the same set, and it leaves |w| to the scale's
  # reduction alone, which XLA then fuses instead of writing |w| out (bench/profile_step).
  return (jnp.where((w >= -1) & (w <= 1), g, jnp.zeros_like(g)),)


binarize_weight.defvjp(_binarize_weight_fwd, _binarize_weight_bwd)


# --- observing binary activations -------------------------------------------------------------

_RECORDERS: list[tuple[list, bool]] = []


@contextlib.contextmanager
def record_sign_inputs(with_sites: bool = False):
  """Collects the input of every binary activation's sign computed while active.

  Used to count the binary activations that flip between two precisions of the same
  model (`convert.self_check`), and by `bcdnet_jax.train.diagnostics` (`with_sites=True`: the
  list holds (module, input) pairs, the module being the `BinaryActivation` that signs);
  under `jit` the list holds tracers, to be returned.
  """
  rec: list = []
  entry = (rec, with_sites)
  _RECORDERS.append(entry)
  try:
    yield rec
  finally:
    _RECORDERS.remove(entry)


def observe_sign_input(x, site=None):
  """Hands `x`, the input of a sign at `site` (its module), to the active recorders."""
  for rec, with_sites in _RECORDERS:
    rec.append((site, x) if with_sites else x)
  return x
