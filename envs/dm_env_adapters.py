"""`dm_env` interoperability, both ways.

* `JaxToDmEnv`: a pure-JAX environment (`envs.api`) seen as a stateful
  `dm_env.Environment` (NumPy time steps), e.g. for tools that speak dm_env.
* `BatchedHostEnv`: a list of Python `dm_env.Environment`s seen as one batched
  environment with the `envs.api` conventions (float32 flat observations,
  automatic reset after LAST), for the un-jitted host-side acting path.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import dm_env
import jax
import numpy as np
from dm_env import specs

from envs import api


@functools.lru_cache(maxsize=None)
def _compiled_hashable(env: api.Environment) -> Tuple[Callable, Callable]:
  return jax.jit(env.reset), jax.jit(env.step)


def _compiled(env: api.Environment) -> Tuple[Callable, Callable]:
  """Jitted (reset, step), shared by all adapters of equal (hashable) envs.

  Without sharing, B adapters of one env (e.g. in a BatchedHostEnv) would
  compile B times.
  """
  try:
    return _compiled_hashable(env)
  except TypeError:  # An unhashable duck-typed env.
    return jax.jit(env.reset), jax.jit(env.step)


class JaxToDmEnv(dm_env.Environment):
  """A pure-JAX environment as a `dm_env.Environment`.

  `reset` and `step` are each compiled once. Randomness: the first episode
  starts from `env.reset(jax.random.split(jax.random.PRNGKey(seed))[1])`; after
  a LAST time step, both `step` and `reset` start the next episode exactly as
  the JAX env's own automatic reset does, so a JaxToDmEnv and the JAX env
  stepped directly from the same first key produce identical streams. A `reset`
  in mid-episode starts from a fresh key of the adapter's key stream.

  Time steps follow dm_env: FIRST has reward and discount None; otherwise the
  reward is a float32 [] and the discount a float32 [] in [0, 1].
  """

  def __init__(self, env: api.Environment, seed: int = 0):
    self._env = env
    self._key = jax.random.PRNGKey(seed)
    self._reset_fn, self._step_fn = _compiled(env)
    self._state = None
    self._last_step_type: Optional[int] = None

  @property
  def jax_env(self) -> api.Environment:
    return self._env

  @property
  def state(self):
    """The current JAX env state (None before the first reset)."""
    return self._state

  def _to_dm_env(self, time_step: api.TimeStep) -> dm_env.TimeStep:
    step_type = dm_env.StepType(int(time_step.step_type))
    self._last_step_type = int(step_type)
    observation = np.asarray(time_step.observation, np.float32)
    if step_type is dm_env.StepType.FIRST:
      return dm_env.TimeStep(step_type, None, None, observation)
    return dm_env.TimeStep(step_type, np.asarray(time_step.reward, np.float32),
                           np.asarray(time_step.discount, np.float32),
                           observation)

  def reset(self) -> dm_env.TimeStep:
    if self._state is not None and self._last_step_type == api.StepType.LAST:
      # The env's own automatic reset (the action is ignored).
      self._state, time_step = self._step_fn(self._state, np.int32(0))
    else:
      self._key, reset_key = jax.random.split(self._key)
      self._state, time_step = self._reset_fn(reset_key)
    return self._to_dm_env(time_step)

  def step(self, action) -> dm_env.TimeStep:
    if self._state is None:
      return self.reset()
    action = np.asarray(action, np.int32)
    if action.shape or not 0 <= int(action) < self._env.num_actions:
      raise ValueError(f"action must be a scalar in [0, "
                       f"{self._env.num_actions}), got {action!r}")
    self._state, time_step = self._step_fn(self._state, action)
    return self._to_dm_env(time_step)

  def observation_spec(self) -> specs.Array:
    return self._env.observation_spec()

  def action_spec(self) -> specs.DiscreteArray:
    return self._env.action_spec()

  def reward_spec(self) -> specs.Array:
    return specs.Array((), np.float32, name="reward")

  def discount_spec(self) -> specs.BoundedArray:
    return specs.BoundedArray((), np.float32, 0.0, 1.0, name="discount")


def _flat_size(spec) -> int:
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(spec))


class BatchedHostEnv:
  """B Python `dm_env.Environment`s stepped together, with `envs.api` semantics.

  `reset()` resets all of them; `step(actions)` steps each env, except that an
  env whose previous time step was LAST is reset instead (its action ignored),
  which returns its FIRST time step, as the JAX envs do. Observations (any
  nest of arrays) are flattened to float32 and concatenated in `jax.tree`
  order; rewards and discounts are 0 and 1 on FIRST.

  If `append_previous_action_and_reward` is set, the observation is extended
  with the one-hot previous action and the previous reward (zeros on FIRST),
  the `envs.api` convention, for envs that do not provide them (JAX envs wrapped
  by `JaxToDmEnv` already do).
  """

  def __init__(self,
               envs: Union[dm_env.Environment, Sequence[dm_env.Environment]],
               append_previous_action_and_reward: bool = False):
    if isinstance(envs, dm_env.Environment):
      envs = [envs]
    envs = list(envs)
    if not envs:
      raise ValueError("envs must contain at least one dm_env.Environment")
    action_spec = envs[0].action_spec()
    if not isinstance(action_spec, specs.DiscreteArray):
      raise ValueError("envs must have a single discrete action "
                       f"(specs.DiscreteArray), got {action_spec!r}")
    observation_spec = envs[0].observation_spec()
    for i, env in enumerate(envs[1:], start=1):
      if env.action_spec() != action_spec:
        raise ValueError(f"envs[{i}] has action spec {env.action_spec()!r}, "
                         f"envs[0] has {action_spec!r}")
      if (jax.tree.structure(env.observation_spec()) !=
          jax.tree.structure(observation_spec) or
          not all(a == b for a, b in zip(jax.tree.leaves(env.observation_spec()),
                                         jax.tree.leaves(observation_spec)))):
        raise ValueError(f"envs[{i}] has observation spec "
                         f"{env.observation_spec()!r}, envs[0] has "
                         f"{observation_spec!r}")
    self._envs = envs
    self._num_actions = int(action_spec.num_values)
    self._append_tail = append_previous_action_and_reward
    self._observation_size = _flat_size(observation_spec) + (
        self._num_actions + 1 if self._append_tail else 0)
    self._last = np.zeros((len(envs),), bool)
    self._started = False

  @property
  def batch_size(self) -> int:
    return len(self._envs)

  @property
  def num_actions(self) -> int:
    return self._num_actions

  @property
  def observation_size(self) -> int:
    return self._observation_size

  def _convert(self, time_steps: Sequence[dm_env.TimeStep],
               actions: np.ndarray) -> api.TimeStep:
    step_type = np.array([int(ts.step_type) for ts in time_steps], np.int32)
    first = step_type == api.StepType.FIRST
    reward = np.array([0.0 if ts.reward is None else ts.reward
                       for ts in time_steps], np.float32)
    discount = np.array([1.0 if ts.discount is None else ts.discount
                         for ts in time_steps], np.float32)
    reward[first], discount[first] = 0.0, 1.0
    observation = np.stack([
        np.concatenate([np.asarray(x, np.float32).ravel()
                        for x in jax.tree.leaves(ts.observation)])
        for ts in time_steps
    ])
    if self._append_tail:
      one_hot = np.zeros((len(time_steps), self._num_actions), np.float32)
      one_hot[np.arange(len(time_steps)), actions] = 1.0
      one_hot[first] = 0.0
      observation = np.concatenate([observation, one_hot, reward[:, None]],
                                   axis=1)
    self._last = step_type == api.StepType.LAST
    return api.TimeStep(step_type, reward, discount, observation)

  def reset(self) -> api.TimeStep:
    """Resets every env. Returns a batched FIRST time step ([B], [B, O])."""
    self._started = True
    return self._convert([env.reset() for env in self._envs],
                         np.zeros((self.batch_size,), np.int32))

  def step(self, actions: np.ndarray) -> api.TimeStep:
    """Steps every env (resetting those whose previous step was LAST).

    Args:
      actions: int [B] in [0, num_actions).
    Returns:
      The batched time step: step_type int32 [B], reward and discount float32
      [B], observation float32 [B, observation_size].
    """
    actions = np.asarray(actions)
    if actions.shape != (self.batch_size,):
      raise ValueError(f"actions must have shape ({self.batch_size},), got "
                       f"{actions.shape}")
    if not np.issubdtype(actions.dtype, np.integer):
      raise ValueError(f"actions must be integers, got dtype {actions.dtype}")
    if np.any((actions < 0) | (actions >= self._num_actions)):
      raise ValueError(f"actions must be in [0, {self._num_actions}), got "
                       f"{actions}")
    if not self._started:
      return self.reset()
    time_steps = [
        env.reset() if last else env.step(action)
        for env, action, last in zip(self._envs, actions, self._last)
    ]
    return self._convert(time_steps, actions)
