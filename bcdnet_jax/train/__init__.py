"""The experiment harness behind `main.py`.

    step          the released schedule, AdamW, losses, the jitted train step (JAX + optax
                  only: what `bench/` times and a user's own loop can import)
    plan          everything checked and decided before anything is written
    workdir       the on-disk layout of a run: records, results, checkpoints, damage
    owner         whose a workdir is (.bcdnet_run.json) and the lock of the run in it
    preemption    SIGTERM / SIGUSR1 / Ctrl-C: checkpoint and exit cleanly
    loop          one training run, top to bottom
    evaluate      top-1/top-5 over one or several data sets
    pipeline      multi-stage recipes (stage 1 -> stage 2 -> final evaluation)
    config        every config field's type, range and check
    diagnostics   binarisation statistics inside the train step
    metric_writer TensorBoard scalars + JSON lines
    report        plots and a page of a workdir (`bcdnet-report`)
    distributed   multi-process start-up (SLURM or explicit flags)

Modules are imported on use: `import bcdnet_jax.train.step` loads no Orbax or Grain.
"""


import os


def run(config, workdir: str, *, cli_overrides=frozenset()) -> dict:
  """`main.py`'s entry point: an evaluation (`config.mode == "eval"`), a multi-stage
  pipeline (`config.pipeline` set) or a single training run; returns its results.

  Args:
    config: an `ml_collections.ConfigDict` (configs/default.py's fields).
    workdir: the run's directory (created; see `bcdnet_jax.train.workdir`).
    cli_overrides: the config fields set on the command line (they win over a pipeline
      stage's values).
  Raises:
    errors.UserError subclasses (ConfigError, DataError, CheckpointError, ...) for
    anything the user can fix; `main.py` prints them as one `error:` line.
  """
  # imported here, not at the top, so that `bcdnet_jax.train.step` stays JAX + optax only
  from bcdnet_jax.train import config as config_lib
  from bcdnet_jax.train import evaluate, loop, pipeline
  from bcdnet_jax.train import workdir as workdir_lib
  config_lib.check_fields(config)  # config.mode among them
  try:
    if config.mode == "eval":
      return evaluate.evaluate(config, workdir)
    if config.pipeline:
      return pipeline.run_pipeline(config, workdir, None, cli_overrides)
    return loop.train_and_evaluate(config, workdir)
  except OSError as e:  # a record, a metric line, the lock: written whole or not at all
    full = workdir_lib.disk_full(e)
    if full is None:
      raise
    where = os.path.dirname(e.filename) if e.filename else workdir
    raise workdir_lib.SaveError(f"disk full writing in {where} ({full}); nothing already "
                                "written was lost (files are replaced whole): free space and "
                                "run the same command") from None
