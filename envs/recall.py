"""Recall: remember a cue over a short delay (a tiny memory task)."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from envs import _util
from envs import api

Array = jax.Array


class RecallState(NamedTuple):
  """State of one Recall episode (documented fields may be read by tests).

  key:         uint32 [2], raw PRNG key for the next episode.
  step_count:  int32 [], actions taken in this episode (0 on FIRST).
  cue:         int32 [], the cue shown on FIRST, in [0, num_cues).
  answered_correctly: bool [], whether the query was answered with the cue.
  last_action: int32 [], previous action (-1 on FIRST).
  last_reward: float32 [], previous reward.
  is_last:     bool [], whether the time step just returned was LAST.
  """
  key: Array
  step_count: Array
  cue: Array
  answered_correctly: Array
  last_action: Array
  last_reward: Array
  is_last: Array


@dataclasses.dataclass(frozen=True)
class Recall(api.Environment):
  """Show a cue, wait `delay` steps, then ask for it.

  Time line of an episode (t = number of actions taken so far):

    t = 0            FIRST, observation shows the cue (one-hot of num_cues).
    t = 1 .. delay   blank observations; actions have no effect, reward 0.
    t = delay + 1    the query: the observation's query flag is 1.
    t = delay + 2    LAST (discount 0): reward +1 if the action taken on the
                     query step equals the cue, else 0.

  Observation (float32, size 2 * num_cues + 2):
    [cue one-hot (num_cues), query flag (1), previous action one-hot
    (num_cues), previous reward (1)].

  Actions: num_cues answers (only the answer on the query step matters).
  success: the query was answered correctly.

  Attributes:
    num_cues: number of distinct cues (and actions), >= 2.
    delay: number of blank steps between cue and query, >= 0.
  """
  num_cues: int = 2
  delay: int = 4

  def __post_init__(self):
    if self.num_cues < 2:
      raise ValueError(f"num_cues must be >= 2, got {self.num_cues}")
    if self.delay < 0:
      raise ValueError(f"delay must be >= 0, got {self.delay}")

  @property
  def num_actions(self) -> int:
    return self.num_cues

  @property
  def observation_size(self) -> int:
    return 2 * self.num_cues + 2

  @property
  def query_step(self) -> int:
    """The step count at which the query is shown (delay + 1)."""
    return self.delay + 1

  def _observation(self, state: RecallState) -> Array:
    show_cue = state.step_count == 0
    cue = jax.nn.one_hot(state.cue, self.num_cues) * show_cue
    query = state.step_count == self.query_step
    return jnp.concatenate([
        cue.astype(jnp.float32),
        query.astype(jnp.float32)[None],
        api.previous_action_and_reward(self.num_actions, state.last_action,
                                       state.last_reward),
    ])

  def reset(self, key: Array) -> Tuple[RecallState, api.TimeStep]:
    key, cue_key = jax.random.split(_util.as_raw_key(key))
    state = RecallState(
        key=key,
        step_count=jnp.int32(0),
        cue=jax.random.randint(cue_key, (), 0, self.num_cues, jnp.int32),
        answered_correctly=jnp.bool_(False),
        last_action=jnp.int32(-1),
        last_reward=jnp.float32(0.0),
        is_last=jnp.bool_(False))
    return state, _util.time_step(api.StepType.FIRST, 0.0, 1.0,
                                  self._observation(state))

  def _transition(self, state: RecallState,
                  action: Array) -> Tuple[RecallState, api.TimeStep]:
    answering = state.step_count == self.query_step
    correct = answering & (action == state.cue)
    reward = correct.astype(jnp.float32)
    state = state._replace(
        step_count=state.step_count + 1,
        answered_correctly=correct,
        last_action=action,
        last_reward=reward,
        is_last=answering)
    step_type = jnp.where(answering, api.StepType.LAST, api.StepType.MID)
    discount = jnp.where(answering, 0.0, 1.0)
    return state, _util.time_step(step_type, reward, discount,
                                  self._observation(state))

  def step(self, state: RecallState,
           action: Array) -> Tuple[RecallState, api.TimeStep]:
    return _util.auto_reset_step(self.reset, self._transition, state, action)

  def success(self, state: RecallState) -> Array:
    return state.answered_correctly

  def render(self, state: RecallState) -> str:
    step_count = int(state.step_count)
    if step_count == 0:
      phase = f"cue: {int(state.cue)}"
    elif step_count <= self.delay:
      phase = f"delay {step_count}/{self.delay}"
    elif not bool(state.is_last):
      phase = "query: which cue?"
    else:
      verdict = "correct" if bool(state.answered_correctly) else "wrong"
      phase = (f"answered {int(state.last_action)} "
               f"({verdict}; cue {int(state.cue)})")
    return (f"Recall t={step_count}\n{phase}\n"
            f"last action {int(state.last_action)}, "
            f"last reward {float(state.last_reward):+.2f}")
