"""`bcdnet_jax.data.transforms` equals PIL + torchvision's transform definitions.

The references below are written here from torchvision's definitions (PIL path): the
default loader (`Image.open(f).convert("RGB")`), `Resize` sizes, `CenterCrop` offsets and
padding, `resized_crop`, `RandomResizedCrop.get_params`, `RandomHorizontalFlip`,
`ColorJitter.get_params` / `forward` and the ops through Pillow's ImageEnhance / HSV
conversion. Every resize reference is Pillow <= 12's (`helpers.resample.released_resize`,
NumPy, horizontal pass then vertical, each rounded), the order the released models were
trained with, whatever the installed Pillow does. The photos are scikit-learn's bundled
`china.jpg` and `flower.jpg`, read from the installed package, re-encoded in every format
the pipeline must read.
"""

import functools
import io
import itertools
import math
import os

import numpy as np
import pytest
from helpers.resample import released_resize
from PIL import Image, ImageEnhance
from scipy import stats

import bcdnet_jax.data.transforms as transforms
from bcdnet_jax import errors


def photo(name):
  import sklearn
  path = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", name)
  return Image.open(path).convert("RGB")


def encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def gif_with_transparency(img):
  """A palette GIF whose transparent index is a colour the picture uses a lot: PIL's
  convert("RGB") gives the palette colour there (not black)."""
  pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
  index = int(np.bincount(np.asarray(pal).ravel()).argmax())
  return encode(pal, "GIF", transparency=index)


def encodings(img, tag):
  """(label, bytes) of `img` in every encoding the pipeline reads."""
  u16 = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257 // 3))
  assert u16.mode == "I;16"
  return [
      (f"{tag}-jpeg420", encode(img, "JPEG", quality=90)),
      (f"{tag}-jpeg444", encode(img, "JPEG", quality=95, subsampling=0)),
      (f"{tag}-progressive", encode(img, "JPEG", quality=85, progressive=True)),
      (f"{tag}-gray-jpeg", encode(img.convert("L"), "JPEG", quality=90)),
      (f"{tag}-cmyk-jpeg", encode(img.convert("CMYK"), "JPEG", quality=90)),
      (f"{tag}-png", encode(img, "PNG", compress_level=1)),
      (f"{tag}-gray-png", encode(img.convert("L"), "PNG", compress_level=1)),
      (f"{tag}-rgba-png", encode(img.convert("RGBA"), "PNG", compress_level=1)),
      (f"{tag}-palette-png", encode(img.convert("P"), "PNG", compress_level=1)),
      (f"{tag}-gray16-png", encode(u16, "PNG", compress_level=1)),
      (f"{tag}-transparent-gif", gif_with_transparency(img)),
      (f"{tag}-bmp", encode(img, "BMP")),
      (f"{tag}-webp-lossless", encode(img, "WEBP", lossless=True, method=0)),
      (f"{tag}-webp-lossy", encode(img, "WEBP", quality=80, method=0)),
      (f"{tag}-tiff", encode(img, "TIFF")),
  ]


@functools.cache
def variants():
  """(label, encoded bytes): sizes incl. squares where 256 * long / short is an integer, a
  shorter side of exactly 256 (no resize) and an enlargement, in every encoding."""
  out = []
  sizes = [(640, 427), (475, 475), (300, 300), (333, 500), (500, 333), (256, 383),
           (180, 135)]  # (width, height); the last is enlarged
  for name in ("china.jpg", "flower.jpg"):
    base = photo(name)
    for w, h in sizes:
      out += encodings(base.resize((w, h), Image.BICUBIC), f"{name[:-4]}-{w}x{h}")
  return out


def pil_load(raw):
  """torchvision's default loader on the bytes."""
  return Image.open(io.BytesIO(raw)).convert("RGB")


def torchvision_eval(raw, size=224, resize=256):
  """PIL decode, torchvision Resize(resize) + CenterCrop(size), uint8."""
  img = pil_load(raw)
  w, h = img.size
  if w <= h:
    ow, oh = resize, int(resize * h / w)
  else:
    oh, ow = resize, int(resize * w / h)
  arr = np.asarray(img)
  if (ow, oh) != (w, h):
    arr = released_resize(arr, (ow, oh))
  top = int(round((oh - size) / 2.0))
  left = int(round((ow - size) / 2.0))
  return arr[top:top + size, left:left + size]


