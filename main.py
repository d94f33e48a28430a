"""Train or evaluate: python main.py --config=configs/stage2.py --workdir=DIR [--config.x=...]"""

from absl import app, flags, logging
from ml_collections import config_flags

from bcdnet_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  train.setup_logging()
  if FLAGS.config.mode == "eval":
    train.evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
