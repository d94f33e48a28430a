"""The binary-network library: JAX and Flax NNX only (no torch, TensorFlow, Grain or Orbax).

    quantizers  sign functions with their surrogate gradients (`jax.custom_vjp`) and the
                scaled weight sign
    layers      learnable bias, RPReLU, torch-compatible BatchNorm, convolutions (real and
                binary), the token shifts, pooling
    blocks      the ReActNet basic block, BCDNet's long-short-range and point-wise MLP
                blocks, the dynamic threshold
    models      ModelSpec, the presets (BCDNet-A/B, ReActNet-A, ResNet-18 variants, the
                ResNet-50 teacher), create_model
    precision   dtype policies (float64 / float32 / tf32 / bfloat16) compared
"""

from bcdnet_jax.nn import blocks, layers, models, precision, quantizers
from bcdnet_jax.nn.models import ModelSpec, create_model

__all__ = ["ModelSpec", "blocks", "create_model", "layers", "models", "precision",
           "quantizers"]
