"""Decoded + augmented images/s per CPU core of the training and evaluation transforms.

Runs `bcdnet_jax.data.transforms.train_transform` (PIL decode, RandomResizedCrop 224, flip;
uint8 out) and `eval_transform` (PIL decode, Resize 256, CenterCrop 224; uint8 out) on
photographic JPEGs of ImageNet size, in a `concurrent.futures.ThreadPoolExecutor` of each
`--threads` count (PIL and NumPy release the GIL), stacking host batches of `--batch` as
the loader does. The JPEGs are made once, deterministically, from scikit-learn's two
bundled photos (mosaics of random crops / rescales, 500x375 and 375x500, about 100-110 KB
at the default quality) and cached in `--images_dir`.

`--legacy /path/to/old/checkout` also measures that checkout's tf.data preprocessing
(`data.preprocess_train` / `preprocess_eval`, normalised float32 out) on the same JPEGs, in
a subprocess with the old checkout first on PYTHONPATH, right after the new path's row of
the same mode and thread count (one sitting, interleaved): rows `tf.data (legacy)`.
TensorFlow is imported in that subprocess only.

  python bench/input_pipeline.py --threads 1,2
  python bench/input_pipeline.py --threads 1,2 --legacy /tmp/old-pipeline --seconds 20
Cores an 8-GPU node needs = 8 x (per-GPU training images/s) / (images/s per core).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_RECIPE = "mosaic-v1"  # bump when the way the JPEGs are made changes (invalidates caches)


# --- the photographic JPEGs -----------------------------------------------------------------

def _photos():
  import sklearn
  from PIL import Image
  d = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
  return [Image.open(os.path.join(d, n)).convert("RGB") for n in ("china.jpg", "flower.jpg")]


def make_jpeg(i: int, photos, quality: int, tiles: int = 3) -> bytes:
  """JPEG number `i`: 500x375 (two in three) or 375x500, a `tiles` x `tiles` mosaic of
  random crops of the photos (60-100 % of the largest crop at the tile's aspect ratio,
  some mirrored) resized with LANCZOS. Downscaled tiles keep ImageNet-like detail per
  pixel (a single upscaled crop of these 640x427 photos compresses to ~50 KB)."""
  import io

  import numpy as np
  from PIL import Image
  rng = np.random.default_rng([20261130, i])
  width, height = (500, 375) if i % 3 else (375, 500)
  canvas = Image.new("RGB", (width, height))
  xs = np.linspace(0, width, tiles + 1).astype(int)
  ys = np.linspace(0, height, tiles + 1).astype(int)
  for a in range(tiles):
    for b in range(tiles):
      tw, th = int(xs[a + 1] - xs[a]), int(ys[b + 1] - ys[b])
      p = photos[int(rng.integers(len(photos)))]
      ch = int(min(p.height, p.width * th / tw) * rng.uniform(0.6, 1.0))
      cw = int(ch * tw / th)
      top, left = int(rng.integers(0, p.height - ch + 1)), int(rng.integers(0, p.width - cw + 1))
      tile = p.crop((left, top, left + cw, top + ch)).resize((tw, th), Image.LANCZOS)
      if rng.random() < 0.5:
        tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      canvas.paste(tile, (int(xs[a]), int(ys[b])))
  buf = io.BytesIO()
  canvas.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def cached_jpegs(directory: str, n: int, quality: int) -> list[str]:
  """Paths of the `n` JPEGs in `directory`, made there first if missing or made otherwise."""
  os.makedirs(directory, exist_ok=True)
  manifest = os.path.join(directory, "manifest.json")
  want = {"recipe": _RECIPE, "num_images": n, "quality": quality}
  paths = [os.path.join(directory, f"img_{i:05d}.jpg") for i in range(n)]
  try:
    with open(manifest) as f:
      if json.load(f) == want and all(os.path.exists(p) for p in paths):
        return paths
  except (OSError, ValueError):
    pass
  photos = _photos()
  for old in glob.glob(os.path.join(directory, "img_*.jpg")):
    os.remove(old)
  for i, p in enumerate(paths):
    with open(p, "wb") as f:
      f.write(make_jpeg(i, photos, quality))
  with open(manifest, "w") as f:
    json.dump(want, f)
  return paths


def read_all(paths):
  out = []
  for p in paths:
    with open(p, "rb") as f:
      out.append(f.read())
  return out


# --- the new path: PIL in a thread pool -----------------------------------------------------

def measure(jpegs: list[bytes], mode: str, threads: int, batch: int, image_size: int,
            seconds: float) -> dict:
  import numpy as np

  import bcdnet_jax.data.transforms as transforms
  n = len(jpegs)

  if mode == "train":
    def one(k):
      return transforms.train_transform(jpegs[k % n], transforms.rng(0, k),
                                        image_size=image_size, name=str(k % n))
  else:
    def one(k):
      return transforms.eval_transform(jpegs[k % n], image_size=image_size,
                                       crop_ratio=224 / 256, name=str(k % n))

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    def next_batch(start):
      return np.stack(list(pool.map(one, range(start, start + batch))))

    for b in range(2):  # warm-up
      next_batch(b * batch)
    done, k = 0, 2 * batch
    cpu0, start = time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
      out = next_batch(k)
      k += batch
      done += batch
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
  assert out.shape == (batch, image_size, image_size, 3) and out.dtype == np.uint8
  rate = done / wall
  return {"pipeline": f"PIL {mode}, uint8", "mode": mode, "threads": threads,
          "images_per_s": round(rate, 1), "images_per_s_per_core": round(rate / threads, 1),
          "images_per_cpu_s": round(done / cpu, 1)}


# --- the old path: tf.data in a subprocess --------------------------------------------------

def legacy_worker(checkout: str, images_dir: str, mode: str, threads: int, batch: int,
                  image_size: int, seconds: float) -> dict:
  """Today's tf.data preprocessing of `checkout` (run with it first on sys.path)."""
  sys.path.insert(0, checkout)
  import tensorflow as tf

  import bcdnet_jax
  from bcdnet_jax import data
  if not os.path.abspath(bcdnet_jax.__file__).startswith(os.path.abspath(checkout)):
    raise SystemExit(f"error: bcdnet_jax came from {bcdnet_jax.__file__}, not {checkout}")
  paths = sorted(glob.glob(os.path.join(images_dir, "img_*.jpg")))
  ds = tf.data.Dataset.from_tensor_slices(read_all(paths)).repeat()
  if mode == "train":
    ds = ds.enumerate().map(
        lambda i, b: data.preprocess_train(b, tf.stack([i, tf.constant(0, tf.int64)]),
                                           image_size=image_size),
        num_parallel_calls=threads, deterministic=False)
  else:
    ds = ds.map(lambda b: data.preprocess_eval(b, image_size=image_size),
                num_parallel_calls=threads, deterministic=False)
  ds = ds.batch(batch, drop_remainder=True).prefetch(2)
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = threads
  opts.threading.max_intra_op_parallelism = 1
  it = iter(ds.with_options(opts))
  for _ in range(3):  # warm-up (tracing)
    next(it)
  n = 0
  cpu0, start = time.process_time(), time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    n += batch
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
  rate = n / wall
  return {"pipeline": "tf.data (legacy)", "mode": mode, "threads": threads,
          "images_per_s": round(rate, 1), "images_per_s_per_core": round(rate / threads, 1),
          "images_per_cpu_s": round(n / cpu, 1)}


