"""Deploy runtime: BCDNet inference from a folded artefact with 1-bit packed weights.

The artefact (written by `bcdnet_jax.deploy.export`) holds a small program (the block sequence)
and tensors: binary weights as sign bits packed 32 per uint32 word along the input
channels, per-channel affines in which each binary conv's scale mean|W| and its BatchNorm
are folded (y = k * D + c, D the integer ±1 dot product), the thresholds, RPReLUs, the
real-valued stem and one classifier head (the mean of the two). Three paths compute D:

- 'packed': activations binarised and packed 32 per word like the weights; D from XNOR +
  `jax.lax.population_count`. Each activation word comes with a mask word of its non-zero
  entries, so sign(0) = 0 (the released `torch.sign`) and the 3x3 convs' zero padding at
  the borders (which is neither +1 nor -1) count 0, exactly as in the float model.
- 'int8': ±1/0 as int8 with int32 accumulation (the accelerators' fast exact path).
- 'float': ±1/0 as float32 (the reference the other two must equal).

D is an exact integer on every path, so the paths differ only by float rounding in the
real-valued parts, which they share; their products (stem, shortcuts, dynamic embeddings,
head) are true float32 on every backend (`jax.lax.Precision.HIGHEST`, as the model's
'float32' policy), never TF32. No pickle, no torch: numpy, JAX and this package.

Exact zero weights (sign 0) are listed per conv as `<conv>.zeros`, the sorted int32
positions of their bits in `<conv>.bits` read as one flat bit array (word-major, bit i of
a word = its channel i): 4 bytes per zero weight; the runtime rebuilds the packed
non-zero mask from them.

File layout: b"BCDNETJX", uint32 format version, uint32 header length, the 32-byte
sha256 of the header and the data together, the JSON header (spec, program, tensor table,
preprocessing), zero padding to 64 bytes, the data. One flipped bit anywhere after the
prefix (a crop ratio, a stride, a weight) is detected.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import struct
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcdnet_jax import errors
from bcdnet_jax.deploy import header_checks

# The token shifts are the model's own (pure jnp) functions, so the two cannot diverge.
from bcdnet_jax.nn.layers import conv as _conv
from bcdnet_jax.nn.layers import group_shift, long_range_shifts

MAGIC = b"BCDNETJX"
VERSION = 3  # 2: the checksum covers the header too; 3: zero weights as positions
ALIGN = 64
PATHS = ("packed", "int8", "float")
WORD = 32
_CHUNK = 32  # words per step of the XNOR-popcount reduction


FORMAT = "bcdnet-jax-deploy"  # the header's "format" field of every artefact
REAL_DTYPES = header_checks.REAL_DTYPES


class ArtefactError(errors.UserError):
  """A deploy artefact that is not one, is truncated or corrupted, or is inconsistent."""


# --- bits ------------------------------------------------------------------------------------

def num_words(channels: int) -> int:
  """uint32 words that hold `channels` sign bits: ceil(channels / 32)."""
  return -(-channels // WORD)


def pack_bits(b):
  """Packs booleans along the last axis into uint32 words.

  Args:
    b: boolean (..., C).

  Returns:
    uint32 (..., ceil(C / 32)); bit i of word j is channel 32 j + i, padding bits 0.
  """
  c = b.shape[-1]
  pad = num_words(c) * WORD - c
  b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, pad)])
  b = b.reshape(*b.shape[:-1], -1, WORD).astype(jnp.uint32)
  return jnp.sum(b << jnp.arange(WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_bits(words, channels: int):
  """The inverse of `pack_bits`.

  Args:
    words: uint32 (..., W).
    channels: channels to keep (<= 32 W).

  Returns:
    boolean (..., channels).
  """
  bits = (words[..., None] >> jnp.arange(WORD, dtype=jnp.uint32)) & 1
  return bits.reshape(*words.shape[:-1], -1)[..., :channels].astype(bool)


def _patches(x, ksize: int, stride: int, padding: int):
  """(N, H, W, K) -> (N, Ho, Wo, ksize * ksize * K) windows, zero-padded (mask words 0)."""
  if ksize == 1 and padding == 0:
    return x[:, ::stride, ::stride] if stride > 1 else x
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (x.shape[1] - ksize) // stride + 1
  wo = (x.shape[2] - ksize) // stride + 1
  cols = [x[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
          for dy in range(ksize) for dx in range(ksize)]
  return jnp.concatenate(cols, axis=-1)


def xnor_popcount_conv(signs, wbits, wmask, ksize: int, stride: int, padding: int):
  """Integer convolution D of ±1/0 activations with packed ±1/0 weights, by XNOR-popcount.

  For each pair of words a (activation bits), m (activation non-zero mask), w: the entries
  that agree contribute +1, those that differ -1, masked ones 0:
  `D = 2 popcount(m & ~(a ^ w)) - popcount(m)`.

  Args:
    signs: {-1, 0, 1} NHWC activations (N, H, W, C), any numeric dtype.
    wbits: uint32 (O, ksize * ksize * words) weight sign bits (1: +1), `num_words(C)`
      words per tap.
    wmask: uint32 like `wbits`, the non-zero weights, or None when none is zero.
    ksize: kernel side.
    stride: stride in both directions.
    padding: symmetric zero padding (zeros count 0, as in the float model).

  Returns:
    int32 (N, Ho, Wo, O), exactly the integer convolution.
  """
  a = _patches(pack_bits(signs > 0), ksize, stride, padding)
  m = _patches(pack_bits(signs != 0), ksize, stride, padding)
  # Materialise the packed words once: fused into the reduction, XLA:CPU would recompute
  # the binarisation and packing for every output channel.
  a, m = jax.lax.optimization_barrier((a, m))
  lead = a.shape[:-1]
  a = a.reshape(-1, 1, a.shape[-1])
  m = m.reshape(-1, 1, m.shape[-1])
  total = jax.lax.population_count(m if wmask is None else m & wmask[None])
  agree = 0
  # Reduce in chunks of 32 words, accumulating: XLA:CPU vectorises a short inner
  # reduction well but not a long one (measured 5-15x faster for 3x3 convs).
  for i in range(0, a.shape[-1], _CHUNK):
    sl = slice(i, i + _CHUNK)
    mm = m[..., sl] if wmask is None else m[..., sl] & wmask[None, :, sl]
    x = mm & ~(a[..., sl] ^ wbits[None, :, sl])
    agree = agree + jax.lax.population_count(x).astype(jnp.int32).sum(-1)
  total = total.astype(jnp.int32).sum(-1)
  return (2 * agree - total).reshape(*lead, wbits.shape[0])


def mask_from_zeros(zeros, bits_shape) -> np.ndarray:
  """The packed non-zero mask of a conv from its `.zeros` tensor.

  Args:
    zeros: int32 positions of the zero weights' bits in the flat bit array of `.bits`.
    bits_shape: the shape of the conv's `.bits`.

  Returns:
    uint32 `bits_shape`: all bits set but those listed (bits past the last channel are
    ignored by every user of the mask).
  """
  words = np.full(math.prod(bits_shape), 0xFFFFFFFF, np.uint32)
  zeros = np.asarray(zeros, np.int64)
  np.bitwise_and.at(words, zeros // WORD,
                    ~(np.uint32(1) << (zeros % WORD).astype(np.uint32)))
  return words.reshape(bits_shape)


def signs_from_bits(wbits, wmask, ksize: int, in_features: int, dtype):
  """Unpacks a conv's weights into a dense kernel.

  Args:
    wbits: uint32 (O, ksize * ksize * W) sign bits.
    wmask: uint32 like `wbits` (the non-zero weights) or None.
    ksize: kernel side.
    in_features: input channels (<= 32 W).
    dtype: the kernel's dtype, e.g. int8 or float32.

  Returns:
    HWIO (ksize, ksize, in_features, O) of ±1, 0 where masked, in `dtype`.
  """
  o = wbits.shape[0]
  w = num_words(in_features)
  bits = unpack_bits(wbits.reshape(o, ksize, ksize, w), in_features)
  s = jnp.where(bits, 1, -1)
  if wmask is not None:
    s = jnp.where(unpack_bits(wmask.reshape(o, ksize, ksize, w), in_features), s, 0)
  return jnp.transpose(s, (1, 2, 3, 0)).astype(dtype)


# --- the forward program ---------------------------------------------------------------------

def _rprelu(t, name, x):
  x = x + t[name + ".shift_in"]
  return jnp.where(x >= 0, x, t[name + ".slope"] * x) + t[name + ".shift_out"]


def _matmul(a, b):
  """a @ b in true float32 (not TF32 / bfloat16 passes on accelerators)."""
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _binarize(t, name, x, relu: bool):
  """sign(x + threshold (+ alpha)) and the folded post-conv offset beta (0 if static)."""
  thr = x + t[name + ".threshold"]
  if name + ".embed" not in t:
    return jnp.sign(thr), 0.0
  e = _matmul(jnp.mean(x, axis=(1, 2)), t[name + ".embed"])
  if relu:
    e = jax.nn.relu(e)
  alpha = _matmul(e, t[name + ".alpha"])[:, None, None, :]
  beta = _matmul(e, t[name + ".beta"])[:, None, None, :]
  return jnp.sign(thr + alpha), beta


def _dot(t, name, s, path, ksize=1, stride=1, padding=0):
  """The integer ±1 product D of binary activations s with conv `name`, as float32."""
  if path == "packed":
    d = xnor_popcount_conv(s, t[name + ".bits"], t.get(name + ".wmask"), ksize, stride,
                           padding)
    if name + ".zero_kernel" in t:
      # Exact zero weights read as -1 above (no mask); add back what they took away.
      fix = _conv(s.astype(jnp.int8), t[name + ".zero_kernel"], stride, padding, jnp.int32)
      d = d.at[..., t[name + ".zero_channels"]].add(fix)
  elif path == "int8":
    d = _conv(s.astype(jnp.int8), t[name + ".sign"], stride, padding, jnp.int32)
  else:
    d = _conv(s, t[name + ".sign"], stride, padding)
  return d.astype(jnp.float32) * t[name + ".k"]


def _avg_pool_2x2(x):
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _max_pool_3x3(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


def _run_stem(t, x, op, path, relu):
  n, k = op["name"], op["kernel"]
  x = _conv(x, t[n + ".kernel"], 2, k // 2) * t[n + ".scale"] + t[n + ".shift"]
  return _max_pool_3x3(x) if op["max_pool"] else x


def _run_basic(t, x, op, path, relu):
  n = op["name"]
  s, beta = _binarize(t, n + ".act1", x, relu)
  a = _dot(t, n + ".conv3x3", s, path, 3, op["stride"], 1) + t[n + ".c1"] + beta
  h = _rprelu(t, n + ".rprelu1", (_avg_pool_2x2(x) if op["stride"] == 2 else x) + a)
  s, beta = _binarize(t, n + ".act2", h, relu)
  y = _dot(t, n + ".pw", s, path) + t[n + ".c2"] + beta
  return _rprelu(t, n + ".rprelu2", y + (jnp.concatenate([h, h], -1) if op["doubles"]
                                         else h))


def _run_lsr(t, x, op, path, relu):
  n = op["name"]
  s, beta = _binarize(t, n + ".act", x, relu)
  lh, lw = long_range_shifts(op["shift_mode"], x.shape[1], x.shape[2])
  y = (_dot(t, n + ".token_mlp", s, path)
       + _dot(t, n + ".short_mlp", group_shift(s, 1, 1), path)
       + _dot(t, n + ".long_mlp", group_shift(s, lh, lw), path))
  return _rprelu(t, n + ".rprelu", y + t[n + ".c"] + beta + x)


def _run_pw(t, x, op, path, relu):
  n = op["name"]
  s, beta = _binarize(t, n + ".act", x, relu)
  return _rprelu(t, n + ".rprelu", _dot(t, n + ".token_mlp", s, path) + t[n + ".c"]
                 + beta + x)


def _run_r18(t, x, op, path, relu):
  n = op["name"]
  s, beta = _binarize(t, n + ".act", x, relu)
  a = _dot(t, n + ".conv3x3", s, path, 3, op["stride"], 1) + t[n + ".c"] + beta
  sc = x
  if op["downsample"]:
    sc = _avg_pool_2x2(x) if op["stride"] == 2 else x
    sc = _conv(sc, t[n + ".down.kernel"], 1, 0) * t[n + ".down.scale"] + t[n + ".down.shift"]
  return _rprelu(t, n + ".rprelu", a + sc)


def _run_head(t, x, op, path, relu):
  return _matmul(jnp.mean(x, axis=(1, 2)), t[op["name"] + ".kernel"]) + t[op["name"] + ".bias"]


def _binary_site_tensors(n, sites):
  """Tensor shapes of binary convs [(act or None, conv, k, cin, cout)]."""
  out = {}
  for act, conv, k, cin, cout in sites:
    out[f"{n}.{conv}.bits"] = (cout, k * k * num_words(cin))
    out[f"{n}.{conv}.k"] = (cout,)
    if act:
      out[f"{n}.{act}.threshold"] = (cin,)
  return out


def _rprelu_tensors(n, rprelus):
  return {f"{n}.{r}.{leaf}": (w,) for r, w in rprelus
          for leaf in ("shift_in", "slope", "shift_out")}


def _affine_tensors(n, k, cin, cout):
  return {n + ".kernel": (k, k, cin, cout), n + ".scale": (cout,), n + ".shift": (cout,)}


@dataclasses.dataclass(frozen=True)
class OpKind:
  """Everything the deploy runtime knows of one kind of program op (see `OPS`).

  Attributes:
    run: `run(t, x, op, path, relu)` computes the op on activations x with its tensors t.
    tensors: `tensors(op, c, o)`, the tensors (name -> shape) it needs for input width c
      and output width o; `validate` checks them.
    out: `out(op, c)`, its output width for input width c.
    check: `check(op, c, o)`, what is wrong with its parameters, or None.
  """
  run: Callable
  tensors: Callable
  out: Callable = lambda op, c: op.get("out", c)
  check: Callable = lambda op, c, o: None


OPS: dict[str, OpKind] = {
    "stem": OpKind(_run_stem, lambda op, c, o: _affine_tensors(op["name"], op["kernel"],
                                                               op["in"], o)),
    "basic": OpKind(
        _run_basic,
        lambda op, c, o: {**_binary_site_tensors(op["name"], [("act1", "conv3x3", 3, c, c),
                                                              ("act2", "pw", 1, c, o)]),
                          **_rprelu_tensors(op["name"], [("rprelu1", c), ("rprelu2", o)])},
        check=lambda op, c, o: None if o in (c, 2 * c) else
        f"a basic block goes from C to C or 2C, not {c} -> {o}"),
    "lsr": OpKind(
        _run_lsr,
        lambda op, c, o: {**_binary_site_tensors(op["name"], [
            ("act", "token_mlp", 1, c, c), (None, "short_mlp", 1, c, c),
            (None, "long_mlp", 1, c, c)]), **_rprelu_tensors(op["name"], [("rprelu", c)])},
        check=lambda op, c, o: None if c % 4 == 0 else
        f"{c} channels are not divisible into 4 shift groups"),
    "pw": OpKind(
        _run_pw,
        lambda op, c, o: {**_binary_site_tensors(op["name"], [("act", "token_mlp", 1, c, c)]),
                          **_rprelu_tensors(op["name"], [("rprelu", c)])}),
    "r18": OpKind(
        _run_r18,
        lambda op, c, o: {**_binary_site_tensors(op["name"], [("act", "conv3x3", 3, c, o)]),
                          **_rprelu_tensors(op["name"], [("rprelu", o)]),
                          **(_affine_tensors(op["name"] + ".down", 1, c, o)
                             if op["downsample"] else {})}),
    "head": OpKind(_run_head, lambda op, c, o: {op["name"] + ".kernel": (c, o),
                                                op["name"] + ".bias": (o,)}),
}


def op_kind(op: dict) -> OpKind:
  """The registry entry of a program op.

  Args:
    op: one op of the header's program (`{"op": kind, "name": ..., ...}`).

  Returns:
    Its `OpKind`.

  Raises:
    ArtefactError: an unknown kind (never a silent no-op).
  """
  kind = OPS.get(op.get("op"))
  if kind is None:
    raise ArtefactError(f"program op {op.get('name')!r}: unknown kind {op.get('op')!r}; "
                        f"this runtime knows {sorted(OPS)}")
  return kind


def forward(program: list[dict], t: dict, x, path: str, relu: bool = False):
  """Runs a program op by op (unjitted; `DeployModel` jits per op).

  Args:
    program: the header's program.
    t: tensor name -> array, as `read` returns them.
    x: normalised NHWC float32 images (N, H, W, 3).
    path: 'packed', 'int8' or 'float'.
    relu: the spec's `dynamic_relu`.

  Returns:
    float32 logits (N, num_classes).
  """
  for op in program:
    x = op_kind(op).run(t, x, op, path, relu)
  return x


@functools.partial(jax.jit, static_argnames=("op", "path", "relu"))
def _run_op(t, x, *, op, path, relu):
  """One op, jitted on its own: identical blocks share one executable, and XLA:CPU runs
  the per-op programs faster than one fused whole (measured 0.6 s against 1.2 s for
  full-size BCDNet-A, batch 8, on the packed path)."""
  return forward([dict(op)], t, x, path, relu)


def _op_key(op: dict) -> tuple:
  return tuple(sorted((k, v) for k, v in op.items() if k != "name")) + (("name", ""),)


# --- the file --------------------------------------------------------------------------------

def _table(meta: dict[str, tuple[np.dtype, tuple]]) -> tuple[dict, int]:
  """Tensor table (dtype, shape, 64-byte aligned offset, nbytes) and the data length."""
  table, offset = {}, 0
  for name, (dtype, shape) in meta.items():
    dtype = np.dtype(dtype)
    offset += (-offset) % ALIGN
    nbytes = dtype.itemsize * math.prod(shape)
    table[name] = {"dtype": dtype.str, "shape": [int(d) for d in shape], "offset": offset,
                   "nbytes": int(nbytes)}
    offset += nbytes
  return table, offset


_PREFIX = 8 + 8 + 32  # magic, version and header length, sha256


def _header_bytes(header: dict, table: dict, data_bytes: int) -> bytes:
  header = {k: v for k, v in header.items() if k not in ("tensors", "data_bytes")}
  return json.dumps(dict(header, tensors=table, data_bytes=data_bytes),
                    separators=(",", ":")).encode()


def _head(hbytes: bytes, digest: bytes) -> bytes:
  head = MAGIC + struct.pack("<II", VERSION, len(hbytes)) + digest + hbytes
  return head + b"\0" * ((-len(head)) % ALIGN)


def file_size(header: dict, meta: dict[str, tuple[np.dtype, tuple]]) -> int:
  """The size `write` gives, from dtypes and shapes alone.

  Args:
    header: the JSON header (without the tensor table).
    meta: tensor name -> (dtype, shape).

  Returns:
    The file size in bytes, exactly.
  """
  table, n = _table(meta)
  return len(_head(_header_bytes(header, table, n), b"\0" * 32)) + n


def write(path: str, header: dict, tensors: dict[str, np.ndarray]) -> int:
  """Writes an artefact: prefix, JSON header, tensors (each 64-byte aligned).

  Args:
    path: the file to write (overwritten; `export` writes a temporary file and renames).
    header: the JSON header (spec, program, preprocessing); the tensor table is added.
    tensors: name -> array.

  Returns:
    The file size in bytes.
  """
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  table, n = _table({k: (v.dtype, v.shape) for k, v in tensors.items()})
  data = bytearray(n)
  for name, arr in tensors.items():
    off = table[name]["offset"]
    data[off:off + arr.nbytes] = arr.tobytes()
  hbytes = _header_bytes(header, table, n)
  head = _head(hbytes, hashlib.sha256(hbytes + bytes(data)).digest())
  with open(path, "wb") as f:
    f.write(head)
    f.write(data)
  return len(head) + n


def read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads and verifies an artefact: magic, version, lengths, checksum, tensor table.

  Args:
    path: the artefact file.

  Returns:
    (header, tensors): the JSON header and tensor name -> NumPy array.

  Raises:
    ArtefactError: an unreadable, foreign, truncated or corrupted file, another format
      version, or an inconsistent tensor table.
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ArtefactError(f"{path}: cannot read the deploy artefact: {e}") from None
  if len(raw) < 16 or raw[:8] != MAGIC:
    raise ArtefactError(f"{path}: not a bcdnet-jax deploy artefact (no {MAGIC!r} magic; "
                        "write one with `python -m bcdnet_jax export`)")
  version, hlen = struct.unpack("<II", raw[8:16])
  if version != VERSION:
    raise ArtefactError(f"{path}: artefact format version {version}, this runtime reads "
                        f"version {VERSION}")
  if _PREFIX + hlen > len(raw):
    raise ArtefactError(f"{path}: truncated: the header needs {_PREFIX + hlen} bytes, the "
                        f"file has {len(raw)}")
  hbytes = raw[_PREFIX:_PREFIX + hlen]
  start = _PREFIX + hlen + (-(_PREFIX + hlen)) % ALIGN
  data = raw[start:]
  if hashlib.sha256(hbytes + data).digest() != raw[16:_PREFIX]:
    raise ArtefactError(f"{path}: corrupted or truncated: the sha256 of the header and data "
                        "does not match the one written with them")
  try:
    header = json.loads(hbytes)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ArtefactError(f"{path}: corrupted header (not JSON: {e})") from None
  want = header.get("data_bytes")
  if not isinstance(want, int) or not isinstance(header.get("tensors"), dict):
    raise ArtefactError(f"{path}: header lacks 'data_bytes' / 'tensors'")
  if len(data) != want:
    raise ArtefactError(f"{path}: truncated or padded: {len(data)} data bytes, the header "
                        f"says {want}")
  tensors = {}
  for name, e in header["tensors"].items():
    try:
      dtype = np.dtype(e["dtype"])
      shape = tuple(int(d) for d in e["shape"])
      off, nbytes = int(e["offset"]), int(e["nbytes"])
    except (KeyError, TypeError, ValueError) as err:
      raise ArtefactError(f"{path}: tensor {name!r}: bad table entry {e} ({err})") from None
    if dtype.kind not in "fui" or dtype.itemsize * math.prod(shape) != nbytes or (
        off < 0 or off + nbytes > len(data)):
      raise ArtefactError(f"{path}: tensor {name!r}: entry {e} does not fit the data")
    tensors[name] = np.frombuffer(data, dtype, math.prod(shape), off).reshape(shape)
  validate(header, tensors, path)
  return header, tensors


def _check_zeros(zeros, num_bits: int, where: str) -> None:
  z = np.asarray(zeros)
  if z.dtype != np.int32 or z.ndim != 1 or not z.size:
    raise ArtefactError(f"{where}: zero-weight positions must be a non-empty 1-D int32 "
                        f"array, got {z.dtype} {z.shape}")
  if z[0] < 0 or z[-1] >= num_bits or np.any(np.diff(z) <= 0):
    raise ArtefactError(f"{where}: zero-weight positions must be increasing and within "
                        f"the conv's {num_bits} sign bits")


def _need(tensors, name, shape, where):
  if name not in tensors:
    raise ArtefactError(f"{where}: missing tensor {name!r}")
  if shape is not None and tuple(tensors[name].shape) != tuple(shape):
    raise ArtefactError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                        f"the architecture header implies {tuple(shape)}")


def validate(header: dict, tensors: dict, where: str = "artefact") -> None:
  """Checks the header's values for their ranges and the program against the tensors.

  Every op's tensors must exist with the shapes that the channel widths in the header
  imply, so a wrong architecture header fails here. The ranges are
  `header_checks.check_header`'s.

  Args:
    header: the JSON header.
    tensors: name -> array.
    where: what to name in the error (the file).

  Raises:
    ArtefactError: naming the op and the tensor or parameter that does not fit.
  """
  program = header.get("program")
  if not isinstance(program, list) or not program:
    raise ArtefactError(f"{where}: header has no program")
  header_checks.check_header(header, where, ArtefactError)
  c = None
  for i, op in enumerate(program):
    kind, n = op.get("op"), op.get("name")
    at = f"{where}: program[{i}] ({kind} {n!r})"
    if kind not in OPS:
      raise ArtefactError(f"{at}: unknown op; expected one of {sorted(OPS)}")
    if (kind == "stem") != (i == 0):
      raise ArtefactError(f"{at}: the program must start with a stem, and only there")
    if kind != "stem" and op.get("in", c) != c:
      raise ArtefactError(f"{at}: takes {op['in']} channels, the previous op gives {c}")
    c = op["in"] if kind == "stem" else c
    o = OPS[kind].out(op, c)
    for name, shape in OPS[kind].tensors(op, c, o).items():
      _need(tensors, name, shape, at)
      zeros = name[:-len(".bits")] + ".zeros"
      if name.endswith(".bits") and zeros in tensors:
        _check_zeros(tensors[zeros], math.prod(shape) * WORD, f"{at}: tensor {zeros!r}")
    problem = OPS[kind].check(op, c, o)
    if problem:
      raise ArtefactError(f"{at}: {problem}")
    if kind == "head":
      if i != len(program) - 1:
        raise ArtefactError(f"{at}: the head must be the last op")
      if o != header.get("spec", {}).get("num_classes"):
        raise ArtefactError(f"{at}: head has {o} classes, the spec says "
                            f"{header.get('spec', {}).get('num_classes')}")
      return
    c = o
  raise ArtefactError(f"{where}: the program does not end with a head")


def min_image_size(program: list[dict]) -> int:
  """The smallest image side (px) a program runs on: its total stride, the stem's (2, and
  2 more with a max-pool) times the blocks'."""
  size = 1
  for op in program:
    if op["op"] == "stem":
      size *= 4 if op.get("max_pool") else 2
    size *= int(op.get("stride", 1))
  return size


