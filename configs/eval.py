"""Evaluate a model directory (e.g. convert_torch_ckpt.py output) on ImageNet validation:
  python main.py --config=configs/eval.py --config.checkpoint=runs/ckpt/bcdnet_a --workdir=runs/eval
and on the test sets reported beside it (TFDS names, optionally ':split'):
  ... --config.eval_datasets=imagenet2012,imagenet_v2,imagenet2012_real
imagenet_v2 is the matched-frequency variant; imagenet_v2/threshold-0.7 and
imagenet_v2/topimages select the others. imagenet2012_real scores a prediction correct when
it is in the image's ReaL label set, over the images that have one.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.mode = "eval"
  c.eval_batch_size = 250
  # 0: the preprocessing recorded with the model (its model.json); a value overrides it
  c.image_size = 0
  c.eval_crop_ratio = 0.0
  return c
