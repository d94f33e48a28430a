"""Comparing the arithmetic of one model: float64, float32 and the bfloat16 policy.

A binary network flips a bit where a sign's input lies within rounding of 0, so two
precisions of the same weights differ in a countable set of binary activations. These
helpers count them, and their effect on the logits and the top-1 prediction; the
converter uses them for float32 against float64, `bench/precision.py` for the mixed
bfloat16 policy against float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bcdnet_jax.nn import models
from bcdnet_jax.nn import quantizers as binarize


@nnx.jit
def logits_and_signs(model, x):
  """Logits and the sign (int8) of every binary activation's input, in one jit (cached per
  architecture, dtype and policy: models with the same structure share the compilation)."""
  with binarize.record_sign_inputs() as rec:
    y = model(x)
  return y, [jnp.sign(r).astype(jnp.int8) for r in rec]


def compare_policies(model: nnx.Module, images, *, policy: str = "bfloat16",
                     reference: str = "float32", batch_size: int = 64) -> dict:
  """Evaluation-mode outputs of `model` under `reference` (true float32 unless told
  otherwise) and under `policy` (e.g. 'bfloat16', or 'tf32' for the GPUs' default
  products), on `images` (NHWC, normalised). Returns counts of binary activations that
  differ, top-1 agreement and the largest logit difference (relative to the largest
  reference logit)."""
  ref, low = nnx.clone(model), nnx.clone(model)
  models.set_dtype_policy(ref, reference)
  models.set_dtype_policy(low, policy)
  ref.eval()
  low.eval()
  images = np.asarray(images, np.float32)
  flipped = total = agree = 0
  max_diff = max_logit = 0.0
  for start in range(0, len(images), batch_size):
    x = jnp.asarray(images[start:start + batch_size])
    y32, s32 = logits_and_signs(ref, x)
    ylo, slo = logits_and_signs(low, x)
    y32, ylo = np.asarray(y32), np.asarray(ylo, np.float32)
    flipped += sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(s32, slo))
    total += sum(int(np.asarray(a).size) for a in s32)
    agree += int(np.sum(y32.argmax(-1) == ylo.argmax(-1)))
    max_diff = max(max_diff, float(np.max(np.abs(y32 - ylo))))
    max_logit = max(max_logit, float(np.max(np.abs(y32))))
  n = len(images)
  return {"policy": models.resolve_dtype_policy(policy),
          "reference": models.resolve_dtype_policy(reference), "images": n,
          "binary_activations": total, "flipped_binary_activations": flipped,
          "flipped_fraction": flipped / max(total, 1), "top1_agreement": agree / max(n, 1),
          "max_abs_logit_diff": max_diff, "max_abs_logit": max_logit}
