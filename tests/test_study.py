"""Tests of experiments/study.py: analysis functions, a tiny end-to-end run."""
import csv
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_PY = os.path.join(REPO_ROOT, "experiments", "study.py")

TINY_CFG = """\
--env=imaze
--env_args=corridor_length=1
--num_envs=4
--unroll_length=5
--total_env_steps=200
--encoder_hidden=8
--lstm_hidden=8
--gtrxl_layers=1
--gtrxl_heads=1
--gtrxl_d_model=8
--gtrxl_mlp_width=8
--gtrxl_memory_len=4
--log_every_seconds=0.01
--checkpoint_every_iterations=0
--eval_episodes=4
"""


@pytest.fixture(scope="module")
def study():
  """experiments/study.py as a module (it is a script, not a package member)."""
  sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
  spec = importlib.util.spec_from_file_location("ald_study", STUDY_PY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _reference_smoothed(env_steps, values, episodes, window):
  """Loop-by-loop float64 reference of the episode-weighted trailing mean."""
  out = []
  for i, x in enumerate(env_steps):
    num = den = 0.0
    for j in range(len(env_steps)):
      if (x - window < env_steps[j] <= x or j == i) and episodes[j] > 0 and (
          not np.isnan(values[j])):
        num += episodes[j] * values[j]
        den += episodes[j]
    out.append(num / den if den else np.nan)
  return np.array(out)


def test_smoothed_hand_computed(study):
  steps = np.array([10.0, 20.0, 30.0, 40.0])
  values = np.array([0.0, 1.0, np.nan, 0.5])
  episodes = np.array([2.0, 6.0, 0.0, 2.0])
  got = study.smoothed(steps, values, episodes, window=20.0)
  # Row 3 (x=40): rows x in (20, 40] -> (0 episodes at 30) + 2 at 0.5.
  # Row 1 (x=20): rows (0, 20] -> (2*0 + 6*1) / 8 = 0.75.
  np.testing.assert_allclose(got, [0.0, 0.75, 1.0, 0.5])
  # At least 3 episodes: row 0 (2) and row 3 (2 in (20, 40]) give NaN; row 2
  # (x=30, window (10, 30]: 6 at 1.0, its own row has none) stays.
  got = study.smoothed(steps, values, episodes, window=20.0, min_episodes=3)
  np.testing.assert_allclose(got, [np.nan, 0.75, 1.0, np.nan])


def test_smoothed_matches_reference_and_row_always_included(study):
  rng = np.random.default_rng(0)
  steps = np.cumsum(rng.integers(1, 30, size=40)).astype(np.float64)
  values = rng.uniform(size=40)
  values[rng.uniform(size=40) < 0.2] = np.nan
  episodes = rng.integers(0, 5, size=40).astype(np.float64)
  for window in (1.0, 25.0, 100.0):
    np.testing.assert_allclose(
        study.smoothed(steps, values, episodes, window),
        _reference_smoothed(steps, values, episodes, window))


def test_held_fraction(study):
  nan = np.nan
  curve = np.array([0.2, 0.95, 0.8, nan, 0.9, 1.0])
  # From index 1: 0.95 (held), 0.8 (not), NaN (left out), 0.9, 1.0 (held).
  assert study.held_fraction(curve, study.first_reach(curve, 0.9), 0.9) == 0.75
  assert study.held_fraction(curve, 4, 0.9) == 1.0
  assert np.isnan(study.held_fraction(curve, None, 0.9))


def test_first_reach(study):
  assert study.first_reach(np.array([np.nan, 0.5, 0.9, 0.2, 1.0]), 0.9) == 2
  assert study.first_reach(np.array([np.nan, 0.5]), 0.9) is None
  assert study.first_reach(np.array([]), 0.9) is None


def test_parse_thresholds_errors_name_flag(study):
  assert study.parse_thresholds(["imaze=success_rate:0.9"]) == {
      "imaze": ("success_rate", 0.9)}
  with pytest.raises(ValueError, match="thresholds"):
    study.parse_thresholds(["imaze=kl:0.1"])
  with pytest.raises(ValueError, match="budgets"):
    study.parse_key_values(["imaze"], "budgets")


def test_tiny_study_end_to_end(tmp_path):
  config_dir = tmp_path / "configs"
  config_dir.mkdir()
  (config_dir / "imaze.cfg").write_text(TINY_CFG)
  out = tmp_path / "report" / "results.md"
  runs = tmp_path / "runs"
  args = [sys.executable, STUDY_PY, f"--config_dir={config_dir}",
          f"--runs_dir={runs}", f"--out={out}",
          "--envs=imaze",
          "--agents=lstm", "--seeds=0", "--sweep_env=", "--sizing=", "--extra=",
          "--thresholds=imaze=success_rate:0.0", "--min_window_episodes=1",
          "--phases=main,acting",
          "--acting_iterations=2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.run(args, capture_output=True, text=True, timeout=120,
                         env=env, check=False)
  assert first.returncode == 0, first.stderr[-3000:]
  logdir = runs / "imaze-corridorlength1-200" / "lstm-s0"
  assert (logdir / "eval.json").exists() and (logdir / "study.json").exists()
  assert (logdir.parent / "acting-lstm.json").exists()
  report = out.read_text()
  assert "## Main study" in report and "| lstm | 1/1 |" in report
  with open(out.parent / "results" / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["agent"], r["seed"], r["group"]) for r in rows] == [
      ("lstm", "0", "main")]
  assert float(rows[0]["reach_steps"]) > 0
  # The run reached, so a share of its rows from then on held the threshold.
  assert 0 < float(rows[0]["held_after_reach"]) <= 1
  assert (out.parent / "results" / "main_imaze_env_steps.png").exists()
  # The archive's default place: beside the report's figures.
  archived = out.parent / "results" / "runs" / "imaze-corridorlength1-200" / (
      "lstm-s0")
  for name in ("config.json", "eval.json", "study.json", "metrics.csv"):
    assert (archived / name).exists(), name
  assert not (archived / "checkpoints").exists()  # small files only

  # On another machine (no runs_dir) the archive is the study's memory: a
  # complete run is skipped and reported from it; a hand-written analysis
  # survives a rebuild.
  shutil.rmtree(runs)
  out.write_text(report.replace("(No analysis written yet.)", "MY NOTES"))
  second = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env=env, check=False)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "skipped" in second.stdout
  # Nothing trained or measured again: the acting figure came from the
  # archive too.
  assert not logdir.parent.exists()
  rebuilt = out.read_text()
  assert "MY NOTES" in rebuilt and "| lstm | 1/1 |" in rebuilt
  with open(out.parent / "results" / "summary.csv") as f:
    assert [r["reach_steps"] for r in csv.DictReader(f)] == [
        rows[0]["reach_steps"]]


