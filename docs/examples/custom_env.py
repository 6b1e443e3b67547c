r"""A user's own environment for ald_jax: a T-maze memory task.

Written only against the public API (`envs.api`; see docs/environments.md).
Train on it from the repository root, which makes `docs.examples` importable:

    python experiments/run.py --env=docs.examples.custom_env:make_env \
        --env_args=corridor_length=3,time_limit=12 --agent=lstm \
        --total_env_steps=100000 --logdir=runs/tmaze_lstm
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp

from envs import api

Array = jax.Array

FORWARD, UP, DOWN = 0, 1, 2  # Actions.
NUM_CUES = 2                  # Cue 0: the UP arm is rewarded; cue 1: DOWN.


class TMazeState(NamedTuple):
  """State of one T-maze episode.

  key:         uint32 [2], raw PRNG key (raw so that checkpoints serialise it).
  step_count:  int32 [], actions taken in this episode (0 on FIRST).
  position:    int32 [], cell of the corridor in [0, corridor_length].
  cue:         int32 [], 0 or 1, drawn at reset.
  solved:      bool [], whether the rewarded arm was entered.
  last_action: int32 [], previous action (-1 on FIRST).
  last_reward: float32 [], previous reward.
  is_last:     bool [], whether the time step just returned was LAST.
  """
  key: Array
  step_count: Array
  position: Array
  cue: Array
  solved: Array
  last_action: Array
  last_reward: Array
  is_last: Array


def _require_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class TMaze(api.Environment):
  """A corridor with a cue at its start and a junction at its end.

  The agent starts at cell 0 of a corridor of corridor_length + 1 cells; the
  cue (one-hot) is visible only there. FORWARD moves one cell on (staying put
  at the junction, the last cell); UP and DOWN do nothing inside the corridor.
  At the junction, UP or DOWN enters an arm and terminates (LAST, discount 0)
  with reward +1 if the arm matches the cue, else 0. After time_limit actions
  without entering an arm the episode is truncated (LAST, discount 1, reward 0).

  Actions: 0 = FORWARD, 1 = UP, 2 = DOWN.
  Observation (float32 [7]): [cue one-hot (2), zero away from cell 0;
    junction flag (1); previous action one-hot (3); previous reward (1)].
  success: the rewarded arm was entered.

  Attributes:
    corridor_length: L, FORWARD moves from the start to the junction, >= 1.
    time_limit: actions per episode before truncation, >= L + 1 (the
      shortest solution).
  """
  corridor_length: int = 4
  time_limit: int = 20

  def __post_init__(self):
    _require_int("corridor_length", self.corridor_length, 1)
    _require_int("time_limit", self.time_limit, self.corridor_length + 1)

  @property
  def num_actions(self) -> int:
    return 3

  @property
  def observation_size(self) -> int:
    return NUM_CUES + 1 + self.num_actions + 1

  def _observation(self, state: TMazeState) -> Array:
    at_start = (state.position == 0).astype(jnp.float32)
    at_junction = (state.position == self.corridor_length).astype(jnp.float32)
    return jnp.concatenate([
        jax.nn.one_hot(state.cue, NUM_CUES, dtype=jnp.float32) * at_start,
        at_junction[None],
        api.previous_action_and_reward(self.num_actions, state.last_action,
                                       state.last_reward),
    ])

  def _time_step(self, state: TMazeState, step_type: Array,
                 discount: Array) -> api.TimeStep:
    return api.TimeStep(step_type=jnp.asarray(step_type, jnp.int32),
                        reward=state.last_reward,
                        discount=jnp.asarray(discount, jnp.float32),
                        observation=self._observation(state))

  def reset(self, key: Array) -> Tuple[TMazeState, api.TimeStep]:
    """key: a raw uint32 [2] `jax.random.PRNGKey` (typed keys are accepted)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    key, cue_key = jax.random.split(key)
    state = TMazeState(
        key=key, step_count=jnp.int32(0), position=jnp.int32(0),
        cue=jax.random.randint(cue_key, (), 0, NUM_CUES, jnp.int32),
        solved=jnp.bool_(False), last_action=jnp.int32(-1),
        last_reward=jnp.float32(0.0), is_last=jnp.bool_(False))
    return state, self._time_step(state, api.StepType.FIRST, 1.0)

  def _transition(self, state: TMazeState,
                  action: Array) -> Tuple[TMazeState, api.TimeStep]:
    at_junction = state.position == self.corridor_length
    entered_arm = at_junction & ((action == UP) | (action == DOWN))
    solved = entered_arm & (action == UP + state.cue)
    step_count = state.step_count + 1
    truncated = ~entered_arm & (step_count >= self.time_limit)
    state = state._replace(
        step_count=step_count,
        position=jnp.minimum(state.position + (action == FORWARD),
                             self.corridor_length).astype(jnp.int32),
        solved=solved, last_action=action,
        last_reward=solved.astype(jnp.float32),
        is_last=entered_arm | truncated)
    step_type = jnp.where(state.is_last, api.StepType.LAST, api.StepType.MID)
    return state, self._time_step(state, step_type,
                                  jnp.where(entered_arm, 0.0, 1.0))

  def step(self, state: TMazeState,
           action: Array) -> Tuple[TMazeState, api.TimeStep]:
    """One step; after LAST, a new episode's FIRST (the action is ignored)."""
    chex.assert_rank(action, 0)
    key, reset_key = jax.random.split(state.key)
    after_reset = self.reset(reset_key)
    after_step = self._transition(state._replace(key=key),
                                  jnp.asarray(action, jnp.int32))
    # Both branches are computed and one is selected, so step stays a pure
    # array function that vmaps (a lax.cond would become a select anyway).
    return jax.tree.map(lambda r, s: jnp.where(state.is_last, r, s),
                        after_reset, after_step)

  def success(self, state: TMazeState) -> Array:
    return state.solved

  def render(self, state: TMazeState) -> str:
    cells = ["."] * (self.corridor_length + 1)
    cells[int(state.position)] = "@"
    arm = "UP" if int(state.cue) == 0 else "DOWN"
    return (f"T-maze t={int(state.step_count)}/{self.time_limit} "
            f"cue={arm}\n{''.join(cells)}+")


def make_env(**kwargs: Any) -> TMaze:
  """The factory named by `--env=docs.examples.custom_env:make_env`.

  Args:
    **kwargs: TMaze fields (corridor_length, time_limit); `--env_args` passes
      them as parsed ints.
  Returns:
    The environment.
  Raises:
    ValueError: an invalid value, naming the parameter.
    TypeError: an unknown parameter.
  """
  return TMaze(**kwargs)
