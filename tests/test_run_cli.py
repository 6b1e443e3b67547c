"""Tests of experiments/run.py (flags, errors, loop) and logging_utils."""
import csv
import dataclasses
import glob
import importlib
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax import checkpointing
from ald_jax import config as config_lib
from ald_jax import logging_utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO_ROOT, "experiments", "run.py")
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO_ROOT, "experiments",
                                             "configs", "*.cfg")))
STUDY_CONFIG_FILES = sorted(glob.glob(os.path.join(
    REPO_ROOT, "experiments", "configs", "study*", "*.cfg")))


@pytest.fixture(scope="module")
def run():
  """experiments/run.py as a module."""
  return importlib.import_module("experiments.run")


# ------------------------------------------------------ command-line errors ---


@pytest.mark.parametrize("args, flag", [
    (["--agent=transformer"], "--agent"),
    (["--num_envs=-4"], "--num_envs"),
    (["--gtrxl_d_model=63", "--gtrxl_heads=2"], "--gtrxl_d_model"),
    (["--env=imaze", "--env_args=corridor_len=4"], "--env_args"),
    (["--env=imaze", "--env_args=corridor_length=0"], "--env_args"),
    (["--env=imaze", "--env_args=corridor_length"], "--env_args"),
    (["--env=atari"], "--env"),
    (["--env=no_such_package.module:factory"], "--env"),
    (["--num_envs=many"], "--num_envs"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--resume"], "--resume"),
])
def test_bad_flags_exit_with_one_line(tmp_path, args, flag):
  logdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, RUN_PY, f"--logdir={logdir}"] + args,
      capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT,
      check=False)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("run.py: error: "), lines[0]
  assert flag in lines[0]
  assert "Traceback" not in result.stderr + result.stdout
  assert not logdir.exists()  # nothing written (nor compiled) before checks


def test_config_error_line_names_the_flag(run):
  err = ValueError("num_envs: must be >= 1 (got -1)")
  assert run._error_line(err) == (
      "run.py: error: --num_envs: must be >= 1 (got -1)")
  assert run._error_line(ValueError("odd\nthing")) == "run.py: error: odd thing"


# --------------------------------------------------------- flags & configs ---


def test_flags_mirror_config_defaults(run):
  assert run.parse_config(["run.py"]) == config_lib.Config()


def test_flags_parse_every_type(run):
  config = run.parse_config(["run.py", "--seed=3", "--discount=0.9",
                             "--agent=lstm", "--resume", "--env_args=delay=2"])
  assert (config.seed, config.discount, config.agent, config.resume,
          config.env_args) == (3, 0.9, "lstm", True, "delay=2")


def test_there_is_a_config_per_env_and_agent():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert names == {f"{env}_{agent}.cfg" for env in config_lib.BUILTIN_ENVS
                   for agent in config_lib.AGENTS}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_file_parses_and_validates(run, path):
  config = run.parse_config(["run.py", f"--flagfile={path}"]).validate()
  env_name, agent = os.path.basename(path)[:-len(".cfg")].split("_")
  assert (config.env, config.agent) == (env_name, agent)
  env = run.build_env(config)
  assert env.num_actions >= 2
  overridden = run.parse_config(["run.py", f"--flagfile={path}", "--seed=7"])
  assert overridden.seed == 7


