"""Where the JAX training step spends its time: a jax.profiler trace, mapped to XLA's ops.

Traces a few steps of `bench/train_step.py`'s program, reads the trace (Perfetto JSON) and
the compiled HLO, and prints the time per op category and per (op kind, output shape):
matrix products and convolutions (XLA's library calls), reductions, element-wise fusions,
copies. Times are summed per op over the traced steps and divided by their number; ops
XLA runs side by side overlap, so the sum can exceed the step's wall time.

  python bench/profile_step.py --arch bcdnet_a --batch 8 --image_size 224 --top 30
  python bench/profile_step.py ... --trace_dir /tmp/trace  # keep the trace (Perfetto, TensorBoard)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_SKIP = ("Thunk", "$", "Pjit", "Slinky", "ThreadpoolListener", "CommonPjRt", "Python",
         "ParseArguments")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arch", default="bcdnet_a")
  p.add_argument("--stage", type=int, default=2, choices=[1, 2])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--precision", default="auto")
  p.add_argument("--policy", default="float32", help="dtype_policy (float32, tf32, bfloat16, auto)")
  p.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=False)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=2, help="traced steps")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--trace_dir", default="", help="keep the trace here (default: temporary)")
  p.add_argument("--json", action="store_true", help="print one JSON object as last line")
  return p.parse_args(argv)


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (category, output shape) from optimised HLO text."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(
      r"^%?([\w.\-]+) \([^\n]*\) -> [^\n]* \{\n(.*?)\n\}", hlo_text, re.M | re.S)}
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(([^\n]*)$", hlo_text,
                       re.M):
    name, shape, opcode, rest = m.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    ops = set(re.findall(r"= \S+ ([\w\-]+)\(", bodies.get(called.group(1), ""))) if (
        called) else {opcode}
    if ops & {"convolution", "dot"}:
      cat = "conv/dot"
    elif ops & {"reduce", "reduce-window"}:
      cat = "reduction"
    elif ops <= {"copy", "transpose", "bitcast", "parameter"}:
      cat = "copy/transpose"
    else:
      cat = "element-wise"
    out[name] = (cat, re.sub(r"\{[^}]*\}", "", shape))
  return out


def main(argv=None):
  a = parse(argv)
  common.set_threads(a.threads)
  flags = os.environ.get("XLA_FLAGS", "")
  if "xprof_traceme" not in flags:  # per-op trace events on XLA:CPU
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_enable_xprof_traceme=true").strip()
  import jax
  import train_step
  run, step, holder, batch, teacher_state, _ = train_step.jax_setup(train_step.parse([
      "--arch", a.arch, "--stage", str(a.stage), "--batch", str(a.batch),
      "--image_size", str(a.image_size), "--num_classes", str(a.num_classes),
      "--precision", a.precision, "--policy", a.policy,
      "--teacher" if a.teacher else "--no-teacher"]))
  ops = hlo_ops(step.lower(holder[0], batch, teacher_state).compile().as_text())
  for _ in range(a.warmup):
    run()
  trace_dir = a.trace_dir or tempfile.mkdtemp(prefix="bcdnet_trace_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(a.steps):
    run()
  jax.profiler.stop_trace()
  files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}: the profiler wrote none")
  events = json.load(gzip.open(max(files, key=os.path.getmtime)))["traceEvents"]
  by_cat: dict[str, float] = collections.defaultdict(float)
  by_op: dict[tuple, float] = collections.defaultdict(float)
  count: collections.Counter = collections.Counter()
  unmatched = 0.0
  for e in events:
    if e.get("ph") != "X" or e["name"].startswith(_SKIP):
      continue
    ms = e.get("dur", 0) / 1e3 / a.steps
    if e["name"] not in ops:
      unmatched += ms
      continue
    cat, shape = ops[e["name"]]
    kind = re.sub(r"\.\d+$", "", e["name"])
    by_cat[cat] += ms
    by_op[(cat, kind, shape)] += ms
    count[(cat, kind, shape)] += 1
  total = sum(by_cat.values())
  print(f"{a.arch} stage {a.stage}, batch {a.batch}, {a.image_size}px: summed op time "
        f"{total:.0f} ms per step (trace: {trace_dir})")
  print("\n| category | ms per step | share |\n|---|---|---|")
  for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
    print(f"| {cat} | {ms:.1f} | {ms / total:.0%} |")
  print("\n| op (kind, output shape) | category | calls per step | ms per step |\n"
        "|---|---|---|---|")
  top = sorted(by_op.items(), key=lambda kv: -kv[1])[:a.top]
  for (cat, kind, shape), ms in top:
    print(f"| {kind} {shape} | {cat} | {count[(cat, kind, shape)] // a.steps} | {ms:.1f} |")
  if a.json:
    print(json.dumps({"summed_op_ms_per_step": round(total, 1),
                      "categories_ms": {k: round(v, 1) for k, v in by_cat.items()},
                      "top_ops_ms": [[f"{k} {s}", c, round(v, 1)]
                                     for (c, k, s), v in top],
                      "trace_dir": trace_dir}))


if __name__ == "__main__":
  main()
