"""A user's own environment (docs/examples/custom_env.py) end to end.

Checks the example against a plain-Python re-implementation of its rules,
under jit/vmap/scan, through `envs.registry.make`, the trainer and run.py.
"""
import csv
import json
import os
import subprocess
import sys

from absl.testing import absltest
from dm_env import test_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax import training
from ald_jax.config import Config
from envs import api
from envs import registry
from envs.dm_env_adapters import JaxToDmEnv

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO_ROOT, "experiments", "run.py")
FACTORY = "docs.examples.custom_env:make_env"
L, TIME_LIMIT = 2, 5
FORWARD, UP, DOWN = 0, 1, 2


def make_env():
  return registry.make(FACTORY, corridor_length=L, time_limit=TIME_LIMIT)


def rollout_fn(env):
  """(key, int32 [N] actions) -> (FIRST time step, [N] time steps, [N] success).

  A reset then a `lax.scan` of `env.step` (the trainer's pattern).
  """
  def run(key, actions):
    state, first = env.reset(key)
    def one_step(state, action):
      state, ts = env.step(state, action)
      return state, (ts, env.success(state))
    _, (steps, success) = jax.lax.scan(one_step, state, actions)
    return first, steps, success
  return run


def reference_stream(first_observation, observations_after, actions):
  """float64 NumPy T-maze, from the rules in the TMaze docstring.

  The cue of each episode is the env's random draw, read from that episode's
  FIRST observation; everything else is recomputed here.

  Args:
    first_observation: [7], the reset observation.
    observations_after: [N, 7], the env's observations after each action (only
      the cue entries of FIRST observations are read).
    actions: int [N].
  Returns:
    step_type [N], reward [N], discount [N], observation [N, 7], success [N].
  """
  def observe(position, cue, last_action, last_reward):
    obs = np.zeros(7)
    if position == 0:
      obs[cue] = 1.0
    obs[2] = float(position == L)
    if last_action >= 0:
      obs[3 + last_action] = 1.0
    obs[6] = last_reward
    return obs

  cue = int(np.argmax(first_observation[:2]))
  position, t, is_last = 0, 0, False
  out = {k: [] for k in ("step_type", "reward", "discount", "obs", "success")}
  for i, action in enumerate(actions):
    if is_last:  # Automatic reset: the action is ignored.
      cue = int(np.argmax(observations_after[i][:2]))
      position, t, is_last = 0, 0, False
      step = (0, 0.0, 1.0, observe(0, cue, -1, 0.0), False)
    else:
      entered = position == L and action in (UP, DOWN)
      solved = entered and action == UP + cue
      position = min(position + (action == FORWARD), L)
      t += 1
      is_last = entered or t >= TIME_LIMIT
      reward = float(solved)
      step = (2 if is_last else 1, reward, 0.0 if entered else 1.0,
              observe(position, cue, action, reward), solved)
    for name, value in zip(out, step):
      out[name].append(value)
  return tuple(np.array(v) for v in out.values())


# ------------------------------------------------------------------ the env ---


def test_registry_builds_the_example_with_the_api_contract():
  env = make_env()
  assert env.num_actions == 3 and env.observation_size == 7
  assert hash(env) == hash(make_env())  # usable as a static jit argument
  state, ts = jax.jit(env.reset)(jax.random.PRNGKey(0))
  assert int(ts.step_type) == api.StepType.FIRST
  assert float(ts.reward) == 0.0 and float(ts.discount) == 1.0
  for leaf, dtype in [(ts.step_type, jnp.int32), (ts.reward, jnp.float32),
                      (ts.discount, jnp.float32),
                      (ts.observation, jnp.float32)]:
    assert leaf.dtype == dtype
  assert ts.observation.shape == (7,)
  # Raw uint32 keys in the state (checkpointable); a typed key gives the same.
  assert state.key.dtype == jnp.uint32 and state.key.shape == (2,)
  typed_state, _ = env.reset(jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, typed_state, state)


def test_scan_matches_python_reference_with_auto_reset():
  env = make_env()
  actions = jax.random.choice(jax.random.PRNGKey(1), 3, (300,),
                              p=jnp.array([0.5, 0.25, 0.25])).astype(jnp.int32)
  first, steps, success = jax.jit(rollout_fn(env))(jax.random.PRNGKey(2),
                                                   actions)
  step_type, reward, discount, obs, solved = reference_stream(
      np.asarray(first.observation), np.asarray(steps.observation),
      np.asarray(actions))
  np.testing.assert_array_equal(steps.step_type, step_type)
  np.testing.assert_allclose(steps.reward, reward)
  np.testing.assert_allclose(steps.discount, discount)
  np.testing.assert_allclose(steps.observation, obs)
  np.testing.assert_array_equal(success, solved)
  last = step_type == api.StepType.LAST
  # The stream exercised termination, truncation, success and both cues.
  assert np.any(last & (discount == 0)) and np.any(last & (discount == 1))
  assert np.any(solved) and np.any(last & (discount == 0) & ~solved)
  firsts = np.flatnonzero(step_type == api.StepType.FIRST)
  assert set(np.argmax(obs[firsts, :2], axis=1)) == {0, 1}


