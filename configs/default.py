"""Every field a run reads, with the released stage-2 recipe's values; others override."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.model.name = "bcdnet_a"
  c.model.stage = 2
  c.model.num_classes = 0  # 0: take it from the dataset
  c.model.overrides = ml_collections.ConfigDict()  # ModelSpec fields, e.g. channels
  # Operands of the stage-2 binary convs' forward, all exact: "auto" (int8 on CPU, float32
  # on GPU: models.AUTO_COMPUTE_DTYPE), "float32", "int8" or "bfloat16".
  c.model.compute_dtype = "auto"
  # Activations between layers: "float32" (the reference: true float32 products on every
  # backend, jax.lax.Precision.HIGHEST), "tf32" (float32 storage, the backend's default
  # products: TF32 on recent NVIDIA GPUs), "bfloat16" (mixed precision: parameters,
  # optimiser, BN statistics, reductions, loss and logits stay float32), or "auto"
  # (float32 on CPU and, until measured there, on GPUs: models.AUTO_DTYPE_POLICY).
  # In evaluation mode it applies to the evaluated model as well.
  c.model.dtype_policy = "auto"

  # any TFDS name prepared in ArrayRecord format (python -m bcdnet_jax prepare NAME),
  # "digits", or "folder:/path/to/images" (path/<split>/<class>/<image>, any PIL format)
  c.dataset = "imagenet2012"
  c.data_dir = ""  # TFDS data_dir; "" means TFDS' default (~/tensorflow_datasets)
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.eval_crop_ratio = 224 / 256  # resize the shorter side to 256, centre-crop 224
  c.color_jitter = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
  c.crop_scale = (0.08, 1.0)  # RandomResizedCrop area range
  c.random_flip = True
  # Decode every image of the train and eval splits before training and name the ones
  # that fail (always done for the eval split of folder: datasets). During training an
  # undecodable image stops the run with its file named.
  c.check_images = False
  # Threads per process decoding and augmenting images (PIL, in a Grain pipeline):
  # 0 = all cores of the process's share (its CPU affinity, e.g. SLURM --cpus-per-task)
  # but one, at least 1. Each epoch is a fresh seeded permutation of the whole split; the
  # data position is the step, so neither this nor the process count changes the batches.
  c.data_workers = 0
  # Images over this many pixels are refused, naming the file (PIL's guard against
  # decompression bombs: small files that decode to gigabytes). 0: PIL's limit,
  # 178,956,970 px (e.g. 13,000 x 13,000). Raise it for data sets with very large images.
  c.max_image_pixels = 0

  # Global batch. The learning rate below is for `base_batch_size` and scales linearly.
  c.batch_size = 256
  c.eval_batch_size = 256
  c.base_batch_size = 256
  c.num_train_steps = 600_000  # > 0 overrides num_epochs
  c.num_epochs = 0.0
  c.learning_rate = 5e-4
  c.warmup_steps = 0
  c.warmup_init_lr = 0.0
  c.weight_decay = 0.0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.label_smoothing = 0.1
  # a model directory of the ResNet-50 teacher; required in training ("" is an error naming
  # the conversion command); "none": no KD, recorded in config.json as a deviation
  c.teacher_dir = ""

  # model directory or workdir whose weights start this run; required for stage 2 (in a
  # pipeline: the previous stage); "none": fresh weights, recorded as a deviation
  c.init_from = ""
  c.checkpoint = ""  # evaluation mode: what to evaluate
  c.mode = "train"  # "train" or "eval"
  # evaluation mode: comma-separated TFDS names[:split] to evaluate on ("" = dataset on
  # eval_split), e.g. imagenet2012,imagenet_v2,imagenet2012_real (see configs/eval.py)
  c.eval_datasets = ""
  c.pipeline = ml_collections.ConfigDict()  # stage name -> overrides, run in order

  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: only at the end
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3
  # Binarisation diagnostics (bcdnet_jax/train/diagnostics.py): per-layer flip ratios, clipped
  # weights, sign balance, scales, RPReLU slopes, gradient norms in TensorBoard and
  # diagnostics.jsonl. Steps between them: -1 = every log step, 0 = off, N = every N steps.
  c.diagnostics_every_steps = -1
  # Warn when a layer's flip ratio is <= flip_min (frozen) or > flip_max (churning) for
  # warn_after diagnostics steps in a row, or its fraction of +1 leaves sign_balance.
  c.diagnostics_warn_after = 3
  c.diagnostics_flip_min = 0.0
  c.diagnostics_flip_max = 0.5
  c.diagnostics_sign_balance = (0.05, 0.95)
  return c
