"""PIL decoding and torchvision's image transforms on PIL images, uint8 out.

The released models were trained and evaluated on images decoded by PIL (torchvision's
default loader: `Image.open(f).convert("RGB")`) and transformed by torchvision on the PIL
image: `RandomResizedCrop` (`crop` + `resize(BILINEAR)`), `RandomHorizontalFlip`,
`ColorJitter` (Pillow's `ImageEnhance` and HSV conversion) for training; `Resize` +
`CenterCrop` for evaluation. This module calls PIL itself for every pixel operation, so its
output equals the authors' pixels by construction; only the random draws are ours, made in
NumPy with the distributions torchvision samples (written from torchvision's definitions,
our own code). Normalisation (mean/std) is left to the device: the output is uint8
[size, size, 3], 4x fewer bytes host -> device than float32.

Randomness is stateless: `rng(seed, position)` is a counter-based generator keyed by the
seed and the example's global position in the stream, so any example's crop, flip and
jitter depend on nothing else (deterministic on any number of workers, resumable anywhere).

No TensorFlow here: this module runs in Grain workers / threads on hosts without it.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import re
import threading
import warnings
from fractions import Fraction

import numpy as np
from PIL import Image, ImageEnhance, UnidentifiedImageError

from bcdnet_jax import errors

_MASK64 = (1 << 64) - 1


class ImageDecodeError(errors.UserError):
  """Bytes that PIL cannot open or decode; the message names the image and says why."""


class ImageTooLargeError(ImageDecodeError):
  """An image over the pixel limit (PIL's decompression-bomb guard); the message names it,
  its size and the limit, and how to raise the limit (`config.max_image_pixels`)."""


# --- the pixel limit ------------------------------------------------------------------------

# PIL warns above Image.MAX_IMAGE_PIXELS (89,478,485 px) and refuses twice that: a guard
# against small files that decode to gigabytes. Our limit is the refusal (0: PIL's).
PIL_WARN_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_limit = 0
_warned: set[str] = set()
_warn_lock = threading.Lock()
log = logging.getLogger("bcdnet_jax")


def max_image_pixels() -> int:
  """The number of pixels above which an image is refused (`set_max_image_pixels`)."""
  return _limit or 2 * PIL_WARN_PIXELS


def set_max_image_pixels(limit: int = 0) -> None:
  """Images over `limit` pixels are refused (`ImageTooLargeError`); 0: PIL's default,
  178,956,970 (2 x Image.MAX_IMAGE_PIXELS). Sets PIL's process-wide limit, so the threads
  decoding images follow it; the data workers call it with the run's
  `config.max_image_pixels`. PIL's own DecompressionBombWarning is silenced in this process:
  `decode` says it once per file in one line of ours instead."""
  global _limit
  limit = int(limit)
  if limit < 0:
    raise errors.UserError(f"config.max_image_pixels: must be >= 0 (0: PIL's limit of "
                           f"{2 * PIL_WARN_PIXELS:,} pixels), got {limit}")
  if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning
             for f in warnings.filters):  # (a test harness may reset the filters)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
  _limit = limit
  # PIL refuses above 2 x MAX_IMAGE_PIXELS (a float compares exactly: odd limits too)
  Image.MAX_IMAGE_PIXELS = limit / 2 if limit else PIL_WARN_PIXELS


def _too_large(name: str, e: Exception) -> ImageTooLargeError:
  found = re.search(r"\((\d+) pixels\)", str(e))
  size = f"{int(found.group(1)):,} pixels" if found else "its size"
  reason = (f"{size} is over the limit of {max_image_pixels():,} pixels (PIL's guard against "
            "decompression bombs)")
  err = ImageTooLargeError(f"cannot decode image {name}: {reason}; for data sets with images "
                           "this large set --config.max_image_pixels above it")
  err.reason = reason  # without the config field (predict has none)
  return err


def _warn_large(img: Image.Image, name: str) -> None:
  """One line per file (per process) for an image above PIL's warning size under PIL's
  default limit (its own warning is silenced: it came once per read, without the file)."""
  if _limit or img.width * img.height <= PIL_WARN_PIXELS:
    return
  with _warn_lock:
    if name in _warned:
      return
    _warned.add(name)
  log.warning("%s: %d x %d px (%.0f megapixels) is a very large image; decoding it (images "
              "over %s pixels are refused; config.max_image_pixels raises the limit)", name,
              img.width, img.height, img.width * img.height / 1e6, f"{max_image_pixels():,}")


# --- decoding -------------------------------------------------------------------------------

def decode(raw: bytes, name: str = "<bytes>") -> Image.Image:
  """The RGB PIL image of encoded `raw` bytes, as torchvision's default loader gives it.

  `Image.open` identifies the format by content (JPEG, PNG, GIF, BMP, WebP, TIFF, ...);
  `convert("RGB")` turns grayscale, CMYK, palette (transparent index: its palette colour),
  RGBA (alpha dropped) and 16-bit images into RGB as PIL does; animations give their first
  frame. The pixels are decoded here (not lazily), so a broken file fails now.

  Args:
    raw: the encoded file's bytes.
    name: the image's name for the error message.

  Returns:
    The decoded RGB `PIL.Image.Image`.

  Raises:
    ImageDecodeError: naming `name`, when PIL cannot identify or fully decode the bytes
      (empty, truncated, not an image).
    ImageTooLargeError: (a subclass) for an image over `max_image_pixels()`.
  """
  set_max_image_pixels(_limit)  # PIL's warning silenced, our line instead (once)
  try:
    img = Image.open(io.BytesIO(raw))
    _warn_large(img, name)
    if img.mode == "RGB":
      img.load()  # convert("RGB") of an RGB image is a copy of these same pixels
    else:
      img = img.convert("RGB")
  except MemoryError:
    raise
  except Image.DecompressionBombError as e:
    raise _too_large(name, e) from None
  except Exception as e:  # PIL reports broken files as OSError, SyntaxError, ValueError, ...
    if not raw:
      why = "empty file"
    elif isinstance(e, UnidentifiedImageError):  # its message names a BytesIO object
      why = "not an image format PIL can identify (JPEG, PNG, GIF, BMP, WebP, TIFF, ...)"
    else:
      why = " ".join(str(e).split()) or type(e).__name__
    raise ImageDecodeError(f"cannot decode image {name}: {why}") from e
  return img


# --- randomness -----------------------------------------------------------------------------

def rng(seed: int, position: int) -> np.random.Generator:
  """A NumPy generator that depends only on (seed, position): Philox keyed by the two
  64-bit words (both taken modulo 2^64). Stateless in the sense of tf.random.stateless_*:
  example `position` of the stream gets the same draws however the stream is split or
  resumed, and different positions get independent streams."""
  key = np.array([int(seed) & _MASK64, int(position) & _MASK64], dtype=np.uint64)
  return np.random.Generator(np.random.Philox(key=key))


# --- RandomResizedCrop ----------------------------------------------------------------------

def random_resized_crop_window(height: int, width: int, rng: np.random.Generator,
                               scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: (top, left, h, w) of a window of an image
  of `height` x `width` pixels.

  Up to 10 tries: area = U(scale) * H W, aspect ratio = exp(U(log ratio)),
  w = int(round(sqrt(area * ratio))), h = int(round(sqrt(area / ratio))) (round half to
  even, as Python); the first that fits (0 < w <= W, 0 < h <= H) is placed uniformly over
  every position (top in [0, H - h], left in [0, W - w]). Otherwise the centre crop at the
  image's aspect ratio clamped to `ratio` (the whole image when its ratio is inside).
  The draws are made in the order torchvision makes them, from `rng`.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
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


# --- ColorJitter ----------------------------------------------------------------------------

def adjust_hue(img: Image.Image, hue: float) -> Image.Image:
  """torchvision `adjust_hue` on a PIL RGB image: PIL's HSV, the uint8 hue channel shifted by
  `int(hue * 255)` with wrap-around (mod 256), back to RGB with PIL. `hue` in [-0.5, 0.5]."""
  h, s, v = img.convert("HSV").split()
  np_h = np.array(h, dtype=np.uint8)
  np_h += np.uint8(int(hue * 255) & 0xFF)  # truncation toward zero, then mod 256: torchvision
  return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


_JITTER_OPS = (
    lambda img, f: ImageEnhance.Brightness(img).enhance(f),  # adjust_brightness
    lambda img, f: ImageEnhance.Contrast(img).enhance(f),  # adjust_contrast
    lambda img, f: ImageEnhance.Color(img).enhance(f),  # adjust_saturation
    adjust_hue,
)


def jitter_params(rng: np.random.Generator, brightness=0.0, contrast=0.0, saturation=0.0,
                  hue=0.0) -> tuple[np.ndarray, tuple]:
  """torchvision `ColorJitter.get_params`: (order, factors). `order` is a uniformly random
  permutation of the op indices 0-3 (brightness, contrast, saturation, hue; drawn first,
  as `torch.randperm(4)`); the factors are uniform in [max(0, 1 - x), 1 + x] for the
  first three and in [-hue, hue] for hue, None for a strength of 0 (the op is skipped).
  Raises `errors.UserError` for a negative strength or a hue above 0.5 (torchvision's
  bounds), naming the config field `color_jitter`."""
  if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
    raise errors.UserError(
        f"color_jitter={(brightness, contrast, saturation, hue)}: strengths must be >= 0 "
        "and the hue strength <= 0.5 (torchvision's ColorJitter bounds)")
  order = rng.permutation(4)

  def factor(x, lo, hi):
    return float(rng.uniform(lo, hi)) if x else None

  factors = (factor(brightness, max(0.0, 1.0 - brightness), 1.0 + brightness),
             factor(contrast, max(0.0, 1.0 - contrast), 1.0 + contrast),
             factor(saturation, max(0.0, 1.0 - saturation), 1.0 + saturation),
             factor(hue, -hue, hue))
  return order, factors


def apply_jitter(img: Image.Image, order, factors) -> Image.Image:
  """torchvision `ColorJitter.forward` on PIL: the ops (0 brightness, 1 contrast,
  2 saturation, 3 hue) in `order`, each with its factor (None: skipped)."""
  for k in order:
    if factors[k] is not None:
      img = _JITTER_OPS[k](img, factors[k])
  return img


# --- the training and evaluation transforms -------------------------------------------------

def resize(img: Image.Image, size, box=None) -> Image.Image:
  """PIL's BILINEAR `img.resize(size, box=box)` in the order of Pillow <= 12, on any Pillow.

  Pillow <= 12, which the released models were trained and evaluated with, always resized
  in two passes, horizontal then vertical, each rounded to uint8; Pillow 13 runs the
  vertical pass first when the height shrinks much more than the width
  (python-pillow/Pillow#9549), which moves 1 level on up to a quarter of the values. Here
  the passes are two explicit one-dimension resizes: Pillow's `ImagingResampleInner` runs a
  pass only along an axis whose size or box changes (`need_horizontal` /
  `need_vertical`), so each call is exactly one of its passes, with the coefficients of
  the two-dimension resize (they depend only on the axis's input size, box ends and output
  size). `size` is (width, height); `box` (left, upper, right, lower) in input pixels,
  default the whole image."""
  w, h = img.size
  out_w, out_h = size
  x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
  if (out_w, x0, x1) != (w, 0, w):
    img = img.resize((out_w, h), Image.BILINEAR, box=(x0, 0, x1, h))
  if (out_h, y0, y1) != (h, 0, h):
    img = img.resize((out_w, out_h), Image.BILINEAR, box=(0, y0, out_w, y1))
  return img


def crop_resize(img: Image.Image, window, size: int) -> Image.Image:
  """torchvision `resized_crop` on PIL: `crop` the (top, left, h, w) window, then
  `resize((size, size), BILINEAR)` in Pillow <= 12's order (`resize`; PIL's filter taps
  clamp at the crop's edges)."""
  top, left, h, w = window
  img = img.crop((left, top, left + w, top + h))
  if img.size != (size, size):
    img = resize(img, (size, size))
  return img


def train_transform(raw: bytes, rng: np.random.Generator, *, image_size: int,
                    crop_scale=(0.08, 1.0), random_flip: bool = True,
                    color_jitter=(0.0, 0.0, 0.0, 0.0), name: str = "<bytes>") -> np.ndarray:
  """uint8 [image_size, image_size, 3]: torchvision's training transform on the PIL image.

  `decode`, `RandomResizedCrop(image_size, scale=crop_scale)` (window from
  `random_resized_crop_window`, then `crop_resize`), `RandomHorizontalFlip(0.5)` when
  `random_flip`, `ColorJitter(*color_jitter)` (brightness, contrast, saturation, hue) when
  any strength is non-zero. Random draws come from `rng` in torchvision's order (crop,
  flip, jitter). Raises `ImageDecodeError` naming `name` for undecodable bytes.
  """
  img = decode(raw, name)
  window = random_resized_crop_window(img.height, img.width, rng, scale=tuple(crop_scale))
  img = crop_resize(img, window, image_size)
  if random_flip and rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if any(color_jitter):
    img = apply_jitter(img, *jitter_params(rng, *color_jitter))
  return np.asarray(img)


def eval_resize_size(image_size: int, crop_ratio: float) -> int:
  """The shorter side before the centre crop: `int(round(image_size / crop_ratio))`
  (256 for 224 at the usual 0.875)."""
  return int(round(image_size / crop_ratio))


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
  """torchvision `Resize(size)` on PIL: the shorter side becomes `size`, the longer
  `int(size * long / short)` (Python floats, as torchvision), BILINEAR in Pillow <= 12's
  order (`resize`); no-op when the size is already right."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  if (new_w, new_h) == (w, h):
    return img
  return resize(img, (new_w, new_h))


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """torchvision `CenterCrop(size)` on PIL: offsets `int(round((H - size) / 2.0))`; a side
  shorter than `size` is zero-padded first, (d // 2) before and ((d + 1) // 2) after, as
  torchvision pads (PIL's crop fills outside the image with zeros)."""
  w, h = img.size

  def offset(n):
    return -((size - n) // 2) if size > n else int(round((n - size) / 2.0))

  top, left = offset(h), offset(w)
  return img.crop((left, top, left + size, top + size))


@functools.lru_cache(maxsize=4096)
def _exact_box(n_in: int, n_out: int, start: int, size: int) -> tuple[float, float] | None:
  """The box (in0, in1) along one axis with which PIL's resize of [in0, in1) to `size`
  pixels computes, for output k, exactly the filter its resize of the whole axis (n_in ->
  n_out) computes for output start + k; None when no such box is certain.

  PIL passes a box as C floats and computes scale = (in1 - in0) / size and the centres
  in0 + (k + 0.5) * scale in double, the whole axis with in0 = 0 and scale = n_in / n_out.
  When n_in / n_out has a power-of-two denominator (e.g. a shorter side resized to 256) and
  the box ends are exact in float32, every one of these numbers is exact, hence bitwise
  equal in both computations (with or without fused multiply-add)."""
  scale = Fraction(n_in, n_out)
  if scale.denominator & (scale.denominator - 1):
    return None
  in0, in1 = start * scale, (start + size) * scale
  for v in (in0, in1, in1 - in0):
    if Fraction(float(np.float32(float(v)))) != v:
      return None
  return float(in0), float(in1)


def _resize_center_crop(img: Image.Image, resize: int, size: int) -> Image.Image:
  """`center_crop(resize_shorter(img, resize), size)`, computing only the crop.

  PIL's BILINEAR resize is two passes, horizontal then vertical, the intermediate rounded
  to uint8, each output column (row) of a pass depending on its input column (row) alone.
  So the horizontal pass of the whole image followed by the crop's columns, then the
  vertical pass of those columns followed by the crop's rows, gives the same pixels; a
  pass restricted to the crop by a box where `_exact_box` proves the coefficients equal
  skips the other outputs. Every `img.resize` here changes one axis only, so it is one of
  PIL's passes (see `resize`), in Pillow <= 12's order on any Pillow. Equal to the
  reference on 100 % of values (tested)."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(resize * long / short)
  ow, oh = (resize, new_long) if w <= h else (new_long, resize)
  if (ow, oh) == (w, h) or size > min(ow, oh):
    return center_crop(resize_shorter(img, resize), size)
  top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
  box = _exact_box(w, ow, left, size)
  if box:
    img = img.resize((size, h), Image.BILINEAR, box=(box[0], 0, box[1], h))
  else:
    img = img.resize((ow, h), Image.BILINEAR).crop((left, 0, left + size, h))
  box = _exact_box(h, oh, top, size)
  if box:
    return img.resize((size, size), Image.BILINEAR, box=(0, box[0], size, box[1]))
  return img.resize((size, oh), Image.BILINEAR).crop((0, top, size, top + size))


def eval_transform(raw: bytes, *, image_size: int, crop_ratio: float,
                   name: str = "<bytes>") -> np.ndarray:
  """The evaluation transform: torchvision's `Resize` + `CenterCrop` on the PIL image.

  `Resize(eval_resize_size(image_size, crop_ratio))` then `CenterCrop(image_size)`; only
  the crop is computed, with PIL's own resize (`_resize_center_crop`), so the pixels equal
  torchvision's.

  Args:
    raw: the encoded image's bytes.
    image_size: side of the output, pixels.
    crop_ratio: image_size over the resized shorter side, in (0, 1] (224/256 as released).
    name: the image's name for the error message.

  Returns:
    uint8 [image_size, image_size, 3].

  Raises:
    ImageDecodeError: naming `name`, for undecodable bytes.
  """
  img = decode(raw, name)
  return np.asarray(_resize_center_crop(img, eval_resize_size(image_size, crop_ratio),
                                        image_size))
