"""The device mesh and what is built from it, shared by training, evaluation and
`checkpoint.restore_model`: shardings, global batches from per-process host batches, the
XLA options and the jitted evaluation step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bcdnet_jax import preprocessing


def compiler_options() -> dict | None:
  """XLA options for the training and evaluation programs on this backend.

  On CPU, XLA's concurrency-optimised scheduler runs independent ops side by side, each
  with the whole thread pool: the training step measured 5-10% faster without it
  (bench/train_step.py, bcdnet_a batch 8). Other backends keep their defaults.
  """
  if jax.default_backend() == "cpu":
    return {"xla_cpu_enable_concurrency_optimized_scheduler": False}
  return None


def make_eval_step(eval_graphdef, mean_rgb=preprocessing.MEAN_RGB,
                   stddev_rgb=preprocessing.STDDEV_RGB):
  """eval_step(state, batch) -> (sums of top-1/top-5 hits, examples, scored examples;
  predictions), with multi-hot label sets (ReaL: images without labels excluded). The
  batch's images are uint8 NHWC, normalised here (`preprocessing.normalize`, mean/std of
  the model's preprocessing record)."""
  def eval_step(state, batch):
    model = nnx.merge(eval_graphdef, state["params"], state["batch_stats"], copy=True)
    logits = model(preprocessing.normalize(batch["image"], mean_rgb, stddev_rgb))
    labels, mask = batch["labels"], batch["mask"]
    scored = mask * (jnp.sum(labels, -1) > 0)
    pred = jnp.argmax(logits, -1)
    top1 = jnp.take_along_axis(labels, pred[:, None], -1)[:, 0]
    top5 = jnp.max(jnp.take_along_axis(
        labels, jax.lax.top_k(logits, min(5, logits.shape[-1]))[1], -1), -1)
    return {"top1": jnp.sum(top1 * scored), "top5": jnp.sum(top5 * scored),
            "count": jnp.sum(mask), "scored": jnp.sum(scored)}, pred
  return eval_step


@dataclasses.dataclass(frozen=True)
class Runtime:
  """A ('data',) mesh over every device of every process: parameters replicated, batches
  split along the mesh (BatchNorm statistics are then over the global batch)."""
  mesh: Mesh

  @classmethod
  def create(cls) -> Runtime:
    return cls(Mesh(np.array(jax.devices()), ("data",)))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  @property
  def size(self) -> int:
    return self.mesh.size

  def global_batch(self, host_batch):
    """The global array of each process's host batch (its rows of the global batch)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), host_batch)

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)

  def abstract_replicated(self, tree):
    """ShapeDtypeStructs of `tree` with the replicated sharding (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=self.replicated), tree)

  def jit_train_step(self, train_step, diagnostics: bool = False):
    """The jitted step; `diagnostics`: the step takes the diagnostics input and returns
    their output as well (`train.make_train_step(..., diagnostics=...)`), replicated."""
    extra = (self.replicated,) if diagnostics else ()
    return jax.jit(train_step, in_shardings=(self.replicated, self.batch_sharding,
                                             self.replicated, *extra),
                   out_shardings=(self.replicated, self.replicated, *extra),
                   donate_argnums=(0,),
                   compiler_options=compiler_options())

  def jit_eval_step(self, eval_graphdef, mean_rgb=preprocessing.MEAN_RGB,
                    stddev_rgb=preprocessing.STDDEV_RGB):
    return jax.jit(make_eval_step(eval_graphdef, tuple(mean_rgb), tuple(stddev_rgb)),
                   in_shardings=(self.replicated, self.batch_sharding),
                   out_shardings=(self.replicated, self.batch_sharding),
                   compiler_options=compiler_options())
