"""The mixed-precision policy: what it stores in bfloat16, what it keeps in float32, and
how far its outputs are from the float32 reference (the fixtures' released weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STAGES, fixture_expected, nhwc
from flax import nnx
from helpers.configs import small_config
from jax.extend import core as jcore

from bcdnet_jax import checkpoint, train
from bcdnet_jax.nn import models, precision
from bcdnet_jax.train import step as step_lib
from configs import default


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          yield from _eqns(sub)


def _tiny(name, stage, policy, **kw):
  sizes = dict(bcdnet_b=dict(channels=[8, 16, 16], mlp_groups=1),
               reactnet_r18=dict(channels=[8, 16, 16, 32], blocks_per_stage=[1, 1, 1, 1]),
               resnet50=dict(channels=[4, 8, 16, 32], blocks_per_stage=[1, 1, 1, 1]))
  return models.create_model(name, stage=stage, num_classes=5, dtype_policy=policy,
                             **sizes[name], **kw)


def _tiny_train_step(policy, stage, compute_dtype):
  """(train step, state, uint8 batch of 3 images at 32 px, teacher state): a tiny BCDNet-B
  student with a tiny ResNet-50 teacher under `policy`."""
  cfg = default.get_config()
  student = _tiny("bcdnet_b", stage, policy, compute_dtype=compute_dtype)
  teacher = _tiny("resnet50", 2, policy)
  teacher.eval()
  teacher_def, teacher_state = nnx.split(teacher)
  train_def, _, params, batch_stats = step_lib.split_model(student)
  tx, _ = step_lib.make_optimizer(cfg, 10)
  step = step_lib.make_train_step(train_def, tx, cfg, teacher_def)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)),
                                jnp.uint8), "label": jnp.arange(3, dtype=jnp.int32)}
  return step, state, batch, teacher_state


@pytest.mark.parametrize("stage,compute_dtype", [(1, "float32"), (2, "float32"), (2, "int8")])
def test_bfloat16_policy_products_in_bfloat16_state_in_float32(stage, compute_dtype):
  """Every convolution and token-wise product of the training step (student forward and
  backward, teacher forward) takes bfloat16 or int8 operands; only the dense heads and
  embeddings run in float32; parameters, optimiser state, BN statistics, loss: float32."""
  step, state, batch, teacher_state = _tiny_train_step("bfloat16", stage, compute_dtype)
  products = {}
  for e in _eqns(jax.make_jaxpr(step)(state, batch, teacher_state).jaxpr):
    if e.primitive.name in ("conv_general_dilated", "dot_general"):
      key = ("dense" in str(e.source_info.name_stack),
             tuple(sorted({str(v.aval.dtype) for v in e.invars})))
      products[key] = products.get(key, 0) + 1
  low = "int8" if stage == 2 and compute_dtype == "int8" else "bfloat16"
  expected_keys = {(True, ("float32",)), (False, (low,))}
  if low == "int8":  # the backward of the binary convs and the real convs: bfloat16
    expected_keys.add((False, ("bfloat16",)))
  assert set(products) == expected_keys, products
  new_state, metrics = jax.eval_shape(step, state, batch, teacher_state)
  for leaf in jax.tree.leaves(new_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert metrics["loss"].dtype == jnp.float32


@pytest.mark.parametrize("name", ["bcdnet_b", pytest.param("reactnet_r18",
                                                            marks=pytest.mark.slow)])
def test_bfloat16_policy_stores_activations_in_bfloat16(name):
  m = _tiny(name, 2, "bfloat16")
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  for mode in ("train", "eval"):
    getattr(m, mode)()
    h = jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
    for layer in [*m.features, *(b for g in m.mlp for b in g)]:
      h = nnx.eval_shape(lambda layer, h: layer(h), layer, h)
      assert h.dtype == jnp.bfloat16, (mode, type(layer).__name__)
    out = nnx.eval_shape(lambda m, x: m(x), m, x)
    assert all(o.dtype == jnp.float32 for o in jax.tree.leaves(out)), (mode, out)


def test_float32_policy_is_the_reference_and_auto_resolves_per_backend():
  assert models.resolve_dtype_policy("auto", "cpu") == "float32"
  assert models.resolve_dtype_policy("auto", "tpu") == "bfloat16"
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
  outs = []
  for policy in ("float32", "auto"):
    m = _tiny("bcdnet_b", 2, policy)
    m.eval()
    outs.append(np.asarray(m(x)))
  np.testing.assert_array_equal(*outs)
  with pytest.raises(ValueError, match="dtype_policy must be one of"):
    models.get_spec("bcdnet_a", dtype_policy="float16")


def _crops(n, size, seed=0):
  """n random crops of the scikit-learn sample photographs, normalised like ImageNet."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  rng = np.random.default_rng(seed)
  photos = load_sample_images().images
  out = []
  for i in range(n):
    p = photos[i % len(photos)]
    s = int(rng.integers(size, min(p.shape[:2])))
    y, x = rng.integers(0, p.shape[0] - s), rng.integers(0, p.shape[1] - s)
    img = Image.fromarray(p[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR)
    out.append(np.asarray(img, np.float32) / 255)
  return (np.stack(out) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STAGES))
