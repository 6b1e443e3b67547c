"""Tests of the dm_env adapters (JAX env -> dm_env, dm_envs -> batched host env)."""
import dm_env
import jax
import numpy as np
import pytest
from absl.testing import absltest
from dm_env import specs
from dm_env import test_utils

from envs import api
from envs.dm_env_adapters import BatchedHostEnv
from envs.dm_env_adapters import JaxToDmEnv
from envs.imaze import IMaze
from envs.metafetch import MetaFetch
from envs.recall import Recall

RECALL = Recall(num_cues=3, delay=2)
IMAZE = IMaze(corridor_length=2, time_limit_factor=2.0)
METAFETCH = MetaFetch(size=4, num_objects=3, view_size=3, time_limit=12)


class _JaxToDmEnvContract(test_utils.EnvironmentTestMixin):
  """dm_env's own interface checks, with actions long enough to end episodes."""
  env = None

  def make_object_under_test(self):
    return JaxToDmEnv(self.env, seed=0)

  def make_action_sequence(self):
    rng = np.random.default_rng(0)
    for _ in range(40):
      yield np.int32(rng.integers(self.env.num_actions))


class RecallContractTest(_JaxToDmEnvContract, absltest.TestCase):
  env = RECALL


class IMazeContractTest(_JaxToDmEnvContract, absltest.TestCase):
  env = IMAZE


class MetaFetchContractTest(_JaxToDmEnvContract, absltest.TestCase):
  env = METAFETCH


def jax_reference_stream(env, seed, actions):
  """The JAX env stepped directly, from the adapter's documented first key."""
  _, key = jax.random.split(jax.random.PRNGKey(seed))
  state, time_step = env.reset(key)
  step = jax.jit(env.step)
  stream = [time_step]
  for action in actions:
    state, time_step = step(state, np.int32(action))
    stream.append(time_step)
  return jax.tree.map(lambda *xs: np.stack(xs), *stream)


@pytest.mark.parametrize("env", [RECALL, IMAZE, METAFETCH],
                         ids=["recall", "imaze", "metafetch"])
def test_batched_host_env_matches_jax_env(env):
  seeds, num_steps = [0, 1, 2], 30
  actions = np.random.default_rng(1).integers(
      0, env.num_actions, (num_steps, len(seeds))).astype(np.int32)
  host = BatchedHostEnv([JaxToDmEnv(env, seed) for seed in seeds])
  assert host.batch_size == 3
  assert host.observation_size == env.observation_size
  assert host.num_actions == env.num_actions
  stream = [host.reset()]
  for t in range(num_steps):
    stream.append(host.step(actions[t]))
  host_stream = jax.tree.map(lambda *xs: np.stack(xs), *stream)  # [T + 1, B]
  assert host_stream.observation.dtype == np.float32
  assert host_stream.observation.shape == (num_steps + 1, 3,
                                           env.observation_size)
  for i, seed in enumerate(seeds):
    reference = jax_reference_stream(env, seed, actions[:, i])
    jax.tree.map(lambda h, r: np.testing.assert_array_equal(h[:, i], r),
                 host_stream, reference)
    # The comparison covered the automatic reset after a LAST.
    assert np.sum(reference.step_type == api.StepType.FIRST) >= 2


def test_jax_to_dm_env_time_steps():
  adapter = JaxToDmEnv(IMAZE, seed=3)
  first = adapter.step(np.int32(0))  # A fresh env starts with FIRST.
  assert first.step_type is dm_env.StepType.FIRST
  assert first.reward is None and first.discount is None
  # Down the corridor and into goal A: LAST with discount 0.
  for action in [2] * (IMAZE.corridor_length + 1) + [3]:
    time_step = adapter.step(np.int32(action))
  assert time_step.step_type is dm_env.StepType.LAST
  assert time_step.discount == 0.0
  assert abs(time_step.reward) == 1.0
  assert adapter.step(np.int32(0)).step_type is dm_env.StepType.FIRST
  with pytest.raises(ValueError, match="action"):
    adapter.step(np.int32(IMAZE.num_actions))


class _CounterEnv(dm_env.Environment):
  """A pure-Python dm_env with a nested observation; ends after 3 steps."""

  def __init__(self, offset=0.0):
    self._offset = offset
    self._t = 0

  def reset(self):
    self._t = 0
    return dm_env.restart(self._observation())

  def step(self, action):
    self._t += 1
    reward = float(action) + self._offset
    if self._t == 3:
      return dm_env.termination(reward, self._observation())
    return dm_env.transition(reward, self._observation())

  def _observation(self):
    return {"a_time": np.array(self._t, np.int64),
            "b_pair": np.array([[self._offset, -1.0]])}

  def observation_spec(self):
    return {"a_time": specs.Array((), np.int64),
            "b_pair": specs.Array((1, 2), np.float64)}

  def action_spec(self):
    return specs.DiscreteArray(2)


def test_batched_host_env_with_python_envs_and_observation_tail():
  host = BatchedHostEnv([_CounterEnv(0.0), _CounterEnv(10.0)],
                        append_previous_action_and_reward=True)
  assert host.observation_size == 3 + 2 + 1
  time_step = host.reset()
  np.testing.assert_array_equal(time_step.step_type, [0, 0])
  np.testing.assert_array_equal(
      time_step.observation, [[0, 0, -1, 0, 0, 0], [0, 10, -1, 0, 0, 0]])
  for t in range(1, 4):
    time_step = host.step(np.array([1, 0]))
    expected_type = api.StepType.LAST if t == 3 else api.StepType.MID
    np.testing.assert_array_equal(time_step.step_type, [expected_type] * 2)
    np.testing.assert_array_equal(time_step.reward, [1.0, 10.0])
    np.testing.assert_array_equal(time_step.discount,
                                  [0.0 if t == 3 else 1.0] * 2)
    np.testing.assert_array_equal(
        time_step.observation, [[t, 0, -1, 0, 1, 1], [t, 10, -1, 1, 0, 10]])
  time_step = host.step(np.array([1, 1]))  # Automatic reset; actions ignored.
  np.testing.assert_array_equal(time_step.step_type, [0, 0])
  np.testing.assert_array_equal(time_step.reward, [0.0, 0.0])
  np.testing.assert_array_equal(time_step.discount, [1.0, 1.0])
  np.testing.assert_array_equal(
      time_step.observation, [[0, 0, -1, 0, 0, 0], [0, 10, -1, 0, 0, 0]])


def test_batched_host_env_accepts_a_single_env():
  host = BatchedHostEnv(_CounterEnv())
  assert host.batch_size == 1
  assert host.reset().observation.shape == (1, 3)
  assert host.step(np.array([1])).reward.shape == (1,)


def test_batched_host_env_validation():
  host = BatchedHostEnv([_CounterEnv(), _CounterEnv()])
  host.reset()
  with pytest.raises(ValueError, match="actions must have shape"):
    host.step(np.array([0]))
  with pytest.raises(ValueError, match="actions must be in"):
    host.step(np.array([0, 2]))
  with pytest.raises(ValueError, match="actions must be integers"):
    host.step(np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="envs must contain"):
    BatchedHostEnv([])
  with pytest.raises(ValueError, match=r"envs\[1\] has action spec"):
    BatchedHostEnv([JaxToDmEnv(Recall(num_cues=2)),
                    JaxToDmEnv(Recall(num_cues=3))])
  with pytest.raises(ValueError, match=r"envs\[1\] has observation spec"):
    BatchedHostEnv([JaxToDmEnv(MetaFetch(view_size=3)),
                    JaxToDmEnv(MetaFetch(view_size=5))])
