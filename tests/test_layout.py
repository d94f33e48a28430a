"""The package's layers, made structural: the library loads no framework it does not need,
and no module imports one on a higher layer (DESIGN.md: nn <- data <- train / deploy /
interop <- entry points; deploy and train do not import each other)."""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "bcdnet_jax")
HEAVY = ("torch", "tensorflow", "grain", "orbax")

# rank of each part of the package; a module may import its own rank or lower ones
RANKS = {"errors": 0, "fileio": 0, "log": 0, "nn": 1, "preprocessing": 2, "runtime": 2,
         "checkpoint": 2, "data": 2, "train": 3, "deploy": 3, "interop": 3, "summary": 3,
         "__main__": 4, "__init__": 4}
APART = {("train", "deploy"), ("deploy", "train")}  # same rank, never each other


def part(module: str) -> str:
  """'bcdnet_jax.train.step' -> 'train'; 'bcdnet_jax' -> '__init__'."""
  names = module.split(".")
  return names[1] if len(names) > 1 else "__init__"


def imports_of(path: str, module: str) -> set[str]:
  """Every bcdnet_jax module `path` imports, at the top or inside a function."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("bcdnet_jax"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
        and node.module.startswith("bcdnet_jax"):
      out.update(f"{node.module}.{a.name}" if node.module == "bcdnet_jax" else node.module
                 for a in node.names)
  return out


def all_modules():
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        yield os.path.join(dirpath, f), rel.removesuffix(".__init__")


def test_no_module_imports_a_higher_layer():
  bad, seen = [], 0
  for path, module in all_modules():
    mine = part(module)
    for imported in imports_of(path, module):
      seen += 1
      theirs = part(imported)
      if RANKS[theirs] > RANKS[mine] or (mine, theirs) in APART:
        bad.append(f"{module} imports {imported} ({mine} rank {RANKS[mine]} -> {theirs} "
                   f"rank {RANKS[theirs]})")
  assert seen > 50  # the walk found the package's imports
  assert not bad, "\n".join(bad)


def test_the_rank_table_covers_every_part():
  parts = {part(m) for _, m in all_modules()}
  assert parts <= set(RANKS), parts - set(RANKS)


LIBRARY = {  # what a user of the library alone imports, and does with it
    "bcdnet_jax.nn": "bcdnet_jax.nn.create_model('bcdnet_a', num_classes=10, "
                     "channels=[4, 8, 16, 16, 32, 32, 64, 64, 64, 64, 128])",
    "bcdnet_jax.train.step": "bcdnet_jax.train.step.smoothed_cross_entropy",
    "bcdnet_jax.deploy.packed": "bcdnet_jax.deploy.packed.load_packed",
}


def test_the_library_loads_no_heavy_framework():
  """In fresh interpreters (run side by side): the library with a model built, the train
  step, and the deploy runtime load none of torch, tensorflow, grain, orbax."""
  procs = {}
  for module, use in LIBRARY.items():
    code = (f"import sys, json, {module}\n{use}\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    procs[module] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  for module, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    loaded = json.loads(out.strip().splitlines()[-1])
    print(f"{module}: heavy modules loaded: {loaded}")
    assert loaded == [], module


def test_top_level_entry_points_and_the_command_dispatcher(capsys):
  import bcdnet_jax
  from bcdnet_jax import __main__ as cli
  from bcdnet_jax.deploy import packed
  from bcdnet_jax.nn import models
  assert bcdnet_jax.create_model is models.create_model
  assert bcdnet_jax.ModelSpec is models.ModelSpec
  assert bcdnet_jax.load_packed is packed.load_packed
  assert callable(bcdnet_jax.restore_model) and callable(bcdnet_jax.summary.summarize)
  assert cli.main(["--help"]) == 0 and "summary" in capsys.readouterr().out
  assert cli.main(["nope"]) == 2
  assert capsys.readouterr().err.strip() == (
      "error: unknown command 'nope'; one of: convert, export, predict, prepare, report, "
      "summary (python -m bcdnet_jax --help)")


def test_ctrl_c_in_a_tool_is_one_line_and_exit_130(capsys):
  from bcdnet_jax import errors

  def interrupted():
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as e:
    errors.run_cli(interrupted)
  assert e.value.code == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("interrupted (Ctrl-C); ")
  with pytest.raises(SystemExit) as e:
    errors.run_cli(lambda: 2)
  assert e.value.code == 2
