"""Warm start: a second identical run loads its programs from the cache."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, "experiments", "run.py")
# The cache does not depend on the agent; lstm compiles fastest.
FLAGS = ["--agent=lstm", "--env=recall", "--env_args=delay=2", "--num_envs=8",
         "--unroll_length=8", "--encoder_hidden=16", "--lstm_hidden=16",
         "--eval_episodes=8", "--total_env_steps=640"]


def _cache_counts(logdir, cache_dir):
  result = subprocess.run(
      [sys.executable, RUN_PY, f"--logdir={logdir}",
       f"--compilation_cache_dir={cache_dir}"] + FLAGS,
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  match = re.search(r"; (\d+) of (\d+) compiled programs came from the "
                    r"compilation cache", result.stdout)
  assert match, result.stdout
  return int(match.group(1)), int(match.group(2))


def test_second_identical_run_compiles_nothing(tmp_path):
  cache = str(tmp_path / "cache")
  hits, requests = _cache_counts(tmp_path / "a", cache)
  assert hits == 0 and requests >= 2  # init and the training iteration
  assert os.listdir(cache)
  hits, requests_again = _cache_counts(tmp_path / "b", cache)
  assert hits == requests_again == requests


def test_cache_can_be_turned_off(tmp_path):
  result = subprocess.run(
      [sys.executable, RUN_PY, f"--logdir={tmp_path / 'a'}",
       "--compilation_cache_dir=none"] + FLAGS,
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "compilation cache" not in result.stdout
  assert "first iteration took" in result.stdout
