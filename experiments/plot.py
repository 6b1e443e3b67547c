r"""Learning curves from run.py logdirs.

    python experiments/plot.py runs/recall_lstm_s* runs/recall_ald_s* \
        --out curves.png --x env_steps --metric success_rate

One line per label: the agent in each logdir's config.json (else the logdir's
name). Logdirs sharing a label (seeds) are interpolated onto a common x grid
over the range they all cover; the line is their mean and the shaded band
their mean +- one standard deviation.
"""
import argparse
import csv
import json
import os
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence

import matplotlib
matplotlib.use("Agg")  # files only; no display needed
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt
import numpy as np
# pylint: enable=g-import-not-at-top,wrong-import-position

X_COLUMNS = {"env_steps": "env_steps", "time": "elapsed_s"}
X_LABELS = {"env_steps": "env steps", "time": "wall-clock time (s)"}
METRICS = ("episode_return", "success_rate")
METRICS_CSV = "metrics.csv"


class Curve(NamedTuple):
  """A label's aggregated curve; arrays are float64 [num_points].

  x: common grid. mean, std: across the label's runs (std 0 for one run).
  num_runs: how many logdirs were averaged.
  """
  x: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  num_runs: int


def run_label(logdir: str) -> str:
  """The agent named in logdir/config.json, else the logdir's base name."""
  path = os.path.join(logdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      agent = json.load(f).get("agent")
    if agent:
      return str(agent)
  return os.path.basename(os.path.normpath(logdir))


def load_column_pair(logdir: str, x_column: str,
                     y_column: str) -> np.ndarray:
  """float64 [N, 2] of (x, y) rows of logdir/metrics.csv, NaN rows dropped.

  Raises:
    ValueError: no metrics.csv, or it lacks one of the columns.
  """
  path = os.path.join(logdir, METRICS_CSV)
  if not os.path.exists(path):
    raise ValueError(f"logdir: no {METRICS_CSV} in {logdir}")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = {x_column, y_column} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"logdir: {path} has no column(s) {sorted(missing)}")
    pairs = np.array([[float(row[x_column] or "nan"),
                       float(row[y_column] or "nan")] for row in reader],
                     dtype=np.float64).reshape(-1, 2)
  return pairs[np.all(np.isfinite(pairs), axis=1)]


def aggregate(runs: Sequence[np.ndarray], num_points: int = 200) -> Curve:
  """Mean and std of several (x, y) curves on a shared grid.

  Args:
    runs: float64 [N_i, 2] arrays, x increasing within each.
    num_points: grid size.
  Returns:
    The Curve over [max of the runs' first x, min of their last x], or over
    the single point/empty range when the runs do not overlap.
  """
  runs = [r for r in runs if len(r)]
  if not runs:
    empty = np.zeros((0,))
    return Curve(empty, empty, empty, 0)
  low = max(r[0, 0] for r in runs)
  high = min(r[-1, 0] for r in runs)
  grid = np.linspace(low, high, num_points) if high > low else np.array([low])
  values = np.stack([np.interp(grid, r[:, 0], r[:, 1]) for r in runs])
  return Curve(grid, values.mean(axis=0), values.std(axis=0), len(runs))


def plot_curves(logdirs: Sequence[str], out: str, *, x: str = "env_steps",
                metric: str = "episode_return", title: Optional[str] = None,
                labels: Optional[Sequence[str]] = None,
                num_points: int = 200,
                x_offsets: Optional[Sequence[float]] = None
                ) -> Dict[str, Curve]:
  """Writes a learning-curve figure of `logdirs` to `out` (PNG, PDF, ...).

  Args:
    logdirs: run.py log directories.
    out: the image path.
    x: "env_steps" or "time" (elapsed seconds).
    metric: "episode_return" or "success_rate".
    title: figure title (default: the metric).
    labels: one label per logdir (default: `run_label`).
    num_points: grid size of each averaged curve.
    x_offsets: one value per logdir subtracted from its x (e.g. a start-up
      time in seconds); default none.
  Returns:
    label -> its Curve, in plotting order.
  Raises:
    ValueError: bad x/metric/labels, or a logdir without usable metrics.
  """
  if x not in X_COLUMNS:
    raise ValueError(f"x: must be one of {sorted(X_COLUMNS)} (got {x!r})")
  if metric not in METRICS:
    raise ValueError(f"metric: must be one of {METRICS} (got {metric!r})")
  if not logdirs:
    raise ValueError("logdirs: need at least one")
  if labels is None:
    labels = [run_label(d) for d in logdirs]
  labels = list(labels)
  if len(labels) != len(logdirs):
    raise ValueError(f"labels: need one per logdir ({len(logdirs)}, got "
                     f"{len(labels)})")
  offsets = [0.0] * len(logdirs) if x_offsets is None else list(x_offsets)
  if len(offsets) != len(logdirs):
    raise ValueError(f"x_offsets: need one per logdir ({len(logdirs)}, got "
                     f"{len(offsets)})")
  runs_by_label: Dict[str, List[np.ndarray]] = {}
  for logdir, label, offset in zip(logdirs, labels, offsets):
    pairs = load_column_pair(logdir, X_COLUMNS[x], metric)
    pairs[:, 0] -= offset
    runs_by_label.setdefault(label, []).append(pairs)
  curves = {label: aggregate(runs, num_points)
            for label, runs in runs_by_label.items()}

  figure, axes = plt.subplots(figsize=(6.4, 4.0))
  for label, curve in curves.items():
    if not curve.num_runs:
      continue
    name = f"{label} (n={curve.num_runs})" if curve.num_runs > 1 else label
    (line,) = axes.plot(curve.x, curve.mean, label=name, marker=(
        "o" if len(curve.x) == 1 else None))
    if curve.num_runs > 1:
      axes.fill_between(curve.x, curve.mean - curve.std,
                        curve.mean + curve.std, color=line.get_color(),
                        alpha=0.25, linewidth=0)
  axes.set_xlabel(X_LABELS[x])
  axes.set_ylabel(metric.replace("_", " "))
  if metric == "success_rate":
    axes.set_ylim(-0.02, 1.02)
  axes.set_title(title or metric.replace("_", " "))
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  figure.savefig(out, dpi=120)
  plt.close(figure)
  return curves


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("logdirs", nargs="+", help="run.py log directories")
  parser.add_argument("--out", required=True,
                      help="image path, e.g. curves.png")
  parser.add_argument("--x", choices=sorted(X_COLUMNS), default="env_steps")
  parser.add_argument("--metric", choices=METRICS, default="episode_return")
  parser.add_argument("--title", default=None)
  args = parser.parse_args(argv)
  try:
    curves = plot_curves(args.logdirs, args.out, x=args.x, metric=args.metric,
                         title=args.title)
  except ValueError as err:
    print(f"plot.py: error: {err}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: " + ", ".join(
      f"{label} (n={c.num_runs})" for label, c in curves.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
