"""Quantizers: sign functions with surrogate gradients, and the scaled weight sign.

Every quantizer is a function of one array returning an array of the same shape and dtype,
written as a `jax.custom_vjp` so that its gradient is the documented surrogate and not
whatever autodiff of a formula gives. One registry holds them by name:

    name           forward                         backward (d out / d x)
    'approx'       sign(x)                         2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 else
    'ste'          sign(x)                         1 where |x| <= 1, 0 else (clipped STE)
    'identity'     sign(x)                         1 (plain straight-through)
    'scaled_sign'  mean|W| * sign(W) per output    1 where |W| <= 1, 0 else; no gradient
                   channel (last axis)             through the scale

`get(None | name | callable)` returns one (None means "no quantization"); `register(name)`
adds your own (a decorator).

sign(0) = 0, exactly as `torch.sign` in the released model (larq's `ste_sign` maps 0 to +1
instead). Exact zeros are rare in float inputs; the packed deploy runtime keeps them exact.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Union

import jax
import jax.numpy as jnp

Quantizer = Callable[[jax.Array], jax.Array]
QuantizerLike = Union[None, str, Quantizer]

QUANTIZERS: dict[str, Quantizer] = {}


def register(name: str, *aliases: str) -> Callable[[Quantizer], Quantizer]:
  """Decorator adding a quantizer to the registry under `name` (and `aliases`):

      @quantizers.register("my_sign")
      @jax.custom_vjp
      def my_sign(x): ...

  Raises ValueError if a name is taken by another function (re-registering the same
  function, as a module reload does, is allowed).
  """
  def deco(fn: Quantizer) -> Quantizer:
    if not callable(fn):
      raise TypeError(f"quantizer {name!r} must be callable, got {type(fn).__name__}")
    for n in (name, *aliases):
      if not isinstance(n, str) or not n:
        raise ValueError(f"quantizer names are non-empty strings, got {n!r}")
      old = QUANTIZERS.get(n)
      if old is not None and getattr(old, "__qualname__", None) != getattr(
          fn, "__qualname__", None):
        raise ValueError(f"quantizer name {n!r} is taken (by {old.__qualname__})")
      QUANTIZERS[n] = fn
    return fn
  return deco


def get(q: QuantizerLike) -> Quantizer | None:
  """The quantizer `q` names: None -> None (no quantization), a registered name -> its
  function, a callable -> itself. Raises ValueError for an unknown name (listing the
  registered ones) and TypeError for anything else."""
  if q is None or callable(q):
    return q
  if isinstance(q, str):
    try:
      return QUANTIZERS[q]
    except KeyError:
      raise ValueError(f"unknown quantizer {q!r}; expected one of {sorted(QUANTIZERS)} "
                       "or a callable (register your own with quantizers.register)") from None
  raise TypeError(f"a quantizer is None, a name or a callable, got {type(q).__name__}")


def name_of(q: QuantizerLike) -> str | None:
  """The registered name of quantizer `q` (the first one it was registered under), its
  `__name__` for an unregistered callable, None for None."""
  fn = get(q)
  if fn is None:
    return None
  for n, f in QUANTIZERS.items():
    if f is fn:
      return n
  return getattr(fn, "__name__", type(fn).__name__)


def _approx_sign_grad(x):
  # Derivative of the piecewise polynomial ApproxSign (Bi-Real / ReActNet):
  # 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere.
  return jnp.where((x >= -1) & (x < 0), 2 + 2 * x,
                   jnp.where((x >= 0) & (x < 1), 2 - 2 * x, 0)).astype(x.dtype)


@register("approx", "approx_sign")
@jax.custom_vjp
def approx_sign(x):
  """ApproxSign (Bi-Real / ReActNet), the released activation quantizer.

  forward:  q(x) = sign(x) in {-1, 0, 1} (sign(0) = 0)
  backward: dq/dx = 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere
  (the derivative of the piecewise polynomial 2x + x^2 / 2x - x^2 that approximates sign).
  x: any shape and float dtype; the result has x's shape and dtype.
  """
  return jnp.sign(x)


def _approx_sign_fwd(x):
  return jnp.sign(x), x


def _approx_sign_bwd(x, g):
  return (g * _approx_sign_grad(x),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


@register("ste", "ste_sign")
@jax.custom_vjp
def ste_sign(x):
  """Clipped straight-through sign (larq's `ste_sign`, except sign(0) = 0).

  forward:  q(x) = sign(x);  backward: dq/dx = 1 where |x| <= 1, 0 elsewhere.
  """
  return jnp.sign(x)


def _ste_sign_fwd(x):
  return jnp.sign(x), x


def _ste_sign_bwd(x, g):
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


@register("identity", "identity_sign")
@jax.custom_vjp
def identity_ste_sign(x):
  """Plain (unclipped) straight-through sign, for ablations.

  forward:  q(x) = sign(x);  backward: dq/dx = 1 everywhere.
  """
  return jnp.sign(x)


identity_ste_sign.defvjp(lambda x: (jnp.sign(x), None), lambda _, g: (g,))


# The activation signs of the presets' `ModelSpec.activation_sign`.
ACTIVATION_SIGNS: dict[str, Quantizer] = {
    "approx": approx_sign,
    "ste": ste_sign,
    "identity": identity_ste_sign,
}


def get_sign(name: str) -> Quantizer:
  """The preset activation sign called `name` (one of ACTIVATION_SIGNS)."""
  try:
    return ACTIVATION_SIGNS[name]
  except KeyError:
    raise ValueError(f"unknown sign function {name!r}; expected one of "
                     f"{sorted(ACTIVATION_SIGNS)}") from None


def weight_scale(w):
  """Per-output-channel scale mean|W| of a kernel whose last axis is the output channel
  (HWIO conv or (in, out) dense), keepdims, a constant for autodiff."""
  return jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=tuple(range(w.ndim - 1)),
                                        keepdims=True))


@register("scaled_sign", "binarize_weight")
@jax.custom_vjp
def binarize_weight(w):
  """The scaled weight sign (XNOR-Net / ReActNet), the released stage-2 kernel quantizer.

  forward:  q(W) = a * sign(W), a = mean|W| over all axes but the last (one scale per
            output channel; HWIO conv or (in, out) dense kernels)
  backward: dq/dW = 1 where |W| <= 1, 0 elsewhere (clipped STE), applied to the incoming
            gradient as it is: no gradient through a, and a not multiplied into the
            gradient either (the released one; the authors' numbers show this).
  """
  return weight_scale(w) * jnp.sign(w)


def _binarize_weight_fwd(w):
  return binarize_weight(w), w


def _binarize_weight_bwd(w, g):
  # -1 <= w <= 1 rather than |w| <= 1: the same set, and it leaves |w| to the scale's
  # reduction alone, which XLA then fuses instead of writing |w| out (bench/profile_step).
  return (jnp.where((w >= -1) & (w <= 1), g, jnp.zeros_like(g)),)


binarize_weight.defvjp(_binarize_weight_fwd, _binarize_weight_bwd)

scaled_sign = binarize_weight  # the name larq users look for


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
