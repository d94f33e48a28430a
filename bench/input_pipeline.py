"""Decoded + augmented images/s per CPU core of the training and evaluation pipelines.

Generates JPEGs of ImageNet's typical size (about 500 x 375, quality 90, random content
with smooth structure so they compress like photos), then runs the library's own
preprocessing (`data.preprocess_train`: random-resized-crop fused with JPEG decoding,
flip, normalise; `data.preprocess_eval`: decode, resize 256, centre crop 224) through
tf.data with a private thread pool of `--threads` threads, batching as training does.

  python bench/input_pipeline.py --threads 1 --json
  python bench/input_pipeline.py --threads 1,2       # a table
Cores an 8-GPU node needs = 8 x (per-GPU training images/s) / (images/s per core).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = (375, 500) if i % 3 else (500, 375)
    low = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    img = tf.image.resize(low[None], (h, w), method="bicubic")[0]
    img = img + rng.normal(0, 12, (h, w, 3))
    img = tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8)
    out.append(tf.io.encode_jpeg(img, quality=90).numpy())
  return out


def measure(jpegs: list[bytes], mode: str, threads: int, batch: int, image_size: int,
            seconds: float) -> dict:
  import tensorflow as tf

  from bcdnet_jax import data
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat()
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
  ds = ds.with_options(opts)
  it = iter(ds)
  for _ in range(3):  # warm-up
    next(it)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    n += batch
  rate = n / (time.perf_counter() - start)
  return {"mode": mode, "threads": threads, "images_per_s": round(rate, 1),
          "images_per_s_per_core": round(rate / threads, 1)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--threads", default="1", help="comma-separated thread counts")
  p.add_argument("--num_images", type=int, default=256)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--seconds", type=float, default=10.0)
  p.add_argument("--json", action="store_true")
  a = p.parse_args(argv)
  jpegs = make_jpegs(a.num_images)
  mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
  rows = [measure(jpegs, mode, int(t), a.batch, a.image_size, a.seconds)
          for t in a.threads.split(",") for mode in ("train", "eval")]
  if not a.json:
    print(f"{a.num_images} JPEGs, mean {mean_kb:.0f} KB")
    print("| pipeline | threads | images/s | images/s per core |")
    print("|---|---|---|---|")
    for r in rows:
      print(f"| {r['mode']} | {r['threads']} | {r['images_per_s']} | "
            f"{r['images_per_s_per_core']} |")
  common.emit({"jpeg_kb_mean": round(mean_kb, 1), "results": rows,
               "peak_rss_mb": round(common.peak_rss_mb(), 1)})


if __name__ == "__main__":
  main()
