"""Run Python code as on a host without TensorFlow (a typical JAX GPU machine).

`run_without_tensorflow(code, tmp_dir)` starts `python -S` (no site-packages, no .pth
files) whose path is the repository root and a directory of symbolic links to every entry
of this environment's site-packages except TensorFlow itself (and Keras): `import
tensorflow` fails there as it does where it was never installed, while tensorflow_datasets,
grain, array_record and the rest import as usual.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys

_TENSORFLOW = re.compile(r"^(tensorflow|tensorflow[-_](cpu|gpu|intel|io|estimator)\b.*|"
                         r"tensorflow-\d.*|tf_keras.*|keras(-\d.*)?)$")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def site_packages_without_tensorflow(tmp_dir: str) -> str:
  """A directory of links to this environment's site-packages entries but TensorFlow's."""
  out = os.path.join(tmp_dir, "site-packages-without-tensorflow")
  os.makedirs(out, exist_ok=True)
  dirs = site.getsitepackages() + [site.getusersitepackages()]
  for d in dirs:
    if not os.path.isdir(d):
      continue
    for name in os.listdir(d):
      link = os.path.join(out, name)
      if _TENSORFLOW.match(name) or os.path.lexists(link):
        continue
      os.symlink(os.path.join(d, name), link)
  return out


def run_without_tensorflow(code: str, tmp_dir: str, timeout: float = 300
                           ) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT, site_packages_without_tensorflow(tmp_dir)]))
  return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                        env=env, timeout=timeout, cwd=tmp_dir)
