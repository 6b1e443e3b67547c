"""The distributed runtime (ald_jax.distributed) on a local Ray instance.

Each test starts and stops its own small Ray instance through
`train_distributed`, as `run.py --runtime=distributed` does.
"""
import csv
import dataclasses
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import dm_env
import numpy as np
import psutil
import pytest
from dm_env import specs

from ald_jax import checkpointing
from ald_jax import distributed
from ald_jax import logging_utils
from ald_jax.config import Config
from envs import registry

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RAY_NAMES = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard",
              "log_monitor", "runtime_env", "monitor.py")

LEARNING = dict(
    env="recall", env_args="num_cues=2,delay=4", num_envs=32, unroll_length=12,
    encoder_hidden=32, lstm_hidden=32, gtrxl_layers=1, gtrxl_heads=2,
    gtrxl_d_model=32, gtrxl_mlp_width=64, gtrxl_memory_len=8,
    learner_learning_rate=1e-3, actor_learning_rate=2e-3, replay_segments=2,
    distill_steps_per_rl_step=2, seed=0, runtime="distributed", num_actors=2,
    envs_per_actor=16, segment_queue_size=2, log_every_seconds=5.0,
    ray_num_cpus=2, checkpoint_every_iterations=0)

TINY = dict(
    env="recall", env_args="delay=2", num_envs=8, unroll_length=6,
    encoder_hidden=16, lstm_hidden=16, gtrxl_layers=1, gtrxl_heads=2,
    gtrxl_d_model=16, gtrxl_mlp_width=16, gtrxl_memory_len=4,
    replay_segments=2, runtime="distributed", num_actors=2, envs_per_actor=4,
    segment_queue_size=4, log_every_seconds=2.0, ray_num_cpus=2,
    checkpoint_every_iterations=0)


def _ray_children():
  """Ray processes among this process's descendants: pid -> name."""
  out = {}
  for proc in psutil.Process().children(recursive=True):
    try:
      text = " ".join([proc.name()] + proc.cmdline()[:3])
      if proc.status() != psutil.STATUS_ZOMBIE and any(
          n in text for n in _RAY_NAMES):
        out[proc.pid] = text[:80]
    except psutil.Error:
      continue
  return out


def _train(config, env=None, **kwargs):
  env = env or registry.make(config.env, **_env_args(config))
  stream = io.StringIO()
  with logging_utils.MetricsWriter(config.logdir, tensorboard=False) as writer:
    state, row = distributed.train_distributed(
        config, env, stream=stream, metrics_writer=writer, **kwargs)
  return env, state, row, stream.getvalue()


def _env_args(config):
  from ald_jax.config import parse_env_args  # pylint: disable=g-import-not-at-top
  return parse_env_args(config.env_args)


def _rows(logdir, name="metrics.csv"):
  with open(os.path.join(logdir, name)) as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize("agent,total_env_steps", [("ald", 96_000),
                                                   ("lstm", 110_000)])
def test_distributed_agent_learns_recall(tmp_path, agent, total_env_steps):
  config = Config(agent=agent, total_env_steps=total_env_steps,
                  logdir=str(tmp_path / agent), **LEARNING).validate()
  env, state, row, out = _train(config)
  result = distributed.Evaluator(config, env).evaluate(state, seed=1000,
                                                       num_episodes=256)
  assert result["eval_success_rate"] >= 0.9, (result, out[-3000:])
  assert row["env_steps"] >= total_env_steps
  assert row["nonfinite"] == 0
  rows = _rows(config.logdir)
  assert rows and "learner_updates_per_s" in rows[0]
  if agent == "ald":
    # The enforced distill rate: K distill steps per learner step, within 10%.
    assert abs(row["distill_ratio"] - 2) <= 0.2, row
    assert float(rows[-1]["distill_steps_per_s"]) >= 0


