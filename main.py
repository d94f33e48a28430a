"""Train or evaluate: python main.py --config=configs/stage2.py --workdir=DIR [--config.x=...]

Several processes (one per GPU) run the same command: under `srun` nothing more is needed;
elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
Known mistakes (config, data, checkpoints) end with one line `error: ...` and exit code 2.
"""

import os
import sys

if not sys.stderr.isatty():
  # progress bars (TFDS preparing a data set) write carriage returns and cursor escapes:
  # in a redirected log they are noise; on a terminal they stay
  os.environ.setdefault("TQDM_DISABLE", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bcdnet_jax import errors, log, train  # noqa: E402
from bcdnet_jax.train import config as config_lib  # noqa: E402
from bcdnet_jax.train import distributed  # noqa: E402
from bcdnet_jax.train import flags as cli_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_list("local_device_ids", None, "Devices of this process, e.g. 0,1,2,3.")
flags.DEFINE_integer("heartbeat_timeout_s", 100,
                     "A process silent this long is declared dead by JAX; the others say "
                     "so in one line (exit code 75) after a quarter of it.")
flags.DEFINE_integer("initialization_timeout_s", 300,
                     "How long start-up waits for every process to register (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  log.setup()
  with errors.one_line():
    # every process checks the file before the start-up waits for the others
    config_lib.check_fields(FLAGS.config, f"--config={FLAGS['config'].config_filename}")
    try:
      distributed.initialize(
          FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
          FLAGS.local_device_ids, initialization_timeout_s=FLAGS.initialization_timeout_s,
          heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
          resume_hint="rerun the same command to resume from the last checkpoint in "
          f"{FLAGS.workdir}")
      train.run(FLAGS.config, FLAGS.workdir, cli_overrides=cli_flags.config_overrides(sys.argv))
    except errors.UserError:
      raise
    except Exception:
      distributed.await_lost_peer()  # a peer lost: its one line and exit come from there
      raise
    except KeyboardInterrupt:
      # Ctrl-C inside the training loop saves and exits 0 (train.preemption); here it came
      # before the loop (checks, compilation), during an evaluation, or as a second Ctrl-C
      print("interrupted: nothing of this run was written since its last checkpoint; "
            "resume by running the same command", file=sys.stderr)
      sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.parse_flags)