def _aggregate(study, label, censored_steps, censored_s, reached=3, runs=3):
  nan = float("nan")
  return study.Aggregate(
      label=label, num_runs=runs, num_reached=reached, steps_mean=nan,
      steps_std=nan, seconds_mean=nan, seconds_std=nan,
      censored_steps=censored_steps, censored_s=censored_s,
      eval_success=(nan, nan), eval_return=(nan, nan), final_train=(nan, nan),
      held_after_reach=nan, steps_per_s=nan, acting_steps_per_s=nan,
      compile_s=nan, kl_final=nan)


@pytest.mark.parametrize(
    "value,less,a_censored,b_censored,expected",
    [(0.5, True, False, False, "yes"), (2.0, True, False, False, "no"),
     # A censored numerator is a lower bound: a ratio already too large stays
     # too large; one small enough may not be.
     (2.0, True, True, False, "no"), (0.5, True, True, False, "undetermined"),
     # A censored denominator: the true ratio can only be smaller.
     (0.5, True, False, True, "yes"), (2.0, True, False, True, "undetermined"),
     (2.0, False, True, False, "yes"), (0.5, False, True, False,
                                        "undetermined"),
     (0.5, False, False, True, "no"), (2.0, False, False, True,
                                       "undetermined"),
     (2.0, False, True, True, "undetermined")])
def test_claim_verdict_only_decides_what_the_censored_bounds_decide(
    study, value, less, a_censored, b_censored, expected):
  assert study.claim_verdict(value, 1.0, less, a_censored,
                             b_censored) == expected


