"""Small digits configurations shared by the tests and the worker processes they start."""

import ml_collections

from configs import default


def small_config(data_dir, *, tiny=True, **kw):
  c = default.get_config()
  c.dataset, c.data_dir = "digits", data_dir
  c.train_split, c.eval_split = "train", "test"
  c.image_size, c.eval_crop_ratio = 16, 1.0
  c.model.name, c.model.stage = "bcdnet_a", 2
  c.model.overrides = ml_collections.ConfigDict(dict(channels=(8, 16, 16), mlp_groups=1))
  if tiny:  # one basic block and a two-block MLP group: quick to compile
    c.model.overrides = ml_collections.ConfigDict(dict(channels=(8, 16), mlp_groups=1,
                                                       mlp_group=("lsr", "pw")))
  c.batch_size = c.base_batch_size = 16
  c.eval_batch_size = 120
  c.num_train_steps = 6
  c.learning_rate = 2e-3
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.teacher_dir = c.init_from = "none"  # tests opt out of the recipe's teacher and stage 1
  for k, v in kw.items():
    c[k] = v
  return c
