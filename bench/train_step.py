"""Images/s of one full training step, JAX against the PyTorch reference of the released model.

A step is what `train.py` / the authors' loop runs: student forward in training mode (two
heads, BN batch statistics), label-smoothed CE on `fc` + (KD from the ResNet-50 teacher, or
CE) on `fc_dist`, backward, AdamW update. Same batch, resolution and thread count for both
frameworks; warm-up steps first (compilation / oneDNN primitive creation), then the median
of timed repeats.

  python bench/train_step.py --framework jax --arch bcdnet_a --stage 2 --batch 8 \
      --image_size 224 --json
  python bench/train_step.py --framework jax --policy bfloat16 --batch 256 --json
  python bench/train_step.py --framework torch --precision bf16 --compile --batch 256 --json
  python bench/train_step.py --compare      # all configurations, a table with ratios
  python bench/train_step.py --framework jax --diagnostics --json   # with binarisation
      # diagnostics (bcdnet_jax/diagnostics.py) computed at every step: their overhead

The PyTorch rows: fp32 eager is the released recipe; bf16 autocast + channels_last +
`torch.compile` (+ fused AdamW on CUDA) is what a PyTorch user tuning for speed runs, and
the baseline JAX is measured against. "warmup_s" (compilation, autotuning) is reported
apart from the steady-state median.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--framework", choices=["jax", "torch"], default="jax")
  p.add_argument("--arch", default="bcdnet_a")
  p.add_argument("--stage", type=int, default=2, choices=[1, 2])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--precision", default="auto",
                 help="jax: compute_dtype of the binary convs (auto, float32, int8, bfloat16);"
                      " torch: fp32 or bf16 (autocast + channels_last)")
  p.add_argument("--policy", default="float32",
                 help="jax: dtype_policy of the model (float32: true float32 products, tf32: the "
                      "backend default products, bfloat16, auto)")
  p.add_argument("--compile", action="store_true",
                 help="torch: torch.compile the student and teacher (and fused AdamW on CUDA)")
  p.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=False,
                 help="include the ResNet-50 teacher's forward (KD loss)")
  p.add_argument("--diagnostics", action="store_true",
                 help="jax: the training step with binarisation diagnostics (train.py's "
                      "diagnostics_every_steps), computed every --diagnostics_every steps")
  p.add_argument("--diagnostics_every", type=int, default=1,
                 help="jax: steps between diagnostics (1: every step, the upper bound)")
  p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--min_time_s", type=float, default=0.0)
  p.add_argument("--json", action="store_true", help="print one JSON object as last line")
  p.add_argument("--compare", action="store_true",
                 help="run JAX and PyTorch configurations in subprocesses, print a table")
  return p.parse_args(argv)


def jax_setup(a):
  """The jitted JAX training step, its state holder, batch and teacher state, and spec."""
  import jax
  import numpy as np
  from flax import nnx

  from bcdnet_jax import runtime
  from bcdnet_jax.nn import models
  from bcdnet_jax.train import step as step_lib
  from configs import default

  cfg = default.get_config()
  spec = models.get_spec(a.arch, stage=a.stage, num_classes=a.num_classes,
                         compute_dtype=a.precision if a.precision != "fp32" else "float32",
                         dtype_policy=a.policy)
  model = models.build(spec)
  train_def, eval_def, params, batch_stats = step_lib.split_model(model)
  tx, _ = step_lib.make_optimizer(cfg, 1000)
  teacher_def = teacher_state = None
  if a.teacher:
    teacher = models.create_model("resnet50", num_classes=a.num_classes,
                                  dtype_policy=a.policy)
    teacher.eval()
    teacher_def, teacher_state = nnx.split(teacher)
  lay = None
  if getattr(a, "diagnostics", False):
    from bcdnet_jax.train import diagnostics
    lay = diagnostics.layout(spec, a.image_size)
  step_fn = step_lib.make_train_step(train_def, tx, cfg, teacher_def, lay)
  step = jax.jit(step_fn, donate_argnums=0, compiler_options=runtime.compiler_options())
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
           "step": jax.numpy.zeros((), jax.numpy.int32)}
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      # uint8, as the input pipeline sends it: the step normalises on the device
      "image": rng.integers(0, 256, (a.batch, a.image_size, a.image_size, 3), np.uint8),
      "label": rng.integers(0, a.num_classes, a.batch).astype(np.int32)})
  holder = [state]
  if lay is not None:
    init_signs = jax.jit(lambda p: diagnostics.init_signs(lay, p))
    holder += [init_signs(params), 0]

  def run():
    if lay is None:
      holder[0], metrics = step(holder[0], batch, teacher_state)
      jax.block_until_ready(metrics["loss"])
      return
    holder[2] += 1
    due = jax.numpy.asarray(holder[2] % max(a.diagnostics_every, 1) == 0)
    holder[0], metrics, out = step(holder[0], batch, teacher_state,
                                   {"signs": holder[1], "due": due})
    if due:  # as diagnostics.Monitor does
      holder[1] = init_signs(holder[0]["params"])
    jax.block_until_ready((metrics["loss"], out["stats"], holder[1]))

  return run, step, holder, batch, teacher_state, spec


def jax_step(a):
  import jax

  from bcdnet_jax.nn import models

  run, _, _, _, _, spec = jax_setup(a)
  times = common.time_calls(run, warmup=a.warmup, repeats=a.repeats, min_time_s=a.min_time_s)
  extra = {"framework": "jax", "path": models.resolve_compute_dtype(spec.compute_dtype),
           "dtype_policy": models.resolve_dtype_policy(spec.dtype_policy),
           "device": str(jax.devices()[0].device_kind),
           "diagnostics_every": a.diagnostics_every if a.diagnostics else 0}
  extra.update(_jax_peak_device_mb())
  return times, extra


def _jax_peak_device_mb():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return {"peak_device_mb": round(peak / 2**20, 1)} if peak else {}


def torch_step(a):
  import numpy as np
  import torch
  import torch.nn.functional as F

  from bcdnet_jax.interop import torch_ref
  from bcdnet_jax.nn import models

  if a.threads:
    torch.set_num_threads(a.threads)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  bf16 = a.precision in ("bf16", "bfloat16")
  spec = models.get_spec(a.arch, stage=a.stage, num_classes=a.num_classes)
  model = torch_ref.build(spec).to(dev).train()
  fmt = torch.channels_last if bf16 else torch.contiguous_format
  model = model.to(memory_format=fmt)
  teacher = None
  if a.teacher:
    teacher = torch_ref.build(models.get_spec("resnet50", num_classes=a.num_classes))
    teacher = teacher.to(dev).eval().to(memory_format=fmt)
  fused = {"fused": True} if a.compile and dev == "cuda" else {}
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0, **fused)
  if a.compile:
    model = torch.compile(model)
    teacher = torch.compile(teacher) if teacher is not None else None
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.standard_normal((a.batch, 3, a.image_size, a.image_size),
                                           np.float32)).to(dev).to(memory_format=fmt)
  y = torch.from_numpy(rng.integers(0, a.num_classes, a.batch)).to(dev)
  ctx = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if bf16 else (
      lambda: torch.autocast(dev, enabled=False))

  def run():
    with ctx():
      logits, logits_dist = model(x)
      ce = F.cross_entropy(logits, y, label_smoothing=0.1)
      if teacher is not None:
        with torch.no_grad():
          t = teacher(x)
        second = -(F.softmax(t.float(), -1) * F.log_softmax(logits_dist.float(), -1)).sum(
            -1).mean()
      else:
        second = F.cross_entropy(logits_dist, y, label_smoothing=0.1)
      loss = (ce + second) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()
    else:
      loss.item()

  times = common.time_calls(run, warmup=a.warmup, repeats=a.repeats, min_time_s=a.min_time_s)
  path = "bf16_autocast_channels_last" if bf16 else "fp32"
  extra = {"framework": "torch", "path": path + ("_compile" if a.compile else ""),
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
  if dev == "cuda":
    extra["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
  return times, extra


def compare(a):
  common_args = ["--arch", a.arch, "--stage", str(a.stage), "--batch", str(a.batch),
                 "--image_size", str(a.image_size), "--threads", str(a.threads),
                 "--warmup", str(a.warmup), "--repeats", str(a.repeats),
                 "--teacher" if a.teacher else "--no-teacher"]
  best_torch = "torch bf16 autocast + channels_last + compile"
  configs = [("torch fp32 (authors')", ["--framework", "torch", "--precision", "fp32"]),
             ("torch bf16 autocast", ["--framework", "torch", "--precision", "bf16"]),
             (best_torch, ["--framework", "torch", "--precision", "bf16", "--compile"]),
             ("jax float32", ["--framework", "jax", "--precision", "float32"]),
             ("jax bf16 policy", ["--framework", "jax", "--policy", "bfloat16",
                                  "--precision", "auto"])]
  if a.stage == 2:
    configs += [("jax int8", ["--framework", "jax", "--precision", "int8"]),
                ("jax bfloat16", ["--framework", "jax", "--precision", "bfloat16"])]
  common.run_configs(os.path.abspath(__file__), configs, common_args, baseline=best_torch,
                     keys=("images_per_s", "step_time_s_median", "warmup_s", "peak_rss_mb",
                           "peak_device_mb"))


def main(argv=None):
  a = parse(argv)
  if a.compare:
    return compare(a)
  common.set_threads(a.threads)
  times, extra = (jax_step if a.framework == "jax" else torch_step)(a)
  res = common.result(times, a.batch, arch=a.arch, stage=a.stage, batch=a.batch,
                      image_size=a.image_size, teacher=a.teacher, **extra)
  common.emit(res, human=not a.json)


if __name__ == "__main__":
  main()
