"""Evaluation: top-1/top-5 of a model directory or training workdir over one or several
data sets, every example counted once on any number of processes (padded, masked batches)."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np

from bcdnet_jax import checkpoint, data, fileio, preprocessing, runtime
from bcdnet_jax.log import logger as log
from bcdnet_jax.nn import models
from bcdnet_jax.train import config as config_lib
from bcdnet_jax.train import owner
from bcdnet_jax.train import plan as plan_lib
from bcdnet_jax.train import step as step_lib
from bcdnet_jax.train import workdir as workdir_lib
from bcdnet_jax.train.config import ConfigError


def run_evaluation(p_eval, state, source, dcfg, eval_batch_size, rt: runtime.Runtime,
                   return_predictions=False) -> dict:
  """Top-1/top-5 over the whole split of `source` (a `data.Source`); checks every example
  counted once. An undecodable image raises `data.DataError` naming it."""
  local = eval_batch_size // jax.process_count()
  batches, num_batches, total = data.eval_batches(source, dcfg, local, eval_batch_size,
                                                  process_index=jax.process_index(),
                                                  process_count=jax.process_count())
  sums = {"top1": 0.0, "top5": 0.0, "count": 0.0, "scored": 0.0}
  preds = []
  seen = 0
  while True:
    try:
      host_batch = next(batches)
    except StopIteration:
      break
    except data.ImageDecodeError as e:
      raise data.DataError(f"{source.dataset} split {source.split!r}: {e}") from None
    seen += 1
    out, pred = p_eval(state, rt.global_batch(host_batch))
    out = jax.device_get(out)
    for k in sums:
      sums[k] += float(out[k])
    if return_predictions:
      mask = host_batch["mask"].astype(bool)
      preds.append(np.asarray(jax.device_get(pred))[mask] if jax.process_count() == 1
                   else None)
  if seen != num_batches or int(round(sums["count"])) != total:
    raise RuntimeError(f"evaluation counted {sums['count']:.0f} examples in {seen} batches, "
                       f"the split has {total} in {num_batches}")
  scored = int(round(sums["scored"]))
  result = {"top1": sums["top1"] / max(scored, 1), "top5": sums["top5"] / max(scored, 1),
            "num_eval_examples": scored, "num_images": total}
  if return_predictions:
    result["predictions"] = np.concatenate(preds)
  return result


def eval_entries(config) -> list[tuple[str, str]]:
  """(TFDS name, split) of each set to evaluate: `config.eval_datasets` (comma-separated
  'name[:split]'), else `config.dataset` on `config.eval_split`."""
  listed = [e for e in str(config.eval_datasets or "").split(",") if e.strip()]
  if not listed:
    return [(config.dataset, config.eval_split)]
  return [data.parse_eval_dataset(e, config.eval_split) for e in listed]


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             return_predictions: bool = False) -> dict:
  """Evaluates `config.checkpoint` (a model directory or training workdir) on each set of
  `eval_entries(config)`; the first set's numbers are also the top-level ones."""
  start = time.time()
  rt = runtime.Runtime.create()
  config_lib.validate(config, rt.size)
  if not config.checkpoint:
    raise ConfigError("config.checkpoint: set it to a model directory (convert_torch_ckpt.py "
                      "output) or a training workdir")
  config_lib.check_workdir(workdir)
  held = [f for f in (checkpoint.SPEC_FILE, checkpoint.TRAIN_CHECKPOINTS)
          if os.path.exists(os.path.join(workdir, f))]
  if held:  # its config.json and results.json would be replaced by the evaluation's
    raise ConfigError(f"--workdir={workdir} holds a training run or a model ({held[0]}); "
                      "evaluation writes config.json and results.json there: use another "
                      "--workdir (e.g. a new directory)")
  owner.check_owner(workdir, "eval")
  with plan_lib.naming("config.checkpoint"):
    model = models.set_dtype_policy(checkpoint.restore_model(config.checkpoint, rt),
                                   config.model.dtype_policy)
  if jax.process_index() == 0:  # which stage it holds, one line (a torch file records none)
    log.info("evaluating %s", checkpoint.describe(config.checkpoint))
  pre = preprocessing.resolve(checkpoint.read_preprocessing(config.checkpoint),
                              image_size=config.image_size,
                              crop_ratio=config.eval_crop_ratio, where=config.checkpoint)
  config_lib.check_image_size(model.spec, pre["image_size"],
                              "config.image_size" if config.image_size else
                              f"the image size recorded in {config.checkpoint}")
  entries = eval_entries(config)
  data.set_max_image_pixels(config.get("max_image_pixels", 0))  # the folder scans below
  sources = [data.open_source(name, split, config.data_dir or None) for name, split in entries]
  for (name, _), source in zip(entries, sources):  # all checked before any work
    if model.spec.num_classes != source.num_classes:
      raise ConfigError(f"config.checkpoint: the model has {model.spec.num_classes} "
                        f"classes, dataset {name!r} has {source.num_classes}")
    data.check_labels(source)  # an unlabelled split (-1) would be scored against class -1
  _, eval_def, params, batch_stats = step_lib.split_model(model)
  state = rt.replicate({"params": params, "batch_stats": batch_stats})
  p_eval = rt.jit_eval_step(eval_def, pre["mean_rgb"], pre["stddev_rgb"])
  dcfg = dataclasses.replace(plan_lib.data_config(config), image_size=pre["image_size"],
                             eval_crop_ratio=pre["crop_ratio"])

  per_set = {}
  for (name, split), source in zip(entries, sources):
    r = run_evaluation(p_eval, state, source, dcfg, config.eval_batch_size, rt,
                       return_predictions)
    per_set[f"{name}:{split}"] = r
    if jax.process_index() == 0:
      log.info("%s:%s: top-1 %.4f top-5 %.4f on %d examples", name, split, r["top1"],
               r["top5"], r["num_eval_examples"])
  result = dict(next(iter(per_set.values())))
  result.update(steps=0, wall_time_s=time.time() - start, checkpoint=config.checkpoint,
                dataset=entries[0][0], eval_split=entries[0][1], preprocessing=pre,
                datasets={k: {f: v[f] for f in ("top1", "top5", "num_eval_examples",
                                                 "num_images")}
                          for k, v in per_set.items()})
  _write(config, workdir, result)
  return result


def _write(config, workdir: str, result: dict) -> None:
  """config.json and results.json: an evaluation writes only here, at the end, locked (and
  its workdir checked again: another run may have begun there meanwhile)."""
  with owner.lock(workdir):
    owner.check_owner(workdir, "eval")
    if jax.process_index() == 0:
      owner.claim(workdir, "eval")
      fileio.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE), config.to_dict())
      fileio.write_json(os.path.join(workdir, workdir_lib.RESULTS_FILE),
                        {k: v for k, v in result.items() if k != "predictions"})


def evaluate_sets(config, model_dir: str, workdir: str) -> dict:
  """Evaluation mode on `config.eval_datasets` of the model in `model_dir`, written to
  `workdir/eval/`; returns {"datasets": ..., "eval_wall_time_s": ...} for results.json."""
  ev = config.copy_and_resolve_references()
  with ev.unlocked():
    ev.mode, ev.checkpoint, ev.pipeline = "eval", model_dir, ml_collections.ConfigDict()
    ev.image_size, ev.eval_crop_ratio = 0, 0.0  # the preprocessing recorded with the model
  r = evaluate(ev, os.path.join(workdir, "eval"))
  return {"datasets": r["datasets"], "eval_wall_time_s": r["wall_time_s"]}