class DeployModel:
  """A loaded artefact, called as `model(x, path="packed")`, one jitted op at a time.

  Calling it:

  - `x`: normalised NHWC float32 images (N, H, W, C), N >= 1, H and W at least
    `min_image_size` (preprocess with the header's `preprocessing`).
  - `path`: 'packed' (XNOR-popcount), 'int8' (int8 products, int32 sums) or 'float'
    (float32 products); all three give the same integer products.
  - returns float32 logits (N, num_classes);
  - raises `ValueError` for another path, shape, an empty batch or too small images.

  Attributes:
    header: the JSON header (spec, program, preprocessing, tensor table).
    spec: the architecture (`ModelSpec` fields as JSON).
    program: the ops, in order.
    source: the file it was loaded from.
  """

  def __init__(self, header: dict, tensors: dict[str, np.ndarray], source: str = ""):
    self.header = header
    self.spec = header["spec"]
    self.program = header["program"]
    self.source = source
    self._relu = bool(self.spec.get("dynamic_relu", False))
    base = {}
    for name, arr in tensors.items():
      if name.endswith(".zeros"):
        conv = name[:-len(".zeros")]
        base[conv + ".wmask"] = jnp.asarray(mask_from_zeros(arr, tensors[conv + ".bits"].shape))
      elif name.endswith(".bits"):
        base[name] = jnp.asarray(arr)
      else:  # float16 storage computes in float32
        base[name] = jnp.asarray(arr, jnp.float32)
    self._base = base
    self._params: dict[str, list[dict]] = {}

  @property
  def num_classes(self) -> int:
    return int(self.spec["num_classes"])

  def params(self, path: str) -> list[dict]:
    """Per op, the tensors a path computes with, named relative to the op (the int8 and
    float paths unpack the weights once, here)."""
    if path not in self._params:
      per_op = []
      for op in self.program:
        prefix = op["name"] + "."
        t = {k[len(op["name"]):]: v for k, v in self._base.items() if k.startswith(prefix)}
        if path == "packed":
          for name in [k for k in t if k.endswith(".wmask")]:
            conv = name[:-len(".wmask")]
            t.update(_zero_weight_correction(conv, t.pop(name), t[conv + ".bits"].shape[0],
                                             op["in"]))
        else:
          dtype = jnp.int8 if path == "int8" else jnp.float32
          for name in [k for k in t if k.endswith(".bits")]:
            conv = name[:-len(".bits")]
            k = 3 if conv.endswith("conv3x3") else 1
            t[conv + ".sign"] = signs_from_bits(t.pop(name), t.pop(conv + ".wmask", None),
                                                k, op["in"], dtype)
        per_op.append(t)
      self._params[path] = per_op
    return self._params[path]

  @property
  def min_image_size(self) -> int:
    """The total stride: the stem (2, and 2 more with a max-pool) times the blocks'."""
    return min_image_size(self.program)

  def __call__(self, x, path: str = "packed"):
    if path not in PATHS:
      raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    x = jnp.asarray(x, jnp.float32)
    cin = self.program[0]["in"]
    if x.ndim != 4 or x.shape[-1] != cin:
      raise ValueError(f"expected a normalised NHWC float32 batch with {cin} channels, got "
                       f"shape {tuple(x.shape)}")
    if x.shape[0] == 0:
      raise ValueError("empty batch: pass at least one image")
    if min(x.shape[1:3]) < self.min_image_size:
      raise ValueError(f"images of {x.shape[1]}x{x.shape[2]} px are smaller than the "
                       f"{self.min_image_size} px this model's strides need")
    for op, t in zip(self.program, self.params(path)):
      x = _run_op(t, x, op=_op_key(op), path=path, relu=self._relu)
    return x


