"""Shared pieces of the benchmark scripts: timing, memory, thread control, output.

Every script measures one framework/configuration per process (so peak memory is its own)
and prints one JSON object as its last line; `--compare` runs the configurations as
subprocesses and prints a table of them with ratios.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def set_threads(n: int) -> None:
  """Restricts XLA:CPU and PyTorch to n intra-op threads; call before importing either."""
  if n <= 0:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "intra_op_parallelism_threads" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=true "
                               f"intra_op_parallelism_threads={n}").strip()
  os.environ.setdefault("OMP_NUM_THREADS", str(n))
  os.environ.setdefault("MKL_NUM_THREADS", str(n))


def time_calls(fn, *, warmup: int, repeats: int,
               min_time_s: float = 0.0) -> tuple[list[float], float]:
  """(wall times of `fn()` after warm-up, seconds of the warm-up calls).

  `fn` must block until its work is done. The warm-up time (compilation, autotuning,
  `torch.compile`) is reported on its own, never mixed into the steady-state median.
  """
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  warmup_s = time.perf_counter() - t0
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < min_time_s:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times, warmup_s


def peak_rss_mb() -> float:
  """Peak resident memory of this process (Linux reports kilobytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result(timing: tuple[list[float], float], images_per_call: int, **extra) -> dict:
  times, warmup_s = timing
  med = statistics.median(times)
  out = {"images_per_s": round(images_per_call / med, 2), "step_time_s_median": round(med, 5),
         "warmup_s": round(warmup_s, 1),
         "step_time_s_min": round(min(times), 5), "repeats": len(times),
         "peak_rss_mb": round(peak_rss_mb(), 1)}
  out.update(extra)
  return out


def emit(res: dict, *, human: bool = False) -> None:
  """A readable line first when asked, then the JSON object as the last line."""
  if human:
    print(f"{res['framework']} {res['path']}: {res['images_per_s']} images/s, median "
          f"{res['step_time_s_median']} s per batch, warm-up {res['warmup_s']} s, "
          f"peak RSS {res['peak_rss_mb']} MB")
  print(json.dumps(res), flush=True)


def run_configs(script: str, configs: list[tuple[str, list[str]]], common: list[str],
                baseline: str | None = None, keys=("images_per_s", "step_time_s_median",
                                                   "peak_rss_mb")) -> list[dict]:
  """Runs `script` once per (label, args) in fresh processes; prints a Markdown table."""
  rows = []
  for label, args in configs:
    cmd = [sys.executable, script, *common, *args, "--json"]
    print(f"# {label}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
      rows.append({"label": label, "error": proc.stderr.strip().splitlines()[-1:]})
      continue
    rows.append({"label": label, **json.loads(proc.stdout.strip().splitlines()[-1])})
  base = next((r for r in rows if r["label"] == baseline and "images_per_s" in r), None)
  header = ["configuration", *keys] + (["vs " + baseline] if base else [])
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    if "error" in r:
      print(f"| {r['label']} | failed: {r['error']} |")
      continue
    cells = [r["label"], *(str(r.get(k, "")) for k in keys)]
    if base:
      cells.append(f"{r['images_per_s'] / base['images_per_s']:.2f}x")
    print("| " + " | ".join(cells) + " |", flush=True)
  return rows
