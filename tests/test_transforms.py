"""Preprocessing equals PIL + torchvision's transform definitions.

The references below are written here from torchvision's definitions (PIL path): Resize
sizes, CenterCrop offsets, RandomResizedCrop.get_params, the ColorJitter ops through
Pillow's ImageEnhance / HSV conversion. The photos are scikit-learn's bundled
`china.jpg` and `flower.jpg`, read from the installed package.
"""

import io
import itertools
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance
from scipy import stats

from bcdnet_jax import data, transforms


def photo(name):
  import sklearn
  path = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", name)
  return Image.open(path).convert("RGB")


def encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def variants():
  """(label, encoded bytes): sizes incl. squares where 256 * long / short is an integer,
  and baseline / 4:4:4 / progressive / grayscale / CMYK JPEG, RGB / L / RGBA / P PNG."""
  out = []
  sizes = [(640, 427), (475, 475), (300, 300), (333, 500), (500, 333), (384, 256),
           (180, 135)]  # (width, height); the last is enlarged
  for name in ("china.jpg", "flower.jpg"):
    base = photo(name)
    for w, h in sizes:
      img = base.resize((w, h), Image.BICUBIC)
      tag = f"{name[:-4]}-{w}x{h}"
      out += [
          (f"{tag}-jpeg420", encode(img, "JPEG", quality=90)),
          (f"{tag}-jpeg444", encode(img, "JPEG", quality=95, subsampling=0)),
          (f"{tag}-progressive", encode(img, "JPEG", quality=85, progressive=True)),
          (f"{tag}-gray-jpeg", encode(img.convert("L"), "JPEG", quality=90)),
          (f"{tag}-cmyk-jpeg", encode(img.convert("CMYK"), "JPEG", quality=90)),
          (f"{tag}-png", encode(img, "PNG")),
          (f"{tag}-gray-png", encode(img.convert("L"), "PNG")),
          (f"{tag}-rgba-png", encode(img.convert("RGBA"), "PNG")),
          (f"{tag}-palette-png", encode(img.convert("P"), "PNG")),
      ]
  return out


def torchvision_eval(raw, size=224, resize=256):
  """PIL decode, torchvision Resize(resize) + CenterCrop(size), uint8."""
  img = Image.open(io.BytesIO(raw)).convert("RGB")
  w, h = img.size
  if w <= h:
    ow, oh = resize, int(resize * h / w)
  else:
    oh, ow = resize, int(resize * w / h)
  if (ow, oh) != (w, h):
    img = img.resize((ow, oh), Image.BILINEAR)
  top = int(round((oh - size) / 2.0))
  left = int(round((ow - size) / 2.0))
  return np.asarray(img.crop((left, top, left + size, top + size)))


def to_levels(normalised):
  return (np.asarray(normalised) * np.array(data.STDDEV_RGB) + np.array(data.MEAN_RGB)) * 255


@tf.function
def graph_eval(raw):
  return data.preprocess_eval(raw, image_size=224)


def test_eval_preprocessing_equals_pil_torchvision_within_one_level():
  worst, exact, total = 0.0, 0, 0
  for label, raw in variants():
    ours = to_levels(graph_eval(tf.constant(raw)).numpy())
    ref = torchvision_eval(raw)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 + 1e-3, f"{label}: {diff.max():.3f} levels"
    worst = max(worst, float(diff.max()))
    exact += int((diff < 1e-3).sum())
    total += diff.size
  print(f"\neval preprocessing vs PIL+torchvision: max {worst:.4f} levels, "
        f"{exact / total:.4%} of values identical")
  assert exact / total > 0.99


def test_fast_training_resize_within_one_level_of_pil():
  base = photo("flower.jpg")
  rng = np.random.default_rng(2)
  for _ in range(12):  # RandomResizedCrop-like crops, enlarged or shrunk to 224
    h, w = rng.integers(30, 427), rng.integers(30, 640)
    top, left = rng.integers(0, 427 - h + 1), rng.integers(0, 640 - w + 1)
    crop = base.crop((left, top, left + w, top + h))
    ref = np.asarray(crop.resize((224, 224), Image.BILINEAR)).astype(int)
    fast = transforms.resize(tf.constant(np.asarray(crop)), 224, 224, exact=False).numpy()
    assert np.abs(fast.astype(int) - ref).max() <= 1, (h, w)