def test_killed_actor_is_restarted_and_no_ray_process_is_left(tmp_path):
  config = Config(agent="lstm", total_env_steps=24_000, actor_max_restarts=2,
                  logdir=str(tmp_path / "fault"), **TINY).validate()
  seen = {}

  def on_poll(info):
    seen.update(_ray_children())
    if "killed" not in seen and info["iteration"] >= 20:
      pid = info["actor_pids"][1]
      os.kill(pid, signal.SIGKILL)   # this run's actor 1, by its pid
      seen["killed"] = pid

  _, state, row, out = _train(config, on_poll=on_poll)
  assert "killed" in seen, out
  assert row["actor_restarts"] >= 1, (row, out[-2000:])
  assert int(state.counters["actor_restarts"]) >= 1
  assert row["env_steps"] >= config.total_env_steps
  # The restarted actor's streams started again: a gap for the learner.
  assert row["stream_resets"] >= 1
  ray_pids = [p for p in seen if isinstance(p, int)]
  assert ray_pids, "no Ray process seen during the run"
  assert not _ray_children(), _ray_children()
  assert not any(psutil.pid_exists(p) and psutil.Process(p).status() !=
                 psutil.STATUS_ZOMBIE for p in ray_pids)


def test_policy_lag_is_bounded_by_max_policy_lag(tmp_path):
  config = Config(agent="gtrxl", total_env_steps=16_000, max_policy_lag=1,
                  logdir=str(tmp_path / "lag"), **TINY).validate()
  _, _, row, _ = _train(config)
  records = _rows(config.logdir, distributed.SEGMENTS_CSV)
  consumed = [r for r in records if r["consumed"] == "1"]
  assert len(consumed) >= 2 * 50, len(consumed)
  lags = [int(r["learner_version"]) - int(r["behaviour_version"])
          for r in consumed]
  assert max(lags) <= 1
  assert all(int(r["lag"]) > 1 for r in records if r["consumed"] == "0")
  assert row["policy_lag_max"] <= 1


# --------------------------------------------------- a Python dm_env env ---


class PythonRecall(dm_env.Environment):
  """Recall in plain Python: a cue, `delay` blank steps, then a query.

  Observation: [cue one-hot (2), query flag]; the runtime appends the
  previous action and reward. Reward 1 for answering the cue at the query.
  """

  def __init__(self, delay: int = 1, seed: int = 0):
    self._delay = delay
    self._rng = np.random.default_rng(seed)
    self._t = 0
    self._cue = 0

  def _obs(self):
    obs = np.zeros(3, np.float32)
    if self._t == 0:
      obs[self._cue] = 1.0
    if self._t == self._delay + 1:
      obs[2] = 1.0
    return obs

  def reset(self):
    self._t, self._cue = 0, int(self._rng.integers(2))
    return dm_env.restart(self._obs())

  def step(self, action):
    if self._t == self._delay + 1:
      reward = float(int(action) == self._cue)
      self._t += 1
      return dm_env.termination(reward, self._obs())
    self._t += 1
    return dm_env.transition(0.0, self._obs())

  def observation_spec(self):
    return specs.Array((3,), np.float32)

  def action_spec(self):
    return specs.DiscreteArray(2, dtype=np.int32)


def make_python_recall(delay: int = 1, seed: int = 0) -> PythonRecall:
  return PythonRecall(delay=delay, seed=seed)


def test_a_python_dm_env_trains_through_the_distributed_runtime(tmp_path):
  config = Config(**{**LEARNING, "agent": "lstm",
                     "env": "test_distributed:make_python_recall",
                     "env_args": "delay=1", "unroll_length": 6,
                     "total_env_steps": 60_000,
                     "logdir": str(tmp_path / "dm_env")}).validate()
  env = make_python_recall(delay=1)
  _, state, row, out = _train(config, env=env)
  assert row["env_steps"] >= config.total_env_steps
  result = distributed.Evaluator(config, env).evaluate(state, seed=5,
                                                       num_episodes=64)
  # Chance is 0.5; the cue must be remembered over one blank step.
  assert result["eval_return"] >= 0.9, (result, out[-2000:])


