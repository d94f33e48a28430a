import json
import subprocess
import sys

import pytest

from bcdnet_jax import summary
from bcdnet_jax.nn import models


@pytest.fixture(scope="module")
def bcdnet_a():
  return summary.summarize(models.get_spec("bcdnet_a", stage=2), 224)


def test_bcdnet_a_operation_counts(bcdnet_a):
  r = bcdnet_a
  assert r["params"] == 46_146_384
  assert r["bops"] == 4_816_896_000  # paper: 4.82e9
  assert round(r["bops"] / 1e9, 3) == 4.817
  assert r["flops"] == 112 * 112 * 27 * 32 + 1024 * 1000  # stem + one head
  assert round(r["flops"] / 1e8, 3) == 0.119  # paper: 0.12e8
  assert r["ops"] == r["bops"] / 64 + r["flops"]
  # 0.8713e8 exactly; the reference's 0.872e8 adds the rounded 0.119e8 (paper: 0.87e8)
  assert abs(r["ops"] - 0.872e8) / 0.872e8 < 1e-3 and round(r["ops"] / 1e8, 2) == 0.87
  assert abs(r["size_bytes_fp32"] / 1e6 - 184.7) < 0.05
  assert r["size_bytes_packed"] < r["size_bytes_fp32"] / 12
  # the deploy artefact (test_export checks these equal the written files' sizes)
  assert r["deploy_compression_fp32"] >= 18 and r["deploy_compression_fp16"] >= 23
  print(f"deploy artefact: {r['deploy_bytes_fp32']:,} B ({r['deploy_compression_fp32']:.2f}x)"
        f", fp16 {r['deploy_bytes_fp16']:,} B ({r['deploy_compression_fp16']:.2f}x)")


def test_reactnet_a_same_bops(bcdnet_a):
  assert summary.summarize(models.get_spec("reactnet_a"), 224)["bops"] == bcdnet_a["bops"]


@pytest.mark.slow
def test_bcdnet_b_extra_flops_are_its_embeddings(bcdnet_a):
  spec = models.get_spec("bcdnet_b")
  r = summary.summarize(spec, 224)
  assert r["bops"] == bcdnet_a["bops"]
  ch = list(spec.channels)
  extra = 0
  for i, o in zip(ch[:-1], ch[1:]):  # two binary sites per basic block
    d = i // 4
    extra += (i * d + d * i + d * i) + (i * d + d * i + d * o)
  c = ch[-1]
  extra += 12 * 3 * c * (c // 4)  # 12 MLP blocks, one site each
  assert r["flops"] - bcdnet_a["flops"] == extra


@pytest.mark.slow
def test_r18_layouts_keep_bops():
  base = summary.summarize(models.get_spec("reactnet_r18"), 224)
  for name in ("bcdnet_a_r18", "bcdnet_b_r18"):
    assert summary.summarize(models.get_spec(name), 224)["bops"] == base["bops"]


def test_stage1_has_no_binary_weights():
  r = summary.summarize(models.get_spec("bcdnet_a", stage=1), 64)
  assert r["bops"] == 0 and r["binary_params"] == 0


@pytest.mark.slow
def test_cli_json_last_line():
  proc = subprocess.run([sys.executable, "-m", "bcdnet_jax", "summary", "--arch", "bcdnet_a",
                         "--stage", "2", "--json"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ("params", "bops", "flops", "ops", "size_bytes_packed", "size_bytes_fp32"):
    assert key in r
  assert r["bops"] == 4_816_896_000
  table = subprocess.run([sys.executable, "-m", "bcdnet_jax", "summary", "--arch", "reactnet_a",
                          "--stage", "2", "--image_size", "224"], capture_output=True,
                         text=True).stdout
  assert "features.13.pw" in table and "BOPs" in table


@pytest.mark.parametrize("flags,words", [
    (["--image_size", "30"], "--image_size: 30 px images do not fit the strides of mobilenet"),
    (["--image_size", "0"], "--image_size: must be a positive number of pixels, got 0"),
    (["--image_size", "-1"], "--image_size: must be a positive number of pixels, got -1"),
    (["--image_size", "7"], "--image_size: 7 px images shrink to nothing"),
    (["--image_size", "5000"], "--image_size: at most 4096 px, got 5000"),
    (["--num_classes", "0"], "--num_classes: must be 1 or more, got 0"),
    (["--checkpoint", "/nonexistent/model"], "/nonexistent/model: no such model directory"),
])
def test_out_of_range_flags_are_one_error_line(capsys, flags, words):
  argv = flags if "--checkpoint" in flags else ["--arch", "bcdnet_a", *flags]
  assert summary.main(argv) == 2
  o = capsys.readouterr()
  assert o.out == "" and o.err.startswith(f"error: {words}") and o.err.count("\n") == 1, o.err


def test_a_model_directory_says_its_stage(tmp_path, capsys):
  from bcdnet_jax import checkpoint
  model = models.create_model("bcdnet_a", stage=1, num_classes=3, channels=[8, 16],
                              mlp_groups=1, mlp_group=["pw"])
  d = checkpoint.save_model(model, str(tmp_path / "m"), preprocess={"image_size": 32})
  assert summary.main(["--checkpoint", d, "--json"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (f"{d}: stage-1 mobilenet model, 3 classes (stage 1: binary "
                      "activations, real-valued weights)")
  r = json.loads(lines[-1])
  assert r["stage"] == 1 and r["image_size"] == 32 and r["bops"] == 0
  assert summary.main(["--checkpoint", d, "--stage", "2"]) == 2
  assert capsys.readouterr().err == ("error: --stage: not with --checkpoint (the model "
                                     "directory records its architecture)\n")