def _zero_weight_correction(conv: str, wmask, out_features: int, in_features: int) -> dict:
  """The few output channels with exact zero weights, and an int8 kernel of 1s there.

  The masked XNOR-popcount (a fourth operand in the inner loop) ran 7x slower than the
  unmasked one on XLA:CPU; zero weights are rare (a float weight exactly 0.0), so the
  packed path runs unmasked, where a zero weight counts as -1, and adds conv(s, Z) for Z
  the indicator of zero weights, over only the channels that have one.
  """
  mask = np.asarray(wmask)
  w = num_words(in_features)
  ksize = math.isqrt(mask.shape[1] // w)
  bits = np.asarray(unpack_bits(jnp.asarray(mask.reshape(out_features, ksize, ksize, w)),
                                in_features))
  zero = ~bits  # (O, k, k, C)
  channels = np.flatnonzero(zero.any(axis=(1, 2, 3)))
  if not channels.size:
    return {}
  kernel = np.transpose(zero[channels], (1, 2, 3, 0)).astype(np.int8)
  return {conv + ".zero_kernel": jnp.asarray(kernel),
          conv + ".zero_channels": jnp.asarray(channels.astype(np.int32))}


def load_packed(path: str) -> DeployModel:
  """Loads a deploy artefact written by `python -m bcdnet_jax export`.

  Args:
    path: the `.bcdnet` file.

  Returns:
    The model, a `DeployModel`: `f(x, path='packed')` maps normalised NHWC float32
    images to float32 logits; `path` is 'packed' (XNOR-popcount), 'int8' or 'float'.

  Raises:
    ArtefactError: a missing, truncated or corrupted file, another format, or an
      architecture header that does not fit the tensors.
  """
  header, tensors = read(path)
  if header.get("format") != FORMAT:
    raise ArtefactError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
  return DeployModel(header, tensors, path)