def test_claims_table_rows_hand_computed(study):
  aggs = {
      "lstm": _aggregate(study, "lstm", 600_000, 10.0, reached=2),
      "gtrxl": _aggregate(study, "gtrxl", 200_000, 40.0),
      "asym": _aggregate(study, "asym", 500_000, 30.0, reached=1),
      "ald": _aggregate(study, "ald", 240_000, 14.0),
  }
  rows = {line.split(" | ")[0].lstrip("| "): line
          for line in study.claims_table(aggs)[2:]}
  assert len(rows) == 6
  # lstm / gtrxl = 3.0 >= 2 with lstm censored (lower bound): holds.
  assert "3.00x" in rows["gtrxl needs >= 2x fewer env steps than lstm "
                         "(lstm / gtrxl)"]
  assert rows["gtrxl needs >= 2x fewer env steps than lstm (lstm / gtrxl)"
              ].endswith("(censored: lstm) | yes |")
  assert rows["ald env steps <= 1.3x gtrxl's (ald / gtrxl)"].endswith(
      "1.20x (240,000 vs 200,000) | yes |")
  assert rows["ald wall-clock < gtrxl's (ald / gtrxl)"].endswith(
      "0.35x (14.0 vs 40.0) | yes |")
  # 14 / 10 = 1.4 <= 1.5; lstm's 10 s is a lower bound, so the true ratio
  # is at most 1.4: holds.
  assert rows["ald wall-clock <= 1.5x lstm's (ald / lstm)"].endswith(
      "1.40x (14.0 vs 10.0) (censored: lstm) | yes |")
  # lstm / ald = 2.5 >= 1, lstm censored: holds; with ald censored too, the
  # bounds decide nothing.
  assert rows["ald fewer env steps than lstm (lstm / ald)"].endswith(
      "2.50x (600,000 vs 240,000) (censored: lstm) | yes |")
  # asym / ald = 2.08 >= 1, asym censored: holds.
  assert rows["asym worse than ald in env steps (asym / ald)"].endswith(
      "(censored: asym) | yes |")
  aggs["ald"] = _aggregate(study, "ald", 240_000, 14.0, reached=2)
  rows = {line.split(" | ")[0].lstrip("| "): line
          for line in study.claims_table(aggs)[2:]}
  assert rows["ald fewer env steps than lstm (lstm / ald)"].endswith(
      "(censored: lstm, ald) | undetermined |")
  del aggs["asym"]
  rows = study.claims_table(aggs)
  assert "| asym worse than ald in env steps (asym / ald) | not run | - |" in (
      rows)


def test_only_report_without_any_run_leaves_the_report_alone(tmp_path):
  config_dir = tmp_path / "configs"
  config_dir.mkdir()
  (config_dir / "imaze.cfg").write_text(TINY_CFG)
  out = tmp_path / "results.md"
  out.write_text("a report of runs this machine does not have")
  args = [sys.executable, STUDY_PY, f"--config_dir={config_dir}",
          f"--runs_dir={tmp_path / 'runs'}", f"--out={out}", "--envs=imaze",
          "--agents=lstm", "--seeds=0", "--sweep_env=", "--sizing=",
          "--extra=", "--thresholds=imaze=success_rate:0.0", "--only_report"]
  result = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          check=False)
  assert result.returncode != 0
  assert "no complete run of this plan" in result.stderr
  assert out.read_text() == "a report of runs this machine does not have"


def test_the_run_archive_of_a_report_is_not_git_ignored():
  """The archive is how a study continues on another machine: it must be
  committable (a `runs/` ignore rule once swallowed it)."""
  if shutil.which("git") is None or not os.path.isdir(
      os.path.join(REPO_ROOT, ".git")):
    pytest.skip("not a git checkout")
  archived = os.path.join("docs", "some_report", "runs", "imaze-x-100",
                          "ald-s0", "metrics.csv")
  result = subprocess.run(["git", "check-ignore", "-q", archived],
                          cwd=REPO_ROOT, check=False)
  assert result.returncode == 1  # 1: not ignored
  # The default logdir of run.py (runs/...) stays ignored.
  assert subprocess.run(["git", "check-ignore", "-q", "runs/default/x"],
                        cwd=REPO_ROOT, check=False).returncode == 0
