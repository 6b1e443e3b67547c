"""Broken and awkward environments for the reliability tests.

Each factory is reachable as `--env=tests.fault_envs:<factory>` (run.py puts
the repo root on sys.path). All wrap the Recall task.
"""
import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from envs.recall import Recall


@dataclasses.dataclass(frozen=True)
class _Wrapped:
  """Recall with hooks for breaking its outputs."""
  inner: Recall = Recall(delay=2)

  @property
  def num_actions(self):
    return self.inner.num_actions

  @property
  def observation_size(self):
    return self.inner.observation_size

  def reset(self, key):
    return self.inner.reset(key)

  def step(self, state, action):
    return self.inner.step(state, action)

  def success(self, state):
    return self.inner.success(state)

  def render(self, state):
    return self.inner.render(state)


class _Counted(NamedTuple):
  inner: Any
  steps: jnp.ndarray  # int32 [], env steps taken since the first reset


@dataclasses.dataclass(frozen=True)
class NanAfter(_Wrapped):
  """Rewards (and so observations) become NaN after `steps` env steps."""
  steps: int = 50

  def reset(self, key):
    state, ts = self.inner.reset(key)
    return _Counted(state, jnp.zeros((), jnp.int32)), ts

  def step(self, state, action):
    inner, ts = self.inner.step(state.inner, action)
    count = state.steps + jnp.ones((), jnp.int32)
    bad = count > self.steps
    ts = ts._replace(reward=jnp.where(bad, jnp.nan, ts.reward),
                     observation=jnp.where(bad, jnp.nan, ts.observation))
    return _Counted(inner, count), ts

  def success(self, state):
    return self.inner.success(state.inner)

  def render(self, state):
    return self.inner.render(state.inner)


def nan_after(steps: int = 50):
  return NanAfter(steps=steps)


@dataclasses.dataclass(frozen=True)
class WeakState(_Wrapped):
  """A step counter created weakly typed in reset (as gymnax-style code does):
  `jnp.array(0)` is weak, the counter after a step is not."""

  def reset(self, key):
    state, ts = self.inner.reset(key)
    return _Counted(state, jnp.array(0)), ts

  def step(self, state, action):
    inner, ts = self.inner.step(state.inner, action)
    return _Counted(inner, state.steps + jnp.ones((), jnp.int32)), ts

  def success(self, state):
    return self.inner.success(state.inner)

  def render(self, state):
    return self.inner.render(state.inner)


def weak_state():
  return WeakState()


def returns_none():
  return None


def not_an_env():
  return object()


@dataclasses.dataclass(frozen=True)
class _NoSuccess:
  inner: Recall = Recall(delay=2)
  num_actions: int = Recall(delay=2).num_actions
  observation_size: int = Recall(delay=2).observation_size

  def reset(self, key):
    return self.inner.reset(key)

  def step(self, state, action):
    return self.inner.step(state, action)


def no_success():
  return _NoSuccess()


@dataclasses.dataclass(frozen=True)
class _WrongObservationSize(_Wrapped):
  @property
  def observation_size(self):
    return self.inner.observation_size + 1


def wrong_observation_size():
  return _WrongObservationSize()


@dataclasses.dataclass(frozen=True)
class _IntObservations(_Wrapped):
  def reset(self, key):
    state, ts = self.inner.reset(key)
    return state, ts._replace(observation=ts.observation.astype(jnp.int32))

  def step(self, state, action):
    state, ts = self.inner.step(state, action)
    return state, ts._replace(observation=ts.observation.astype(jnp.int32))


def int_observations():
  return _IntObservations()


@dataclasses.dataclass(frozen=True)
class _HalfRewards(_Wrapped):
  def reset(self, key):
    state, ts = self.inner.reset(key)
    return state, ts._replace(reward=ts.reward.astype(jnp.float16))

  def step(self, state, action):
    state, ts = self.inner.step(state, action)
    return state, ts._replace(reward=ts.reward.astype(jnp.float16))


def half_rewards():
  return _HalfRewards()
