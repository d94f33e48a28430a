"""The released recipe in one command: stage 1, stage 2 initialised from it, then evaluation
on ImageNet validation, ImageNet-V2 (matched frequency) and ReaL:

  python convert_torch_ckpt.py --torch_ckpt resnet50-19c8e357.pth --arch resnet50 \\
      --out runs/ckpt/resnet50                              # the teacher, once
  python main.py --config=configs/imagenet.py --workdir=runs/imagenet \\
      --config.teacher_dir=runs/ckpt/resnet50

Writes runs/imagenet/{stage1,stage2,eval}/ and runs/imagenet/results.json. Rerunning the
same command resumes at any point: finished stages are kept, an interrupted stage resumes
from its newest checkpoint, a finished pipeline evaluates nothing again. Each stage's values
are those of configs/stage1.py and configs/stage2.py; a value given on the command line
replaces the stages' (e.g. --config.batch_size=512 for both).
"""

import ml_collections

from configs import default, stage1, stage2

# the fields in which the stages differ from default.py (the stage-2 values)
_STAGE_FIELDS = ("num_train_steps", "learning_rate", "warmup_steps", "warmup_init_lr",
                 "weight_decay", "color_jitter")


def _stage(cfg):
  fields = {k: cfg[k] for k in _STAGE_FIELDS}
  return ml_collections.ConfigDict(dict(
      model=ml_collections.ConfigDict(dict(stage=cfg.model.stage)), **fields))


def get_config():
  c = default.get_config()
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.stage1 = _stage(stage1.get_config())
  c.pipeline.stage2 = _stage(stage2.get_config())  # init_from: stage 1, by the pipeline
  c.eval_datasets = "imagenet2012,imagenet_v2,imagenet2012_real"
  return c