@pytest.mark.slow  # two runs (about a minute): outside the default suite
def test_checkpoints_and_resume(tmp_path):
  config = Config(agent="ald", total_env_steps=4_800,
                  checkpoint_every_iterations=20,
                  logdir=str(tmp_path / "ckpt"),
                  **{k: v for k, v in TINY.items()
                     if k != "checkpoint_every_iterations"}).validate()
  env = registry.make("recall", delay=2)
  with checkpointing.Checkpointer(os.path.join(config.logdir, "checkpoints")
                                  ) as ckpt:
    _, state, row, _ = _train(config, env=env, checkpointer=ckpt)
    steps = ckpt.all_steps()
    assert steps and steps[-1] == row["iteration"] == int(
        state.counters["iteration"])
    like = distributed.checkpoint_like(config, env)
    step, restored = ckpt.restore_latest(like)
  assert step == steps[-1]
  resumed_config = dataclasses.replace(config, total_env_steps=9_600,
                                       resume=True)
  with checkpointing.Checkpointer(os.path.join(config.logdir, "checkpoints")
                                  ) as ckpt:
    _, state2, row2, out = _train(resumed_config, env=env, checkpointer=ckpt,
                                  start_state=restored)
  assert int(state2.counters["iteration"]) > step
  assert row2["env_steps"] >= 9_600
  assert int(state2.counters["distill_steps"]) > int(
      restored.counters["distill_steps"])
  assert f"iteration {step}," in out


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_ray_address_joins_an_existing_cluster_and_leaves_it_running(tmp_path):
  # A cluster started apart from the run, as `ray start --head` on a head node
  # (--block keeps its processes under the pid started here), joined by
  # `run.py --ray_address=host:port` in its own process: Ray's token
  # authentication is per process (RAY_AUTH_MODE, RAY_AUTH_TOKEN).
  port = _free_port()
  temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short socket paths
  env = dict(os.environ, RAY_AUTH_MODE="token",
             RAY_AUTH_TOKEN=secrets.token_hex(32), NPROC="4")
  env.pop("RAY_AUTH_TOKEN_PATH", None)
  head = subprocess.Popen(
      [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
       "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
       f"--temp-dir={temp_dir}", "--disable-usage-stats"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
      start_new_session=True)
  cluster, alive = [], []
  try:
    deadline = time.monotonic() + 120
    while True:  # the head node takes a few seconds to listen
      assert head.poll() is None, "ray start --head exited"
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        assert time.monotonic() < deadline, "the head node never listened"
        time.sleep(1)
    logdir = tmp_path / "joined"
    run = subprocess.run(
        [sys.executable, os.path.join(_REPO, "experiments", "run.py"),
         f"--logdir={logdir}", "--runtime=distributed", "--agent=lstm",
         "--env=recall", "--env_args=delay=2", "--num_envs=8",
         "--num_actors=2", "--envs_per_actor=4", "--unroll_length=6",
         "--encoder_hidden=16", "--lstm_hidden=16", "--total_env_steps=2000",
         "--checkpoint_every_iterations=0", "--eval_episodes=8",
         f"--ray_address=127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=400, env=env, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("ray: "))
    assert line.startswith("ray: the Ray cluster at "), line  # not local
    assert f":{port}, 1 node(s), 4 CPU(s)" in line, line
    assert (logdir / "eval.json").exists()
    # Joining does not own the cluster: it is still up after the run.
    assert head.poll() is None
    cluster = psutil.Process(head.pid).children(recursive=True)
    assert any("gcs_server" in p.name() for p in cluster)
  finally:
    if head.poll() is None:
      cluster = cluster or psutil.Process(head.pid).children(recursive=True)
      head.send_signal(signal.SIGTERM)   # the pid started above
      try:
        head.wait(timeout=60)
      except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    _, alive = psutil.wait_procs(cluster, timeout=30)
    for proc in alive:  # what the head's shutdown left behind, by pid
      proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)
  assert not alive, [p.pid for p in alive]
