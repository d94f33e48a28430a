"""The released recipe's arithmetic: learning-rate schedule, AdamW, losses, the train step.

JAX, optax and `bcdnet_jax.nn` only (no Orbax, Grain, torch or TensorFlow): what `bench/`
times and what a user's own loop can import. The loss is the released one: (label-smoothed
CE on `fc` + KD from the frozen ResNet-50 teacher on `fc_dist`) / 2, or CE on both heads
when no teacher is configured.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bcdnet_jax import preprocessing
from bcdnet_jax.train import diagnostics as diag_lib


def released_learning_rate(k, *, base: float, peak: float, warmup_steps: int,
                           total_steps: int):
  """The released scheduler's learning rate for iteration `k` = 1, 2, ... (before its update).

  Linear warm-up `base + (peak - base) * (k - 1) / (W - 1)` while `W >= 2` and `k < W`
  (iteration 1 uses `base`, iteration W the peak), then the cosine
  `peak * (1 + cos(pi * (k - W) / (M - W))) / 2` to 0 at iteration M = `total_steps`.
  With no warm-up (W = 0) iteration 1 already uses `peak * (1 + cos(pi / M)) / 2`.
  Source: the recipe in BCDNET_REFERENCE.md ("The released schedule, exactly").

  Args:
    k: the iteration number, int scalar or array (1-based), or a traced value.
  Returns:
    float32 (float64 under `jax_enable_x64`) learning rate(s) of `k`'s shape.
  """
  k = jnp.asarray(k, jnp.result_type(float))
  w, m = warmup_steps, total_steps
  warm = base + (peak - base) * (k - 1) / max(w - 1, 1)
  cosine = peak * (1 + jnp.cos(math.pi * (k - w) / max(m - w, 1))) / 2
  return jnp.where(k < w, warm, cosine) if w >= 2 else cosine


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """The released schedule as an optax schedule, with the LR scaled linearly with the
  global batch (`batch_size / base_batch_size`).

  optax calls a schedule with the number of updates already made, so update `count` is
  the released iteration `k = count + 1`; a resume at step s continues at k = s + 1, as the
  released loop does from its `last_iter`.
  """
  scale = config.batch_size / config.base_batch_size
  peak = config.learning_rate * scale
  base = (config.warmup_init_lr if config.warmup_steps > 0 else config.learning_rate) * scale

  def schedule(count):
    return released_learning_rate(count + 1, base=base, peak=peak,
                                  warmup_steps=config.warmup_steps, total_steps=total_steps)

  return schedule


def make_optimizer(config, total_steps: int):
  """(torch.optim.AdamW as optax, its schedule): decoupled decay lr * wd * p with the
  pre-update parameters, betas/eps from the config."""
  schedule = learning_rate_schedule(config, total_steps)
  return optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                     weight_decay=config.weight_decay), schedule


# --- losses ---------------------------------------------------------------------------------

def smoothed_cross_entropy(logits, labels, smoothing: float):
  """Mean CE against (1 - eps) one-hot + eps / K (torch's label_smoothing=eps).

  Args:
    logits: float (B, K). labels: int (B,) in [0, K). smoothing: eps in [0, 1).
  """
  k = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, k), smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def distillation_loss(student_logits, teacher_logits):
  """Mean over the batch of -sum_k softmax(teacher)_k log_softmax(student)_k."""
  p = jax.nn.softmax(teacher_logits, axis=-1)
  return jnp.mean(-jnp.sum(p * jax.nn.log_softmax(student_logits, axis=-1), axis=-1))


# --- the step -------------------------------------------------------------------------------

def split_model(model):
  """(train graphdef, eval graphdef, params, batch_stats) of an nnx model."""
  model.train()
  train_def, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_def, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.train()
  return train_def, eval_def, params, batch_stats


def make_train_step(train_graphdef, tx, config, teacher_graphdef=None, diagnostics=None):
  """train_step(state, batch, teacher_state) -> (state, metrics): the released loss,
  (label-smoothed CE on `fc` + KD from the teacher, or CE, on `fc_dist`) / 2, and AdamW.

  With `diagnostics` (a `diagnostics.Layout` of the model) the step is
  train_step(state, batch, teacher_state, diag) -> (state, metrics, diag_out): `diag` is
  {"signs": the weight signs of the previous diagnostics step, "due": a bool scalar}, and
  `diag_out` the binarisation statistics of this step when due
  (`diagnostics.step_outputs`). The loss, gradients and update are the same computations
  either way.
  `batch["image"]` is uint8 NHWC, normalised here (`preprocessing.normalize`, ImageNet's
  mean/std as the recipe's `Normalize`); the teacher sees the same normalised batch.
  """
  smoothing = config.label_smoothing

  def train_step(state, batch, teacher_state, diag=None):
    images, labels = preprocessing.normalize(batch["image"]), batch["label"]

    def loss_fn(params):
      model = nnx.merge(train_graphdef, params, state["batch_stats"], copy=True)
      if diagnostics is not None:
        (logits, logits_dist), sign_inputs = diag_lib.forward_recording(model, images)
      else:
        (logits, logits_dist), sign_inputs = model(images), None
      ce = smoothed_cross_entropy(logits, labels, smoothing)
      if teacher_graphdef is not None:
        teacher = nnx.merge(teacher_graphdef, teacher_state, copy=True)
        t_logits = jax.lax.stop_gradient(teacher(images))
        second = distillation_loss(logits_dist, t_logits)
      else:
        second = smoothed_cross_entropy(logits_dist, labels, smoothing)
      loss = (ce + second) / 2
      return loss, (nnx.state(model, nnx.BatchStat), logits, logits_dist, ce, second,
                    sign_inputs)

    (loss, (batch_stats, logits, logits_dist, ce, second, sign_inputs)), grads = (
        jax.value_and_grad(loss_fn, has_aux=True)(state["params"]))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates),
                 "batch_stats": batch_stats, "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics = {"loss": loss, "ce": ce, "second_loss": second,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "accuracy_dist": jnp.mean(jnp.argmax(logits_dist, -1) == labels)}
    if diagnostics is None:
      return new_state, metrics
    return new_state, metrics, diag_lib.step_outputs(
        diagnostics, diag, new_state["params"], grads, sign_inputs)

  return train_step