def report(what, diffs):
  worst = max(int(d.max()) for d in diffs)
  same = sum(int((d == 0).sum()) for d in diffs) / sum(d.size for d in diffs)
  print(f"\n{what}: {len(diffs)} images, max difference {worst} levels, "
        f"{same:.4%} of values identical")
  return worst, same


# --- decoding -------------------------------------------------------------------------------

def test_decode_equals_torchvision_loader_for_every_encoding():
  for label, raw in variants()[:len(encodings(photo("china.jpg"), "x"))]:
    img = transforms.decode(raw, label)
    assert img.mode == "RGB", label
    np.testing.assert_array_equal(np.asarray(img), np.asarray(pil_load(raw)), label)
  # the transparent GIF index decodes to its palette colour, not black
  raw = dict(variants())["flower-640x427-transparent-gif"]
  pal = Image.open(io.BytesIO(raw))
  index = pal.info["transparency"]
  colour = pal.getpalette()[3 * index:3 * index + 3]
  mask = np.asarray(pal) == index
  assert mask.any() and (np.asarray(transforms.decode(raw))[mask] == colour).all()
  assert max(colour) > 0


def test_decode_takes_the_first_frame_of_an_animation():
  frames = [Image.new("RGB", (20, 10), c) for c in ((200, 10, 10), (10, 200, 10))]
  raw = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
  assert Image.open(io.BytesIO(raw)).n_frames == 2
  np.testing.assert_array_equal(np.asarray(transforms.decode(raw)),
                                np.asarray(pil_load(raw)))
  assert tuple(np.asarray(transforms.decode(raw))[0, 0]) == (200, 10, 10)


