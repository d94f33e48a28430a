"""Converted fixture checkpoints reproduce what the authors' PyTorch code computed.

Tolerances (float32): logits within 1e-5 absolute (largest seen 1.7e-6); gradients within
1e-4 of the largest |gradient| of each tensor (largest seen 1.4e-5 relative); BN running
statistics within 1e-6 (seen: exact). Each test prints the largest difference it saw.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STAGES, fixture_expected, nhwc
from flax import nnx

from bcdnet_jax.interop import convert

LOGIT_ATOL = 1e-5
GRAD_RTOL = 1e-4


def _loss(model, x, probe):
  a, b = model(x)
  return jnp.sum(a * probe) + 0.5 * jnp.sum(b * probe), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_eval_logits(converted, name):
  model, _ = converted[name]
  e = fixture_expected(name)
  model.eval()
  try:
    forward = nnx.jit(lambda m, x: m(x))
    for size in (224, 96):
      got = np.asarray(forward(model, jnp.asarray(nhwc(e[f"x{size}"]))))
      diff = np.abs(got - e[f"eval_logits_{size}"]).max()
      print(f"{name} eval_logits_{size}: max |diff| {diff:.3g}")
      assert diff < LOGIT_ATOL
  finally:
    model.train()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_train_logits_gradients_and_bn_statistics(converted, name):
  model, sd = converted[name]
  e = fixture_expected(name)
  model = nnx.clone(model)  # the training pass updates BN statistics
  x = jnp.asarray(nhwc(e["x96"]))
  probe = jnp.asarray(e["probe"])

  step = nnx.jit(nnx.grad(_loss, argnums=(0, 1), has_aux=True))
  (grads, gx), (a, b) = step(model, x, probe)
  da = np.abs(np.asarray(a) - e["train_logits_96"]).max()
  db = np.abs(np.asarray(b) - e["train_logits_dist_96"]).max()
  print(f"{name} train logits fc/fc_dist: max |diff| {da:.3g} / {db:.3g}")
  assert da < LOGIT_ATOL and db < LOGIT_ATOL

  gx = np.asarray(gx).transpose(0, 3, 1, 2)
  rel = np.abs(gx - e["grad_x96"]).max() / np.abs(e["grad_x96"]).max()
  print(f"{name} grad_x96: max relative diff {rel:.3g}")
  assert rel < GRAD_RTOL

  named = convert.state_to_torch_names(model, grads)
  expected = {k[len("grad/module."):]: e[k] for k in e.files if k.startswith("grad/")}
  assert set(named) == set(expected)  # a gradient for every parameter, nothing else
  worst = max((np.abs(named[k] - v).max() / max(np.abs(v).max(), 1e-12), k)
              for k, v in expected.items())
  print(f"{name} parameter gradients: max relative diff {worst[0]:.3g} ({worst[1]})")
  assert worst[0] < GRAD_RTOL

  bn = model.features[1].bn1
  for ours, key in ((bn.mean, "running_mean"), (bn.var, "running_var")):
    d = np.abs(np.asarray(ours[...]) - e[f"{key}_after/module.feature.1.bn1"]).max()
    print(f"{name} feature.1.bn1.{key} after one step: max |diff| {d:.3g}")
    assert d < 1e-6
  assert int(bn.count[...]) == int(sd["feature.1.bn1.num_batches_tracked"]) + 1


@pytest.mark.parametrize("name", list(STAGES))
def test_torch_reference_reproduces_fixtures(name):
  """Our torch reference loads the released format strictly and computes the same."""
  torch = pytest.importorskip("torch")
  from conftest import fixture_ckpt, tiny_spec

  from bcdnet_jax.interop import torch_ref
  e = fixture_expected(name)
  ref = torch_ref.build(tiny_spec(STAGES[name]))
  raw = torch.load(fixture_ckpt(name), map_location="cpu", weights_only=True)["model"]
  ref.load_state_dict({k[len("module."):]: v for k, v in raw.items()}, strict=True)
  ref.eval()
  with torch.no_grad():
    d = np.abs(ref(torch.from_numpy(e["x224"])).numpy() - e["eval_logits_224"]).max()
  assert d < LOGIT_ATOL
  ref.train()
  x = torch.from_numpy(e["x96"]).requires_grad_(True)
  a, b = ref(x)
  p = torch.from_numpy(e["probe"])
  ((a * p).sum() + 0.5 * (b * p).sum()).backward()
  assert np.abs(a.detach().numpy() - e["train_logits_96"]).max() < LOGIT_ATOL
  rel = max(np.abs(t.grad.numpy() - e[f"grad/module.{k}"]).max()
            / np.abs(e[f"grad/module.{k}"]).max() for k, t in ref.named_parameters())
  print(f"{name} torch reference gradients: max relative diff {rel:.3g}")
  assert rel < GRAD_RTOL


def test_stage1_checkpoint_loads_into_stage2(converted):
  """Stage 2 starts from stage 1 as the authors did: same names and shapes."""
  from conftest import tiny_spec
  _, sd1 = converted["a_3f"]
  m2, report = convert.from_torch_state_dict(sd1, tiny_spec(2))
  assert report["tensors_mapped"] == len(sd1)
  m1, _ = converted["a_3f"]
  np.testing.assert_array_equal(np.asarray(m2.features[3].conv3x3.kernel[...]),
                                np.asarray(m1.features[3].conv3x3.kernel[...]))
  assert m2.features[3].conv3x3.binary_weights and not m1.features[3].conv3x3.binary_weights


@pytest.mark.slow
def test_int8_compute_reproduces_stage2_fixture(converted):
  """int8 ±1 products with int32 accumulation (the CPU default): the authors' logits."""
  from conftest import tiny_spec
  _, sd = converted["a_3"]
  model, _ = convert.from_torch_state_dict(sd, tiny_spec(2, compute_dtype="int8"))
  assert model.features[3].conv3x3.compute_dtype == "int8"
  e = fixture_expected("a_3")
  model.eval()
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(nhwc(e["x96"]))))
  diff = np.abs(got - e["eval_logits_96"]).max()
  print(f"a_3 int8 eval_logits_96: max |diff| {diff:.3g}")
  assert diff < LOGIT_ATOL