def test_shortest_path_and_truncation_by_hand():
  env = make_env()
  state, ts = env.reset(jax.random.PRNGKey(3))
  cue = int(np.argmax(ts.observation[:2]))
  # L forwards then the cued arm: LAST, reward 1, discount 0, success.
  for action in [FORWARD] * L + [UP + cue]:
    state, ts = env.step(state, jnp.int32(action))
  assert (int(ts.step_type), float(ts.reward), float(ts.discount)) == (2, 1, 0)
  assert bool(env.success(state))
  state, ts = env.step(state, jnp.int32(DOWN))  # ignored: a new episode
  assert int(ts.step_type) == api.StepType.FIRST
  # Never turning: truncated after TIME_LIMIT actions, discount 1.
  for _ in range(TIME_LIMIT):
    state, ts = env.step(state, jnp.int32(FORWARD))
  assert (int(ts.step_type), float(ts.reward), float(ts.discount)) == (2, 0, 1)
  assert not bool(env.success(state))


def test_vmap_matches_loop_and_jit_matches_no_jit():
  env = make_env()
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  actions = jax.random.randint(jax.random.PRNGKey(5), (3, 12), 0, 3)
  batched = jax.jit(jax.vmap(rollout_fn(env)))(keys, actions)
  single_rollout = jax.jit(rollout_fn(env))
  for i in range(3):
    jax.tree.map(lambda b, s: np.testing.assert_array_equal(b[i], s),
                 batched, single_rollout(keys[i], actions[i]))
  reset_jit, step_jit = jax.jit(env.reset), jax.jit(env.step)
  state_jit, _ = reset_jit(keys[0])
  state, _ = env.reset(keys[0])
  for action in actions[0, :6]:
    state_jit, ts_jit = step_jit(state_jit, action)
    state, ts = env.step(state, action)
    jax.tree.map(np.testing.assert_array_equal, (state_jit, ts_jit),
                 (state, ts))


@pytest.mark.parametrize("kwargs, message", [
    (dict(corridor_length=0), "corridor_length"),
    (dict(corridor_length=2.5), "corridor_length"),
    (dict(corridor_length=True), "corridor_length"),
    (dict(corridor_length=4, time_limit=4), "time_limit"),
])
def test_invalid_arguments_name_the_parameter(kwargs, message):
  with pytest.raises(ValueError, match=message):
    registry.make(FACTORY, **kwargs)


def test_unknown_argument_is_rejected():
  with pytest.raises(TypeError, match="length"):
    registry.make(FACTORY, length=3)


class CustomEnvDmEnvContractTest(test_utils.EnvironmentTestMixin,
                                 absltest.TestCase):
  """dm_env's own contract checks, through the JaxToDmEnv adapter."""

  def make_object_under_test(self):
    return JaxToDmEnv(make_env(), seed=0)

  def make_action_sequence(self):
    return np.random.default_rng(0).integers(0, 3, size=40).astype(np.int32)


# ------------------------------------------------- the training system ---

TINY = dict(env=FACTORY, env_args=f"corridor_length={L},time_limit={TIME_LIMIT}",
            num_envs=4, unroll_length=6, encoder_hidden=8, lstm_hidden=8,
            gtrxl_layers=1, gtrxl_heads=2, gtrxl_d_model=8, gtrxl_mlp_width=8,
            gtrxl_memory_len=4, replay_segments=2)


@pytest.mark.slow  # run.py trains lstm on it in the default suite
def test_ald_trainer_runs_on_the_custom_env():
  config = Config(agent="ald", total_env_steps=48, **TINY)
  trainer = training.make_trainer(config, make_env())
  state = trainer.init()
  for _ in range(2):
    state, metrics = trainer.train_iteration(state)
  metrics = jax.device_get(metrics)
  assert int(metrics["env_steps"]) == 2 * 4 * 6
  for name in ("learner_loss", "value_loss", "actor_loss", "kl_actor_learner"):
    assert np.isfinite(metrics[name]), name
  # 48 steps of episodes of at most TIME_LIMIT steps: some ended.
  assert float(np.sum(metrics["episode_count"])) > 0
  assert jax.device_get(state.env_state.key).dtype == np.uint32
  ev = trainer.evaluate(state, seed=7, num_episodes=4)
  assert 0.0 <= ev["eval_return"] <= 1.0
  assert 0.0 <= ev["eval_success_rate"] <= 1.0


def _run_py(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)  # run.py itself must make the repo importable
  return subprocess.run([sys.executable, RUN_PY] + args, capture_output=True,
                        text=True, timeout=180, env=env, cwd=REPO_ROOT,
                        check=False)


def test_run_py_trains_on_the_custom_env(tmp_path):
  logdir = tmp_path / "run"
  flags = [f"--{k}={v}" for k, v in TINY.items() if not k.startswith("gtrxl")]
  result = _run_py(flags + ["--agent=lstm", "--total_env_steps=48",
                            "--eval_episodes=4", f"--logdir={logdir}"])
  assert result.returncode == 0, result.stdout + result.stderr
  with open(logdir / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert rows and int(rows[-1]["env_steps"]) == 48
  with open(logdir / "eval.json") as f:
    evaluation = json.load(f)
  assert evaluation["eval_episodes"] == 4
  assert 0.0 <= evaluation["eval_success_rate"] <= 1.0


def test_run_py_bad_factory_is_a_one_line_env_error(tmp_path):
  result = _run_py(["--env=docs.examples.custom_env:no_such_factory",
                    f"--logdir={tmp_path / 'run'}"])
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("run.py: error: --env:")
  assert "no_such_factory" in lines[0]
