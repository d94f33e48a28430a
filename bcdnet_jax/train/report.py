"""A static report of a training workdir: PNG plots and one HTML page that shows them.

    python -m bcdnet_jax report WORKDIR [--out DIR]      (console script: bcdnet-report)

Reads what training writes (`metrics.jsonl`, `diagnostics.jsonl`, `results.json`,
`config.json`) in WORKDIR, or in each stage's subdirectory of a pipeline run (the digits
demo's `stage1/`, `stage2/`), and writes to DIR (default WORKDIR/report):

- `training.png`: loss, accuracies (train heads; evaluations as points), learning rate
  and images/s over steps, every stage of a pipeline on one step axis (stage 2's step s
  drawn at stage 1's length + s) with the stage boundaries marked;
- heat maps over steps, one row per layer (`bcdnet_jax.train.diagnostics`): `flip_ratio.png`
  (weight signs flipped since the previous diagnostics step, stage 2), `sign_balance.png`
  (fraction of +1 at each sign), `sign_band.png` (fraction of sign inputs with |x| < 1),
  `clip_fraction.png` (latent weights with |W| > 1), `grad_norm.png`; each only when the
  run logged that statistic;
- `index.html`: the plots and the evaluation results (every test set of every
  results.json).

Works on a finished run, a run in progress (what is logged so far) and a resumed run (a
step logged twice counts once: `metric_writer.read_jsonl`). Plots are matplotlib's (Agg
backend) at fixed pixel sizes (`TRAINING_PIXELS`, `heatmap_pixels`).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os

from bcdnet_jax import errors
from bcdnet_jax.train import metric_writer

TRAINING_PIXELS = (1200, 800)
DPI = 100
HEATMAPS = (  # (file, statistic, title, colour scale)
    ("flip_ratio.png", "flip_ratio", "weight flip ratio since the previous diagnostics step",
     "symlog"),
    ("sign_balance.png", "pos_fraction", "sign balance: fraction of +1 at each sign",
     "balance"),
    ("sign_band.png", "band_fraction", "sign inputs with |x| < 1 (non-zero ApproxSign "
     "gradient)", "fraction"),
    ("clip_fraction.png", "clip_fraction", "latent weights with |W| > 1 (no STE gradient)",
     "fraction"),
    ("grad_norm.png", "grad_norm", "gradient norm per binary layer", "log"),
)


class ReportError(errors.UserError):
  """WORKDIR is not a training workdir, or holds no metrics yet."""


def heatmap_pixels(num_layers: int) -> tuple[int, int]:
  """(width, height) in pixels of a heat map with `num_layers` rows."""
  return 1200, min(max(160 + 22 * num_layers, 300), 2400)


@dataclasses.dataclass
class Stage:
  name: str
  path: str
  offset: int  # added to this stage's steps on the common axis
  total_steps: int  # configured steps (or the last logged one when unknown)
  metrics: list
  diagnostics: list
  results: dict | None


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ReportError(f"{path}: unreadable ({e})") from None


def _is_run(path) -> bool:
  return any(os.path.exists(os.path.join(path, f))
             for f in ("metrics.jsonl", "config.json", "model.json"))


def _workdirs_in(path) -> list[str]:
  """The names of the subdirectories of `path` that are training or pipeline workdirs."""
  try:
    names = sorted(os.listdir(path))
  except OSError as e:
    raise ReportError(f"{path}: unreadable ({e.strerror})") from None
  return [n for n in names if os.path.isdir(os.path.join(path, n))
          and _is_run(os.path.join(path, n))]


def _chained(workdir, names) -> bool:
  """Whether subdirectories `names` (at least two) are the stages of one pipeline still
  running: each stage after the first was initialised from the one before it."""
  if len(names) < 2:
    return False
  for prev, name in zip(names, names[1:]):
    cfg = _read_json(os.path.join(workdir, name, "config.json"))
    init = cfg.get("init_from") if isinstance(cfg, dict) else None
    if not init:
      return False
    init = os.path.normpath(init)  # relative to where training ran, or absolute
    if not (os.path.realpath(init) == os.path.realpath(os.path.join(workdir, prev)) or (
        os.path.basename(init) == prev and os.path.basename(os.path.dirname(init)) ==
        os.path.basename(os.path.realpath(workdir)))):
      return False
  return True


def find_stages(workdir: str) -> list[Stage]:
  """The stages of `workdir` in order (one for a plain run), with their logged lines.
  Accepted: a training workdir (its own metrics.jsonl, config.json or model.json), a
  pipeline workdir (a config.json with a `pipeline`, or, before that is written at the
  end, stage subdirectories each initialised from the one before); anything else is a
  ReportError that names the workdirs it contains."""
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir}: not a directory")
  config = _read_json(os.path.join(workdir, "config.json"))
  names = list((config.get("pipeline") if isinstance(config, dict) else None) or {})
  dirs = []
  if names:
    dirs = [(n, os.path.join(workdir, n)) for n in names
            if os.path.isdir(os.path.join(workdir, n))]
  elif _is_run(workdir):
    dirs = [("run", workdir)]
  else:  # a pipeline still running: its config.json is written at the end
    subs = _workdirs_in(workdir)
    if _chained(workdir, subs):
      dirs = [(n, os.path.join(workdir, n)) for n in subs]
  if not dirs:
    subs = _workdirs_in(workdir)
    what = f"; it contains the workdirs {', '.join(subs)}: pass one of them" if subs else ""
    missing = (f" (its config.json names the pipeline stages {', '.join(names)}, none of "
               "them a subdirectory)" if names else
               " (no metrics.jsonl, no pipeline config.json)")
    raise ReportError(f"{workdir} is not a training workdir{missing}{what}")
  stages, offset = [], 0
  for name, path in dirs:
    metrics = metric_writer.read_jsonl(os.path.join(path, "metrics.jsonl"))
    diags = metric_writer.read_jsonl(os.path.join(path, "diagnostics.jsonl"))
    cfg = _read_json(os.path.join(path, "config.json")) or {}
    results = _read_json(os.path.join(path, "results.json"))
    last = max([m["step"] for m in metrics] + [0])
    total = int(cfg.get("num_train_steps") or 0) or last
    stages.append(Stage(name, path, offset, total, metrics, diags, results))
    offset += total
  if not any(s.metrics for s in stages):
    raise ReportError(_not_a_training_run(workdir, config) or
                      f"{workdir}: no metrics yet (no step logged in metrics.jsonl)")
  return stages


_NEEDS = ("report draws a training run: pass the workdir main.py trained (it holds "
          "metrics.jsonl)")


def _not_a_training_run(workdir: str, config) -> str | None:
  """What `workdir` is when it is a directory other tools write, not a training run:
  an evaluation workdir (config.json of mode 'eval', results.json) or a model directory
  (model.json and state/, e.g. the converter's output); None for anything else."""
  if isinstance(config, dict) and config.get("mode") == "eval":
    of = f" of {config['checkpoint']}" if config.get("checkpoint") else ""
    return (f"{workdir} is an evaluation workdir (results.json of evaluating a model{of}), "
            f"not a training run: {_NEEDS}")
  if os.path.isdir(os.path.join(workdir, "state")) and \
      os.path.exists(os.path.join(workdir, "model.json")) and config is None:
    meta = _read_json(os.path.join(workdir, "model.json"))
    conv = meta.get("converted_from") if isinstance(meta, dict) else None
    src = (f" converted from {conv['source']}" if isinstance(conv, dict) and conv.get("source")
           else "")
    return (f"{workdir} is a model directory{src} (model.json and state/: weights, no "
            f"training log): {_NEEDS}")
  return None


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _mark_stages(ax, stages, lo=None):
  """Stage boundaries and names; `lo`: the axis starts there (stages ending before it are
  not named)."""
  if len(stages) < 2:
    return
  for s in stages[1:]:
    if lo is None or s.offset >= lo:
      ax.axvline(s.offset, color="0.4", linestyle="--", linewidth=0.8)
  for s in stages:
    if lo is not None and s.offset + s.total_steps <= lo:
      continue
    x = s.offset if lo is None else max(s.offset, lo)
    ax.annotate(s.name, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8, color="0.3")


def _series(stages, key):
  xs, ys = [], []
  for s in stages:
    for m in s.metrics:
      if key in m:
        xs.append(s.offset + m["step"])
        ys.append(m[key])
  return xs, ys


def plot_training(stages, path: str) -> None:
  """Loss, accuracies, learning rate and images/s over the common step axis."""
  plt = _plt()
  from matplotlib.ticker import MaxNLocator
  w, h = TRAINING_PIXELS
  fig, axes = plt.subplots(2, 2, figsize=(w / DPI, h / DPI), dpi=DPI)
  panels = [
      (axes[0, 0], "loss", [("loss", "loss"), ("ce", "CE (fc)"),
                            ("second_loss", "second head (fc_dist)")], False),
      (axes[0, 1], "accuracy", [("accuracy", "train top-1 (fc)"),
                                ("accuracy_dist", "train top-1 (fc_dist)")], False),
      (axes[1, 0], "learning rate", [("learning_rate", "learning rate")], True),
      (axes[1, 1], "images/s", [("images_per_s", "images/s")], False),
  ]
  for ax, title, keys, log_y in panels:
    for key, label in keys:
      xs, ys = _series(stages, key)
      if xs:
        ax.plot(xs, ys, label=label, linewidth=1.2)
    if title == "accuracy":
      xs, ys = _series(stages, "eval_top1")
      if xs:
        ax.plot(xs, ys, "o", color="black", markersize=4, label="evaluation top-1")
    if log_y and any(y > 0 for y in _series(stages, keys[0][0])[1]):
      ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step" + (" (stages end to end)" if len(stages) > 1 else ""), fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
    _mark_stages(ax, stages)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def _matrix(stages, stat):
  """(layers in first-logged order, steps on the common axis, rows x steps values or NaN)
  of diagnostics statistic `stat`."""
  import numpy as np
  layers, steps, cells = {}, [], {}
  for s in stages:
    for d in s.diagnostics:
      row = {k.rsplit("/", 1)[0]: v for k, v in d.items()
             if k != "step" and k.rsplit("/", 1)[-1] == stat}
      if not row:
        continue
      x = s.offset + d["step"]
      steps.append(x)
      for layer, v in row.items():
        layers.setdefault(layer, len(layers))
        cells[(layer, x)] = v
  steps = sorted(set(steps))
  m = np.full((len(layers), len(steps)), np.nan)
  col = {x: j for j, x in enumerate(steps)}
  for (layer, x), v in cells.items():
    m[layers[layer], col[x]] = v
  return list(layers), steps, m


def plot_heatmap(stages, stat: str, title: str, scale: str, path: str) -> bool:
  """One row per layer, one column per diagnostics step; False (nothing written) when
  no step logged `stat`."""
  import numpy as np
  from matplotlib import colors
  from matplotlib.ticker import MaxNLocator
  layers, steps, m = _matrix(stages, stat)
  if not steps:
    return False
  plt = _plt()
  w, h = heatmap_pixels(len(layers))
  fig, ax = plt.subplots(figsize=(w / DPI, h / DPI), dpi=DPI)
  xs = np.asarray(steps, np.float64)
  if len(xs) > 1:
    mid = (xs[1:] + xs[:-1]) / 2
    edges = np.concatenate([[xs[0] - (mid[0] - xs[0])], mid, [xs[-1] + (xs[-1] - mid[-1])]])
  else:
    edges = np.array([xs[0] - 0.5, xs[0] + 0.5])
  data = np.ma.masked_invalid(m)
  finite = m[np.isfinite(m)]
  if scale == "symlog":
    norm, cmap = colors.SymLogNorm(1e-4, vmin=0, vmax=max(float(finite.max()), 1e-3)), "magma"
  elif scale == "log":
    pos = finite[finite > 0]
    lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (1e-3, 1.0)
    norm, cmap = colors.LogNorm(lo, max(hi, lo * 1.0001)), "viridis"
    data = np.ma.masked_where(~(m > 0), m)
  elif scale == "balance":
    norm, cmap = colors.Normalize(0, 1), "RdBu_r"
  else:
    norm, cmap = colors.Normalize(0, 1), "viridis"
  mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1), data, norm=norm, cmap=cmap)
  ax.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=max(5, min(8, 400 // max(
      len(layers), 1))))
  ax.invert_yaxis()
  ax.set_xlabel("step" + (" (stages end to end)" if len(stages) > 1 else ""), fontsize=8)
  ax.set_title(title, fontsize=10)
  ax.tick_params(axis="x", labelsize=8)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  fig.colorbar(mesh, ax=ax, fraction=0.03, pad=0.01)
  ax.set_xlim(edges[0], edges[-1])
  _mark_stages(ax, stages, lo=edges[0])
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return True


