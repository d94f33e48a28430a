"""Imports a released BCDNet (or torchvision ResNet-50) PyTorch checkpoint.

  python convert_torch_ckpt.py --torch_ckpt a_3.pth.tar --arch bcdnet_a --stage 2 --out DIR

Writes DIR (model.json + Orbax state) for `bcdnet_jax.checkpoint.restore_model(DIR)` and
prints a report; exits non-zero with a message on any failure, having written nothing.
"""

import sys

from bcdnet_jax.interop import convert

if __name__ == "__main__":
  sys.exit(convert.main(sys.argv[1:]))
