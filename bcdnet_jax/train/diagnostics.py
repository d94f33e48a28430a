"""What binarisation is doing during training: per-layer statistics computed on device in
the training step, written to TensorBoard and `workdir/diagnostics.jsonl`, with warnings
when a layer's weights freeze or churn or its activations lose their balance.

Per binary convolution (every `QuantConv`, `BinaryConv` among them, of any model built from
`bcdnet_jax.nn`, named as in `bcdnet-summary`'s table; the weight statistics for those with
a kernel quantizer):

- `flip_ratio` (stage 2): the fraction of the binary weight's signs sign(W) in {-1, 0, 1}
  that differ from those at the previous diagnostics step (at the first one: from the
  weights the run started or resumed with). The previous signs are kept on device as int8,
  a quarter of a float copy of the weights.
- `clip_fraction` (stage 2): the fraction of latent weights with |W| > 1, which the
  clipped straight-through estimator gives no gradient (`binarize.binarize_weight`).
- `scale_mean`, `scale_min`, `scale_max` (stage 2): the per-output-channel scale mean|W|
  that multiplies sign(W) (`binarize.weight_scale`); the channels' values also go to a
  TensorBoard histogram `diagnostics/<layer>/scale`.
- `grad_norm`: the L2 norm of the loss gradient with respect to the latent kernel.

Per sign of activations (`BinaryActivation`, the module path, e.g. `features.1.act1`),
over the whole global batch of the step:

- `pos_fraction`: the fraction of inputs x > 0, i.e. of outputs +1 (the sign balance);
- `band_fraction`: the fraction with |x| < 1, where ApproxSign's (and the clipped STE's)
  gradient is non-zero (ReActNet / Bi-Real's ApproxSign; `binarize.approx_sign`);
- `zero_fraction`: the fraction of exact zeros (sign(0) = 0: neither +1 nor -1).

Per RPReLU (module path, e.g. `features.1.rprelu1`): `slope_min`, `slope_max` of its
per-channel PReLU slopes (histogram `diagnostics/<layer>/slope`).

Fractions are exact: counts in int32 divided by the number of elements.
The statistics are computed inside the jitted training step under a `lax.cond` on a
device flag, so steps without diagnostics run none of the reductions; the previous signs
are updated by a separate small jitted function after each diagnostics step only.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bcdnet_jax.nn import blocks, layers, models
from bcdnet_jax.nn import quantizers as binarize

log = logging.getLogger("bcdnet_jax")

CONV_STATS = ("flip_ratio", "clip_fraction", "scale_mean", "scale_min", "scale_max",
              "grad_norm")
SIGN_STATS = ("pos_fraction", "band_fraction", "zero_fraction")
RPRELU_STATS = ("slope_min", "slope_max")


@dataclasses.dataclass(frozen=True)
class Layout:
  """The layers the diagnostics observe, in the order the forward pass calls them.

  Each entry is a module path (a tuple of attribute names and list indices, as
  `nnx.iter_graph` gives it); `name` joins it with dots, as `bcdnet-summary` does.
  `binary_weights`: whether the binary convolutions binarise their weights (stage 2).
  """
  convs: tuple[tuple, ...]
  signs: tuple[tuple, ...]
  rprelus: tuple[tuple, ...]
  binary_weights: bool
  order: tuple[tuple, ...] = ()  # all of them, in call order

  def ordered(self, stats: dict) -> dict:
    """`stats` ({layer name: ...}) with its layers in call order (others last)."""
    names = [self.name(p) for p in self.order]
    return {**{n: stats[n] for n in names if n in stats},
            **{n: v for n, v in stats.items() if n not in names}}

  @staticmethod
  def name(path: tuple) -> str:
    return ".".join(str(p) for p in path)

  def conv_names(self) -> list[str]:
    return [self.name(p) for p in self.convs]

  def sign_names(self) -> list[str]:
    return [self.name(p) for p in self.signs]

  def rprelu_names(self) -> list[str]:
    return [self.name(p) for p in self.rprelus]


def layout(spec: models.ModelSpec, image_size: int = 32) -> Layout:
  """The `Layout` of `spec`'s model, from an abstract forward pass on one image (nothing
  is allocated; `image_size` only has to fit the strides)."""
  return model_layout(models.abstract_model(spec), (image_size, image_size,
                                                    spec.in_channels))


def model_layout(model: nnx.Module, input_shape) -> Layout:
  """The `Layout` of any model built from `bcdnet_jax.nn` layers (concrete or abstract),
  from an abstract forward pass on one example of `input_shape` (no batch axis): its
  `QuantConv`s, `BinaryActivation`s and `RPReLU`s in call order."""
  graphdef, state = nnx.split(model)
  calls: list = []

  def forward(state, x):
    model = nnx.merge(graphdef, state)
    model.eval()
    paths = {id(node): tuple(path) for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module)}
    originals = {}
    try:
      for cls in (blocks.BinaryActivation, layers.QuantConv, layers.RPReLU):
        originals[cls] = cls.__call__

        def call(self, x, *a, _orig=originals[cls], **kw):
          calls.append(paths[id(self)])
          return _orig(self, x, *a, **kw)

        cls.__call__ = call
      return model(x)
    finally:
      for cls, orig in originals.items():
        cls.__call__ = orig

  jax.eval_shape(forward, state,
                 jax.ShapeDtypeStruct((1, *tuple(input_shape)), jnp.float32))
  kinds = {tuple(path): node for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Module)}
  seen: dict = {}
  for path in calls:
    seen.setdefault(path, None)
  of = lambda cls: tuple(p for p in seen if isinstance(kinds[p], cls))  # noqa: E731
  convs = tuple(p for p in of(layers.QuantConv) if kinds[p].kernel_quantizer is not None)
  convs = convs or of(layers.QuantConv)  # stage 1: grad norms of the real weights
  return Layout(convs=convs, signs=of(blocks.BinaryActivation), rprelus=of(layers.RPReLU),
                binary_weights=any(kinds[p].kernel_quantizer is not None for p in convs),
                order=tuple(seen))


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _value(v):
  return v[...] if isinstance(v, nnx.Variable) else v


def _fraction(mask):
  """Exact fraction of True in `mask` (an int32 count, then one division). Counted per
  channel (the last axis) first: XLA:CPU runs that reduction faster than one straight to a
  scalar (bench/train_step.py --diagnostics)."""
  per_channel = jnp.sum(mask, axis=tuple(range(mask.ndim - 1)), dtype=jnp.int32)
  return jnp.sum(per_channel).astype(jnp.float32) / mask.size


def weight_signs(kernel):
  """sign(W) in {-1, 0, 1} as int8 (what `flip_ratio` compares)."""
  return jnp.sign(kernel).astype(jnp.int8)


def init_signs(lay: Layout, params) -> dict:
  """{conv name: int8 sign(W)} of `params` (empty in stage 1): the previous signs of the
  first diagnostics step."""
  if not lay.binary_weights:
    return {}
  return {lay.name(p): weight_signs(_value(_at(params, p)["kernel"])) for p in lay.convs}


def sign_stats(x) -> dict:
  """pos_fraction, band_fraction, zero_fraction of the sign input `x` (any float dtype)."""
  return {"pos_fraction": _fraction(x > 0), "band_fraction": _fraction(jnp.abs(x) < 1),
          "zero_fraction": _fraction(x == 0)}


def conv_stats(kernel, grad, prev_signs=None):
  """(scalars, per-channel scale, new int8 signs) of one binary conv's HWIO kernel.

  Without `prev_signs` (stage 1) only grad_norm is computed (the weights are real)."""
  g = grad.astype(jnp.float32)
  out = {"grad_norm": jnp.sqrt(jnp.sum(g * g))}
  if prev_signs is None:
    return out, None, None
  signs = weight_signs(kernel)
  scale = jnp.mean(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
  out.update(flip_ratio=_fraction(signs != prev_signs),
             clip_fraction=_fraction(jnp.abs(kernel) > 1),
             scale_mean=jnp.mean(scale), scale_min=jnp.min(scale), scale_max=jnp.max(scale))
  return out, scale, signs


def compute(lay: Layout, params, grads, sign_inputs: dict, prev_signs: dict):
  """Every statistic of one step: (stats {layer: {stat: float32 scalar}},
  vectors {layer: {"scale" | "slope": per-channel float32}}, new signs {conv: int8}).

  `params`: the weights after the step's update (what flips are counted on), `grads`:
  the step's gradients (same tree), `sign_inputs`: {sign site name: its input}.
  """
  stats, vectors, signs = {}, {}, {}
  for path in lay.convs:
    name = lay.name(path)
    s, scale, new = conv_stats(_value(_at(params, path)["kernel"]),
                               _value(_at(grads, path)["kernel"]),
                               prev_signs.get(name) if lay.binary_weights else None)
    stats[name] = s
    if new is not None:
      vectors[name] = {"scale": scale}
      signs[name] = new
  for name in lay.sign_names():
    if name in sign_inputs:
      stats[name] = sign_stats(sign_inputs[name])
  for path in lay.rprelus:
    slope = _value(_at(params, path)["prelu"]["slope"])
    stats[lay.name(path)] = {"slope_min": jnp.min(slope), "slope_max": jnp.max(slope)}
    vectors[lay.name(path)] = {"slope": slope}
  return stats, vectors, signs


def forward_recording(model, images):
  """`model(images)` and {sign site name: its input, gradient stopped} of that pass."""
  paths = {id(node): Layout.name(path) for path, node in nnx.iter_graph(model)
           if isinstance(node, blocks.BinaryActivation)}
  with binarize.record_sign_inputs(with_sites=True) as rec:
    out = model(images)
  inputs = {paths[id(site)]: jax.lax.stop_gradient(x) for site, x in rec
            if site is not None and id(site) in paths}
  return out, inputs


def step_outputs(lay: Layout, diag_in: dict, params, grads, sign_inputs: dict) -> dict:
  """The training step's diagnostics output {"stats", "vectors"} (see `compute`), computed
  when `diag_in["due"]` (a device bool) is true, zeros otherwise; `diag_in["signs"]`: the
  signs of the previous diagnostics step (`init_signs` of the parameters after it: the
  caller updates them, so steps without diagnostics neither compute nor copy them)."""

  def run(operands):
    params, grads, sign_inputs, prev = operands
    stats, vectors, _ = compute(lay, params, grads, sign_inputs, prev)
    return {"stats": stats, "vectors": vectors}

  def skip(operands):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, operands))

  return jax.lax.cond(diag_in["due"], run, skip,
                      (params, grads, sign_inputs, diag_in["signs"]))


# --- the host side --------------------------------------------------------------------------

def resolve_every(config) -> int:
  """Steps between diagnostics: `config.diagnostics_every_steps`, -1 meaning the log
  cadence (`log_every_steps`), 0 off."""
  every = int(config.get("diagnostics_every_steps", -1))
  return int(config.log_every_steps) if every < 0 else every


def flatten(stats: dict) -> dict:
  """{"<layer>/<stat>": float} of the stats tree (the JSON line and TensorBoard tags)."""
  return {f"{layer}/{k}": float(v) for layer, d in stats.items() for k, v in d.items()}


class Monitor:
  """Runs a diagnostics-enabled jitted step (`train.make_train_step(...,
  diagnostics=layout)`) behind the plain step's interface `(state, batch, teacher_state)
  -> (state, metrics)`, keeps the previous signs on device, and at diagnostics steps
  writes the statistics and warns.

  `every`: steps between diagnostics (> 0); the last step (`total`) always has them.
  """

  def __init__(self, lay: Layout, p_step, params, *, every: int, start_step: int,
               total: int, config=None):
    self.layout, self._p_step = lay, p_step
    self.every, self.total, self.step = every, total, start_step
    self._init_signs = jax.jit(lambda p: init_signs(lay, p))
    self._signs = self._init_signs(params)
    self.latest = None
    self.alarms = Alarms.from_config(config)

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.total

  def __call__(self, state, batch, teacher_state):
    self.step += 1
    due = self.due(self.step)
    state, metrics, out = self._p_step(state, batch, teacher_state,
                                       {"signs": self._signs, "due": np.bool_(due)})
    if due:  # the next flips count from these weights
      self._signs = self._init_signs(state["params"])
      self.latest = (self.step, out)
    return state, metrics

  def write(self, step: int, writer) -> dict:
    """Writes the statistics of diagnostics step `step` (scalars `diagnostics/<layer>/
    <stat>`, histograms, one line of diagnostics.jsonl), checks them, and returns the
    flat {"<layer>/<stat>": value}."""
    if self.latest is None or self.latest[0] != step:
      raise RuntimeError(f"no diagnostics computed at step {step}")
    out = jax.device_get(self.latest[1])
    flat = flatten(self.layout.ordered(out["stats"]))
    writer.scalars(step, flat, jsonl="diagnostics", prefix="diagnostics/")
    for layer, vecs in out["vectors"].items():
      for k, v in vecs.items():
        writer.histogram(step, f"diagnostics/{layer}/{k}", v)
    for line in self.alarms.check(step, out["stats"]):
      log.warning("%s", line)
    return flat


class Alarms:
  """The warnings of `Monitor`, from the `diagnostics_*` config fields."""

  def __init__(self, *, warn_after: int = 3, flip_min: float = 0.0, flip_max: float = 0.5,
               balance: tuple = (0.05, 0.95)):
    self.warn_after, self.flip_min, self.flip_max = warn_after, flip_min, flip_max
    self.balance = tuple(balance)
    self._streak: dict = {}
    self._outside: set = set()

  @classmethod
  def from_config(cls, c) -> Alarms:
    if c is None:
      return cls()
    return cls(warn_after=int(c.get("diagnostics_warn_after", 3)),
               flip_min=float(c.get("diagnostics_flip_min", 0.0)),
               flip_max=float(c.get("diagnostics_flip_max", 0.5)),
               balance=tuple(c.get("diagnostics_sign_balance", (0.05, 0.95))))

  def check(self, step: int, stats: dict) -> list[str]:
    """Warning lines for step `step`: flip ratios <= flip_min ("frozen") or > flip_max
    ("churning") for `warn_after` diagnostics steps in a row (said once per streak), and
    sign balances that left [lo, hi] (said once until they come back)."""
    frozen, churning, unbalanced = [], [], []
    for layer, d in stats.items():
      if "flip_ratio" in d:
        f = float(d["flip_ratio"])
        kind = "frozen" if f <= self.flip_min else "churning" if f > self.flip_max else None
        prev_kind, n = self._streak.get(layer, (None, 0))
        n = n + 1 if kind is not None and kind == prev_kind else (1 if kind else 0)
        self._streak[layer] = (kind, n)
        if kind is not None and n == self.warn_after:
          (frozen if kind == "frozen" else churning).append(layer)
      if "pos_fraction" in d:
        p = float(d["pos_fraction"])
        lo, hi = self.balance
        if not lo <= p <= hi:
          if layer not in self._outside:
            unbalanced.append(f"{layer} ({p:.3f})")
          self._outside.add(layer)
        else:
          self._outside.discard(layer)
    lines = []
    if frozen:
      lines.append(f"diagnostics step {step}: weight signs frozen (flip ratio <= "
                   f"{self.flip_min:g} for {self.warn_after} diagnostics steps) in "
                   + ", ".join(frozen))
    if churning:
      lines.append(f"diagnostics step {step}: weight signs churning (flip ratio > "
                   f"{self.flip_max:g} for {self.warn_after} diagnostics steps) in "
                   + ", ".join(churning))
    if unbalanced:
      lines.append(f"diagnostics step {step}: sign balance (fraction of +1) left "
                   f"[{self.balance[0]:g}, {self.balance[1]:g}] at " + ", ".join(unbalanced))
    return lines

