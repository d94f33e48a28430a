"""Stage 1 of the released recipe: binary activations, real weights (the authors' a_3f).

AdamW (wd 0.01), LR warm-up 1e-3 -> 4e-3 over 15,000 steps then cosine to 0 at 300,000
steps (about 60 epochs at batch 256), colour jitter, KD from the ResNet-50 teacher
(required: convert resnet50-19c8e357.pth with convert_torch_ckpt.py, or opt out with
--config.teacher_dir=none, recorded as a deviation). configs/imagenet.py runs both stages:
  python main.py --config=configs/stage1.py --workdir=runs/stage1 \
      --config.teacher_dir=runs/ckpt/resnet50 --config.data_dir=~/tensorflow_datasets
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.stage = 1
  c.num_train_steps = 300_000
  c.learning_rate = 4e-3
  c.warmup_steps = 15_000
  c.warmup_init_lr = 1e-3
  c.weight_decay = 0.01
  c.color_jitter = (0.2, 0.2, 0.2, 0.1)
  return c
