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
  # Activations between layers: "float32" (the reference), "bfloat16" (mixed precision:
  # parameters, optimiser, BN statistics, reductions, loss and logits stay float32), or
  # "auto" (float32 on CPU and, until measured there, on GPUs: models.AUTO_DTYPE_POLICY).
  # In evaluation mode it applies to the evaluated model as well.
  c.model.dtype_policy = "auto"

  c.dataset = "imagenet2012"  # any TFDS name, "digits", or "folder:/path/to/images"
  c.data_dir = ""  # TFDS data_dir; "" means TFDS' default (~/tensorflow_datasets)
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.eval_crop_ratio = 224 / 256  # resize the shorter side to 256, centre-crop 224
  c.color_jitter = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
  c.crop_scale = (0.08, 1.0)  # RandomResizedCrop area range
  c.random_flip = True
  # Training resize: False = one antialiased pass within one level of PIL's (fast);
  # True = PIL's own fixed-point two passes, equal to the pixel (about half the
  # images/s per core). Evaluation always uses PIL's exact resize.
  c.exact_resize_train = False
  # Decode every image of the train and eval splits before training and name the ones
  # that fail (always done for the eval split of folder: datasets). During training an
  # undecodable image stops the run with its file named.
  c.check_images = False
  c.shuffle_buffer = 16_384
  # "global_stream": every process reads the same stream and decodes its rows of each
  # global batch (results independent of the process count); "per_process": each process
  # reads only its own part of the split (less I/O on many hosts).
  c.data_sharding = "global_stream"
  c.data_workers = 0  # input pipeline worker processes (0: automatic)

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
  return c
