"""bcdnet_jax.nn as a library: quantizers, QuantConv / QuantDense, BinaryActivation's
forms, stats of any model, the model registry, diagnostics and export of users' networks."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bcdnet_jax import errors
from bcdnet_jax.nn import blocks, layers, models, quantizers, stats
from examples import tiny_bnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The boundaries and every piece: beyond -1, -1, inside, 0, inside, 1, beyond.
X = np.array([-2.0, -1.0, -0.75, -0.5, 0.0, 0.5, 0.75, 1.0, 1.5], np.float32)
GRADS = {  # the surrogate derivative of each sign, in NumPy
    "approx": lambda x: np.where((x >= -1) & (x < 0), 2 + 2 * x,
                                 np.where((x >= 0) & (x < 1), 2 - 2 * x, 0.0)),
    "ste": lambda x: np.where(np.abs(x) <= 1, 1.0, 0.0),
    "identity": lambda x: np.ones_like(x),
}


@pytest.mark.parametrize("name", sorted(GRADS))
def test_sign_quantizers_forward_and_gradient(name):
  q = quantizers.get(name)
  np.testing.assert_array_equal(np.asarray(q(jnp.asarray(X))), np.sign(X))
  assert float(q(jnp.float32(0.0))) == 0.0  # sign(0) = 0 (larq: +1)
  probe = np.arange(1, X.size + 1, dtype=np.float32)
  g = jax.grad(lambda x: jnp.sum(q(x) * probe))(jnp.asarray(X))
  np.testing.assert_allclose(np.asarray(g), GRADS[name](X) * probe, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (6, 5)])  # conv HWIO and dense (in, out)
def test_scaled_sign_forward_and_gradient(shape):
  rng = np.random.default_rng(0)
  w = rng.normal(0, 0.8, shape).astype(np.float32)
  flat = w.reshape(-1, shape[-1])
  flat[0, 0], flat[1, 1], flat[2, 2], flat[3, 3], flat[4, 4] = 0.0, 1.0, -1.0, 0.5, -1.5
  w = flat.reshape(shape)
  q = quantizers.get("scaled_sign")
  scale = np.abs(flat).mean(axis=0)  # one per output channel
  np.testing.assert_allclose(np.asarray(q(jnp.asarray(w))).reshape(flat.shape),
                             scale * np.sign(flat), rtol=1e-6)
  probe = rng.normal(size=shape).astype(np.float32)
  g = jax.grad(lambda w: jnp.sum(q(w) * probe))(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(g), np.where(np.abs(w) <= 1, probe, 0.0))


def test_get_none_callable_and_errors():
  assert quantizers.get(None) is None
  f = lambda x: jnp.tanh(x)  # noqa: E731
  assert quantizers.get(f) is f
  assert quantizers.get("approx") is quantizers.approx_sign
  assert quantizers.name_of("approx_sign") == "approx"
  with pytest.raises(ValueError, match=r"unknown quantizer 'nope'; expected one of \["):
    quantizers.get("nope")
  with pytest.raises(TypeError, match="a quantizer is None, a name or a callable, got int"):
    quantizers.get(3)


def test_registered_quantizer_by_name_and_a_callable_in_the_layers():
  @quantizers.register("test_half_sign")
  @jax.custom_vjp
  def half_sign(x):
    return 0.5 * jnp.sign(x)

  half_sign.defvjp(lambda x: (half_sign(x), None), lambda _, g: (0.5 * g,))
  assert quantizers.get("test_half_sign") is half_sign
  with pytest.raises(ValueError, match="quantizer name 'approx' is taken"):
    quantizers.register("approx")(lambda x: x)
  x = jnp.asarray(X).reshape(1, 3, 3, 1)
  act = blocks.BinaryActivation(1, sign="test_half_sign")
  np.testing.assert_array_equal(np.asarray(act(x)), 0.5 * np.sign(X).reshape(1, 3, 3, 1))
  np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: jnp.sum(act(x)))(x)), 0.5)
  # a callable straight into QuantConv: conv(q_in(x), q_k(W))
  conv = layers.QuantConv(1, 2, 3, 1, 1, input_quantizer=jnp.sign,
                          kernel_quantizer="test_half_sign", rngs=nnx.Rngs(0))
  k = np.asarray(conv.kernel[...])
  ref = layers.conv2d(jnp.sign(x), jnp.asarray(0.5 * np.sign(k)), 1, 1)
  np.testing.assert_array_equal(np.asarray(conv(x)), np.asarray(ref))


def test_fresh_quantconv_signs_are_mixed_presets_keep_released_init():
  conv = layers.QuantConv(64, 32, 3, kernel_quantizer="scaled_sign", rngs=nnx.Rngs(0))
  pos = np.mean(np.asarray(conv.kernel[...]) > 0, axis=(0, 1, 2))  # fraction of +1 per channel
  assert pos.shape == (32,) and 0.4 < pos.mean() < 0.6 and pos.min() > 0.3 and pos.max() < 0.7
  w = np.sign(np.asarray(conv.weight()))
  assert not all(np.all(w[..., o] == w[..., 0]) for o in range(1, 32))
  released = layers.BinaryConv(64, 32, 3, binary_weights=True, rngs=nnx.Rngs(0))
  k = np.asarray(released.kernel[...])
  assert (k > 0).all() and k.max() < 1e-3  # U(0, 1e-3): the presets' stage-2 start
  assert released.kernel_quantizer is quantizers.binarize_weight and released.binary_weights


def test_quantconv_stride_padding_dilation_and_quantdense():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  conv = layers.QuantConv(3, 4, 3, stride=2, padding=2, dilation=2, rngs=nnx.Rngs(0))
  ref = jax.lax.conv_general_dilated(x, conv.kernel[...], (2, 2), ((2, 2), (2, 2)),
                                     rhs_dilation=(2, 2),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision="highest")
  assert conv(x).shape == (2, 5, 5, 4)  # (9 + 4 - 4 - 1) // 2 + 1
  np.testing.assert_allclose(np.asarray(conv(x)), np.asarray(ref), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="QuantConv: stride must be a positive int, got 0"):
    layers.QuantConv(3, 4, 3, stride=0, rngs=nnx.Rngs(0))
  dense = layers.QuantDense(5, 3, input_quantizer="ste", kernel_quantizer="scaled_sign",
                            rngs=nnx.Rngs(0))
  z = np.asarray(jax.random.normal(jax.random.key(1), (4, 5)))
  k, b = np.asarray(dense.kernel[...]), np.asarray(dense.bias[...])
  want = np.sign(z) @ (np.abs(k).mean(0) * np.sign(k)) + b
  np.testing.assert_allclose(np.asarray(dense(jnp.asarray(z))), want, rtol=1e-5, atol=1e-6)


def test_binary_activation_forms():
  plain = blocks.BinaryActivation(4)
  x = jnp.asarray(np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 2, 2, 4))
  np.testing.assert_array_equal(np.asarray(plain(x)), np.sign(np.asarray(x)))
  seq = nnx.Sequential(plain, layers.QuantConv(4, 2, kernel_quantizer="scaled_sign",
                                               rngs=nnx.Rngs(0)))
  assert seq(x).shape == (1, 2, 2, 2)
  s, beta = blocks.BinaryActivation(4, 4, rngs=nnx.Rngs(0))(x)  # the blocks' form
  assert beta == 0.0 and s.shape == x.shape
  with pytest.raises(ValueError, match="dynamic thresholds need out_features"):
    blocks.BinaryActivation(4, dynamic={}, rngs=nnx.Rngs(0))


# --- stats of any model, by hand ------------------------------------------------------------

def test_summary_of_a_sequential_bnn_by_hand():
  model = tiny_bnn.create(num_classes=10, rngs=nnx.Rngs(0))
  r = stats.summary(model, (32, 32, 3))
  rows = [(s["name"], s["kind"], s["binary_macs"], s["real_macs"]) for s in r["layers"]]
  assert rows == [("layers.0", "Conv", 0, 32 * 32 * 3 * 3 * 3 * 32),   # 884,736
                  ("layers.3", "QuantConv", 16 * 16 * 3 * 3 * 32 * 64, 0),  # 4,718,592
                  ("layers.6", "QuantConv", 8 * 8 * 3 * 3 * 64 * 64, 0),   # 2,359,296
                  ("layers.9", "Linear", 0, 64 * 10)]
  assert r["bops"] == 7_077_888 and r["flops"] == 885_376
  assert r["ops"] == 7_077_888 / 64 + 885_376
  binary = 3 * 3 * 32 * 64 + 3 * 3 * 64 * 64  # 55,296
  real = 864 + 650 + 2 * (32 + 64 + 64) + 32 + 64  # stem, head, BN scale/bias, thresholds
  assert r["binary_params"] == binary and r["params"] == binary + real == 57_226
  assert r["bn_statistics"] == 2 * (32 + 64 + 64)
  assert r["size_bytes_fp32"] == 4 * (57_226 + 320)
  assert r["size_bytes_packed"] == binary // 8 + 4 * (real + 320 + 64 + 64)


def test_summary_of_a_class_of_blocks_by_hand_and_stage1():
  r = stats.summary(tiny_bnn.create_blocks(num_classes=10, rngs=nnx.Rngs(0)), (32, 32, 3))
  assert r["bops"] == 8 * 8 * (3 * 3 * 16 * 16 + 2 * 16 * 16 + 3 * 3 * 32 * 32 + 32 * 32)
  assert r["flops"] == 16 * 16 * 3 * 3 * 3 * 16 + 32 * 10
  r1 = stats.summary(tiny_bnn.create_blocks(num_classes=10, stage=1, rngs=nnx.Rngs(0)),
                     (32, 32, 3))
  assert r1["bops"] == 0 and r1["flops"] == r["flops"] + r["bops"]  # real weights: FLOPs


# --- the registry ---------------------------------------------------------------------------

def test_registry_names_and_mistakes():
  spec = models.get_spec("examples.tiny_bnn:create", num_classes=10, in_channels=1)
  assert spec.family == "custom" and spec.builder == "examples.tiny_bnn:create"
  assert models.ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
  assert "builder" not in models.get_spec("bcdnet_a").to_json()  # presets' records unchanged
  m = models.build(spec, seed=0)
  assert isinstance(m, nnx.Sequential) and m.spec == spec and m(jnp.ones((2, 32, 32, 1))).shape \
      == (2, 10)
  # a registered name is recorded as its importable module:function, so a fresh process
  # (evaluation, export, summary) can build the model again
  assert models.get_spec("tiny_blocks", stage=1).builder == "examples.tiny_bnn:create_blocks"
  unknown = models.ModelSpec(family="custom", builder="zz_registered_elsewhere", stage=2,
                             num_classes=10)
  with pytest.raises(errors.UserError, match="unknown model name 'zz_registered_elsewhere': "
                     "expected a preset, 'module:function'"):
    models.build(unknown, seed=0)  # what restore_model does: one error line, no traceback
  for name, msg in [("nosuchmod:create", "cannot import module 'nosuchmod'"),
                    ("examples.tiny_bnn:nope", "module 'examples.tiny_bnn' has no function"),
                    ("tiny", "unknown model name 'tiny'")]:
    with pytest.raises(errors.UserError, match=msg):
      models.get_spec(name)
  with pytest.raises(ValueError, match="override 'channels' does not apply to the custom"):
    models.get_spec("tiny_blocks", channels=(4, 8))
  with pytest.raises(ValueError, match="'bcdnet_a' is a preset's name"):
    models.register_model("bcdnet_a")(tiny_bnn.create)
  with pytest.raises(ValueError, match="the builder returned int, not an nnx.Module"):
    models.register_model("test_not_a_module")(lambda **kw: 3)
    models.create_model("test_not_a_module")


def test_heads_one_or_two():
  a, b = jnp.ones((2, 3)), jnp.zeros((2, 3))
  assert models.heads(a) == (a, a) and models.heads((a, b)) == (a, b)
  with pytest.raises(ValueError, match="got 3 outputs"):
    models.heads((a, a, a))


def test_diagnostics_layout_of_a_custom_model():
  from bcdnet_jax.train import diagnostics
  lay = diagnostics.model_layout(tiny_bnn.create(rngs=nnx.Rngs(0)), (16, 16, 3))
  assert lay.conv_names() == ["layers.3", "layers.6"] and lay.binary_weights
  assert lay.sign_names() == ["layers.2", "layers.5"] and lay.rprelu_names() == []
  lay1 = diagnostics.model_layout(tiny_bnn.create(stage=1, rngs=nnx.Rngs(0)), (16, 16, 3))
  assert lay1.conv_names() == ["layers.3", "layers.6"] and not lay1.binary_weights


# --- export ---------------------------------------------------------------------------------

def test_export_of_custom_models(tmp_path):
  from bcdnet_jax.deploy import export, packed
  model = models.create_model("tiny_blocks", num_classes=10, seed=1)
  # trained-looking weights: mixed signs (the blocks start at U(0, 1e-3))
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    v.set_value(v.get_value() + 0.1 * jax.random.normal(jax.random.key(2), v.shape))
  model.eval()
  art = str(tmp_path / "tb.bcdnet")
  export.export_model(model, art)
  res = export.verify(model, packed.load_packed(art), image_size=32)
  for path in packed.PATHS:
    assert res[path]["top1_equal"] and res[path]["max_abs_diff"] < 1e-5 * max(
        1.0, res[path]["max_logit"]), (path, res[path])
  seq = models.create_model("examples.tiny_bnn:create", num_classes=10)
  with pytest.raises(export.ExportError) as e:
    export.export_model(seq, str(tmp_path / "seq.bcdnet"))
  msg = str(e.value)
  assert msg.startswith("cannot export module layers.0: no fold function for Conv (the deploy")
  assert "\n" not in msg and "docs/building-bnns.md, 'Adding a block kind'" in msg
  assert not (tmp_path / "seq.bcdnet").exists()


def test_nn_imports_no_heavy_frameworks():
  code = ("import sys, bcdnet_jax.nn; "
          "print([m for m in ('torch', 'tensorflow', 'grain', 'orbax') "
          "if any(k == m or k.startswith(m + '.') for k in sys.modules)])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


# --- the harness trains, records, restores and refuses to export a custom network ---------

def test_custom_model_through_the_training_harness(tmp_path, digits_dir, caplog, capsys):
  from helpers.configs import small_config

  from bcdnet_jax import checkpoint, train
  from bcdnet_jax.deploy import export
  from bcdnet_jax.train import report
  name = "examples.tiny_bnn:create"
  wd1, wd2 = str(tmp_path / "s1"), str(tmp_path / "s2")
  c1 = small_config(digits_dir, num_train_steps=4, log_every_steps=2)
  c1.model.name, c1.model.stage = name, 1
  with caplog.at_level("WARNING", logger="bcdnet_jax"):
    r1 = train.run(c1, wd1)
  assert "config.model.overrides channels, mlp_group, mlp_groups apply to presets only" \
      in caplog.text
  assert r1["steps"] == 4 and r1["num_eval_examples"] == 359
  c2 = small_config(digits_dir, num_train_steps=4, log_every_steps=2, init_from=wd1)
  c2.model.name = name
  r2 = train.run(c2, wd2)  # stage 2 from stage 1: the same parameter tree
  assert 0.0 <= r2["top1"] <= 1.0
  spec = json.load(open(os.path.join(wd2, "model.json")))["spec"]
  assert spec["family"] == "custom" and spec["builder"] == name and spec["stage"] == 2
  rows = [json.loads(line) for line in open(os.path.join(wd2, "diagnostics.jsonl"))]
  assert rows[-1]["step"] == 4
  for key in ("layers.3/flip_ratio", "layers.6/scale_mean", "layers.2/pos_fraction",
              "layers.5/band_fraction"):
    assert key in rows[-1], key
  restored = checkpoint.restore_model(wd2)
  assert isinstance(restored, nnx.Sequential) and restored.spec.builder == name
  assert report.main([wd2]) == 0 and os.path.exists(os.path.join(wd2, "report", "index.html"))
  out = str(tmp_path / "m.bcdnet")
  assert export.main(["--checkpoint", wd2, "--out", out]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: cannot export module layers.0: no fold function for Conv")
  assert not os.path.exists(out)
