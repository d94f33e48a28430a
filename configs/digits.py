"""The built-in demo: a reduced-width BCDNet-A on scikit-learn's digits (32x32 RGB).

Stage 1, then stage 2 initialised from it, then evaluation on the test split, in one
command, on CPU:  python main.py --config=configs/digits.py --workdir=runs/digits
No ResNet-50 teacher here (teacher_dir="none", recorded in config.json as a deviation from
the recipe): both heads learn from the labels (label-smoothed CE).
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "digits"
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = 32
  c.eval_crop_ratio = 1.0  # the images are already 32x32: no resize, no crop
  c.crop_scale = (0.5, 1.0)  # an 8 % crop of a digit is no longer a digit
  c.random_flip = False  # nor is a mirrored one
  c.model.name = "bcdnet_a"
  # stem 32x32 -> 16x16, blocks to 4x4 tokens, one MLP group at 64 channels
  c.model.overrides = ml_collections.ConfigDict(dict(
      channels=(16, 32, 32, 64, 64), strides=(1, 2, 1, 2), mlp_groups=1))
  c.batch_size = 64
  c.eval_batch_size = 120
  c.base_batch_size = 64
  c.teacher_dir = "none"  # no teacher exists for digits; stage 2's init_from: the pipeline
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.stage1 = ml_collections.ConfigDict(dict(
      model=ml_collections.ConfigDict(dict(stage=1)), num_train_steps=600,
      learning_rate=4e-3, warmup_steps=60, warmup_init_lr=1e-3, weight_decay=0.01,
      color_jitter=(0.2, 0.2, 0.2, 0.1)))
  c.pipeline.stage2 = ml_collections.ConfigDict(dict(
      model=ml_collections.ConfigDict(dict(stage=2)), num_train_steps=600,
      learning_rate=1e-3, warmup_steps=0, weight_decay=0.0,
      color_jitter=(0.0, 0.0, 0.0, 0.0)))
  return c