@pytest.mark.parametrize("path", STUDY_CONFIG_FILES,
                         ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_study_config_file_parses_validates_and_names_its_env(run, path):
  config = run.parse_config(["study", f"--flagfile={path}"]).validate()
  assert config.env == os.path.basename(path)[:-len(".cfg")]
  assert run.build_env(config).num_actions >= 2


def _study_config_fields(run, folder, env_name):
  path = os.path.join(REPO_ROOT, "experiments", "configs", folder,
                      f"{env_name}.cfg")
  return dataclasses.asdict(run.parse_config(["study", f"--flagfile={path}"]))


@pytest.mark.parametrize("env_name", ["imaze", "metafetch"])
def test_distributed_study_config_is_the_sync_one_plus_its_runtime(run,
                                                                   env_name):
  """The round-2 sync vs distributed comparison holds everything else fixed."""
  sync = _study_config_fields(run, "study2", env_name)
  distributed = _study_config_fields(run, "study2_distributed", env_name)
  differing = {k for k in sync if sync[k] != distributed[k]}
  assert differing == {"runtime", "actor_inference", "logdir"}
  assert (distributed["runtime"], distributed["actor_inference"]) == (
      "distributed", "per_env")
  # One env per actor call, and the RL batch of the sync runtime.
  assert (distributed["num_actors"] * distributed["envs_per_actor"]
          == sync["num_envs"])


def test_ppo_study_config_is_the_sync_one_with_ppo(run):
  """The round-2 V-MPO vs PPO comparison changes the RL loss and nothing else."""
  vmpo = _study_config_fields(run, "study2", "imaze")
  ppo = _study_config_fields(run, "study2_ppo", "imaze")
  assert {k for k in vmpo if vmpo[k] != ppo[k]} == {"rl_loss", "logdir"}
  assert (vmpo["rl_loss"], ppo["rl_loss"]) == ("vmpo", "ppo")


def test_agents_of_one_env_differ_only_in_agent_and_logdir(run):
  by_env = {}
  for path in CONFIG_FILES:
    config = run.parse_config(["run.py", f"--flagfile={path}"])
    fields = dataclasses.asdict(config)
    del fields["agent"], fields["logdir"]
    by_env.setdefault(fields["env"], []).append(fields)
  for configs in by_env.values():
    assert all(c == configs[0] for c in configs)


# ------------------------------------------------------------ logdir checks ---


def test_logdir_with_checkpoints_needs_resume_and_same_config(run, tmp_path):
  logdir = str(tmp_path / "run")
  config = config_lib.Config(logdir=logdir)
  run.check_logdir(config)  # empty logdir: fine
  run.write_config_json(config)
  with checkpointing.Checkpointer(os.path.join(logdir, "checkpoints")) as ckpt:
    ckpt.save(4, {"x": np.zeros((1,), np.float32)})
  with pytest.raises(ValueError, match="^logdir: .*--resume"):
    run.check_logdir(config)
  run.check_logdir(dataclasses.replace(config, resume=True,
                                       total_env_steps=10**6))
  with pytest.raises(ValueError, match="^lstm_hidden: differs"):
    run.check_logdir(dataclasses.replace(config, resume=True, lstm_hidden=8))


# --------------------------------------------------------- the train loop ---


class FakeTrainer:
  """Follows the Trainer contract with trivial arithmetic (no compilation).

  State: every leaf has a leading [1] device axis. Each iteration finishes
  two episodes with returns (it, 0) and one success.
  """
  env_steps_per_iteration = 10
  num_devices = 1

  def init(self):
    return {"it": jnp.zeros((1,), jnp.int32),
            "w": jnp.zeros((1, 3), jnp.float32),
            "key": jax.random.key_data(jax.random.split(jax.random.key(0), 1))}

  def train_iteration(self, state):
    it = state["it"] + 1
    new = {"it": it, "w": state["w"] * 0.5 + it[:, None].astype(jnp.float32),
           "key": state["key"] + jnp.uint32(1)}
    metrics = {"iteration": it[0], "env_steps": it[0] * 10,
               "episode_count": jnp.float32(2.0),
               "episode_return_sum": it[0].astype(jnp.float32),
               "success_count": jnp.float32(1.0),
               "kl_actor_learner": jnp.float32(jnp.nan),
               "eta": jnp.float32(0.5), "alpha": jnp.float32(4.0),
               "learner_loss": jnp.float32(1.0), "actor_loss": jnp.float32(0.0),
               "value_loss": jnp.float32(2.0)}
    return new, metrics

  def evaluate(self, state, seed, num_episodes):
    del state, seed
    return {"eval_return": 0.25, "eval_success_rate": 0.5,
            "eval_episodes": float(num_episodes)}

  def to_host(self, state):
    return jax.device_get(state)

  def from_host(self, host_state):
    return jax.tree.map(jnp.asarray, host_state)


class FakeClock:
  """One second per call, so that every progress line is due."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    self.now += 1.0
    return self.now


def _train(run, logdir, total_env_steps, resume=False):
  config = config_lib.Config(logdir=logdir, num_envs=2, unroll_length=5,
                             total_env_steps=total_env_steps, resume=resume,
                             checkpoint_every_iterations=2,
                             log_every_seconds=0.5).validate()
  out = io.StringIO()
  state, metrics = run.train(config, env=None, trainer=FakeTrainer(),
                             stream=out, clock=FakeClock())
  return config, state, metrics, out.getvalue()


def _csv_rows(logdir):
  with open(os.path.join(logdir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_train_logs_checkpoints_and_resumes_to_the_same_state(run, tmp_path):
  straight = str(tmp_path / "straight")
  _, want_state, want_metrics, _ = _train(run, straight, 80)

  split = str(tmp_path / "split")
  _, _, _, first_out = _train(run, split, 50)
  with checkpointing.Checkpointer(os.path.join(split, "checkpoints")) as ckpt:
    assert ckpt.all_steps() == [2, 4, 5]
  assert "it 5  steps 50 (10/s)  return 2.5  success 50%  eta 0.5  alpha 4" in (
      first_out)  # iteration 5: episode returns (5, 0); kl is NaN: left out
  _, state, metrics, out = _train(run, split, 80, resume=True)
  assert "iterations 5->8" in out

  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_equal(metrics, want_metrics)  # NaN == NaN here
  assert metrics["iteration"] == 8
  rows = _csv_rows(split)
  assert [int(float(r["iteration"])) for r in rows] == list(range(1, 9))
  assert [float(r["episode_return"]) for r in rows] == [
      i / 2 for i in range(1, 9)]
  assert all(float(r["success_rate"]) == 0.5 for r in rows)
  assert "episode_count" not in rows[0]
  with open(os.path.join(split, "config.json")) as f:
    assert json.load(f)["total_env_steps"] == 80


def test_evaluate_and_save_writes_eval_json(run, tmp_path):
  config = config_lib.Config(logdir=str(tmp_path), eval_episodes=8)
  out = io.StringIO()
  result = run.evaluate_and_save(FakeTrainer(), None, config, stream=out)
  with open(tmp_path / "eval.json") as f:
    assert json.load(f) == result == {"eval_return": 0.25,
                                      "eval_success_rate": 0.5,
                                      "eval_episodes": 8.0}
  assert "success 50%" in out.getvalue()


# ---------------------------------------------------- logging_utils pieces ---


def test_format_progress_matches_the_documented_line():
  line = logging_utils.format_progress(logging_utils.Progress(
      elapsed_s=12.3, iteration=40, env_steps=25_600, env_steps_per_s=2_100,
      mean_return=0.43, success_rate=0.71, kl=0.021, eta=0.84, alpha=4.9,
      remaining_s=62))
  assert line == ("[  12.3s] it 40  steps 25.6k (2.1k/s)  return 0.43  "
                  "success 71%  kl 0.021  eta 0.84  alpha 4.9  left 1m02s")


def test_format_progress_leaves_out_nan_fields():
  line = logging_utils.format_progress(logging_utils.Progress(
      elapsed_s=3725, iteration=1, env_steps=640, env_steps_per_s=64,
      mean_return=math.nan, success_rate=math.nan, kl=math.nan, eta=math.nan,
      alpha=math.nan, remaining_s=math.inf))
  assert line == "[  1h02m] it 1  steps 640 (64/s)  return -  left ?"


@pytest.mark.parametrize("count, text", [
    (0, "0"), (950, "950"), (12.5, "12.5"), (25_600, "25.6k"),
    (1_234_567, "1.23M"), (2e9, "2G")])
def test_format_count(count, text):
  assert logging_utils.format_count(count) == text


def test_episode_accumulator():
  acc = logging_utils.EpisodeAccumulator()
  assert math.isnan(acc.mean_return) and math.isnan(acc.success_rate)
  acc.add(2, 3.0, 1)
  acc.add(0, 0.0, 0)
  acc.add(3, -1.0, 3)
  assert (acc.episodes, acc.mean_return, acc.success_rate) == (5, 0.4, 0.8)
  acc.reset()
  assert acc.episodes == 0
  with pytest.raises(ValueError):
    acc.add(-1, 0.0, 0)


def test_metrics_writer_appends_on_resume_with_one_header(tmp_path):
  logdir = str(tmp_path)
  with logging_utils.MetricsWriter(logdir) as writer:
    for it in (1, 2, 3):
      writer.write({"iteration": it, "env_steps": 10 * it, "elapsed_s": it,
                    "loss": it / 4}, step=10 * it)
  assert glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  # Resuming from the checkpoint of iteration 2: row 3 will be redone.
  with logging_utils.MetricsWriter(logdir, resume_iteration=2,
                                   tensorboard=False) as writer:
    assert writer.resumed_elapsed_s == 2
    writer.write({"iteration": 3, "env_steps": 30, "elapsed_s": 5,
                  "loss": 9.0, "new_key": 1.0}, step=30)
  with open(os.path.join(logdir, "metrics.csv")) as f:
    text = f.read()
  assert text.count("iteration") == 1
  rows = _csv_rows(logdir)
  assert [(float(r["iteration"]), float(r["loss"])) for r in rows] == [
      (1, 0.25), (2, 0.5), (3, 9.0)]
  # A fresh (non-resumed) writer replaces the file.
  with logging_utils.MetricsWriter(logdir, tensorboard=False) as writer:
    writer.write({"iteration": 1, "other": 2.0}, step=1)
  assert [list(r) for r in _csv_rows(logdir)] == [["iteration", "other"]]
