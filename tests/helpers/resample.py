"""Pillow <= 12's BILINEAR resize in NumPy: the order the released models were trained and
evaluated with (a horizontal pass, then a vertical one, each rounded to uint8).

Written here from the definitions in Pillow's `src/libImaging/Resample.c`
(`precompute_coeffs`, `normalize_coeffs_8bpc`, the 8 bpc passes): per output pixel a
window of input pixels weighted by the triangle filter (support 1, widened by the
down-scaling factor), the weights normalised to sum 1 in double, then turned into 22-bit
fixed point and accumulated in integers with a half added before the shift. The box's ends
are C floats (float32), as Pillow passes them.
"""

import functools

import numpy as np

PRECISION_BITS = 32 - 8 - 2

@functools.lru_cache(maxsize=256)
def coefficients(in_size: int, in0: float, in1: float, out_size: int):
  """(first input index int64 [out_size], fixed-point weights int64 [out_size, k]) of one
  pass along one axis: output i is sum_j w[i, j] * in[first[i] + j] (zero weights pad)."""
  in0, in1 = float(np.float32(in0)), float(np.float32(in1))
  scale = filterscale = float(np.float32(in1) - np.float32(in0)) / out_size
  filterscale = max(filterscale, 1.0)
  support = 1.0 * filterscale
  first, rows = [], []
  for xx in range(out_size):
    center = in0 + (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size) - xmin
    w = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * (1.0 / filterscale)))
         for x in range(xmax)]
    total = 0.0
    for v in w:  # left to right, as the C loop `ww += w`
      total += v
    if total != 0.0:
      w = [v / total for v in w]
    first.append(xmin)
    rows.append([int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else
                 int(0.5 + v * (1 << PRECISION_BITS)) for v in w])
  k = max(len(r) for r in rows)
  weights = np.zeros((out_size, k), np.int64)
  for i, r in enumerate(rows):
    weights[i, :len(r)] = r
  return np.asarray(first, np.int64), weights


def _pass(arr: np.ndarray, coeffs, axis: int) -> np.ndarray:
  """One pass along `axis` of uint8 HWC `arr`: rounded and clipped to uint8."""
  first, weights = coeffs
  x = np.moveaxis(arr.astype(np.int64), axis, 0)
  acc = np.zeros((len(first),) + x.shape[1:], np.int64)
  for j in range(weights.shape[1]):
    idx = np.minimum(first + j, x.shape[0] - 1)  # padded taps have weight 0
    acc += weights[:, j].reshape((-1,) + (1,) * (x.ndim - 1)) * x[idx]
  out = np.clip((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255)
  return np.moveaxis(out.astype(np.uint8), 0, axis)


def released_resize(arr: np.ndarray, size, box=None) -> np.ndarray:
  """uint8 [H, W, C] of uint8 [h, w, C] `arr`: `Image.resize(size, BILINEAR, box)` of
  Pillow <= 12 (a pass only along an axis whose size or box changes)."""
  h, w = arr.shape[:2]
  out_w, out_h = size
  x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
  if out_w != w or x0 or x1 != out_w:
    arr = _pass(arr, coefficients(w, x0, x1, out_w), 1)
  if out_h != h or y0 or y1 != out_h:
    arr = _pass(arr, coefficients(h, y0, y1, out_h), 0)
  return arr
