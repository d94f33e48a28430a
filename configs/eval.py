"""Evaluate a model directory (e.g. convert_torch_ckpt.py output) on ImageNet validation:
  python main.py --config=configs/eval.py --config.checkpoint=ckpt/bcdnet_a --workdir=runs/eval
"""

from configs import default


def get_config():
  c = default.get_config()
  c.mode = "eval"
  c.eval_batch_size = 250
  return c