def test_bfloat16_policy_on_the_released_fixtures(converted, name):
  """The fixtures' weights under the bfloat16 policy against float32 on 64 photographs:
  few binary activations flip and the predictions mostly agree (printed, asserted loose)."""
  model, _ = converted[name]
  images = np.concatenate([nhwc(fixture_expected(name)["x96"]), _crops(62, 96)])
  r = precision.compare_policies(model, images, policy="bfloat16")
  print(f"\n{name}: {r['flipped_binary_activations']:,} of {r['binary_activations']:,} "
        f"binary activations differ ({100 * r['flipped_fraction']:.3f} %), top-1 agreement "
        f"{100 * r['top1_agreement']:.1f} % of {r['images']}, max |logit diff| "
        f"{r['max_abs_logit_diff']:.3g} (max |logit| {r['max_abs_logit']:.3g})")
  assert r["images"] == 64 and r["binary_activations"] > 1_000_000
  assert 0 < r["flipped_fraction"] < 0.05
  assert r["top1_agreement"] >= 0.5  # untrained fixtures: near-tie logits (max |logit| ~1)
  same = precision.compare_policies(model, images[:8], policy="float32")
  assert same["flipped_binary_activations"] == 0 and same["max_abs_logit_diff"] == 0.0
  assert same["reference"] == "float32"
  if jax.default_backend() == "cpu":  # float32 products either way: tf32 changes nothing
    tf32 = precision.compare_policies(model, images[:8], policy="tf32")
    assert tf32["policy"] == "tf32" and tf32["max_abs_logit_diff"] == 0.0


@pytest.mark.slow
def test_training_and_evaluation_run_under_the_bfloat16_policy(tmp_path, digits_dir):
  c = small_config(digits_dir)
  c.model.dtype_policy = "bfloat16"
  wd = str(tmp_path / "w")
  result = train.run(c, wd)
  assert np.isfinite(result["top1"]) and result["steps"] == 6
  assert checkpoint.read_spec(wd).dtype_policy == "bfloat16"
  # evaluation takes the config's policy: float32 scores the bfloat16-trained weights
  e = small_config(digits_dir, mode="eval", checkpoint=wd)
  e.model.dtype_policy = "float32"
  scored = train.run(e, str(tmp_path / "eval"))
  assert scored["num_eval_examples"] == result["num_eval_examples"]
  assert abs(scored["top1"] - result["top1"]) <= 0.05


def test_bfloat16_policy_saves_activations_for_the_backward_in_bfloat16(capsys):
  """The tensors kept for the backward: only parameters stay float32; every saved
  activation is bfloat16 (or a bool mask), less than half the float32 policy's bytes."""
  import re

  from jax import ad_checkpoint
  saved = {}
  for policy in ("float32", "bfloat16"):
    m = _tiny("bcdnet_b", 2, policy)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    x = jnp.zeros((4, 32, 32, 3))

    def loss(params, graphdef=graphdef, rest=rest, x=x):
      a, b = nnx.merge(graphdef, params, rest, copy=True)(x)
      return jnp.sum(a) + jnp.sum(b)

    ad_checkpoint.print_saved_residuals(loss, params)
    sizes = {}
    for line in capsys.readouterr().out.splitlines():
      found = re.match(r"\s*(\w+)\[([\d,]*)\]", line)
      if found and "from the argument" not in line and found.group(2).count(",") >= 1:
        n = int(np.prod([int(d) for d in found.group(2).split(",")]))
        if n >= 4 * 4 * 4 * 8:  # activation-sized, not a per-channel statistic
          kind = found.group(1)
          sizes[kind] = sizes.get(kind, 0) + n * {"f32": 4, "bf16": 2}.get(kind, 1)
    saved[policy] = sizes
  assert saved["float32"].get("f32", 0) > 0, saved
  assert set(saved["bfloat16"]) <= {"bf16", "bool"}, saved
  assert sum(saved["bfloat16"].values()) < 0.55 * sum(saved["float32"].values()), saved


def test_mixed_prelu_gradients_equal_float32_autodiff():
  from bcdnet_jax.nn import layers
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 5, 8)), jnp.bfloat16)
  slope = jnp.asarray(np.random.default_rng(4).uniform(0.1, 0.4, 8), jnp.float32)
  g = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.bfloat16)
  y, vjp = jax.vjp(layers.prelu_mixed, x, slope)
  ref_y, ref_vjp = jax.vjp(lambda x, s: jnp.where(x >= 0, x, s * x), x.astype(jnp.float32),
                           slope)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_y.astype(jnp.bfloat16)))
  gx, gs = vjp(g)
  rx, rs = ref_vjp(g.astype(jnp.float32))
  assert gx.dtype == jnp.bfloat16 and gs.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(gx), np.asarray(rx.astype(jnp.bfloat16)))
  np.testing.assert_allclose(np.asarray(gs), np.asarray(rs), rtol=1e-6)