@pytest.mark.parametrize("kind", ["empty", "truncated-jpeg", "truncated-png", "text"])
def test_undecodable_bytes_raise_an_error_naming_the_image(kind):
  jpeg = dict(variants())["china-300x300-jpeg420"]
  png = dict(variants())["china-300x300-png"]
  raw = {"empty": b"", "truncated-jpeg": jpeg[:len(jpeg) // 2],
         "truncated-png": png[:len(png) // 2], "text": b"label,path\n3,a.jpg\n"}[kind]
  why = {"empty": "empty file", "truncated-jpeg": "truncated", "truncated-png": "truncated",
         "text": "not an image format PIL can identify"}[kind]
  name = f"train/n0144/{kind}.JPEG"
  for call in (lambda: transforms.decode(raw, name),
               lambda: transforms.eval_transform(raw, image_size=8, crop_ratio=0.875,
                                                 name=name),
               lambda: transforms.train_transform(raw, transforms.rng(0, 0), image_size=8,
                                                  name=name)):
    with pytest.raises(transforms.ImageDecodeError, match=name) as e:
      call()
    assert isinstance(e.value, errors.UserError)
    assert why in str(e.value)


# --- evaluation -----------------------------------------------------------------------------

def test_eval_transform_equals_pil_torchvision():
  diffs = []
  for label, raw in variants():
    ours = transforms.eval_transform(raw, image_size=224, crop_ratio=0.875, name=label)
    ref = torchvision_eval(raw)
    assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3), label
    diffs.append(np.abs(ours.astype(int) - ref))
  worst, same = report("eval transform vs PIL+torchvision", diffs)
  assert worst == 0 and same == 1.0


def test_eval_transform_other_sizes_equal_pil_torchvision():
  for label, raw in variants()[::7]:
    for size, ratio in ((32, 0.875), (160, 0.95), (64, 1.0)):
      resize = int(round(size / ratio))
      ours = transforms.eval_transform(raw, image_size=size, crop_ratio=ratio)
      np.testing.assert_array_equal(ours, torchvision_eval(raw, size, resize),
                                    f"{label} {size}/{ratio}")
    # crop_ratio > 1: a shorter side below the crop, zero-padded as torchvision pads
    ours = transforms.eval_transform(raw, image_size=64, crop_ratio=1.25)
    ref = torchvision_center_crop(transforms.resize_shorter(pil_load(raw), 51), 64)
    np.testing.assert_array_equal(ours, ref, label)


def test_eval_computes_only_the_crop_with_boxes_proven_exact():
  """The crop-only resize (`_resize_center_crop`) restricts a pass with a box only where
  PIL's coefficients are provably the same: a shorter side resized to 256 (power-of-two
  denominator) yes, 500 -> 341 no. The photo set above exercises both kinds of axis."""
  assert transforms._exact_box(375, 256, 16, 224) == (23.4375, 351.5625)
  assert transforms._exact_box(500, 341, 58, 224) is None
  assert transforms._exact_box(475, 37, 3, 32) is None
  kinds = set()
  for w, h in {pil_load(raw).size for _, raw in variants()}:
    ow, oh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    if (ow, oh) != (w, h):
      kinds |= {(n_in == min(w, h), transforms._exact_box(
          n_in, n_out, int(round((n_out - 224) / 2.0)), 224) is not None)
          for n_in, n_out in ((w, ow), (h, oh))}
  assert kinds == {(True, True), (False, False)}  # shorter sides: box; longer: pass + crop


def test_eval_resize_size_and_integer_sizes():
  assert transforms.eval_resize_size(224, 0.875) == 256
  assert transforms.eval_resize_size(32, 0.875) == 37
  assert transforms.resize_shorter(Image.new("RGB", (475, 475)), 256).size == (256, 256)
  assert transforms.resize_shorter(Image.new("RGB", (641, 300)), 256).size == (546, 256)
  assert transforms.resize_shorter(Image.new("RGB", (300, 641)), 256).size == (256, 546)
  img = Image.new("RGB", (256, 383))
  assert transforms.resize_shorter(img, 256) is img  # torchvision: no resize at all


def torchvision_center_crop(img, size):
  """torchvision `center_crop`: zero-pad a short side ((d // 2) before, ((d + 1) // 2)
  after), then crop at int(round((H - size) / 2.0))."""
  arr = np.asarray(img)
  h, w = arr.shape[:2]
  ph = (size - h) if size > h else 0
  pw = (size - w) if size > w else 0
  arr = np.pad(arr, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
  h, w = arr.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return arr[top:top + size, left:left + size]


@pytest.mark.parametrize("w,h", [(300, 300), (301, 250), (61, 100), (100, 61), (50, 51)])
def test_center_crop_equals_torchvision_incl_padding(w, h):
  img = photo("flower.jpg").resize((w, h), Image.BILINEAR)
  for size in (60, 80, 224):
    np.testing.assert_array_equal(np.asarray(transforms.center_crop(img, size)),
                                  torchvision_center_crop(img, size), (w, h, size))


# --- training: crops for given windows ------------------------------------------------------

def windows_for(h, w, rng):
  """The whole image, a 1-pixel-wide strip (enlarged), corner windows and random ones."""
  out = [(0, 0, h, w), (0, w - 1, h, 1), (h - 9, w - 13, 9, 13), (0, 0, min(h, 224), 224)]
  for _ in range(2):
    ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
    out.append((int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw))
  return [win for win in out if win[3] <= w]


def test_train_crops_for_given_windows_equal_pil_crop_resize(monkeypatch):
  rng = np.random.default_rng(0)
  diffs = []
  chosen = []
  monkeypatch.setattr(transforms, "random_resized_crop_window",
                      lambda h, w, rng, scale: chosen[0])
  decoded = {}  # decoding is tested above: each image decoded once here
  real_decode = transforms.decode
  monkeypatch.setattr(transforms, "decode", lambda raw, name: decoded.setdefault(
      name, real_decode(raw, name)))
  for label, raw in variants():
    ref_img = pil_load(raw)
    for win in windows_for(ref_img.height, ref_img.width, rng):
      chosen[:] = [win]
      ours = transforms.train_transform(raw, transforms.rng(0, 0), image_size=224,
                                        random_flip=False, name=label)
      top, left, h, w = win
      ref = released_resize(np.asarray(ref_img)[top:top + h, left:left + w], (224, 224))
      assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3), label
      diffs.append(np.abs(ours.astype(int) - ref))
  worst, same = report("train crops for given windows vs PIL crop + resize", diffs)
  assert worst == 0 and same == 1.0


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


def our_crops(height, width, n, seed=11, **kw):
  return np.array([transforms.random_resized_crop_window(
      height, width, transforms.rng(seed, i), **kw) for i in range(n)])


def crop_features(windows, height, width):
  top, left, h, w = (np.asarray(windows)[:, k].astype(float) for k in range(4))
  return {"area": h * w / (height * width), "log_ratio": np.log(w / h),
          "centre_y": (top + h / 2) / height, "centre_x": (left + w / 2) / width}


@pytest.mark.parametrize("height,width", [(500, 500), (375, 500), (500, 375), (120, 1000)])
def test_random_resized_crop_distribution_matches_torchvision(height, width):
  n = 2000
  ours = our_crops(height, width, n)
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


def test_random_resized_crop_makes_torchvisions_draws_in_its_order():
  """Given the same stream of uniform numbers, the window is torchvision's, draw for draw
  (the scale range and the fallback included)."""
  for k, (h, w, scale) in enumerate([(375, 500, (0.08, 1.0)), (500, 375, (0.35, 1.0)),
                                     (40, 1000, (0.08, 1.0)), (9, 9, (0.5, 1.0))]):
    for i in range(200):
      ours = transforms.random_resized_crop_window(h, w, np.random.default_rng([k, i]),
                                                   scale=scale)
      ref = torchvision_crop(np.random.default_rng([k, i]), h, w, scale=scale)
      assert ours == tuple(int(v) for v in ref), (h, w, i)
      assert all(type(v) is int for v in ours)


def test_random_resized_crop_draws_every_offset_and_falls_back_to_centre():
  # an 8x8 window of a 9x9 image: offsets 0 and 1 both drawn (the last offset too)
  wins = our_crops(9, 9, 4000)
  eight = wins[(wins[:, 2] == 8) & (wins[:, 3] == 8)]
  assert set(eight[:, 0]) == {0, 1} and set(eight[:, 1]) == {0, 1}
  # a panorama no draw fits: torchvision's centre crop at ratio 4/3
  wins = our_crops(40, 1000, 50)
  rng = np.random.default_rng(0)
  assert torchvision_crop(rng, 40, 1000) == (0, 473, 40, 53)
  assert (wins == [0, 473, 40, 53]).all()
  # a tall strip: the centre crop at ratio 3/4
  wins = our_crops(1000, 40, 5)
  assert (wins == [473, 0, 53, 40]).all()


# --- flip, randomness -----------------------------------------------------------------------

def noise_png(h=32, w=32, seed=0):
  rng = np.random.default_rng(seed)
  return encode(Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)), "PNG")


