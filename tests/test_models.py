import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CHANNELS
from flax import nnx

from bcdnet_jax.nn import models

forward = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("stage", [1, 2])
def test_bcdnet_a_parameter_count(stage):
  spec = models.get_spec("bcdnet_a", stage=stage)
  assert models.count_params(models.abstract_model(spec)) == 46_146_384


def test_preset_parameter_counts():
  counts = {n: models.count_params(models.abstract_model(models.get_spec(n)))
            for n in models.PRESETS}
  assert counts["resnet50"] == 25_557_032  # torchvision's ResNet-50
  assert counts["bcdnet_a"] == 46_146_384
  assert counts["bcdnet_b"] > counts["bcdnet_a"]
  assert counts["reactnet_r18"] < counts["bcdnet_a_r18"] < counts["bcdnet_b_r18"]
  assert set(counts) == {"bcdnet_a", "bcdnet_b", "reactnet_a", "reactnet_r18",
                         "bcdnet_a_r18", "bcdnet_b_r18", "resnet50"}


def test_reactnet_a_layout():
  spec = models.get_spec("reactnet_a")
  assert list(spec.channels) == [32, 64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
  assert spec.mlp_groups == 0
  assert models.block_strides(spec) == (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)


def test_released_stride_rule():
  assert models.block_strides(models.get_spec("bcdnet_a")) == (1, 2, 1, 2, 1, 2, 1, 1, 1, 2)
  # at the fixtures' reduced width the rule strides at 4 -> 8 but not into 64 channels
  tiny = models.get_spec("bcdnet_a", channels=TINY_CHANNELS)
  assert models.block_strides(tiny) == (2, 2, 1, 2, 1, 1, 1, 1, 1, 2)
  custom = models.get_spec("bcdnet_a", channels=TINY_CHANNELS,
                           strides=[1, 2, 1, 2, 1, 2, 1, 1, 1, 2])
  assert models.block_strides(custom) == (1, 2, 1, 2, 1, 2, 1, 1, 1, 2)


def test_tiny_fixture_model_from_overrides():
  spec = models.get_spec("bcdnet_a", stage=2, num_classes=10, channels=TINY_CHANNELS)
  assert models.count_params(models.abstract_model(spec)) == 704_116  # fixtures' README


def test_train_returns_two_heads_eval_their_mean():
  m = models.create_model("bcdnet_a", stage=2, num_classes=7, channels=[8, 16, 16],
                          mlp_groups=1)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  m.eval()
  mean = np.asarray(forward(m, x))
  m.train()
  logits, logits_dist = nnx.clone(m)(x)
  assert logits.shape == logits_dist.shape == (2, 7) and mean.shape == (2, 7)
  # in eval mode BN uses running statistics: compare with the heads on eval features
  m.eval()
  z = m.features_and_pool(x)
  np.testing.assert_allclose(mean, (np.asarray(m.head(z)) + np.asarray(m.head_dist(z))) / 2,
                             rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown model name 'bcdnet_c'"):
    models.create_model("bcdnet_c", stage=2)
  with pytest.raises(ValueError, match="unknown override 'chanels'"):
    models.get_spec("bcdnet_a", chanels=[1])
  with pytest.raises(ValueError, match="stage must be 1 or 2"):
    models.get_spec("bcdnet_a", stage=3)
  with pytest.raises(ValueError, match="C to C or 2C"):
    models.get_spec("bcdnet_a", channels=[4, 8, 24])
  with pytest.raises(ValueError, match="divisible by 4"):
    models.get_spec("bcdnet_a", channels=[3, 6, 6])
  with pytest.raises(ValueError, match="strides must be"):
    models.block_strides(models.get_spec("bcdnet_a", strides=[2]))
  with pytest.raises(ValueError, match="unknown sign function"):
    models.get_spec("bcdnet_a", activation_sign="tanh")
  m = models.create_model("reactnet_a", stage=1, num_classes=3,
                          channels=[4, 8, 8])
  with pytest.raises(ValueError, match="NHWC"):
    m(jnp.zeros((1, 3, 32, 32)))


def test_mlp_width_override():
  assert models.get_spec("bcdnet_a", mlp_width=512).channels[-1] == 512
  assert list(models.get_spec("bcdnet_a", channels=[4, 8, 16], mlp_width=16).channels) \
      == [4, 8, 16]
  with pytest.raises(ValueError, match="contradicts"):
    models.get_spec("bcdnet_a", channels=[4, 8, 8], mlp_width=16)


def _copy_shared(src, dst):
  """Copies every Variable of src into the same path of dst."""
  flat = dict(nnx.to_flat_state(nnx.state(src)))
  dst_state = nnx.state(dst)
  for path, var in nnx.to_flat_state(dst_state):
    if path in flat:
      var.set_value(flat[path].get_value())
  nnx.update(dst, dst_state)


def test_shift_modes_differ_only_where_they_should():
  kw = dict(stage=2, num_classes=5, channels=[8, 16, 16], mlp_groups=1, seed=3)
  released = models.create_model("bcdnet_a", shift_mode="released", **kw)
  paper = models.create_model("bcdnet_a", shift_mode="paper", **kw)
  _copy_shared(released, paper)
  released.eval(), paper.eval()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 24, 24, 3)), jnp.float32)
  # 24 -> 12 (stem) -> 6 tokens: released shifts by 3, paper by 6 // 2 = 3: identical
  np.testing.assert_array_equal(np.asarray(released(x)), np.asarray(paper(x)))
  # 40 -> 20 -> 10 tokens: released 3, paper 5: different outputs
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 40, 40, 3)), jnp.float32)
  assert np.abs(np.asarray(released(x)) - np.asarray(paper(x))).max() > 1e-4


