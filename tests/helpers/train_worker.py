"""Runs a very small digits training as one of several processes (used by the tests).

  python tests/helpers/train_worker.py WORKDIR DATA_DIR STEPS [--kill_at N] [main.py flags]

Starts jax.distributed the way main.py does (explicit flags, or SLURM_* variables), trains,
and writes this process's final parameters to WORKDIR/params_<process>.npz.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def main():
  workdir, data_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
  rest = sys.argv[4:]
  kill_at = signal_at = None
  opts = {}
  while rest:
    key, value = rest[0].lstrip("-"), rest[1]
    rest = rest[2:]
    if key == "kill_at":
      kill_at = int(value)
    elif key == "signal_at":  # SIGTERM to this process after that step
      signal_at = int(value)
    else:
      opts[key] = value
  from bcdnet_jax import log as log_lib
  from bcdnet_jax.train import distributed, loop
  log_lib.setup()
  distributed.initialize(opts.get("coordinator_address"),
                         int(opts["num_processes"]) if "num_processes" in opts else None,
                         int(opts["process_id"]) if "process_id" in opts else None,
                         heartbeat_timeout_s=int(opts.get("heartbeat_timeout_s", 100)),
                         initialization_timeout_s=int(opts.get("initialization_timeout_s",
                                                               300)))
  import jax
  import numpy as np

  from helpers.configs import small_config
  cfg = small_config(data_dir, tiny=True, num_train_steps=steps,
                     checkpoint_every_steps=int(opts.get("checkpoint_every", 2)))

  def hook(step):
    if kill_at is not None and step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    if signal_at is not None and step == signal_at:
      os.kill(os.getpid(), signal.SIGTERM)

  try:
    res = loop.train_and_evaluate(cfg, workdir, step_hook=hook, return_params=True)
  except Exception:
    distributed.await_lost_peer()  # as main.py: a lost peer is one line
    raise
  if res.get("preempted"):
    print("PREEMPTED AT", res["steps"], flush=True)
    return
  flat = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(res["params"]))}
  np.savez(os.path.join(workdir, f"params_{jax.process_index()}.npz"), **flat)
  print("PROCESSES", jax.process_count(), "DEVICES", jax.device_count(), flush=True)


if __name__ == "__main__":
  main()