def _product_precisions(text):
  """{(operand element types, precision)} -> count for every dot_general / convolution
  of a lowered StableHLO program (a product without a precision attribute is DEFAULT)."""
  import re
  found = {}
  for line in text.splitlines():
    if "stablehlo.dot_general" not in line and "stablehlo.convolution" not in line:
      continue
    operands = line.rsplit(" : (", 1)[1].split("->")[0]
    types = tuple(sorted(set(re.findall(r"tensor<(?:[\d?]+x)*(\w+)>", operands))))
    prec = re.search(r"precision(?:_config)? = \[([^\]]*)\]", line)
    words = set(re.findall(r"HIGHEST|HIGH|DEFAULT", prec.group(1))) if prec else {"DEFAULT"}
    assert len(words) == 1, line
    key = (types, words.pop())
    found[key] = found.get(key, 0) + 1
  return found


def _lowered_train_step(policy, stage, compute_dtype):
  step, state, batch, teacher_state = _tiny_train_step(policy, stage, compute_dtype)
  return jax.jit(step).lower(state, batch, teacher_state).as_text()


def _lowered_eval(policy, name="bcdnet_b", stage=2, **kw):
  m = _tiny(name, stage, policy, **kw)
  m.eval()
  graphdef, state = nnx.split(m)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
      state, jnp.zeros((2, 32, 32, 3), jnp.float32)).as_text()


@pytest.mark.parametrize("stage,compute_dtype", [(1, "float32"), (2, "float32"), (2, "int8")])
def test_float32_policy_pins_every_float32_product_to_highest_precision(stage, compute_dtype):
  """The whole training step (student forward and the custom VJPs' backward products,
  the teacher, both heads, BCDNet-B's embeddings) and the evaluation forward: every
  float32 convolution and matrix product carries HIGHEST under 'float32' (and 'auto' on
  CPU), DEFAULT under 'tf32'; int8 products carry none."""
  programs = {policy: [_lowered_train_step(policy, stage, compute_dtype),
                       _lowered_eval(policy, stage=stage, compute_dtype=compute_dtype),
                       _lowered_eval(policy, "resnet50")]
              for policy in ("float32", "auto", "tf32")}
  for policy, texts in programs.items():
    want = "DEFAULT" if policy == "tf32" else "HIGHEST"
    for i, text in enumerate(texts):
      found = _product_precisions(text)
      f32 = {k: n for k, n in found.items() if k[0] == ("f32",)}
      assert f32 and set(f32) == {(("f32",), want)}, (policy, found)
      assert set(found) - set(f32) <= {(("i8",), "DEFAULT")}, (policy, found)
      if compute_dtype == "int8" and i < 2:  # the student's binary convs
        assert (("i8",), "DEFAULT") in found
  counts = [sum(_product_precisions(t).values()) for t in programs["float32"]]
  assert counts == [sum(_product_precisions(t).values()) for t in programs["tf32"]]


def test_float32_policy_pins_the_accelerator_backward_formulation_too(monkeypatch):
  """On accelerators the strided convs' input gradient is XLA's transposed conv (not the
  CPU formulation): traced as a GPU would, every float32 product is still HIGHEST."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  found = _product_precisions(_lowered_train_step("float32", 2, "float32"))
  assert set(found) == {(("f32",), "HIGHEST")}, found


def test_tf32_policy_is_float32_storage_at_default_precision():
  """'tf32' stores float32 like 'float32' and only changes the products' precision: on
  CPU (float32 products either way) the outputs are bit for bit those of 'float32', the
  training-mode heads included; it is recorded like any policy."""
  assert models.resolve_dtype_policy("tf32", "gpu") == "tf32"
  assert models.resolve_dtype_policy("auto", "gpu") == "float32"
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 32, 3)), jnp.float32)
  outs = {}
  for policy in ("float32", "tf32"):
    m = _tiny("bcdnet_b", 2, policy)
    assert m.activation_dtype == ""
    assert {c.precision for _, c in nnx.iter_modules(m) if hasattr(c, "precision")} == {
        "highest" if policy == "float32" else "default"}
    outs[policy] = [np.asarray(y) for y in m(x)]
    assert models.ModelSpec.from_json(m.spec.to_json()).dtype_policy == policy
  if jax.default_backend() == "cpu":  # on GPUs / TPUs TF32 / bfloat16 passes differ
    for a, b in zip(outs["float32"], outs["tf32"]):
      np.testing.assert_array_equal(a, b)
