"""torchvision's image transforms on PIL images, as TensorFlow ops for tf.data.

The released models were trained and evaluated on PIL-decoded images transformed by
torchvision (`RandomResizedCrop`, `RandomHorizontalFlip`, `ColorJitter`, `Resize`,
`CenterCrop`), which work in PIL's uint8 arithmetic. These ops reproduce that arithmetic
(written from the definitions in torchvision and Pillow, our own code) so that the
network sees the pixels the authors' network saw:

- decoding by content, JPEGs with libjpeg's accurate integer IDCT (what PIL uses);
- PIL's bilinear resampling: two passes (horizontal, then vertical), each with PIL's
  triangle filter widened by the scale when shrinking, coefficients in 22-bit fixed point,
  rounding to uint8 after each pass;
- `RandomResizedCrop`'s sampling (10 tries, log-uniform ratio, centre-crop fallback);
- `ColorJitter`: a random order per image and PIL's `ImageEnhance` blends (truncating
  to uint8) and HSV round trip for hue.

Images are uint8-valued tensors; the arithmetic is done in the precision Pillow uses
(float32, float64 or int32) so results equal PIL's to the bit in all but rare ties.
Randomness is stateless (`tf.random.stateless_*` keyed by a seed), so a pipeline is
deterministic and resumable.
"""

from __future__ import annotations

import math

import tensorflow as tf

_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 - 2
_CROP_MARGIN = 16  # one 4:2:0 MCU: beyond the reach of chroma upsampling at a crop edge


# --- decoding -------------------------------------------------------------------------------

def decode(image_bytes):
  """uint8 [H, W, 3] as PIL's `Image.open(f).convert("RGB")` gives it, by content.

  JPEG (baseline, progressive, grayscale, CMYK) with the accurate IDCT; PNG, GIF (first
  frame) and BMP through `tf.io.decode_image`, grayscale replicated and alpha dropped.
  """
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.ensure_shape(
          tf.io.decode_image(image_bytes, channels=3, expand_animations=False),
          [None, None, 3]))


def image_shape(image_bytes):
  """[height, width] (int32); JPEGs are not decoded for it."""
  return tf.cond(tf.io.is_jpeg(image_bytes),
                 lambda: tf.io.extract_jpeg_shape(image_bytes)[:2],
                 lambda: tf.shape(decode(image_bytes))[:2])


def decode_crop(image_bytes, window):
  """The crop `window` = [top, left, height, width] of the decoded image.

  JPEGs decode only the blocks around the window. libjpeg's fancy chroma upsampling
  treats a crop's edge as the image's edge, so the decoded region extends `_CROP_MARGIN`
  pixels past the window (clamped) and is then sliced: equal to cropping the fully
  decoded image (tested).
  """
  def crop(img, top, left):
    return img[top:top + window[2], left:left + window[3]]

  def fused():
    shape = tf.io.extract_jpeg_shape(image_bytes)
    top = tf.maximum(window[0] - _CROP_MARGIN, 0)
    left = tf.maximum(window[1] - _CROP_MARGIN, 0)
    bottom = tf.minimum(window[0] + window[2] + _CROP_MARGIN, shape[0])
    right = tf.minimum(window[1] + window[3] + _CROP_MARGIN, shape[1])
    region = tf.image.decode_and_crop_jpeg(
        image_bytes, tf.stack([top, left, bottom - top, right - left]), channels=3,
        dct_method="INTEGER_ACCURATE")
    return crop(region, window[0] - top, window[1] - left)

  return tf.cond(tf.io.is_jpeg(image_bytes), fused,
                 lambda: crop(decode(image_bytes), window[0], window[1]))


# --- PIL's bilinear resampling --------------------------------------------------------------

