"""Parameters, operations and sizes of any model built from `bcdnet_jax.nn` layers.

The model is traced abstractly (`jax.eval_shape`: nothing computed, no weights read) on
one example while every `Conv`, `QuantConv` (and `BinaryConv`), `Linear` and `QuantDense`
reports what it computed. Conventions (the paper's):

- BOPs: multiply-accumulates of layers whose kernel is quantized (a `kernel_quantizer`:
  the released stage 2). Their input is taken to be binary (their own input quantizer or a
  `BinaryActivation` before them), as in every BNN of the literature.
- FLOPs: multiply-accumulates of real-valued convs and dense layers (stems, shortcuts,
  BCDNet-B's dynamic embeddings, heads, and stage 1's binary convs, whose weights are
  real). Of two heads averaged at evaluation (BCDNet's `head` and `head_dist`) ONE is
  counted, as the paper does (`count_both_heads=True` counts both). Element-wise work (BN,
  biases, PReLU, adds, pooling, signs) is not counted.
- OPs = BOPs / 64 + FLOPs.
- Sizes: float32 parameters and BN running statistics (`size_bytes_fp32`) against 1 bit
  per quantized weight plus a float32 scale per output channel of each quantized layer,
  float32 for everything else (`size_bytes_packed`).

    stats = summary(model, (32, 32, 3))   # one example's shape, no batch axis
    print(format_table(stats))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bcdnet_jax.nn import layers

# The layer classes whose work is counted (subclasses included: BinaryConv is a QuantConv).
COUNTED = (layers.Conv, layers.QuantConv, layers.Linear, layers.QuantDense)
DENSE = (layers.Linear, layers.QuantDense)


@dataclasses.dataclass
class LayerStats:
  """One counted layer call. `name`: the module path joined with dots (`features.1.pw`),
  `kind`: its class name, `output_shape`: without the batch axis; params and MACs are
  counts (binary = quantized kernel)."""
  name: str
  kind: str
  output_shape: tuple
  binary_params: int
  real_params: int
  binary_macs: int
  real_macs: int


@contextlib.contextmanager
def _recording(records: list):
  """Temporarily wraps the counted layers' __call__ to report their work."""
  originals = {}
  for cls in COUNTED:
    orig = cls.__dict__.get("__call__")
    if orig is None:  # inherited (BinaryConv): the parent's wrapper reports it
      continue

    def call(self, x, *args, _orig=orig, **kwargs):
      y = _orig(self, x, *args, **kwargs)
      records.append((self, tuple(x.shape), tuple(y.shape)))
      return y

    originals[cls] = orig
    cls.__call__ = call
  try:
    yield
  finally:
    for cls, orig in originals.items():
      cls.__call__ = orig


def _example(input_shape: Sequence[int], dtype=jnp.float32):
  shape = tuple(int(d) for d in input_shape)
  if not shape or any(d < 1 for d in shape):
    raise ValueError(f"input_shape must be positive ints (one example, no batch axis), "
                     f"got {tuple(input_shape)}")
  return jax.ShapeDtypeStruct((1, *shape), dtype)


def module_paths(model: nnx.Module) -> dict[int, str]:
  """{id(module): dotted path} of every module of `model` ('' for the model itself)."""
  return {id(node): ".".join(str(p) for p in path) for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)}


def layer_stats(model: nnx.Module, input_shape: Sequence[int]) -> list[LayerStats]:
  """One LayerStats per counted layer call of `model` (in evaluation mode) on one example
  of `input_shape` (no batch axis, e.g. (224, 224, 3) NHWC), in call order. `model` is not
  changed (a copy is traced); it may be abstract (`nnx.eval_shape`)."""
  graphdef, state = nnx.split(model)
  records: list = []
  names: dict = {}

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    names.update(module_paths(m))
    with _recording(records):
      return m(x)

  jax.eval_shape(forward, state, _example(input_shape))
  out = []
  for module, _, y_shape in records:
    k = module.kernel.get_value().shape
    n_kernel = math.prod(k)
    n_bias = module.bias.get_value().size if getattr(module, "bias", None) is not None else 0
    if isinstance(module, DENSE):
      macs = math.prod(y_shape[1:-1]) * n_kernel
    else:
      macs = math.prod(y_shape[1:3]) * n_kernel
    is_binary = getattr(module, "kernel_quantizer", None) is not None
    out.append(LayerStats(
        name=names.get(id(module), "?"), kind=type(module).__name__,
        output_shape=y_shape[1:],
        binary_params=n_kernel if is_binary else 0,
        real_params=n_bias + (0 if is_binary else n_kernel),
        binary_macs=macs if is_binary else 0, real_macs=0 if is_binary else macs))
  return out


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (`nnx.Param`; BN running statistics excluded)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def count_bn_statistics(model: nnx.Module) -> int:
  """Number of BN running means and variances (what a deployed model also stores)."""
  return int(sum(math.prod(v.shape) for path, v in nnx.to_flat_state(
      nnx.state(model, nnx.BatchStat)) if path[-1] in ("mean", "var")))


def summary(model: nnx.Module, input_shape: Sequence[int], *,
            count_both_heads: bool = False) -> dict:
  """Totals and per-layer counts of `model` on one example of `input_shape` (no batch
  axis): params, binary_params, real_params, bn_statistics, bops, flops, ops (= bops / 64
  + flops), size_bytes_fp32, size_bytes_packed, compression, and "layers" (LayerStats as
  dicts). See the module docstring for the conventions."""
  stats = layer_stats(model, input_shape)
  params = count_params(model)
  bn_stats = count_bn_statistics(model)
  bops = sum(s.binary_macs for s in stats)
  flops = sum(s.real_macs for s in stats
              if count_both_heads or not s.name.endswith("head_dist"))
  binary_params = sum(s.binary_params for s in stats)
  binary_out_channels = sum(s.output_shape[-1] for s in stats if s.binary_params)
  fp32 = 4 * (params + bn_stats)
  packed = (binary_params + 7) // 8 + 4 * (params - binary_params + bn_stats
                                           + binary_out_channels)
  return {
      "input_shape": list(int(d) for d in input_shape),
      "params": params, "binary_params": binary_params,
      "real_params": params - binary_params, "bn_statistics": bn_stats,
      "bops": bops, "flops": flops, "ops": bops / 64 + flops,
      "size_bytes_fp32": fp32, "size_bytes_packed": packed,
      "compression": fp32 / packed,
      "layers": [dataclasses.asdict(s) for s in stats],
  }


def _size(nbytes: int) -> str:
  return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"


def format_table(result: dict) -> str:
  """The per-layer table and the totals of `summary`'s result, as text."""
  rows = [("layer", "type", "output", "bin params", "real params", "BOPs", "FLOPs")]
  for s in result["layers"]:
    rows.append((s["name"], s["kind"], "x".join(map(str, s["output_shape"])),
                 f"{s['binary_params']:,}", f"{s['real_params']:,}",
                 f"{s['binary_macs']:,}", f"{s['real_macs']:,}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  r = result
  lines += ["",
            f"parameters      {r['params']:,} ({r['binary_params']:,} binary)",
            f"BOPs            {r['bops']:.4g}",
            f"FLOPs           {r['flops']:.4g}",
            f"OPs             {r['ops']:.4g}  (BOPs / 64 + FLOPs)",
            f"size fp32       {_size(r['size_bytes_fp32'])} (parameters + BN statistics)",
            f"size 1-bit      {_size(r['size_bytes_packed'])} "
            f"({r['compression']:.1f}x smaller)"]
  return "\n".join(lines)
