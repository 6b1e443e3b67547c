"""Tests of experiments/plot.py on synthetic run.py logdirs."""
import csv
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT_PY = os.path.join(REPO_ROOT, "experiments", "plot.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot():
  return importlib.import_module("experiments.plot")


def _write_logdir(path, agent, env_steps, returns, success):
  """A logdir as run.py writes it (only the columns plot.py reads + one)."""
  os.makedirs(path)
  if agent is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({"agent": agent, "env": "recall"}, f)
  with open(os.path.join(path, "metrics.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["iteration", "env_steps", "elapsed_s", "episode_return",
                     "success_rate", "eta"])
    for i, (x, r, s) in enumerate(zip(env_steps, returns, success)):
      writer.writerow([i + 1, x, 2.0 * (i + 1), r, s, "nan"])
  return str(path)


@pytest.fixture
def logdirs(tmp_path):
  steps = [100, 200, 300, 400]
  return [
      _write_logdir(tmp_path / "lstm_s0", "lstm", steps, [0.0, 0.1, 0.2, 0.3],
                    [0.0, 0.5, 0.5, 1.0]),
      # Second seed: return +0.2 everywhere, one interval without episodes.
      _write_logdir(tmp_path / "lstm_s1", "lstm", steps,
                    [0.2, "nan", 0.4, 0.5], [0.0, "nan", 1.0, 1.0]),
      _write_logdir(tmp_path / "unnamed", None, [100, 250], [1.0, 2.0],
                    [1.0, 1.0]),
  ]


def test_seeds_are_averaged_with_a_spread(plot, logdirs, tmp_path):
  out = str(tmp_path / "figs" / "curves.png")
  curves = plot.plot_curves(logdirs, out, num_points=4)
  assert list(curves) == ["lstm", "unnamed"]
  lstm = curves["lstm"]
  assert lstm.num_runs == 2
  np.testing.assert_allclose(lstm.x, [100, 200, 300, 400])
  # Seed 1 lacks x=200; linear interpolation between 0.2 and 0.4 gives 0.3.
  np.testing.assert_allclose(lstm.mean, [0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(lstm.std, [0.1, 0.1, 0.1, 0.1])
  np.testing.assert_allclose(curves["unnamed"].std, 0.0)
  with open(out, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(out) > 1000


def test_time_axis_and_success_rate(plot, logdirs, tmp_path):
  curves = plot.plot_curves(logdirs[:2], str(tmp_path / "t.png"), x="time",
                            metric="success_rate", num_points=3)
  np.testing.assert_allclose(curves["lstm"].x, [2.0, 5.0, 8.0])
  # t=5: seed 0 is 0.5 (between t=4 and 6); seed 1 interpolates 0 -> 1 over
  # t=2..6 (its t=4 row has no episodes), 0.75.
  np.testing.assert_allclose(curves["lstm"].mean, [0.0, 0.625, 1.0])


def test_time_offsets_shift_each_run_before_averaging(plot, logdirs, tmp_path):
  # Seed 1 started 2 s later: shifted, its rows line up with seed 0's.
  curves = plot.plot_curves(logdirs[:2], str(tmp_path / "t.png"), x="time",
                            metric="success_rate", num_points=3,
                            x_offsets=[0.0, 2.0])
  # Overlap of t = 2..8 (seed 0) and 0..6 (seed 1): t = 2, 4, 6.
  np.testing.assert_allclose(curves["lstm"].x, [2.0, 4.0, 6.0])
  # Seed 0 reads 0, 0.5, 0.5. Seed 1, shifted, has rows at t=0 (0.0), t=4
  # (1.0) and t=6 (1.0) (its row without episodes is dropped): 0.5 at t=2.
  np.testing.assert_allclose(curves["lstm"].mean, [(0.0 + 0.5) / 2,
                                                   (0.5 + 1.0) / 2,
                                                   (0.5 + 1.0) / 2])
  with pytest.raises(ValueError, match="x_offsets"):
    plot.plot_curves(logdirs[:2], str(tmp_path / "t.png"), x_offsets=[1.0])


def test_bad_arguments(plot, logdirs, tmp_path):
  with pytest.raises(ValueError, match="metric"):
    plot.plot_curves(logdirs, str(tmp_path / "a.png"), metric="loss")
  with pytest.raises(ValueError, match="x"):
    plot.plot_curves(logdirs, str(tmp_path / "a.png"), x="iterations")
  with pytest.raises(ValueError, match="no metrics.csv"):
    plot.plot_curves([str(tmp_path)], str(tmp_path / "a.png"))


def test_command_line_writes_a_png(logdirs, tmp_path):
  out = tmp_path / "cli.png"
  result = subprocess.run(
      [sys.executable, PLOT_PY, *logdirs, "--out", str(out), "--x", "time",
       "--metric", "success_rate"],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert "lstm (n=2)" in result.stdout
  assert out.read_bytes()[:8] == PNG_MAGIC
