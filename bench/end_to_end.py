"""End-to-end training images/s: `main.py` on an ImageNet-format ArrayRecord data set.

Makes (once, cached in --data_dir) `imagenet2012` archives of photographic JPEGs of ImageNet
sizes (random crops and rescales of scikit-learn's china.jpg / flower.jpg, ~375x500,
quality 90, like ImageNet's ~110 KB files) with `tests/helpers/imagenet_tars.py`, prepares
them with `python -m bcdnet_jax prepare imagenet2012` (ArrayRecord), then runs
`main.py` training on them and reports:
- end-to-end images/s (the training loop's own rate from metrics.jsonl, after compilation);
- step-only images/s of `bench/train_step.py` with the same model, batch, image size and
  dtype settings (no input pipeline: a batch already on the device);
- the fraction of the loop's wall time it was blocked waiting for host batches
  (results.json's `input_wait_fraction`; with asynchronous dispatch an upper bound of the
  step's wait) and `end_to_end_over_step_only`, the share of the step-only rate reached.
When end-to-end is close to step-only and the wait fraction near 0, the input pipeline keeps
up. On a small CPU the step dominates; on a GPU the comparison says how many cores the
input needs (README: "cores per GPU").

  python bench/end_to_end.py --steps 40 --batch 256 --json            # a GPU
  python bench/end_to_end.py --steps 6 --batch 4 --image_size 64 \\
      --arch bcdnet_a --images 64 --json                                # a CPU smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = common.ROOT


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=40, help="training steps (the first compiles)")
  p.add_argument("--batch", type=int, default=256, help="global batch")
  p.add_argument("--arch", default="bcdnet_a")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--images", type=int, default=3000,
                 help="training images of the synthetic data set (made once, cached)")
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--workers", type=int, default=0, help="config.data_workers (0: auto)")
  p.add_argument("--policy", default="auto", help="config.model.dtype_policy")
  p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/bcdnet-jax/end_to_end"),
                 help="where the synthetic data set is prepared (reused when present)")
  p.add_argument("--skip_step_only", action="store_true")
  p.add_argument("--json", action="store_true", help="print one JSON object as last line")
  return p.parse_args(argv)


def photo_jpeg_maker(seed: int = 0):
  """image_fn(label, index) -> JPEG bytes: a random crop of a sample photograph, rescaled to
  an ImageNet-like size (shorter side 300-500, aspect 3:4 or 4:3), quality 90."""
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images

  def image_fn(label: int, index: int) -> bytes:
    rng = np.random.default_rng([seed, index])
    p = photos[index % len(photos)]
    h = int(rng.integers(200, p.shape[0] + 1))
    w = int(rng.integers(200, p.shape[1] + 1))
    y, x = int(rng.integers(0, p.shape[0] - h + 1)), int(rng.integers(0, p.shape[1] - w + 1))
    short = int(rng.integers(300, 501))
    size = (short * 4 // 3, short) if rng.random() < 0.7 else (short, short * 4 // 3)
    img = Image.fromarray(p[y:y + h, x:x + w]).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()

  return image_fn


def ensure_dataset(a) -> str:
  """The data_dir holding the prepared synthetic imagenet2012 of `a.images` images."""
  data_dir = os.path.join(a.data_dir, f"{a.images}x{a.classes}")
  marker = os.path.join(data_dir, "prepared.json")
  if os.path.exists(marker):
    return data_dir
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from helpers.imagenet_tars import make_imagenet_tars
  manual = os.path.join(data_dir, "downloads", "manual")
  per_class = max(1, a.images // a.classes)
  print(f"making {per_class * a.classes} photographic JPEGs in {manual} ...", file=sys.stderr)
  make_imagenet_tars(manual, a.classes, per_class, max(1, per_class // 20),
                     image_fn=photo_jpeg_maker())
  subprocess.run([sys.executable, "-m", "bcdnet_jax", "prepare", "imagenet2012",
                  f"--data_dir={data_dir}", f"--manual_dir={manual}"], check=True, cwd=ROOT)
  for name in os.listdir(manual):  # the archives are not needed once prepared
    os.remove(os.path.join(manual, name))
  with open(marker, "w") as f:
    json.dump({"images": per_class * a.classes, "classes": a.classes}, f)
  return data_dir


def end_to_end(a, data_dir: str) -> dict:
  """Runs main.py; returns the training loop's images/s and input wait fraction."""
  workdir = tempfile.mkdtemp(prefix="bcdnet_e2e_")
  log_every = max(1, (a.steps - 1) // 4)
  cmd = [sys.executable, "main.py", "--config=configs/default.py", f"--workdir={workdir}",
         "--config.dataset=imagenet2012", f"--config.data_dir={data_dir}",
         f"--config.model.name={a.arch}", f"--config.model.dtype_policy={a.policy}",
         f"--config.num_train_steps={a.steps}", f"--config.batch_size={a.batch}",
         f"--config.base_batch_size={a.batch}", f"--config.eval_batch_size={a.batch}",
         f"--config.image_size={a.image_size}", f"--config.data_workers={a.workers}",
         f"--config.log_every_steps={log_every}", "--config.checkpoint_every_steps=0",
         # the step alone, as bench/train_step.py measures it (no ResNet-50 weights here)
         "--config.teacher_dir=none", "--config.init_from=none"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode != 0:
    raise SystemExit(f"main.py failed:\n{out.stderr[-3000:]}")
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  rates = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      m = json.loads(line)
      if m.get("images_per_s", 0) > 0 and m["step"] > 1:  # step 1's rate: compilation
        rates.append(m["images_per_s"])
  # each logged rate covers log_every steps (after the first step: compilation excluded),
  # so the loop's rate is their harmonic mean
  rate = len(rates) / sum(1 / r for r in rates) if rates else float("nan")
  return {"end_to_end_images_per_s": round(rate, 2),
          "input_wait_fraction": results.get("input_wait_fraction"),
          "workdir": workdir}


def step_only(a) -> dict:
  cmd = [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--framework", "jax",
         "--arch", a.arch, "--batch", str(a.batch), "--image_size", str(a.image_size),
         "--policy", a.policy, "--precision", "auto", "--warmup", "2", "--repeats", "5",
         "--json"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode != 0:
    raise SystemExit(f"train_step.py failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  a = parse(argv)
  data_dir = ensure_dataset(a)
  res = {"arch": a.arch, "batch": a.batch, "image_size": a.image_size, "steps": a.steps,
         "data_workers": a.workers, "cores": len(os.sched_getaffinity(0))}
  res.update(end_to_end(a, data_dir))
  if not a.skip_step_only:
    step = step_only(a)
    res["step_only_images_per_s"] = step["images_per_s"]
    res["end_to_end_over_step_only"] = round(res["end_to_end_images_per_s"]
                                             / step["images_per_s"], 3)
  if a.json:
    print(json.dumps(res))
  else:
    for k, v in res.items():
      print(f"{k:28s} {v}")


if __name__ == "__main__":
  main()
