"""Users' own networks: a registry of builders, `module:function` names, model outputs.

A builder is a function `create(*, num_classes, rngs, [stage], [in_channels]) ->
nnx.Module`; `models.get_spec(name)` turns its name into a `ModelSpec` of family 'custom'
(recorded in model.json), so everything that builds a model from a spec (the training
harness, `checkpoint.restore_model`, `init_from`, summary, export) builds it too.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Callable

from flax import nnx

from bcdnet_jax import errors

MODELS: dict[str, Callable] = {}


class ModelNameError(errors.UserError):
  """A model name that names no preset, no registered builder and no importable
  'module:function'; the message says which and how to name it."""


_HOW = ("a preset, 'module:function' (the module importable from where you run, e.g. the "
        "repository root or PYTHONPATH), or a name registered with register_model in a "
        "module this process has imported")


def register_model(name: str | None = None):
  """Decorator registering a builder of a user's network under `name` (default: the
  function's name), so `create_model(name)` / `config.model.name=name` build it:

      @models.register_model("tiny_bnn")
      def create(*, num_classes: int, rngs: nnx.Rngs, stage: int = 2,
                 in_channels: int = 3) -> nnx.Module: ...

  The builder is called with keyword arguments num_classes and rngs, plus stage and
  in_channels if its signature takes them; it returns an `nnx.Module` mapping NHWC float32
  images (N, H, W, in_channels) to logits (N, num_classes), or in training mode
  optionally to two heads (logits, logits_dist) as BCDNet does. Stage 1 and stage 2 of
  one builder must have the same parameter tree (as `QuantConv` with and without a
  kernel quantizer have). The training harness imports the builder by name, so a name
  registered here is known only once its module is imported: from the command line use
  'module:function' (`is_custom_name`)."""
  def deco(fn):
    key = name or fn.__name__
    from bcdnet_jax.nn.models import PRESETS
    if key in PRESETS:
      raise ValueError(f"register_model: {key!r} is a preset's name")
    MODELS[key] = fn
    return fn
  return deco


def is_custom_name(name) -> bool:
  """Whether `name` names a user's network: registered, or 'module:function'."""
  return isinstance(name, str) and (name in MODELS or (
      ":" in name and all(part.strip() for part in name.split(":", 1))))


def resolve_builder(name: str) -> Callable:
  """The builder function `name` names (`register_model` name or 'module:function', the
  module imported with `importlib`); ValueError naming the problem otherwise."""
  if name in MODELS:
    return MODELS[name]
  if not is_custom_name(name):
    raise ModelNameError(f"unknown model name {name!r}: expected {_HOW}")
  module_name, attr = name.split(":", 1)
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ModelNameError(f"model {name!r}: cannot import module {module_name!r} ({e}); run "
                         "from the directory that holds it or add it to PYTHONPATH") from None
  fn = MODELS.get(attr) if attr not in vars(module) else getattr(module, attr)
  if fn is None or not callable(fn):
    raise ModelNameError(f"model {name!r}: module {module_name!r} has no function {attr!r}")
  return fn


def recorded_name(name: str) -> str:
  """The builder name model.json records for `name`: a registered name becomes the
  'module:function' of its builder where that can be imported again (a fresh process, such
  as an evaluation or export, does not know names registered in this one); a
  'module:function' name stays as it is."""
  fn = MODELS.get(name)
  if fn is None or ":" in name:
    return name
  module, qualname = getattr(fn, "__module__", ""), getattr(fn, "__qualname__", "")
  if module in ("", "__main__") or not qualname.isidentifier():
    return name  # defined in a script or a closure: only its registered name is known
  return f"{module}:{qualname}"


def heads(outputs):
  """(logits, logits_dist) of a model's training-mode outputs: BCDNet's two heads as they
  are; one head's logits twice, so the released loss (CE(logits) + second(logits_dist)) / 2
  is CE alone without a teacher and (CE + KD) / 2 with one."""
  if isinstance(outputs, (tuple, list)):
    if len(outputs) != 2:
      raise ValueError(f"a model returns logits or two heads (logits, logits_dist), got "
                       f"{len(outputs)} outputs")
    return tuple(outputs)
  return outputs, outputs


def config_overrides(name: str, overrides: dict) -> dict:
  """`config.model.overrides` for model `name`: as they are for a preset; for a custom
  model the preset-architecture fields are dropped, with a warning (a config written for a
  preset, such as configs/digits.py, then trains a custom network unchanged)."""
  from bcdnet_jax.nn.models import ARITHMETIC_FIELDS, PRESETS
  if name in PRESETS or not is_custom_name(name):
    return overrides
  keep = {"in_channels", *ARITHMETIC_FIELDS}
  dropped = sorted(set(overrides) - keep)
  if dropped:
    logging.getLogger("bcdnet_jax").warning(
        "config.model.overrides %s apply to presets only: not used for the custom model %s",
        ", ".join(dropped), name)
  return {k: v for k, v in overrides.items() if k in keep}


def build_custom(spec, seed) -> nnx.Module:
  """Calls the builder of a 'custom' spec (see `register_model`); the model gets `spec`."""
  fn = resolve_builder(spec.builder)
  kw = dict(num_classes=spec.num_classes, rngs=nnx.Rngs(seed))
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    params = {}
  takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  for k in ("stage", "in_channels"):
    if takes_all or k in params:
      kw[k] = getattr(spec, k)
  model = fn(**kw)
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model {spec.builder!r}: the builder returned "
                     f"{type(model).__name__}, not an nnx.Module")
  model.spec = spec
  model.activation_dtype = ""
  return model
