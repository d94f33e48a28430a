"""Evaluation throughput and peak memory: JAX paths against the PyTorch reference.

JAX paths: the Flax model in evaluation mode with its stage-2 binary convs on float32,
int8 (int32 accumulation) or bfloat16 operands, and the deploy artefact of
`bcdnet_jax.deploy.export` on its 'float', 'int8' and 'packed' (XNOR + popcount) paths; all are
exact for the binary parts; `--policy bfloat16` stores the model's activations in bfloat16.
PyTorch: fp32 (as released), bf16 autocast + channels_last, and the same plus
`torch.compile` ('bf16-compile', the baseline a PyTorch user tuning for speed runs).
"warmup_s" (compilation, autotuning) is reported apart from the steady-state median.

  python bench/inference.py --framework jax --arch bcdnet_a --batch 8 --image_size 224 --json
      (measures every exact JAX path, each in its own process, and reports the fastest,
       naming it in "path"; --path picks one)
  python bench/inference.py --compare    # all paths of both frameworks, a table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

JAX_MODEL_PATHS = ("float32", "int8", "bfloat16")
JAX_DEPLOY_PATHS = ("deploy-float", "deploy-int8", "deploy-packed")
TORCH_PATHS = ("fp32", "bf16", "bf16-compile")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--framework", choices=["jax", "torch"], default="jax")
  p.add_argument("--arch", default="bcdnet_a")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--path", default="fastest",
                 help=f"jax: {', '.join(JAX_MODEL_PATHS + JAX_DEPLOY_PATHS)} or fastest; "
                      f"torch: {', '.join(TORCH_PATHS)}")
  p.add_argument("--policy", default="float32",
                 help="jax model paths: dtype_policy (float32: true float32 products, tf32: the "
                      "backend default products, bfloat16, auto)")
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--min_time_s", type=float, default=0.0)
  p.add_argument("--json", action="store_true")
  p.add_argument("--compare", action="store_true")
  return p.parse_args(argv)


def _images(a, nchw=False):
  import numpy as np
  shape = (a.batch, 3, a.image_size, a.image_size) if nchw else (
      a.batch, a.image_size, a.image_size, 3)
  return np.random.default_rng(0).standard_normal(shape, np.float32)


def jax_infer(a):
  import jax
  from flax import nnx

  from bcdnet_jax.nn import models
  x = jax.device_put(_images(a))
  if a.path in JAX_MODEL_PATHS:
    spec = models.get_spec(a.arch, stage=2, num_classes=a.num_classes,
                           compute_dtype=a.path, dtype_policy=a.policy)
    model = models.build(spec)
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
      return nnx.merge(graphdef, state)(x)
    fn = lambda: jax.block_until_ready(forward(state, x))  # noqa: E731
  elif a.path in JAX_DEPLOY_PATHS:
    from bcdnet_jax.deploy import export
    model = models.create_model(a.arch, stage=2, num_classes=a.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
      f = os.path.join(tmp, "model.bcdnet")
      export.export_model(model, f)
      del model
      predict = export.load_packed(f)
    path = a.path.split("-", 1)[1]
    fn = lambda: jax.block_until_ready(predict(x, path=path))  # noqa: E731
  else:
    raise SystemExit(f"--path {a.path!r}: expected one of "
                     f"{JAX_MODEL_PATHS + JAX_DEPLOY_PATHS} or 'fastest'")
  times = common.time_calls(fn, warmup=a.warmup, repeats=a.repeats, min_time_s=a.min_time_s)
  extra = {"framework": "jax", "path": a.path, "device": str(jax.devices()[0].device_kind)}
  if a.path in JAX_MODEL_PATHS:
    extra["dtype_policy"] = models.resolve_dtype_policy(a.policy)
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("peak_bytes_in_use"):
    extra["peak_device_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return times, extra


def torch_infer(a):
  import torch

  from bcdnet_jax.interop import torch_ref
  from bcdnet_jax.nn import models
  if a.threads:
    torch.set_num_threads(a.threads)
  if a.path not in TORCH_PATHS:
    raise SystemExit(f"--path {a.path!r}: expected one of {TORCH_PATHS} for torch")
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  bf16 = a.path.startswith("bf16")
  fmt = torch.channels_last if bf16 else torch.contiguous_format
  model = torch_ref.build(models.get_spec(a.arch, stage=2, num_classes=a.num_classes))
  model = model.to(dev).eval().to(memory_format=fmt)
  if a.path.endswith("-compile"):
    model = torch.compile(model)
  x = torch.from_numpy(_images(a, nchw=True)).to(dev).to(memory_format=fmt)

  def fn():
    with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
      y = model(x)
    if dev == "cuda":
      torch.cuda.synchronize()
    return y.float().sum().item()

  times = common.time_calls(fn, warmup=a.warmup, repeats=a.repeats, min_time_s=a.min_time_s)
  extra = {"framework": "torch",
           "path": {"fp32": "fp32", "bf16": "bf16_autocast_channels_last",
                    "bf16-compile": "bf16_autocast_channels_last_compile"}[a.path],
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
  if dev == "cuda":
    extra["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
  return times, extra


def _args(a):
  return ["--arch", a.arch, "--batch", str(a.batch), "--image_size", str(a.image_size),
          "--num_classes", str(a.num_classes), "--threads", str(a.threads),
          "--policy", a.policy,
          "--warmup", str(a.warmup), "--repeats", str(a.repeats),
          "--min_time_s", str(a.min_time_s)]


def fastest(a):
  """Each exact JAX path in its own process; returns the fastest one's result."""
  best, tried = None, {}
  for path in JAX_MODEL_PATHS + JAX_DEPLOY_PATHS:
    cmd = [sys.executable, os.path.abspath(__file__), "--framework", "jax", "--path", path,
           *_args(a), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      print(f"# path {path} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
      continue
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    tried[path] = res["images_per_s"]
    print(f"# {path}: {res['images_per_s']} images/s", file=sys.stderr, flush=True)
    if best is None or res["images_per_s"] > best["images_per_s"]:
      best = res
  if best is None:
    raise SystemExit("every JAX path failed")
  best["paths_images_per_s"] = tried
  return best


def compare(a):
  best_torch = "torch bf16 autocast + channels_last + compile"
  configs = [("torch fp32 (authors')", ["--framework", "torch", "--path", "fp32"]),
             ("torch bf16 autocast", ["--framework", "torch", "--path", "bf16"]),
             (best_torch, ["--framework", "torch", "--path", "bf16-compile"])]
  configs += [(f"jax {p}", ["--framework", "jax", "--path", p])
              for p in JAX_MODEL_PATHS + JAX_DEPLOY_PATHS]
  configs += [(f"jax {p} bf16 policy", ["--framework", "jax", "--path", p, "--policy",
                                        "bfloat16"]) for p in ("int8", "bfloat16")]
  common.run_configs(os.path.abspath(__file__), configs, _args(a), baseline=best_torch,
                     keys=("images_per_s", "step_time_s_median", "warmup_s", "peak_rss_mb",
                           "peak_device_mb"))


def main(argv=None):
  a = parse(argv)
  if a.compare:
    return compare(a)
  if a.framework == "jax" and a.path == "fastest":
    res = fastest(a)
  else:
    if a.framework == "torch" and a.path == "fastest":
      a.path = "fp32"  # as released; bf16 autocast is the other (--compare runs both)
    common.set_threads(a.threads)
    times, extra = (jax_infer if a.framework == "jax" else torch_infer)(a)
    res = common.result(times, a.batch, arch=a.arch, batch=a.batch,
                        image_size=a.image_size, **extra)
  common.emit(res, human=not a.json)


if __name__ == "__main__":
  main()