def test_bcdnet_b_starts_as_bcdnet_a_and_options():
  kw = dict(stage=2, num_classes=5, channels=[8, 16, 16], mlp_groups=1)
  a = models.create_model("bcdnet_a", **kw)
  b = models.create_model("bcdnet_b", **kw)
  _copy_shared(a, b)
  a.eval(), b.eval()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))
  dyn = b.features[1].act1.dynamic
  assert dyn.embed.kernel[...].shape == (8, 2)  # d = C_in / 4, no bias
  assert dyn.embed.bias is None and dyn.alpha.bias is None and dyn.beta.bias is None
  assert dyn.alpha.kernel[...].shape == (2, 8) and dyn.beta.kernel[...].shape == (2, 8)
  assert b.features[2].act2.dynamic.beta.kernel[...].shape == (4, 16)
  # W2 (threshold) and W3 (post-conv offset) both change the output once non-zero
  for attr in ("alpha", "beta"):
    b2 = nnx.clone(b)
    lin = getattr(b2.features[1].act1.dynamic, attr)
    lin.kernel[...] = jnp.full(lin.kernel[...].shape, 0.5)
    assert np.abs(np.asarray(b2(x)) - np.asarray(a(x))).max() > 1e-4
  b8 = models.create_model("bcdnet_b", dynamic_reduction=8, dynamic_relu=True, **kw)
  assert b8.features[1].act1.dynamic.embed.kernel[...].shape == (8, 1)
  assert b8.features[1].act1.dynamic.relu
  only3 = models.create_model("bcdnet_b", dynamic_3x3_only=True, **kw)
  assert only3.features[1].act1.dynamic is not None
  assert only3.features[1].act2.dynamic is None
  assert only3.mlp[0][0].act.dynamic is None


@pytest.mark.parametrize("name", ["reactnet_r18", "bcdnet_a_r18", "bcdnet_b_r18"])
def test_resnet18_family(name):
  full = models.abstract_model(models.get_spec(name))
  assert sum(len(g) for g in full.mlp) == (0 if name == "reactnet_r18" else 6)
  assert len(full.features) == 1 + (16 if name == "reactnet_r18" else 14)
  assert full.features[5].downsample is not None  # first block of stage 2
  assert full.features[6].downsample is None
  m = models.create_model(name, stage=2, num_classes=4, channels=[8, 16, 16, 32],
                          blocks_per_stage=[1, 1, 1, 1], mlp_groups=min(full.spec.mlp_groups, 1))
  m.eval()
  y = forward(m, jnp.zeros((1, 64, 64, 3)))
  assert y.shape == (1, 4) and np.isfinite(np.asarray(y)).all()


@pytest.mark.slow
def test_resnet50_teacher_forward():
  m = models.create_model("resnet50", num_classes=6, channels=[4, 8, 16, 32],
                          blocks_per_stage=[1, 1, 1, 1])
  m.eval()
  y = forward(m, jnp.zeros((2, 32, 32, 3)))
  assert y.shape == (2, 6)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_full_width_presets_compute_in_float64(name):
  """Cast to float64 under x64, every preset traces to float64 logits throughout (no
  layer forces float32), in both modes: the converter's self-check relies on it."""
  with jax.enable_x64(True):
    model = models.cast_floating(models.abstract_model(models.get_spec(name, stage=2)),
                                 jnp.float64)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float64)
    train_out = nnx.eval_shape(lambda m, x: m(x), model, x)
    model.eval()
    eval_out = nnx.eval_shape(lambda m, x: m(x), model, x)
  outs = jax.tree.leaves((train_out, eval_out))
  assert outs and all(o.dtype == jnp.float64 for o in outs), [o.dtype for o in outs]
