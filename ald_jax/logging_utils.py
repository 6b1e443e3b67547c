"""Progress lines, metric files and episode statistics of a training run.

`experiments/run.py` uses three pieces:

* `EpisodeAccumulator` sums the per-iteration episode counters between two
  progress lines (host floats; the trainer reports sums, not means).
* `format_progress` turns one `Progress` record into a compact line, e.g.
  `[  12.3s] it 40  steps 25.6k (2.1k/s)  return 0.43  success 71%  kl 0.021
  eta 0.84  alpha 4.9  left 1m02s` (a pure function).
* `MetricsWriter` appends one row per progress line to `logdir/metrics.csv` and
  writes the same scalars as TensorBoard events in `logdir`.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Mapping, NamedTuple, Optional

import tensorboardX

METRICS_CSV = "metrics.csv"


class EpisodeAccumulator:
  """Sums of finished episodes since the last `reset` (host-side floats)."""

  def __init__(self):
    self.episodes = 0.0
    self.return_sum = 0.0
    self.success_count = 0.0

  def add(self, episode_count: float, return_sum: float,
          success_count: float) -> None:
    """Adds one iteration's counts: episodes finished, sum of their returns,
    number of them that succeeded."""
    if episode_count < 0 or success_count < 0:
      raise ValueError(f"episode_count and success_count must be >= 0 "
                       f"(got {episode_count}, {success_count})")
    self.episodes += float(episode_count)
    self.return_sum += float(return_sum)
    self.success_count += float(success_count)

  @property
  def mean_return(self) -> float:
    """Mean undiscounted episode return; NaN when no episode finished."""
    return self.return_sum / self.episodes if self.episodes else math.nan

  @property
  def success_rate(self) -> float:
    """Fraction of finished episodes that succeeded, in [0, 1]; NaN if none."""
    return self.success_count / self.episodes if self.episodes else math.nan

  def reset(self) -> None:
    self.__init__()


class Progress(NamedTuple):
  """What one progress line shows. NaN fields are left out of the line.

  elapsed_s: wall-clock seconds since the run started.
  iteration: training iterations done.
  env_steps: env steps done (all envs together).
  env_steps_per_s: env steps per second since the previous line.
  mean_return: mean return of the episodes finished since the previous line.
  success_rate: their success fraction in [0, 1].
  kl: KL(actor || learner), mean per step (NaN for agents without both).
  eta, alpha: the V-MPO temperature and KL multiplier (NaN with PPO).
  remaining_s: estimated seconds until the budget is reached (NaN: left out,
    e.g. on the first line, whose rate includes compilation).
  """
  elapsed_s: float
  iteration: int
  env_steps: float
  env_steps_per_s: float
  mean_return: float
  success_rate: float
  kl: float
  eta: float
  alpha: float
  remaining_s: float


def format_duration(seconds: float) -> str:
  """'12.3s' under a minute, '1m02s' under an hour, else '2h05m'; '?' if NaN."""
  if not math.isfinite(seconds):
    return "?"
  seconds = max(seconds, 0.0)
  if seconds < 60:
    return f"{seconds:.1f}s"
  whole = int(round(seconds))
  if whole < 3600:
    return f"{whole // 60}m{whole % 60:02d}s"
  return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def format_count(count: float) -> str:
  """Counts with SI suffixes: 950, 25.6k, 1.20M, 3.4G (3 significant digits)."""
  if not math.isfinite(count):
    return "?"
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(count) >= scale:
      return f"{count / scale:.3g}{suffix}"
  return f"{count:.3g}" if count != int(count) else str(int(count))


def format_value(value: float, digits: int = 2) -> str:
  """`digits` significant digits; integers when |value| >= 10**digits."""
  if abs(value) >= 10**digits:
    return f"{value:.0f}"
  return f"{value:.{digits}g}"


def format_progress(progress: Progress) -> str:
  """The one-line summary printed every `log_every_seconds`."""
  parts = [f"it {progress.iteration}",
           f"steps {format_count(progress.env_steps)} "
           f"({format_count(progress.env_steps_per_s)}/s)"]
  if math.isnan(progress.mean_return):
    parts.append("return -")
  else:
    parts.append(f"return {format_value(progress.mean_return)}")
  if not math.isnan(progress.success_rate):
    parts.append(f"success {progress.success_rate:.0%}")
  for name in ("kl", "eta", "alpha"):
    value = getattr(progress, name)
    if not math.isnan(value):
      parts.append(f"{name} {format_value(value)}")
  if not math.isnan(progress.remaining_s):
    parts.append(f"left {format_duration(progress.remaining_s)}")
  return f"[{format_duration(progress.elapsed_s):>7}] " + "  ".join(parts)


class MetricsWriter:
  """Writes metric rows to `logdir/metrics.csv` and TensorBoard event files.

  The CSV header is written once, from the keys of the first row. Resuming
  (`resume_iteration` given) keeps the existing rows with `iteration <=
  resume_iteration` (rows logged after the restored checkpoint describe
  training that is about to be redone), keeps the header and appends after
  them. Without `resume_iteration` an existing file is replaced. TensorBoard
  is told to drop events after `resume_step` (its `purge_step`), so curves
  have no duplicate either. The training loop writes a row at every
  checkpoint, so the kept rows end exactly at the restored iteration.
  """

  def __init__(self, logdir: str, *, resume_iteration: Optional[int] = None,
               resume_step: Optional[int] = None, tensorboard: bool = True):
    os.makedirs(logdir, exist_ok=True)
    self.csv_path = os.path.join(logdir, METRICS_CSV)
    self._fieldnames: Optional[List[str]] = None
    self.resumed_elapsed_s = 0.0
    kept_rows: List[Dict[str, str]] = []
    if resume_iteration is not None and os.path.exists(self.csv_path):
      with open(self.csv_path, newline="") as f:
        reader = csv.DictReader(f)
        self._fieldnames = list(reader.fieldnames or []) or None
        kept_rows = [row for row in reader
                     if float(row.get("iteration") or 0) <= resume_iteration]
      if kept_rows and kept_rows[-1].get("elapsed_s"):
        self.resumed_elapsed_s = float(kept_rows[-1]["elapsed_s"])
    self._file = open(self.csv_path, "w", newline="")
    self._writer: Optional[csv.DictWriter] = None
    if self._fieldnames:
      self._start_csv(self._fieldnames)
      self._writer.writerows(kept_rows)
      self._file.flush()
    purge_step = (resume_step + 1 if resume_iteration is not None
                  and resume_step is not None else None)
    self._tensorboard = (tensorboardX.SummaryWriter(logdir,
                                                    purge_step=purge_step)
                         if tensorboard else None)

  def _start_csv(self, fieldnames: List[str]) -> None:
    self._fieldnames = fieldnames
    self._writer = csv.DictWriter(self._file, fieldnames=fieldnames,
                                  restval="", extrasaction="ignore")
    self._writer.writeheader()

  def write(self, row: Mapping[str, float], step: int) -> None:
    """Appends one row (CSV) and its scalars at x=`step` (TensorBoard).

    Args:
      row: metric name -> float (Python ints are written as ints). Keys
        absent from the CSV header fixed by the first row are left out of
        the CSV; TensorBoard gets every key except NaN values (metrics that
        do not apply to the agent).
      step: the TensorBoard x coordinate (env steps).
    """
    if self._writer is None:
      self._start_csv(list(row))
    self._writer.writerow({k: v if isinstance(v, int) else float(v)
                           for k, v in row.items()})
    self._file.flush()
    if self._tensorboard is not None:
      for name, value in row.items():
        if not math.isnan(value):  # NaN: not applicable to this agent
          self._tensorboard.add_scalar(name, float(value),
                                       global_step=int(step))
      self._tensorboard.flush()

  def close(self) -> None:
    self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