def test_flip_has_probability_one_half():
  raw = noise_png()
  n, flipped = 1000, 0
  for i in range(n):
    kw = dict(image_size=16, name=f"{i}")
    out = transforms.train_transform(raw, transforms.rng(4, i), **kw)
    plain = transforms.train_transform(raw, transforms.rng(4, i), random_flip=False, **kw)
    if np.array_equal(out, plain[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, plain)  # the same window, not flipped
  print(f"\nflip: {flipped} of {n}")
  assert abs(flipped - n / 2) < 4.5 * math.sqrt(n / 4)  # binomial, 4.5 sigma


def test_same_seed_and_position_give_the_same_image_and_others_differ():
  raw = dict(variants())["flower-333x500-jpeg420"]
  kw = dict(image_size=32, color_jitter=(0.4, 0.4, 0.4, 0.1))
  a = transforms.train_transform(raw, transforms.rng(7, 123_456_789_012), **kw)
  b = transforms.train_transform(raw, transforms.rng(7, 123_456_789_012), **kw)
  np.testing.assert_array_equal(a, b)
  outs = [transforms.train_transform(raw, transforms.rng(7, p), **kw) for p in range(8)]
  outs.append(transforms.train_transform(raw, transforms.rng(8, 0), **kw))
  for x, y in itertools.combinations(outs, 2):
    assert not np.array_equal(x, y)
  # the generator depends on (seed, position) only, not on what was drawn before
  first = transforms.rng(7, 5).random(4)
  transforms.rng(7, 4).random(1000)
  np.testing.assert_array_equal(transforms.rng(7, 5).random(4), first)


# --- ColorJitter ----------------------------------------------------------------------------

def pil_hue(img, factor):
  """torchvision `adjust_hue` on PIL."""
  h, s, v = img.convert("HSV").split()
  np_h = np.array(h, dtype=np.uint8)
  with np.errstate(over="ignore"):
    np_h += np.int32(factor * 255).astype(np.uint8)
  return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


PIL_OPS = (lambda im, f: ImageEnhance.Brightness(im).enhance(f),
           lambda im, f: ImageEnhance.Contrast(im).enhance(f),
           lambda im, f: ImageEnhance.Color(im).enhance(f),
           pil_hue)


def jitter_inputs():
  rng = np.random.default_rng(1)
  flower = photo("flower.jpg").resize((96, 64), Image.BILINEAR)
  return [flower, Image.fromarray(rng.integers(0, 256, (48, 48, 3)).astype(np.uint8))]


@pytest.mark.parametrize("op,factors", [(0, (0.0, 0.8, 1.13, 1.6)), (1, (0.6, 0.91, 1.2)),
                                        (2, (0.0, 1.07, 1.4)),
                                        (3, (-0.5, -0.1, -0.037, 0.002, 0.1, 0.5))])
def test_each_jitter_op_equals_pil(op, factors):
  for img in jitter_inputs():
    for f in factors:
      only = [None] * 4
      only[op] = f
      ours = transforms.apply_jitter(img, [op], only)
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(PIL_OPS[op](img, f)),
                                    (op, f))