def run_legacy(checkout: str, images_dir: str, mode: str, threads: int, batch: int,
               image_size: int, seconds: float) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([checkout] + [p for p in [env.get("PYTHONPATH")] if p])
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cmd = [sys.executable, os.path.abspath(__file__), "--legacy_worker", checkout,
         "--images_dir", images_dir, "--modes", mode, "--threads", str(threads),
         "--batch", str(batch), "--image_size", str(image_size), "--seconds", str(seconds)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"pipeline": "tf.data (legacy)", "mode": mode, "threads": threads,
            "error": tail}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
  p.add_argument("--modes", default="train,eval", help="train, eval or both")
  p.add_argument("--num_images", type=int, default=256)
  p.add_argument("--quality", type=int, default=96,
                 help="JPEG quality of the generated images (96: ~105 KB mean)")
  p.add_argument("--images_dir", default=None,
                 help="cache of the generated JPEGs (default: a directory under the temp dir)")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--seconds", type=float, default=10.0, help="measured time per row")
  p.add_argument("--legacy", default=None, metavar="CHECKOUT",
                 help="also measure this old checkout's tf.data preprocessing")
  p.add_argument("--legacy_worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--json", action="store_true", help="only the JSON line")
  a = p.parse_args(argv)
  threads = [int(t) for t in a.threads.split(",")]
  modes = a.modes.split(",")
  if a.legacy_worker:
    common.emit(legacy_worker(a.legacy_worker, a.images_dir, modes[0], threads[0], a.batch,
                              a.image_size, a.seconds))
    return
  images_dir = a.images_dir or os.path.join(
      tempfile.gettempdir(), f"bcdnet-bench-jpegs-{_RECIPE}-{a.num_images}-q{a.quality}")
  paths = cached_jpegs(images_dir, a.num_images, a.quality)
  jpegs = read_all(paths)
  mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
  rows = []
  for t in threads:
    for mode in modes:
      rows.append(measure(jpegs, mode, t, a.batch, a.image_size, a.seconds))
      if a.legacy:
        rows.append(run_legacy(a.legacy, images_dir, mode, t, a.batch, a.image_size,
                               a.seconds))
  if not a.json:
    print(f"{len(jpegs)} photographic JPEGs (500x375 / 375x500, quality {a.quality}), "
          f"mean {mean_kb:.0f} KB, in {images_dir}; {os.cpu_count()} CPUs")
    print("| pipeline | threads | images/s | images/s per core |")
    print("|---|---|---|---|")
    for r in rows:
      label = f"{r['pipeline']} {r['mode']}" if "legacy" in r["pipeline"] else r["pipeline"]
      if "error" in r:
        print(f"| {label} | {r['threads']} | failed: {r['error']} | |")
        continue
      print(f"| {label} | {r['threads']} | {r['images_per_s']} | "
            f"{r['images_per_s_per_core']} |")
  common.emit({"bench": "input_pipeline", "jpeg_kb_mean": round(mean_kb, 1),
               "num_images": len(jpegs), "quality": a.quality, "results": rows,
               "tensorflow_in_main_process": "tensorflow" in sys.modules,
               "peak_rss_mb": round(common.peak_rss_mb(), 1)})


if __name__ == "__main__":
  main()
