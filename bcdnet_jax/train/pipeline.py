"""Multi-stage recipes (`config.pipeline`): stage 1, then stage 2 initialised from it, in
subdirectories of one workdir, then the final model's evaluation on `config.eval_datasets`."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from bcdnet_jax import fileio
from bcdnet_jax.log import logger as log
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train import evaluate as evaluate_lib
from bcdnet_jax.train import loop as loop_lib
from bcdnet_jax.train import owner, report
from bcdnet_jax.train import workdir as workdir_lib


def stage_config(config, name, overrides, cli_overrides):
  """`config` with a pipeline stage's values, except fields set on the command line: those
  win (`--config.num_train_steps=30` shortens every stage), and the log says so."""
  stage_cfg = config.copy_and_resolve_references()
  flat = {}
  for k, v in overrides.items():
    if isinstance(v, ml_collections.ConfigDict):
      flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
    else:
      flat[k] = v
  with stage_cfg.unlocked():
    stage_cfg.pipeline = ml_collections.ConfigDict()
    for key, v in flat.items():
      if key in cli_overrides:
        log.info("pipeline stage %s: config.%s from the command line replaces the stage's "
                 "%r", name, key, v)
        continue
      parent, _, leaf = key.rpartition(".")
      (stage_cfg[parent] if parent else stage_cfg)[leaf] = v
  return stage_cfg


def run_pipeline(config, workdir, step_hook, cli_overrides=frozenset()):
  """Runs the stages of `config.pipeline` in order, each initialised from the last, then
  evaluates the final model on `config.eval_datasets` (when set). Every stage's config is
  checked before the first one starts. Rerunning the command resumes where it stopped:
  finished stages keep their results, an interrupted stage resumes from its newest
  checkpoint."""
  config_lib.check_workdir(workdir)
  owner.check_owner(workdir, "pipeline", stages=list(config.pipeline.keys()))
  stages, previous = [], None
  for name, overrides in config.pipeline.items():
    stage_cfg = stage_config(config, name, overrides, cli_overrides)
    with stage_cfg.unlocked():
      if previous is not None and not stage_cfg.init_from:
        stage_cfg.init_from = previous
      stage_cfg.eval_datasets = ""  # the final model's, below
    config_lib.validate(stage_cfg, jax.device_count())
    previous = os.path.join(workdir, name)
    stages.append((name, stage_cfg, previous))
  with owner.lock(workdir):
    if jax.process_index() == 0:
      owner.claim(workdir, "pipeline")
    return _run_stages(config, workdir, stages, step_hook)


def _run_stages(config, workdir, stages, step_hook) -> dict:
  results = {}
  for name, stage_cfg, sub in stages:
    log.info("pipeline stage %s -> %s", name, sub)
    results[name] = loop_lib.train_and_evaluate(stage_cfg, sub, step_hook=step_hook)
    if results[name].get("preempted"):
      return results[name]
  final = dict(results[name])
  final.update(stages=results,
               wall_time_s=sum(r.get("wall_time_s", 0.0) for r in results.values()))
  if config.eval_datasets:
    final.update(final_sets(config, sub, workdir))
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, workdir_lib.RESULTS_FILE), final)
    fileio.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE), {
        **config.to_dict(),
        "deviations": sorted({d for _, c, _ in stages for d in config_lib.deviations(c)})})
    write_report(workdir)
  return final


def final_sets(config, model_dir: str, workdir: str) -> dict:
  """`evaluate.evaluate_sets` of the pipeline's final model, or its earlier results when
  they are newer than the model's results.json and cover the same sets (a rerun of a finished
  pipeline evaluates nothing again)."""
  done_path = os.path.join(workdir, "eval", "results.json")
  try:
    if os.path.getmtime(done_path) >= os.path.getmtime(os.path.join(model_dir,
                                                                    "results.json")):
      with open(done_path) as f:
        done = json.load(f)
      wanted = [f"{name}:{split}" for name, split in evaluate_lib.eval_entries(config)]
      if done.get("checkpoint") == model_dir and list(done.get("datasets", {})) == wanted:
        log.info("%s: the final evaluation was done earlier; kept", done_path)
        return {"datasets": done["datasets"], "eval_wall_time_s": done["wall_time_s"]}
  except (OSError, ValueError):
    pass
  return evaluate_lib.evaluate_sets(config, model_dir, workdir)


def write_report(workdir: str) -> str | None:
  """`bcdnet-report`'s plots and page of `workdir` in workdir/report; a report that
  cannot be made is a warning, not a failed run (the training results are written)."""
  try:
    index = report.build(workdir)
  except Exception as e:  # noqa: BLE001 - plotting must not fail a finished training
    log.warning("report of %s not written: %s", workdir, e)
    return None
  log.info("report: %s", index)
  return index
