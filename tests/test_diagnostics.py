"""Binarisation diagnostics: every statistic against NumPy on a tiny model with known
weights and inputs, the warnings, and that the diagnostics leave training unchanged."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers.configs import small_config

from bcdnet_jax import preprocessing, summary
from bcdnet_jax.nn import models
from bcdnet_jax.nn import quantizers as binarize
from bcdnet_jax.train import diagnostics, loop
from bcdnet_jax.train import step as step_lib
from configs import default

TINY = dict(channels=(8, 16), mlp_groups=1, mlp_group=("lsr", "pw"))


def tiny_spec(stage=2):
  return models.get_spec("bcdnet_a", stage=stage, num_classes=10, **TINY)


def test_layout_names_are_the_summary_table_names():
  spec = tiny_spec()
  lay = diagnostics.layout(spec, 16)
  table = [s.name for s in summary.layer_stats(spec, 16) if s.kind == "BinaryConv"]
  assert lay.conv_names() == table
  assert lay.sign_names() == ["features.1.act1", "features.1.act2", "mlp.0.0.act",
                              "mlp.0.1.act"]
  assert lay.rprelu_names() == ["features.1.rprelu1", "features.1.rprelu2", "mlp.0.0.rprelu",
                                "mlp.0.1.rprelu"]
  assert lay.binary_weights and not diagnostics.layout(tiny_spec(1), 16).binary_weights


def test_sign_stats_count_exactly():
  x = jnp.array([[-2.0, -1.0, -0.5, 0.0], [0.0, 0.25, 1.0, 3.0]])
  s = jax.device_get(diagnostics.sign_stats(x))
  assert s == {"pos_fraction": 3 / 8, "band_fraction": 4 / 8, "zero_fraction": 2 / 8}


def _known_model():
  """The tiny stage-2 model with known weights: a zero stem (so the first sign's inputs
  are exactly its bias: zeros, 0.5 and -2), a sign whose inputs are all positive, an
  all-positive binary conv, latent weights beyond the clip range, known RPReLU slopes."""
  model = models.build(tiny_spec(), seed=3)
  model.features[0].conv.kernel[...] = jnp.zeros_like(model.features[0].conv.kernel[...])
  model.features[1].act1.bias.bias[...] = jnp.array([0, 0, 0, 0.5, 0.5, 0.5, -2, -2.0])
  model.features[1].act2.bias.bias[...] = jnp.full((8,), 100.0)  # all inputs positive
  k = np.asarray(model.features[1].pw_down1.kernel[...])
  model.features[1].pw_down1.kernel[...] = jnp.asarray(np.abs(k) + 1e-3)  # all positive
  k = np.array(model.features[1].conv3x3.kernel[...])
  k.reshape(-1)[::10] = 1.5 * np.sign(k.reshape(-1)[::10])  # 58 of 576 beyond |W| = 1
  model.features[1].conv3x3.kernel[...] = jnp.asarray(k)
  model.features[1].rprelu2.prelu.slope[...] = jnp.linspace(-0.5, 0.75, 16)
  return model


def _numpy_conv(kernel, prev_kernel, grad):
  k = np.asarray(kernel, np.float64)
  scale = np.abs(k).mean(axis=(0, 1, 2))
  return {"flip_ratio": np.mean(np.sign(k) != np.sign(np.asarray(prev_kernel))),
          "clip_fraction": np.mean(np.abs(k) > 1), "scale_mean": scale.mean(),
          "scale_min": scale.min(), "scale_max": scale.max(),
          "grad_norm": np.sqrt(np.sum(np.asarray(grad, np.float64) ** 2))}


def test_every_statistic_against_numpy_with_a_forced_flip():
  model = _known_model()
  spec = model.spec
  lay = diagnostics.layout(spec, 16)
  train_def, _, params, batch_stats = step_lib.split_model(model)
  cfg = default.get_config()
  cfg.learning_rate = 0.0  # the weights change only where the test flips them
  tx, _ = step_lib.make_optimizer(cfg, 10)
  step = jax.jit(step_lib.make_train_step(train_def, tx, cfg, None, lay))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (4, 16, 16, 3)), jnp.uint8),
           "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32)}

  def kernels(p):
    return {n: np.asarray(diagnostics._at(p, path)["kernel"][...])
            for n, path in zip(lay.conv_names(), lay.convs)}

  # the reference gradients and sign inputs of the same forward, outside the step
  def loss_fn(p):
    m = nnx.merge(train_def, p, batch_stats, copy=True)
    with binarize.record_sign_inputs(with_sites=True) as rec:
      logits, logits_dist = m(preprocessing.normalize(batch["image"]))
    names = {id(node): ".".join(map(str, path)) for path, node in nnx.iter_graph(m)}
    loss = (step_lib.smoothed_cross_entropy(logits, batch["label"], cfg.label_smoothing)
            + step_lib.smoothed_cross_entropy(logits_dist, batch["label"],
                                           cfg.label_smoothing)) / 2
    return loss, {names[id(site)]: x for site, x in rec}

  grads, inputs = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
  inputs = jax.device_get(inputs)
  grads = kernels(grads)

  k0 = kernels(params)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  signs = diagnostics.init_signs(lay, params)
  state, _, out = step(state, batch, None, {"signs": signs, "due": jnp.asarray(True)})
  stats = jax.device_get(out["stats"])
  for name in lay.conv_names():  # lr 0: nothing flipped
    want = _numpy_conv(k0[name], k0[name], grads[name])
    for key, v in want.items():
      np.testing.assert_allclose(stats[name][key], v, rtol=2e-6, err_msg=f"{name} {key}")
    np.testing.assert_allclose(jax.device_get(out["vectors"][name]["scale"]),
                               np.abs(k0[name]).mean(axis=(0, 1, 2)), rtol=1e-6)
  assert stats["features.1.conv3x3"]["clip_fraction"] == 58 / 576
  assert stats["features.1.pw_down1"]["flip_ratio"] == 0
  # the first sign sees exactly its bias: 3 zeros, 3 x 0.5, 2 x -2 per token
  assert stats["features.1.act1"] == {"pos_fraction": 3 / 8, "band_fraction": 6 / 8,
                                      "zero_fraction": 3 / 8}
  assert stats["features.1.act2"] == {"pos_fraction": 1.0, "band_fraction": 0.0,
                                      "zero_fraction": 0.0}
  for name, x in inputs.items():
    x = np.asarray(x)
    for key, v in {"pos_fraction": np.mean(x > 0), "band_fraction": np.mean(np.abs(x) < 1),
                   "zero_fraction": np.mean(x == 0)}.items():
      np.testing.assert_allclose(stats[name][key], v, atol=1.5 / x.size, err_msg=name)
  assert stats["features.1.rprelu2"]["slope_min"] == pytest.approx(-0.5)
  assert stats["features.1.rprelu2"]["slope_max"] == pytest.approx(0.75)

  # force flips: 7 weights of conv3x3 before a step without diagnostics, 5 more after it
  def flip(state, name, idx):
    path = lay.convs[lay.conv_names().index(name)]
    var = diagnostics._at(state["params"], path)["kernel"]
    k = np.array(var[...])
    k.reshape(-1)[idx] *= -1
    var[...] = jnp.asarray(k)

  signs = diagnostics.init_signs(lay, state["params"])  # what Monitor keeps after a log
  flip(state, "features.1.conv3x3", np.arange(1, 8))
  state, _, out = step(state, batch, None, {"signs": signs, "due": jnp.asarray(False)})
  assert all(float(v) == 0 for d in jax.device_get(out["stats"]).values() for v in d.values())
  flip(state, "features.1.conv3x3", np.arange(11, 16))
  flip(state, "mlp.0.1.token_mlp", np.arange(3))
  k2 = kernels(state["params"])
  state, _, out = step(state, batch, None, {"signs": signs, "due": jnp.asarray(True)})
  stats = jax.device_get(out["stats"])
  assert stats["features.1.conv3x3"]["flip_ratio"] == 12 / 576
  assert stats["mlp.0.1.token_mlp"]["flip_ratio"] == 3 / 256
  for name in lay.conv_names():
    want = np.mean(np.sign(k2[name]) != np.sign(k0[name]))
    assert stats[name]["flip_ratio"] == pytest.approx(want, abs=1e-7), name
  np.testing.assert_array_equal(
      jax.device_get(diagnostics.init_signs(lay, state["params"]))["features.1.conv3x3"],
      np.sign(k2["features.1.conv3x3"]).astype(np.int8))


def test_stage1_has_gradient_norms_and_signs_but_no_weight_statistics():
  model = models.build(tiny_spec(1))
  lay = diagnostics.layout(model.spec, 16)
  _, _, params, _ = step_lib.split_model(model)
  assert diagnostics.init_signs(lay, params) == {}
  stats, vectors, signs = diagnostics.compute(
      lay, params, params, {"features.1.act1": jnp.ones((2, 4))}, {})
  assert set(stats["features.1.conv3x3"]) == {"grad_norm"}
  assert signs == {} and "features.1.conv3x3" not in vectors
  assert set(stats["features.1.act1"]) == set(diagnostics.SIGN_STATS)


def test_warnings_after_a_streak_and_when_the_balance_leaves_its_range():
  alarms = diagnostics.Alarms(warn_after=3, flip_min=0.0, flip_max=0.5, balance=(0.05, 0.95))

  def check(step, flip, pos):
    return alarms.check(step, {"c": {"flip_ratio": flip}, "a": {"pos_fraction": pos}})

  assert check(1, 0.0, 0.5) == [] and check(2, 0.0, 0.5) == []
  (line,) = check(3, 0.0, 0.5)
  assert "frozen" in line and line.endswith(" c")
  assert check(4, 0.0, 0.5) == []  # said once per streak
  assert check(5, 0.6, 0.5) == [] and check(6, 0.7, 0.5) == []
  (line,) = check(7, 0.8, 0.5)
  assert "churning" in line
  (line,) = check(8, 0.1, 0.97)
  assert "sign balance" in line and "a (0.970)" in line
  assert check(9, 0.1, 0.99) == []  # still outside: said once
  assert check(10, 0.1, 0.5) == []
  assert len(check(11, 0.1, 0.01)) == 1  # left again


def test_cadence():
  c = ml_collections.ConfigDict(dict(log_every_steps=50, diagnostics_every_steps=-1))
  assert diagnostics.resolve_every(c) == 50
  c.diagnostics_every_steps = 0
  assert diagnostics.resolve_every(c) == 0
  c.diagnostics_every_steps = 7
  assert diagnostics.resolve_every(c) == 7


def _tb_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                           size_guidance={"scalars": 0, "histograms": 0})
  acc.Reload()
  return acc.Tags()


@pytest.mark.slow
def test_diagnostics_leave_training_unchanged_and_are_written(tmp_path, digits_dir):
  runs = {}
  for every in (0, 1):
    wd = str(tmp_path / f"every{every}")
    res = loop.train_and_evaluate(
        small_config(digits_dir, num_train_steps=4, diagnostics_every_steps=every), wd,
        return_params=True)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
      runs[every] = ([json.loads(line) for line in f], res["params"], wd)
  (m0, p0, wd0), (m1, p1, wd1) = runs[0], runs[1]
  losses = [[(d["step"], d["loss"], d["ce"], d["second_loss"]) for d in m if "loss" in d]
            for m in (m0, m1)]
  assert losses[0] == losses[1] and len(losses[0]) == 4  # bit for bit
  assert jax.tree.all(jax.tree.map(np.array_equal, p0, p1))
  assert not os.path.exists(os.path.join(wd0, "diagnostics.jsonl")) or not open(
      os.path.join(wd0, "diagnostics.jsonl")).read()
  with open(os.path.join(wd1, "diagnostics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [d["step"] for d in lines] == [1, 2, 3, 4]
  lay = diagnostics.layout(tiny_spec(), 16)
  keys = {f"{n}/{s}" for n in lay.conv_names() for s in diagnostics.CONV_STATS}
  keys |= {f"{n}/{s}" for n in lay.sign_names() for s in diagnostics.SIGN_STATS}
  keys |= {f"{n}/{s}" for n in lay.rprelu_names() for s in diagnostics.RPRELU_STATS}
  assert set(lines[0]) == keys | {"step"}
  assert list(lines[0])[1].startswith("features.1.act1/")  # call order
  tags = _tb_tags(wd1)
  assert "diagnostics/features.1.conv3x3/flip_ratio" in tags["scalars"]
  assert "diagnostics/mlp.0.0.act/pos_fraction" in tags["scalars"]
  assert "diagnostics/features.1.conv3x3/scale" in tags["histograms"]
  assert "diagnostics/features.1.rprelu1/slope" in tags["histograms"]
  assert not any(t.startswith("diagnostics/") for t in _tb_tags(wd0)["scalars"])


def test_histograms_of_a_diverging_run_are_written(tmp_path):
  from bcdnet_jax.train import metric_writer
  w = metric_writer.MetricWriter(str(tmp_path))
  w.histogram(1, "huge", np.full(8, 1e35))  # beyond TensorBoard's own bins
  w.histogram(1, "mixed", np.array([-3e36, 1.0, np.inf]))
  w.histogram(1, "none", [np.nan])  # nothing finite: nothing written
  w.histogram(1, "plain", [0.25, 0.5])
  w.close()
  assert sorted(_tb_tags(str(tmp_path))["histograms"]) == ["huge", "mixed", "plain"]