def results_rows(stages) -> list[dict]:
  """One row per (stage, test set) of the stages' results.json files."""
  rows = []
  for s in stages:
    r = s.results
    if not r:
      continue
    sets = r.get("datasets") or {
        f"{r.get('dataset', '?')}:{r.get('eval_split', '?')}": r}
    for name, v in sets.items():
      rows.append({"stage": s.name, "test set": name, "top-1": v.get("top1"),
                   "top-5": v.get("top5"), "images": v.get("num_eval_examples"),
                   "steps": r.get("steps")})
  return rows


def _pct(v):
  return "" if v is None else f"{100 * float(v):.2f} %"


def _html(stages, plots, rows, workdir) -> str:
  e = html.escape
  status = []
  for s in stages:
    last = max([m["step"] for m in s.metrics] + [0])
    state = ("finished" if s.results else
             "in progress" if last < s.total_steps else "trained, not evaluated")
    status.append(f"<li>{e(s.name)}: step {last} of {s.total_steps} logged, {state} "
                  f"({len(s.diagnostics)} diagnostics steps)</li>")
  parts = [
      "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
      f"<title>bcdnet-jax report: {e(os.path.abspath(workdir))}</title>",
      "<style>body{font-family:sans-serif;margin:2em;max-width:1250px}"
      "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 10px;"
      "text-align:right}th{background:#eee}td:first-child,td:nth-child(2){text-align:left}"
      "img{display:block;margin:1em 0;max-width:100%;height:auto}</style>",
      "</head><body>",
      f"<h1>Training report</h1><p><code>{e(os.path.abspath(workdir))}</code></p>",
      "<ul>", *status, "</ul>", "<h2>Evaluation</h2>"]
  if rows:
    parts.append("<table><tr>" + "".join(f"<th>{e(k)}</th>" for k in rows[0]) + "</tr>")
    for r in rows:
      parts.append(f"<tr><td>{e(r['stage'])}</td><td>{e(r['test set'])}</td>"
                   f"<td>{_pct(r['top-1'])}</td><td>{_pct(r['top-5'])}</td>"
                   f"<td>{r['images'] if r['images'] is not None else ''}</td>"
                   f"<td>{r['steps'] if r['steps'] is not None else ''}</td></tr>")
    parts.append("</table>")
  else:
    parts.append("<p>No evaluation results yet (no results.json).</p>")
  parts.append("<h2>Training</h2>")
  for fname, title, (w, h) in plots:
    parts.append(f"<h3>{e(title)}</h3><img src='{e(fname)}' width='{w}' height='{h}' "
                 f"alt='{e(title)}'>")
  if len(plots) == 1:
    parts.append("<p>No binarisation diagnostics logged (diagnostics_every_steps = 0, or "
                 "none written yet).</p>")
  parts.append("</body></html>")
  return "\n".join(parts) + "\n"


