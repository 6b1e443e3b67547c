"""The functional environment API shared by every ald_jax environment.

An environment is an immutable (hashable) Python object holding its parameters.
Its methods are pure functions of arrays, so they can be `jax.jit`-ed,
`jax.vmap`-ed over a batch of environments and used inside `lax.scan`:

    env = IMaze(corridor_length=4)
    state, ts = env.reset(jax.random.key(0))       # ts.step_type == FIRST
    state, ts = env.step(state, jnp.int32(2))      # MID or LAST

Conventions (those of `dm_env`, so that truncation is handled correctly):

* `TimeStep.reward` and `TimeStep.discount` describe the transition that led to
  this time step; on FIRST they are 0 and 1.
* Termination: LAST with discount 0. Time-limit truncation: LAST with discount 1
  (the learner bootstraps from the value of the LAST observation).
* Automatic reset: calling `step` on a state whose last time step was LAST starts
  a new episode (with fresh randomness drawn from the state's key) and returns its
  FIRST time step; the action is ignored. A `lax.scan` over many episodes needs no
  special handling.
* Observations are flat float32 vectors of size `observation_size`. They always
  end with the one-hot previous action (`num_actions` entries, zero on FIRST)
  followed by the previous reward (one entry, 0 on FIRST).
* `success(state)` tells, at a LAST time step, whether the episode counts as
  solved (the env documents what that means); it is used for success rates.
"""
from __future__ import annotations

import abc
from typing import Any, NamedTuple, Tuple

import dm_env
import jax
import jax.numpy as jnp
import numpy as np
from dm_env import specs

Array = jax.Array
EnvState = Any  # a pytree of arrays, env-specific


class StepType:
  """Integer codes of `TimeStep.step_type` (the values of `dm_env.StepType`)."""
  FIRST = int(dm_env.StepType.FIRST)  # 0
  MID = int(dm_env.StepType.MID)      # 1
  LAST = int(dm_env.StepType.LAST)    # 2


class TimeStep(NamedTuple):
  """One time step. Shapes are for one env; a batch adds leading axes.

  step_type:   int32 [], one of StepType.
  reward:      float32 [], reward of the transition into this step (0 on FIRST).
  discount:    float32 [], 0 on termination, 1 otherwise (incl. truncation).
  observation: float32 [observation_size].
  """
  step_type: Array
  reward: Array
  discount: Array
  observation: Array

  def first(self) -> Array:
    return self.step_type == StepType.FIRST

  def last(self) -> Array:
    return self.step_type == StepType.LAST


class Environment(abc.ABC):
  """Base class of the pure-JAX environments (see the module docstring).

  Subclasses are frozen dataclasses (hashable, usable as static arguments),
  validate every constructor argument (raising ValueError naming the parameter)
  and implement `reset`, `step`, `success`, `render`, `num_actions` and
  `observation_size`. A user's own environment needs only follow this API
  (subclassing is optional: duck typing is enough).
  """

  @property
  @abc.abstractmethod
  def num_actions(self) -> int:
    """Number of discrete actions."""

  @property
  @abc.abstractmethod
  def observation_size(self) -> int:
    """Length of the flat float32 observation vector."""

  @abc.abstractmethod
  def reset(self, key: Array) -> Tuple[EnvState, TimeStep]:
    """Starts an episode. Returns (state, FIRST time step)."""

  @abc.abstractmethod
  def step(self, state: EnvState, action: Array) -> Tuple[EnvState, TimeStep]:
    """Advances one step (auto-resets after LAST). `action`: int32 []."""

  @abc.abstractmethod
  def success(self, state: EnvState) -> Array:
    """bool []: whether the episode that just ended counts as solved."""

  @abc.abstractmethod
  def render(self, state: EnvState) -> str:
    """A multi-line text picture of one (un-batched) state."""

  def observation_spec(self) -> specs.Array:
    return specs.Array((self.observation_size,), np.float32, name="observation")

  def action_spec(self) -> specs.DiscreteArray:
    return specs.DiscreteArray(self.num_actions, dtype=np.int32, name="action")


def previous_action_and_reward(num_actions: int, action: Array,
                               reward: Array) -> Array:
  """The observation tail: one-hot previous action then previous reward.

  Args:
    num_actions: A.
    action: int32 [], or -1 for "none" (FIRST), which encodes as all zeros.
    reward: float32 [].
  Returns:
    float32 [A + 1].
  """
  one_hot = jax.nn.one_hot(action, num_actions, dtype=jnp.float32)
  return jnp.concatenate([one_hot, jnp.reshape(reward, (1,)).astype(jnp.float32)])