def test_jitter_in_fixed_order_equals_pil():
  factors = (1.15, 0.85, 1.18, -0.06)
  for order in [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]:
    for img in jitter_inputs():
      ref = img
      for k in order:
        ref = PIL_OPS[k](ref, factors[k])
      ours = transforms.apply_jitter(img, order, factors)
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref), order)


def test_jitter_order_is_a_uniform_permutation_and_factors_in_range():
  n = 4800
  strengths = (0.4, 0.3, 0.2, 0.1)
  params = [transforms.jitter_params(transforms.rng(3, i), *strengths) for i in range(n)]
  perms = [tuple(int(k) for k in order) for order, _ in params]
  counts = np.array([perms.count(p) for p in itertools.permutations(range(4))])
  assert counts.sum() == n  # every draw is a permutation
  chi = stats.chisquare(counts)
  print(f"\njitter order: 24 permutations, counts {counts.min()}-{counts.max()}, "
        f"chi-square p={chi.pvalue:.3f}")
  assert chi.pvalue > 1e-3
  factors = np.array([f for _, f in params])
  bounds = [(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]
  for k, (lo, hi) in enumerate(bounds):
    col = factors[:, k]
    assert lo <= col.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < col.max() < hi
    assert stats.kstest(col, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, k
  # brightness 1.0: factors in [max(0, 1 - x), 1 + x] = [0, 2]
  assert transforms.jitter_params(transforms.rng(0, 0), 1.0)[1][0] <= 2.0


def test_jitter_skips_zero_strengths_and_rejects_bad_ones():
  _, factors = transforms.jitter_params(transforms.rng(1, 2), 0.2, 0.0, 0.0, 0.1)
  assert factors[1] is None and factors[2] is None
  assert factors[0] is not None and factors[3] is not None
  raw = noise_png()
  kw = dict(image_size=16, random_flip=False)
  np.testing.assert_array_equal(  # all zero: no jitter, no draws
      transforms.train_transform(raw, transforms.rng(1, 2), **kw),
      transforms.train_transform(raw, transforms.rng(1, 2), color_jitter=(0, 0, 0, 0), **kw))
  for bad in ((0.4, 0.4, 0.4, 0.6), (-0.1, 0.0, 0.0, 0.0)):
    with pytest.raises(errors.UserError, match="color_jitter"):
      transforms.train_transform(raw, transforms.rng(1, 2), color_jitter=bad, **kw)


def torchvision_train(raw, g, size, scale, jitter):
  """torchvision's Compose([RandomResizedCrop(size, scale), RandomHorizontalFlip(),
  ColorJitter(*jitter)]) on the PIL image, its random numbers drawn from `g` in
  torchvision's order: crop window, flip, jitter order, then the four factors."""
  img = pil_load(raw)
  top, left, h, w = torchvision_crop(g, img.height, img.width, scale=scale)
  img = Image.fromarray(released_resize(np.asarray(img)[top:top + h, left:left + w],
                                        (size, size)))
  if g.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  order = g.permutation(4)
  b, c, s, hue = jitter
  factors = [g.uniform(max(0, 1 - b), 1 + b), g.uniform(max(0, 1 - c), 1 + c),
             g.uniform(max(0, 1 - s), 1 + s), g.uniform(-hue, hue)]
  for k in order:
    img = PIL_OPS[k](img, factors[k])
  return np.asarray(img)


def test_train_transform_equals_torchvision_compose_draw_for_draw():
  raws = dict(variants())
  jitter = (0.4, 0.4, 0.4, 0.1)
  for i, label in enumerate(["china-640x427-jpeg420", "flower-333x500-png",
                             "china-180x135-gray-jpeg", "flower-475x475-transparent-gif"]):
    for j in range(6):
      ours = transforms.train_transform(raws[label], np.random.default_rng([i, j]),
                                        image_size=64, crop_scale=(0.2, 1.0),
                                        color_jitter=jitter)
      ref = torchvision_train(raws[label], np.random.default_rng([i, j]), 64, (0.2, 1.0),
                              jitter)
      np.testing.assert_array_equal(ours, ref, f"{label} {j}")


# --- the resize order: Pillow <= 12's on any Pillow -----------------------------------------

RESIZE_SHAPES = {"tall": (300, 1100), "wide": (1100, 300), "square": (400, 400)}  # (w, h)
CROP_WINDOWS = {"tall": (40, 30, 400, 100), "wide": (30, 40, 100, 400),  # (top, left, h, w)
                "square": (10, 20, 250, 250)}


@pytest.mark.parametrize("shape", list(RESIZE_SHAPES))
def test_every_resize_follows_pillow12_order(shape, tmp_path):
  """Evaluation (two sizes: the box-restricted passes and the whole-axis passes), training
  crops (a tall, a wide and a square window) and `predict`: 0 levels from Pillow <= 12's
  two-pass resize in NumPy. Pillow 13's own one-call resize of the tall crop differs
  (python-pillow/Pillow#9549: vertical pass first), so this test sees the order."""
  import PIL

  from bcdnet_jax import preprocessing
  from bcdnet_jax.deploy import predict
  w, h = RESIZE_SHAPES[shape]
  arr = np.random.default_rng(5).integers(0, 256, (h, w, 3)).astype(np.uint8)
  raw = encode(Image.fromarray(arr), "PNG", compress_level=1)
  for size, ratio in ((224, 0.875), (100, 0.9)):
    ours = transforms.eval_transform(raw, image_size=size, crop_ratio=ratio)
    ref = torchvision_eval(raw, size, transforms.eval_resize_size(size, ratio))
    assert int(np.abs(ours.astype(int) - ref).max()) == 0, (shape, size)
  path = tmp_path / f"{shape}.png"
  path.write_bytes(raw)
  ours = predict.load_image(str(path), preprocessing.record(224, 0.875))
  np.testing.assert_array_equal(ours, torchvision_eval(raw))
  top, left, ch, cw = CROP_WINDOWS[shape]
  ours = np.asarray(transforms.crop_resize(Image.fromarray(arr), CROP_WINDOWS[shape], 224))
  ref = released_resize(arr[top:top + ch, left:left + cw], (224, 224))
  assert int(np.abs(ours.astype(int) - ref).max()) == 0, shape
  one_call = np.asarray(Image.fromarray(arr[top:top + ch, left:left + cw]).resize(
      (224, 224), Image.BILINEAR))
  if shape == "tall" and int(PIL.__version__.split(".")[0]) >= 13:
    assert int(np.abs(one_call.astype(int) - ref).max()) == 1
  elif int(PIL.__version__.split(".")[0]) < 13:
    np.testing.assert_array_equal(one_call, ref)


def test_released_resize_reference_equals_pillow_one_pass_at_a_time():
  """The NumPy reference is Pillow's arithmetic: each single-axis resize (one pass on any
  Pillow) equals it, with and without a box, up- and down-scaling."""
  arr = np.random.default_rng(6).integers(0, 256, (37, 53, 3)).astype(np.uint8)
  img = Image.fromarray(arr)
  for size, box in (((20, 37), None), ((120, 37), None), ((53, 11), None), ((53, 90), None),
                    ((17, 37), (3.5, 0, 40.25, 37)), ((53, 9), (0, 2.75, 53, 30.5))):
    np.testing.assert_array_equal(np.asarray(img.resize(size, Image.BILINEAR, box=box)),
                                  released_resize(arr, size, box), (size, box))
