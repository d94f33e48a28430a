"""Stage 2 of the released recipe: binary activations and weights (the authors' a_3).

AdamW (wd 0), LR 5e-4 cosine to 0 over 600,000 steps (about 120 epochs at batch 256), no
colour jitter, KD from the ResNet-50 teacher, initialised from stage 1 (both required;
"none" opts out of either, recorded as a deviation; configs/imagenet.py runs both stages):
  python main.py --config=configs/stage2.py --workdir=runs/stage2 \
      --config.init_from=runs/stage1 --config.teacher_dir=runs/ckpt/resnet50
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.stage = 2
  c.num_train_steps = 600_000
  c.learning_rate = 5e-4
  c.weight_decay = 0.0
  return c
