"""The experiment harness behind `main.py`.

Modules, imported on use (the step alone needs only JAX and optax):
    step          schedule, optimiser, losses, the jitted train step
    config        every config field's type, range and check
    diagnostics   binarisation statistics inside the train step
    metric_writer TensorBoard scalars + JSON lines
    report        plots and a page of a workdir (`bcdnet-report`)
    distributed   multi-process start-up (SLURM or explicit flags)

`run(config, workdir)` dispatches training, a multi-stage pipeline or an evaluation.
"""


def run(config, workdir, **kw):
  """`main.py`'s entry point (see `bcdnet_jax.train.trainer.run`)."""
  from bcdnet_jax.train import trainer
  return trainer.run(config, workdir, **kw)