def build(workdir: str, out: str | None = None) -> str:
  """Writes the report of `workdir` to `out` (default workdir/report); returns the path
  of its index.html. Raises ReportError for a directory that is not a training workdir
  or has no metrics yet."""
  stages = find_stages(workdir)
  where = f"--out {out}" if out else os.path.join(workdir, "report")
  out = out or os.path.join(workdir, "report")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ReportError(f"{where}: is a file, not a directory; pass a directory for the "
                      "report")
  try:
    return _write(stages, workdir, out)
  except OSError as e:
    raise ReportError(f"{where}: cannot write the report there "
                      f"({e.strerror or e}{': ' + e.filename if e.filename else ''})") from None


def _write(stages, workdir, out) -> str:
  os.makedirs(out, exist_ok=True)
  plots = []
  plot_training(stages, os.path.join(out, "training.png"))
  plots.append(("training.png", "loss, accuracy, learning rate, images/s", TRAINING_PIXELS))
  for fname, stat, title, scale in HEATMAPS:
    if plot_heatmap(stages, stat, title, scale, os.path.join(out, fname)):
      plots.append((fname, title, heatmap_pixels(len(_matrix(stages, stat)[0]))))
    elif os.path.exists(os.path.join(out, fname)):
      os.remove(os.path.join(out, fname))  # from an earlier report of another run
  index = os.path.join(out, "index.html")
  with open(index, "w") as f:
    f.write(_html(stages, plots, results_rows(stages), workdir))
  return index


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bcdnet-report", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir")
  p.add_argument("--out", default=None, help="output directory (default WORKDIR/report)")
  args = p.parse_args(argv)
  try:
    index = build(args.workdir, args.out)
  except errors.UserError as e:
    return errors.report(e)
  print(f"wrote {index}")
  return 0


def cli() -> None:
  """The `bcdnet-report` console script."""
  errors.run_cli(main)


if __name__ == "__main__":
  cli()
