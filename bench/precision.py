"""How far a dtype policy is from true float32: flipped binary activations, top-1 agreement.

Runs `bcdnet_jax.nn.precision.compare_policies` (evaluation mode, same weights, `--reference`
against `--policy`) on
- the two released-format fixtures (tests/fixtures, stage 1 and stage 2, reduced width),
- a full-width BCDNet-A stage 2 with torch's initialisation and random BN statistics and
  affine parameters (the converter tests' recipe),
- optionally trained model directories / workdirs (`--model_dir`, e.g. the digits demo),
on `--images` random crops of scikit-learn's two sample photographs (ImageNet
normalisation) or, for digits models, the digits test split. Prints a Markdown table and
writes it with the numbers as JSON to `--out`.

  python bench/precision.py --images 256 --model_dir runs/digits_bf16/stage2 --out /tmp/p
  python bench/precision.py --policy tf32 --out /tmp/p_tf32   # TF32 products, on a GPU

The reference is true float32 (products at `jax.lax.Precision.HIGHEST` on every backend)
unless `--reference` says otherwise; `--policy tf32` measures what the GPUs' default TF32
products change (on a CPU nothing: float32 products either way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FIXTURES = os.path.join(common.ROOT, "tests", "fixtures", "bcdnet_torch")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--policy", default="bfloat16", help="float32, tf32, bfloat16 or auto")
  p.add_argument("--reference", default="float32",
                 help="the policy compared against (default: true float32)")
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--full_size", type=int, default=224, help="image size of the full-width model")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--model_dir", action="append", default=[],
                 help="a trained model directory or workdir (repeatable)")
  p.add_argument("--skip_full_width", action="store_true")
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--out", default="", help="directory for precision.md and precision.json")
  return p.parse_args(argv)


def photo_crops(n: int, size: int, seed: int = 0):
  """n random square crops of the scikit-learn sample photographs, resized (PIL bilinear)
  to size x size and normalised with the ImageNet mean and deviation (NHWC float32)."""
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_sample_images

  from bcdnet_jax import preprocessing
  rng = np.random.default_rng(seed)
  photos = load_sample_images().images
  out = []
  for i in range(n):
    p = photos[i % len(photos)]
    s = int(rng.integers(min(size, min(p.shape[:2]) - 1), min(p.shape[:2])))
    y, x = rng.integers(0, p.shape[0] - s + 1), rng.integers(0, p.shape[1] - s + 1)
    img = Image.fromarray(p[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR)
    out.append(np.asarray(img, np.float32) / 255)
  mean = np.asarray(preprocessing.MEAN_RGB, np.float32)
  std = np.asarray(preprocessing.STDDEV_RGB, np.float32)
  return (np.stack(out) - mean) / std


def randomise_batch_norm(model, seed: int):
  """Random BN statistics and affine parameters (running means N(0, 0.1), variances
  U(0.5, 2), scales 1 + N(0, 0.1), biases N(0, 0.1)), as the converter tests do."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from bcdnet_jax.nn import layers
  rng = np.random.default_rng(seed)
  for _, bn in model.iter_modules():
    if isinstance(bn, layers.BatchNorm):
      c = bn.scale[...].shape
      bn.mean[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
      bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
      bn.scale[...] = jnp.asarray(1 + rng.normal(0, 0.1, c), jnp.float32)
      bn.bias[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
  return nnx.clone(model)


def digits_test_images(model_dir: str):
  """The digits test split, preprocessed as the model was (its model.json), with labels."""
  import dataclasses
  import tempfile

  import numpy as np

  from bcdnet_jax import checkpoint, data, preprocessing
  from bcdnet_jax.train import plan as plan_lib
  from configs import digits
  pre = preprocessing.resolve(checkpoint.read_preprocessing(model_dir), image_size=0,
                              crop_ratio=0.0, where=model_dir)
  source = data.open_source("digits", "test", tempfile.mkdtemp(prefix="digits_"))
  dcfg = dataclasses.replace(plan_lib.data_config(digits.get_config()),
                             image_size=pre["image_size"], eval_crop_ratio=pre["crop_ratio"])
  batches, _, _ = data.eval_batches(source, dcfg, 120, 120)
  images, labels = [], []
  for batch in batches:
    keep = batch["mask"].astype(bool)
    images.append(preprocessing.normalize(batch["image"][keep], pre["mean_rgb"],
                                          pre["stddev_rgb"]))
    labels.append(batch["labels"][keep].argmax(-1))
  return np.concatenate(images), np.concatenate(labels)


def rows(a):
  import numpy as np

  from bcdnet_jax import checkpoint
  from bcdnet_jax.interop import convert
  from bcdnet_jax.nn import models, precision
  spec_tiny = dict(num_classes=10, channels=[4, 8, 16, 16, 32, 32, 64, 64, 64, 64, 128])
  for name, stage in (("a_3f", 1), ("a_3", 2)):
    sd = convert.read_torch_checkpoint(os.path.join(FIXTURES, f"{name}_tiny.pth.tar"))
    model, _ = convert.from_torch_state_dict(
        sd, models.get_spec("bcdnet_a", stage=stage, **spec_tiny))
    r = precision.compare_policies(model, photo_crops(a.images, 96), policy=a.policy,
                                   reference=a.reference, batch_size=a.batch)
    yield f"fixture {name} (stage {stage}, reduced width), 96 px photo crops", r
  if not a.skip_full_width:
    model = randomise_batch_norm(models.create_model("bcdnet_a", stage=2), seed=1)
    r = precision.compare_policies(model, photo_crops(a.images, a.full_size),
                                   policy=a.policy, reference=a.reference,
                                   batch_size=a.batch)
    yield f"full-width bcdnet_a stage 2 (random weights), {a.full_size} px photo crops", r
  for d in a.model_dir:
    model = checkpoint.restore_model(d)
    images, labels = digits_test_images(d)
    r = precision.compare_policies(model, images, policy=a.policy, reference=a.reference,
                                   batch_size=a.batch)
    for policy in (a.reference, a.policy):
      m = models.set_dtype_policy(model, policy)
      m.eval()
      logits = np.concatenate([np.asarray(precision.logits_and_signs(m, images[i:i + 120])[0])
                               for i in range(0, len(images), 120)])
      r[f"top1_{models.resolve_dtype_policy(policy)}"] = float(
          np.mean(logits.argmax(-1) == labels))
    yield f"{d} (trained), digits test split", r


def main(argv=None):
  a = parse(argv)
  common.set_threads(a.threads)
  results = []
  lines = [f"policy {a.policy} against {a.reference} (evaluation mode, same weights)", "",
           "| model, images | binary activations differing | top-1 agreement | "
           f"max abs logit diff (max abs logit) | top-1 {a.reference} / policy |",
           "|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  for label, r in rows(a):
    results.append({"label": label, **r})
    ref = "top1_" + r["reference"]
    acc = (f"{100 * r[ref]:.2f} % / {100 * r['top1_' + r['policy']]:.2f} %"
           if ref in r else "")
    line = (f"| {label} | {r['flipped_binary_activations']:,} of {r['binary_activations']:,} "
            f"({100 * r['flipped_fraction']:.3f} %) | {100 * r['top1_agreement']:.1f} % of "
            f"{r['images']} | {r['max_abs_logit_diff']:.3g} ({r['max_abs_logit']:.3g}) | {acc} |")
    lines.append(line)
    print(line, flush=True)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "precision.md"), "w") as f:
      f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "precision.json"), "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
