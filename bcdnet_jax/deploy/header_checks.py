"""Range checks of a deploy artefact's header: the sha256 proves the header is the one
written, not that what wrote it was sane (a recorded crop ratio of 0 would divide by zero
in predict), so every value the runtime and `predict` compute with is checked here.
"""

from __future__ import annotations

REAL_DTYPES = ("float32", "float16")
MAX_IMAGE_SIZE = 4096  # px: the largest input side a header may record (predict's limit)


def _is_int(v, lo: int, hi: int | None = None) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


_OP_FIELDS = {  # field -> (rule, what it must be), for the fields an op has
    "in": (lambda v: _is_int(v, 1), "a positive integer"),
    "out": (lambda v: _is_int(v, 1), "a positive integer"),
    "kernel": (lambda v: _is_int(v, 1, 15) and v % 2 == 1, "an odd integer 1 to 15"),
    "stride": (lambda v: v in (1, 2) and not isinstance(v, bool), "1 or 2"),
    "max_pool": (lambda v: isinstance(v, bool), "true or false"),
    "doubles": (lambda v: isinstance(v, bool), "true or false"),
    "downsample": (lambda v: isinstance(v, bool), "true or false"),
    "shift_mode": (lambda v: v in ("released", "paper") or _is_int(v, 1),
                   "'released', 'paper' or a positive integer"),
    "name": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
}


def check_header(header: dict, where: str, error) -> None:
  """Checks that every value the runtime and `predict` compute with is in its range: the
  sha256 proves the header is the one written, not that what wrote it was sane (a
  recorded crop ratio of 0 would divide by zero in predict). Raises `error` (packed's
  ArtefactError) naming the field, its value and the range."""
  from bcdnet_jax import preprocessing
  spec = header.get("spec")
  if not isinstance(spec, dict) or not _is_int(spec.get("num_classes"), 1):
    got = spec.get("num_classes") if isinstance(spec, dict) else spec
    raise error(f"{where}: header field spec.num_classes must be a positive integer, "
                        f"got {got!r}")
  if header.get("real_dtype") not in REAL_DTYPES:
    raise error(f"{where}: header field real_dtype must be one of {REAL_DTYPES}, got "
                        f"{header.get('real_dtype')!r}")
  pre = header.get("preprocess")
  if pre is not None:  # None: recorded none (predict asks for --image_size)
    try:
      if not isinstance(pre, dict):
        raise TypeError(f"expected a dict, got {pre!r}")
      preprocessing.record(**pre)
    except (TypeError, ValueError) as e:
      raise error(f"{where}: header field preprocess: "
                          f"{str(e).removeprefix('preprocessing: ')}") from None
    if pre["image_size"] > MAX_IMAGE_SIZE:
      raise error(f"{where}: header field preprocess.image_size must be at most "
                          f"{MAX_IMAGE_SIZE} px, got {pre['image_size']}")
  for i, op in enumerate(header.get("program") or []):
    if not isinstance(op, dict):
      raise error(f"{where}: program[{i}] is not an object: {op!r}")
    for field, (ok, what) in _OP_FIELDS.items():
      if field in op and not ok(op[field]):
        raise error(f"{where}: program[{i}] ({op.get('op')} {op.get('name')!r}): "
                            f"field {field} must be {what}, got {op[field]!r}")
