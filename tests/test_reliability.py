"""What a run guarantees after bad input, NaN, a crash, corruption or a rival.

Subprocess tests of experiments/run.py (exit codes and one-line errors) and
in-process tests of the logdir lock, the verified resume and the metrics
record. The promises are listed in docs/reliability.md.
"""
import csv
import dataclasses
import glob
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ald_jax import checkpointing
from ald_jax import logdir_lock
from ald_jax.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, "experiments", "run.py")
TINY_FLAGS = [
    "--agent=ald", "--env=recall", "--env_args=delay=2", "--num_envs=8",
    "--unroll_length=8", "--encoder_hidden=16", "--lstm_hidden=16",
    "--gtrxl_layers=1", "--gtrxl_heads=2", "--gtrxl_d_model=16",
    "--gtrxl_mlp_width=16", "--gtrxl_memory_len=4", "--replay_segments=2",
    "--eval_episodes=8"]


def _run(args, timeout=300, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, RUN_PY] + list(args),
                        capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=REPO, check=False, **kw)


def _assert_one_line_error(result, code, *needles):
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("run.py: error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert "Traceback" not in result.stderr + result.stdout
  return lines[0]


# ------------------------------------------------------------ bad inputs ---


@pytest.fixture(scope="module")
def not_a_directory(tmp_path_factory):
  path = tmp_path_factory.mktemp("file") / "plain_file"
  path.write_text("x")
  return str(path)


BAD_INPUTS = [
    # (flags, text the one line must contain)
    (["--env=tests.fault_envs:returns_none"], "--env: "),
    (["--env=tests.fault_envs:not_an_env"], "is not an environment"),
    (["--env=tests.fault_envs:no_success"], "missing success"),
    (["--env=imaze", "--env_args=corridor_length=2.5"], "--env_args: "),
    (["--env=tests.fault_envs:wrong_observation_size"], "observation"),
    (["--env=tests.fault_envs:int_observations"], "int32"),
    (["--env=tests.fault_envs:half_rewards"], "float16"),
    (["--learner_learning_rate=inf"], "--learner_learning_rate: "),
    (["--vmpo_eps_eta=nan"], "--vmpo_eps_eta: "),
    (["--num_envs=100000000", "--unroll_length=100",
      "--total_env_steps=20000000000"], "--num_envs: "),
    (["--gtrxl_d_model=65536", "--gtrxl_heads=1"], "GiB"),
    (["--flagfile=/no/such/file.cfg"], "--flagfile: no such file"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS,
                         ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, args,
                                                         needle):
  logdir = tmp_path / "run"
  result = _run([f"--logdir={logdir}"] + args, timeout=120)
  _assert_one_line_error(result, 2, needle)
  assert not logdir.exists()


def test_unwritable_logdir_is_one_line(not_a_directory):
  result = _run([f"--logdir={not_a_directory}/run"], timeout=120)
  _assert_one_line_error(result, 2, "--logdir: ", "not a directory")


def test_only_check_args_validates(tmp_path):
  logdir = tmp_path / "run"
  bad = _run([f"--logdir={logdir}", "--only_check_args", "--num_envs=-1"])
  _assert_one_line_error(bad, 2, "--num_envs")
  good = _run([f"--logdir={logdir}", "--only_check_args"])
  assert good.returncode == 0, good.stderr
  assert not logdir.exists()


# ------------------------------------------------------------- NaN guard ---


def test_nan_from_the_env_stops_with_exit_3_and_keeps_good_checkpoints(
    tmp_path):
  logdir = str(tmp_path / "run")
  # Rewards turn NaN at env step 51: inside iteration 7 (8 steps each).
  result = _run([f"--logdir={logdir}", "--env=tests.fault_envs:nan_after",
                 "--env_args=steps=50", "--total_env_steps=1280",
                 "--checkpoint_every_iterations=2"]
                + [f for f in TINY_FLAGS if not f.startswith("--env")])
  line = _assert_one_line_error(result, 3, "non-finite", "iteration 7",
                                "env rewards/observations")
  assert "up to iteration 6" in line
  assert not os.path.exists(os.path.join(logdir, "eval.json"))
  directory = os.path.join(logdir, "checkpoints")
  with checkpointing.Checkpointer(directory) as ckpt:
    steps = ckpt.all_steps()
    assert steps == [2, 4, 6], steps
    for step in steps:  # verified and finite, or this raises
      tree = ckpt.restore(step, require_finite=True)
      assert int(np.ravel(tree["iteration"])[0]) == step


def test_nonfinite_flag_of_the_trainer_names_the_quantity():
  training = importlib.import_module("ald_jax.training")
  config = Config(agent="ald", env="recall", env_args="delay=2", num_envs=8,
                  unroll_length=8, encoder_hidden=16, lstm_hidden=16,
                  gtrxl_layers=1, gtrxl_heads=2, gtrxl_d_model=16,
                  gtrxl_mlp_width=16, gtrxl_memory_len=4, replay_segments=2,
                  total_env_steps=10**6)
  from envs import registry
  trainer = training.make_trainer(config, registry.make("recall", delay=2))
  state = trainer.init()
  state, metrics = trainer.train_iteration(state)
  assert int(metrics["nonfinite"]) == 0
  host = trainer.to_host(state)
  policy = host.params["learner"]["params"]["heads"]["policy"]
  policy["kernel"] = np.full_like(policy["kernel"], np.nan)
  state, metrics = trainer.train_iteration(trainer.from_host(host))
  names = training.describe_nonfinite(int(metrics["nonfinite"]))
  assert "RL loss" in names and "RL-trained params" in names, names
  assert "env rewards/observations" not in names
  # A step so large that the learner blows up within one iteration: its
  # params stay finite (1e30-sized), what it feeds the distillation is not.
  huge = training.make_trainer(
      dataclasses.replace(config, learner_learning_rate=1e30),
      registry.make("recall", delay=2))
  _, metrics = huge.train_iteration(huge.init())
  names = training.describe_nonfinite(int(metrics["nonfinite"]))
  assert "distillation loss" in names, names