def test_resize_size_is_integer_arithmetic():
  """256 * 475 / 475 in float32 is 255.99998: torchvision's size is 256."""
  img = tf.zeros([475, 475, 3], tf.uint8)
  assert transforms.resize_shorter(img, 256).shape[:2] == (256, 256)
  img = tf.zeros([300, 641, 3], tf.uint8)
  assert tuple(transforms.resize_shorter(img, 256).shape[:2]) == (256, 256 * 641 // 300)


def test_resize_equals_pil_bilinear():
  base = np.asarray(photo("china.jpg"))
  for h, w in [(256, 383), (224, 224), (600, 900), (41, 70), (427, 320)]:
    ours = transforms.resize(tf.constant(base), h, w).numpy().astype(int)
    ref = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(int)
    assert np.abs(ours - ref).max() <= 1, (h, w)
    assert (ours == ref).mean() > 0.99, (h, w)
    fast = transforms.resize(tf.constant(base), h, w, exact=False).numpy().astype(int)
    assert np.abs(fast - ref).max() <= 1, (h, w)


def test_fused_jpeg_crop_equals_decode_then_crop():
  for raw in [encode(photo("flower.jpg"), "JPEG", quality=90),
              encode(photo("china.jpg"), "JPEG", quality=80, progressive=True),
              encode(photo("china.jpg").convert("CMYK"), "JPEG", quality=90)]:
    check_fused_crops(raw)


def check_fused_crops(raw):
  full = transforms.decode(raw).numpy()
  rng = np.random.default_rng(0)
  windows = [(0, 0, 427, 640), (1, 1, 425, 637), (419, 630, 8, 10)]
  for _ in range(40):
    h, w = rng.integers(8, 427), rng.integers(8, 640)
    windows.append((rng.integers(0, 427 - h + 1), rng.integers(0, 640 - w + 1), h, w))
  for top, left, h, w in windows:
    crop = transforms.decode_crop(raw, tf.constant([top, left, h, w], tf.int32)).numpy()
    np.testing.assert_array_equal(crop, full[top:top + h, left:left + w])


# --- RandomResizedCrop ----------------------------------------------------------------------

def torchvision_crop(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """NumPy transcription of torchvision's RandomResizedCrop.get_params."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@tf.function
def our_crops(height, width, n):
  seeds = tf.stack([tf.fill([n], tf.constant(11, tf.int64)), tf.range(n, dtype=tf.int64)], 1)
  return tf.map_fn(lambda s: transforms.random_resized_crop_window(
      tf.stack([height, width]), s), seeds, fn_output_signature=tf.int32)


def crop_features(windows, height, width):
  top, left, h, w = (np.asarray(windows)[:, k].astype(float) for k in range(4))
  return {"area": h * w / (height * width), "log_ratio": np.log(w / h),
          "centre_y": (top + h / 2) / height, "centre_x": (left + w / 2) / width}


@pytest.mark.parametrize("height,width", [(500, 500), (375, 500), (500, 375), (120, 1000)])
def test_random_resized_crop_distribution_matches_torchvision(height, width):
  n = 2000
  ours = our_crops(tf.constant(height), tf.constant(width), n).numpy()
  rng = np.random.default_rng(5)
  ref = np.array([torchvision_crop(rng, height, width) for _ in range(n)])
  assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
  assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
  fa, fb = crop_features(ours, height, width), crop_features(ref, height, width)
  line = []
  for key in fa:
    res = stats.ks_2samp(fa[key], fb[key])
    line.append(f"{key} D={res.statistic:.3f} p={res.pvalue:.2f}")
    assert res.pvalue > 1e-3, (key, res)
  print(f"\n{height}x{width}: " + ", ".join(line))


def test_random_resized_crop_draws_every_offset_and_falls_back_to_centre():
  # an 8x8 window of a 9x9 image: offsets 0 and 1 both drawn (the last offset too)
  wins = our_crops(tf.constant(9), tf.constant(9), 4000).numpy()
  eight = wins[(wins[:, 2] == 8) & (wins[:, 3] == 8)]
  assert set(eight[:, 0]) == {0, 1} and set(eight[:, 1]) == {0, 1}
  # a panorama no draw fits: torchvision's centre crop at ratio 4/3
  wins = our_crops(tf.constant(40), tf.constant(1000), 50).numpy()
  rng = np.random.default_rng(0)
  assert torchvision_crop(rng, 40, 1000) == (0, 473, 40, 53)
  assert (wins == [0, 473, 40, 53]).all()
  # a tall strip: the centre crop at ratio 3/4
  wins = our_crops(tf.constant(1000), tf.constant(40), 5).numpy()
  assert (wins == [473, 0, 53, 40]).all()


# --- ColorJitter ----------------------------------------------------------------------------

def pil_hue(img, factor):
  h, s, v = img.convert("HSV").split()
  np_h = np.array(h, dtype=np.uint8)
  np_h += np.array(factor * 255).astype(np.uint8)
  return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


PIL_OPS = (lambda im, f: ImageEnhance.Brightness(im).enhance(f),
           lambda im, f: ImageEnhance.Contrast(im).enhance(f),
           lambda im, f: ImageEnhance.Color(im).enhance(f),
           pil_hue)


def jitter_inputs():
  rng = np.random.default_rng(1)
  flower = photo("flower.jpg").resize((96, 64), Image.BILINEAR)
  return [flower, Image.fromarray(rng.integers(0, 256, (48, 48, 3)).astype(np.uint8))]


@pytest.mark.parametrize("op,factors", [(0, (0.8, 1.13, 1.2)), (1, (0.8, 0.91, 1.2)),
                                        (2, (0.8, 1.07, 1.2)), (3, (-0.1, -0.037, 0.1))])
def test_each_jitter_op_equals_pil_within_one_level(op, factors):
  worst = 0
  fn = tf.function(transforms._JITTER_OPS[op])  # one trace per image shape
  for img in jitter_inputs():
    x = tf.constant(np.asarray(img), tf.float32)
    for f in factors:
      ours = fn(x, tf.constant(f, tf.float64)).numpy()
      ref = np.asarray(PIL_OPS[op](img, f)).astype(np.float32)
      worst = max(worst, float(np.abs(ours - ref).max()))
  assert worst <= 1.0
  print(f"\njitter op {op}: max {worst} levels")


def test_jitter_in_fixed_order_equals_pil():
  factors = (1.15, 0.85, 1.18, 0.06)
  fn = tf.function(lambda x, o: transforms.apply_jitter(x, o, factors))
  for order in [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]:
    for img in jitter_inputs():
      ref = img
      for k in order:
        ref = PIL_OPS[k](ref, factors[k])
      ours = fn(tf.constant(np.asarray(img), tf.float32), tf.constant(order)).numpy()
      assert np.abs(ours - np.asarray(ref)).max() <= 1.0, order


def test_jitter_order_is_a_uniform_permutation():
  n = 4800
  draws = tf.function(lambda seeds: tf.map_fn(transforms.jitter_order, seeds,
                                              fn_output_signature=tf.int32))(
      tf.stack([tf.fill([n], tf.constant(3, tf.int64)), tf.range(n, dtype=tf.int64)], 1))
  perms = [tuple(p) for p in draws.numpy()]
  counts = np.array([perms.count(p) for p in itertools.permutations(range(4))])
  assert counts.sum() == n  # every draw is a permutation
  chi = stats.chisquare(counts)
  print(f"\njitter order: 24 permutations, counts {counts.min()}-{counts.max()}, "
        f"chi-square p={chi.pvalue:.3f}")
  assert chi.pvalue > 1e-3


def test_color_jitter_skips_zero_strength_and_stays_in_range():
  img = tf.constant(np.asarray(jitter_inputs()[0]), tf.float32)
  same = transforms.color_jitter(img, tf.constant([1, 2], tf.int64))
  np.testing.assert_array_equal(same.numpy(), img.numpy())
  out = transforms.color_jitter(img, tf.constant([1, 2], tf.int64), 0.2, 0.2, 0.2, 0.1).numpy()
  assert out.min() >= 0 and out.max() <= 255 and (out == np.round(out)).all()
  assert not np.array_equal(out, img.numpy())
