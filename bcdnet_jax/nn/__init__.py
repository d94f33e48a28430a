"""The binary-network library: JAX and Flax NNX only (no torch, TensorFlow, Grain or Orbax).

    quantizers  sign functions with their surrogate gradients (`jax.custom_vjp`) and the
                scaled weight sign, in one registry: `quantizers.get`, `quantizers.register`
    layers      QuantConv / QuantDense (input and kernel quantizers), learnable bias,
                RPReLU, torch-compatible BatchNorm, real convolutions, the token shifts,
                pooling
    blocks      BinaryActivation (sign with a learnable threshold), the ReActNet basic
                block, BCDNet's long-short-range and point-wise MLP blocks, the dynamic
                threshold
    models      ModelSpec, the presets (BCDNet-A/B, ReActNet-A, ResNet-18 variants, the
                ResNet-50 teacher), create_model, `register_model` for your own networks
    registry    users' networks: register_model, 'module:function' names, one or two heads
    stats       summary / layer_stats (params, BOPs, FLOPs, OPs, sizes) of any model
    precision   dtype policies (float64 / float32 / tf32 / bfloat16) compared

The names most networks need are here too: `nn.QuantConv`, `nn.QuantDense`,
`nn.BinaryActivation`, `nn.summary`, `nn.register_model` (docs/building-bnns.md).
"""

from bcdnet_jax.nn import blocks, layers, models, precision, quantizers, registry, stats
from bcdnet_jax.nn.blocks import BinaryActivation
from bcdnet_jax.nn.layers import QuantConv, QuantDense
from bcdnet_jax.nn.models import ModelSpec, create_model, register_model
from bcdnet_jax.nn.stats import layer_stats, summary

__all__ = ["BinaryActivation", "ModelSpec", "QuantConv", "QuantDense", "blocks",
           "create_model", "layer_stats", "layers", "models", "precision", "quantizers",
           "register_model", "registry", "stats", "summary"]