def _resample_coefficients(in_size, out_size):
  """PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter.

  Returns (indices [out, k], fixed-point weights [out, k] int32), k = taps per output.
  """
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  filterscale = tf.maximum(scale, 1.0)
  support = filterscale  # the triangle's support, 1, widened when shrinking
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
  xmin = tf.maximum(tf.floor(center - support + 0.5), 0.0)
  xmax = tf.minimum(tf.floor(center + support + 0.5), in_f) - xmin
  x = tf.cast(tf.range(ksize), tf.float64)[None, :]
  pos = ((x + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
  w = tf.maximum(1.0 - tf.abs(pos), 0.0) * tf.cast(x < xmax[:, None], tf.float64)
  total = tf.math.cumsum(w, axis=1)[:, -1:]  # summed in order, as PIL
  w = tf.math.divide_no_nan(w, total)
  fixed = tf.cast(tf.floor(0.5 + w * (1 << _PRECISION_BITS)), tf.int32)
  idx = tf.minimum(tf.cast(x + xmin[:, None], tf.int32), tf.cast(in_size, tf.int32) - 1)
  return idx, fixed


def _resample_rows(image, out_size):
  """One pass of PIL's 8-bit resampling along the first axis of [N, ...] (int32 out)."""
  idx, fixed = _resample_coefficients(tf.shape(image)[0], out_size)
  rows = tf.reshape(tf.cast(image, tf.int32), [tf.shape(image)[0], -1])
  taps = tf.gather(rows, tf.transpose(idx))  # [k, out, rest]: whole rows, contiguous
  acc = tf.reduce_sum(taps * tf.transpose(fixed)[:, :, None], axis=0)
  acc += 1 << (_PRECISION_BITS - 1)
  out = tf.clip_by_value(tf.bitwise.right_shift(acc, _PRECISION_BITS), 0, 255)
  return tf.reshape(out, tf.concat([[out_size], tf.shape(image)[1:]], 0))


def _resample_axis(image, out_size, axis):
  """One pass of PIL's 8-bit resampling along `axis` (0 rows, 1 columns) of [H, W, C]."""
  if axis == 0:
    return _resample_rows(image, out_size)
  return tf.transpose(_resample_rows(tf.transpose(image, [1, 0, 2]), out_size), [1, 0, 2])


def resize(image, height, width, exact: bool = True):
  """PIL's `Image.resize((width, height), BILINEAR)` of a uint8 [H, W, C] image.

  `exact`: PIL's two passes in its fixed-point arithmetic (equal to PIL; ~3x the time of
  the alternative on CPU). Otherwise one antialiased `tf.image.resize` pass with the same
  triangle filter, rounded: within one level of PIL everywhere (PIL rounds the
  intermediate image to uint8, an error of at most 1/2 level that the second pass
  averages, plus 1/2 at the end), off by one on ~10 % of the values.
  """
  shape = tf.shape(image)
  if not exact:
    out = tf.image.resize(image, tf.stack([height, width]), method="bilinear",
                          antialias=True)
    return tf.cast(tf.clip_by_value(tf.floor(out + 0.5), 0.0, 255.0), tf.uint8)
  image = tf.cast(image, tf.int32)
  image = tf.cond(tf.equal(shape[1], width), lambda: image,
                  lambda: _resample_axis(image, width, axis=1))
  image = tf.cond(tf.equal(shape[0], height), lambda: image,
                  lambda: _resample_axis(image, height, axis=0))
  return tf.cast(image, tf.uint8)


def resize_shorter(image, size: int, exact: bool = True):
  """torchvision `Resize(size)`: shorter side `size`, the other `int(size * long / short)`.

  Integer arithmetic: float32 would give 255 for 256 * 475 / 475.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.int64)
  h, w = shape[0], shape[1]
  size = tf.constant(size, tf.int64)
  nh = tf.where(w < h, (size * h) // w, size)
  nw = tf.where(w < h, size, (size * w) // h)
  return resize(image, tf.cast(nh, tf.int32), tf.cast(nw, tf.int32), exact)


def center_crop(image, size: int):
  """torchvision `CenterCrop(size)` of an image at least `size` on each side."""
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float64) / 2.0), tf.int32)
  return image[top:top + size, left:left + size]


# --- RandomResizedCrop ----------------------------------------------------------------------

def random_resized_crop_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               attempts: int = 10):
  """torchvision `RandomResizedCrop.get_params`: [top, left, height, width] (int32).

  Up to `attempts` draws of area ~ U(scale) * H W and log aspect ratio ~ U(log ratio);
  sizes `int(round(sqrt(...)))` (round half to even, as Python); the first draw that fits
  is placed uniformly over every position. Otherwise the centre crop at the ratio
  clamped to `ratio` (the whole image when its ratio is inside).
  """
  height = tf.cast(shape[0], tf.float64)
  width = tf.cast(shape[1], tf.float64)
  s_area, s_ratio, s_pos = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  target = height * width * tf.random.stateless_uniform(
      [attempts], s_area, scale[0], scale[1], tf.float64)
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], s_ratio, math.log(ratio[0]), math.log(ratio[1]), tf.float64))
  w = tf.round(tf.sqrt(target * aspect))
  h = tf.round(tf.sqrt(target / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  u = tf.random.stateless_uniform([2], s_pos, dtype=tf.float64)
  h_ok, w_ok = h[first], w[first]
  top_ok = tf.minimum(tf.floor(u[0] * (height - h_ok + 1)), height - h_ok)
  left_ok = tf.minimum(tf.floor(u[1] * (width - w_ok + 1)), width - w_ok)
  # fallback: the centre crop at the clamped ratio
  in_ratio = width / height
  lo, hi = min(ratio), max(ratio)
  w_fb = tf.where(in_ratio < lo, width,
                  tf.where(in_ratio > hi, tf.round(height * hi), width))
  h_fb = tf.where(in_ratio < lo, tf.round(width / lo), height)
  top_fb = tf.floor((height - h_fb) / 2)
  left_fb = tf.floor((width - w_fb) / 2)
  ok = tf.reduce_any(fits)
  window = tf.where(ok, tf.stack([top_ok, left_ok, h_ok, w_ok]),
                    tf.stack([top_fb, left_fb, h_fb, w_fb]))
  return tf.cast(window, tf.int32)


# --- ColorJitter: PIL's ImageEnhance and HSV arithmetic --------------------------------------

def _blend(degenerate, image, factor):
  """PIL `Image.blend(degenerate, image, factor)`: float32 arithmetic, truncated to uint8."""
  f = tf.cast(factor, tf.float32)
  return tf.clip_by_value(tf.floor(degenerate + f * (image - degenerate)), 0.0, 255.0)


def _luma(image):
  """PIL's `convert("L")`: (R 19595 + G 38470 + B 7471 + 2^15) >> 16, as float32."""
  rgb = tf.cast(image, tf.int32)
  l24 = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
  return tf.cast(tf.bitwise.right_shift(l24, 16), tf.float32)[..., None]


def adjust_brightness(image, factor):
  """torchvision `adjust_brightness` on PIL: blend with black (scale, then clamp)."""
  return _blend(tf.zeros_like(image), image, factor)


def adjust_contrast(image, factor):
  """torchvision `adjust_contrast` on PIL: blend with the rounded mean of the luma image."""
  mean = tf.reduce_mean(tf.cast(_luma(image), tf.float64))
  mean = tf.cast(tf.floor(mean + 0.5), tf.float32)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def adjust_saturation(image, factor):
  """torchvision `adjust_saturation` on PIL: blend with the per-pixel luma."""
  return _blend(tf.broadcast_to(_luma(image), tf.shape(image)), image, factor)


def _rgb_to_hsv(image):
  """PIL's RGB -> HSV (uint8 H, S, V), with its float32/float64 steps."""
  f32, f64 = tf.float32, tf.float64
  r, g, b = tf.unstack(image, axis=-1)
  maxc = tf.maximum(r, tf.maximum(g, b))
  minc = tf.minimum(r, tf.minimum(g, b))
  cr = maxc - minc
  one = tf.ones_like(cr)
  safe_cr = tf.where(cr > 0, cr, one)
  s = safe_cr / tf.where(maxc > 0, maxc, one)
  rc, gc, bc = (maxc - r) / safe_cr, (maxc - g) / safe_cr, (maxc - b) / safe_cr
  h = tf.where(r == maxc, bc - gc,
               tf.where(g == maxc,
                        tf.cast(2.0 + tf.cast(rc, f64) - tf.cast(bc, f64), f32),
                        tf.cast(4.0 + tf.cast(gc, f64) - tf.cast(rc, f64), f32)))
  h = tf.cast(tf.math.floormod(tf.cast(h, f64) / 6.0 + 1.0, 1.0), f32)
  uh = tf.clip_by_value(tf.floor(tf.cast(h, f64) * 255.0), 0.0, 255.0)
  us = tf.clip_by_value(tf.floor(tf.cast(s, f64) * 255.0), 0.0, 255.0)
  grey = cr == 0
  zero = tf.zeros_like(uh)
  return tf.where(grey, zero, uh), tf.where(grey, zero, us), tf.cast(maxc, f64)


def _round_half_away(x):
  return tf.floor(x + 0.5)  # C round() on the non-negative values here


def _hsv_to_rgb(h, s, v):
  """PIL's HSV -> RGB of uint8-valued float64 H, S, V."""
  f32, f64 = tf.float32, tf.float64
  i = tf.floor(h * 6.0 / 255.0)
  f = tf.cast(h * 6.0 / 255.0 - i, f32)
  fs = tf.cast(s / 255.0, f32)
  p = _round_half_away(v * (1.0 - tf.cast(fs, f64)))
  q = _round_half_away(v * (1.0 - tf.cast(fs * f, f64)))
  t = _round_half_away(v * (1.0 - tf.cast(fs, f64) * (1.0 - tf.cast(f, f64))))
  p, q, t = (tf.clip_by_value(c, 0.0, 255.0) for c in (p, q, t))
  sector = tf.cast(i, tf.int32) % 6
  table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  out = []
  for c in range(3):
    val = v
    for k in range(6):
      val = tf.where(sector == k, table[k][c], val)
    out.append(tf.where(s == 0, v, val))
  return tf.cast(tf.stack(out, axis=-1), f32)


def adjust_hue(image, factor):
  """torchvision `adjust_hue` on PIL: H (uint8) += int(factor * 255), wrapping, in PIL HSV."""
  h, s, v = _rgb_to_hsv(image)
  shift = tf.cast(tf.cast(tf.cast(factor, tf.float64) * 255.0, tf.int32), tf.float64)
  h = tf.math.floormod(h + shift, 256.0)
  return _hsv_to_rgb(h, s, v)


def color_jitter(image, seed, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
  """torchvision `ColorJitter(brightness, contrast, saturation, hue)` of a uint8-valued
  float32 image: factors uniform in [max(0, 1 - x), 1 + x] (hue in [-hue, hue]), applied in
  a random order drawn per image (`torch.randperm(4)`); an op whose strength is 0 is
  skipped, as torchvision's `None`."""
  s_order, s_b, s_c, s_s, s_h = tf.unstack(tf.random.experimental.stateless_split(seed, 5))

  def uniform(s, lo, hi):
    return tf.random.stateless_uniform([], s, lo, hi, tf.float64)

  factors = (uniform(s_b, max(0.0, 1.0 - brightness), 1.0 + brightness) if brightness else None,
             uniform(s_c, max(0.0, 1.0 - contrast), 1.0 + contrast) if contrast else None,
             uniform(s_s, max(0.0, 1.0 - saturation), 1.0 + saturation) if saturation else None,
             uniform(s_h, -hue, hue) if hue else None)
  return apply_jitter(image, jitter_order(s_order), factors)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply_jitter(image, order, factors):
  """Brightness, contrast, saturation, hue (op indices 0-3) in `order`, with `factors`
  (None skips the op)."""
  for k in range(4):
    branches = [(lambda op=op, f=f, im=image: op(im, f)) if f is not None
                else (lambda im=image: im) for op, f in zip(_JITTER_OPS, factors)]
    image = tf.switch_case(order[k], branches)
  return image


def jitter_order(seed):
  """A uniformly random permutation of the four jitter ops (int32 [4])."""
  return tf.cast(tf.argsort(tf.random.stateless_uniform([4], seed)), tf.int32)
