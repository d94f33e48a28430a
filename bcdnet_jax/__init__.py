"""BCDNet in JAX / Flax NNX (see README.md)."""

import os as _os

# Set before TensorFlow or JAX is first imported; a value already in the environment wins.
# Only `bcdnet-prepare` imports TensorFlow now (TFDS' ImageNet builders); its oneDNN kernels
# print "E0000 ... oneDNN supports DT_INT32 only on platforms with AVX-512", an error-looking
# line about a fallback, so they are off. Level 1 drops the C++ INFO lines of TensorFlow and
# XLA (CPU feature notes); warnings and errors still show.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
