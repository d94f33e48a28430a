"""The blocks, and the rule that every block kind is known everywhere it must be:
folded by export, run by the deploy runtime, named in the torch name tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bcdnet_jax.deploy import export, packed
from bcdnet_jax.interop import convert
from bcdnet_jax.nn import blocks, models
from bcdnet_jax.nn import quantizers as binarize

BINARY_PRESETS = [n for n in models.PRESETS if n != "resnet50"]


@pytest.mark.parametrize("name", BINARY_PRESETS)
def test_every_block_class_has_a_fold_a_runner_and_a_torch_name(name):
  model = models.abstract_model(models.get_spec(name, stage=2, num_classes=10))
  folds = export.fold_functions()
  classes = {type(x) for x in model.features} | {type(b) for g in model.mlp for b in g}
  missing = sorted(c.__name__ for c in classes if c not in folds)
  assert not missing, f"{name}: no fold function for {missing}"
  program, _ = export.deploy_tensors(model, abstract=True)
  unknown = sorted({op["op"] for op in program} - set(packed.OPS))
  assert not unknown, f"{name}: no deploy runner for {unknown}"
  assert convert.unmapped(model) == [], f"{name}: not in the torch name tables"


def test_unknown_kinds_fail_by_name():
  class Mystery(nnx.Module):
    pass

  model = models.create_model("bcdnet_a", stage=2, num_classes=3, channels=[8, 16],
                              mlp_groups=1, mlp_group=["pw"])
  model.features[1] = Mystery()
  with pytest.raises(export.ExportError, match="no fold function for Mystery"):
    export.deploy_tensors(model)
  with pytest.raises(packed.ArtefactError, match="unknown kind 'conv5x5'"):
    packed.forward([{"op": "conv5x5", "name": "x"}], {}, jnp.zeros((1, 8, 8, 3)), "float")


def test_dynamic_threshold_starts_as_the_static_block():
  """BCDNet-B's W2 and W3 start at zero, so a fresh BCDNet-B block computes what the
  BCDNet-A block with the same other weights computes."""
  rngs = nnx.Rngs(0)
  a = blocks.BasicBlock(8, 16, 2, binary_weights=True, rngs=rngs)
  b = blocks.BasicBlock(8, 16, 2, binary_weights=True, dynamic=dict(reduction=4),
                        rngs=nnx.Rngs(0))
  # copy every shared parameter from a into b
  sa = dict(nnx.to_flat_state(nnx.state(a)))
  for path, var in nnx.to_flat_state(nnx.state(b)):
    if path in sa:
      var.set_value(sa[path].get_value())
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8))
  np.testing.assert_allclose(np.asarray(b(x)), np.asarray(a(x)), rtol=1e-6, atol=1e-6)


def test_binary_activation_records_its_sign_inputs():
  act = blocks.BinaryActivation(4, 4, dynamic=None, rngs=nnx.Rngs(0))
  act.bias.bias[...] = jnp.array([0.5, -0.5, 0.0, 1.0])
  x = jnp.ones((1, 2, 2, 4))
  with binarize.record_sign_inputs() as rec:
    s, beta = act(x)
  assert len(rec) == 1
  np.testing.assert_array_equal(np.asarray(rec[0]), np.asarray(x + act.bias.bias[...]))
  np.testing.assert_array_equal(np.asarray(s), np.sign(np.asarray(rec[0])))
  assert beta == 0.0
  with binarize.record_sign_inputs() as again:
    pass
  assert again == []  # nothing recorded outside the context
