"""Meta-Fetch: discover a hidden fetch order by trial and error, then repeat it."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from envs import _util
from envs import api

Array = jax.Array

# Cell types of the view: wall, floor, then one per object (2 + k = object k).
WALL, FLOOR = 0, 1
# Actions: row/column deltas of N, E, S, W.
MOVES = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]], np.int32)


def _random_permutation(key: Array, n: int) -> Array:
  """int32 [n], a uniform random permutation of range(n) (via top_k, not sort)."""
  _, permutation = jax.lax.top_k(jax.random.uniform(key, (n,)), n)
  return permutation.astype(jnp.int32)


class MetaFetchState(NamedTuple):
  """State of one Meta-Fetch episode (documented fields may be read by tests).

  key:             uint32 [2], raw PRNG key.
  step_count:      int32 [], actions taken in this episode.
  agent_position:  int32 [2], (row, column) in [0, size).
  object_positions: int32 [K, 2], (row, column) of each object this round.
  order:           int32 [K], order[i] is the object to fetch i-th (a
                   permutation of range(K), fixed for the episode).
  collected:       bool [K], objects fetched (removed) in the current round.
  progress:        int32 [], objects fetched in order so far this round.
  rounds_completed: int32 [], full rounds fetched this episode.
  last_action:     int32 [], previous action (-1 on FIRST).
  last_reward:     float32 [], previous reward.
  is_last:         bool [], whether the time step just returned was LAST.
  """
  key: Array
  step_count: Array
  agent_position: Array
  object_positions: Array
  order: Array
  collected: Array
  progress: Array
  rounds_completed: Array
  last_action: Array
  last_reward: Array
  is_last: Array


@dataclasses.dataclass(frozen=True)
class MetaFetch(api.Environment):
  """An open `size x size` room with K objects to fetch in a hidden order.

  At reset the agent and the K distinct objects occupy distinct random cells
  and a random fetch order (a permutation of the objects) is drawn; it stays
  fixed for the whole episode. An object is touched when the agent moves onto
  its cell (bumping into the room's wall while standing on one touches
  nothing). Touching the next object of the order gives +1 and removes it;
  touching any other present object gives -wrong_object_penalty and resets the
  round (all of the round's objects reappear where they were, progress back to
  0). When all K are fetched, a new round starts: the objects are placed at new
  distinct random cells other than the agent's, and the same order must be
  fetched again. The episode is only ever truncated, after time_limit steps
  (LAST, discount 1).

  Example, size 5 (A = agent, 0..K-1 = objects):

      . . . 1 .
      . A . . .
      . . . . 0
      2 . . . .
      . . . . .

  Actions: 0 = N, 1 = E, 2 = S, 3 = W (moving out of the room keeps position).

  Observation (float32, size V * V * (K + 2) + 4 + 1; 5 * 5 * 5 + 5 = 130 with
  the defaults): [egocentric V x V view centred on the agent, row-major, one-hot
  over (wall, floor, object 0, ..., object K-1) per cell (cells outside the room
  are walls; the agent's own cell shows what lies under it); previous action
  one-hot (4); previous reward (1)].

  success: at least one full round was fetched in the episode.

  Attributes:
    size: room side N, >= 2.
    num_objects: K, in [1, N * N - 1].
    view_size: side V of the egocentric view, odd, >= 1.
    time_limit: episode length in steps, >= 1.
    wrong_object_penalty: reward subtracted on touching a wrong object, >= 0.
  """
  size: int = 5
  num_objects: int = 3
  view_size: int = 5
  time_limit: int = 100
  wrong_object_penalty: float = 0.0

  def __post_init__(self):
    if self.size < 2:
      raise ValueError(f"size must be >= 2, got {self.size}")
    if self.num_objects < 1:
      raise ValueError(f"num_objects must be >= 1, got {self.num_objects}")
    if self.num_objects > self.size * self.size - 1:
      raise ValueError(
          f"num_objects must be <= size * size - 1 = {self.size**2 - 1} "
          f"(more objects than free cells), got {self.num_objects}")
    if self.view_size < 1 or self.view_size % 2 == 0:
      raise ValueError(f"view_size must be odd and >= 1, got {self.view_size}")
    if self.time_limit < 1:
      raise ValueError(f"time_limit must be >= 1, got {self.time_limit}")
    if not self.wrong_object_penalty >= 0:
      raise ValueError("wrong_object_penalty must be >= 0, got "
                       f"{self.wrong_object_penalty}")

  @property
  def num_actions(self) -> int:
    return len(MOVES)

  @property
  def num_cell_types(self) -> int:
    return self.num_objects + 2

  @property
  def observation_size(self) -> int:
    return (self.view_size**2 * self.num_cell_types + self.num_actions + 1)

  def cell_grid(self, state: MetaFetchState) -> Array:
    """int32 [N, N] cell types: FLOOR, or 2 + k where object k is present."""
    grid = jnp.full((self.size, self.size), FLOOR, jnp.int32)
    # Collected objects are written off-grid, where `mode="drop"` discards them.
    rows = jnp.where(state.collected, self.size, state.object_positions[:, 0])
    return grid.at[rows, state.object_positions[:, 1]].set(
        2 + jnp.arange(self.num_objects, dtype=jnp.int32), mode="drop")

  def _observation(self, state: MetaFetchState) -> Array:
    view = _util.egocentric_one_hot_view(self.cell_grid(state),
                                         state.agent_position, self.view_size,
                                         self.num_cell_types, WALL)
    return jnp.concatenate([
        view,
        api.previous_action_and_reward(self.num_actions, state.last_action,
                                       state.last_reward)
    ])

  def _place_objects(self, key: Array, agent_position: Array) -> Array:
    """int32 [K, 2] distinct random cells, none of them the agent's."""
    scores = jax.random.uniform(key, (self.size * self.size,))
    agent_cell = agent_position[0] * self.size + agent_position[1]
    # The K highest uniform scores are a uniform random K-subset; the agent's
    # cell, scored -1, is never among them. (top_k is much faster than a sort
    # on CPU.)
    _, cells = jax.lax.top_k(scores.at[agent_cell].set(-1.0), self.num_objects)
    return jnp.stack([cells // self.size, cells % self.size], axis=-1).astype(
        jnp.int32)

  def reset(self, key: Array) -> Tuple[MetaFetchState, api.TimeStep]:
    key, agent_key, objects_key, order_key = jax.random.split(
        _util.as_raw_key(key), 4)
    agent_cell = jax.random.randint(agent_key, (), 0, self.size * self.size)
    agent_position = jnp.stack([agent_cell // self.size,
                                agent_cell % self.size]).astype(jnp.int32)
    state = MetaFetchState(
        key=key,
        step_count=jnp.int32(0),
        agent_position=agent_position,
        object_positions=self._place_objects(objects_key, agent_position),
        order=_random_permutation(order_key, self.num_objects),
        collected=jnp.zeros((self.num_objects,), jnp.bool_),
        progress=jnp.int32(0),
        rounds_completed=jnp.int32(0),
        last_action=jnp.int32(-1),
        last_reward=jnp.float32(0.0),
        is_last=jnp.bool_(False))
    return state, _util.time_step(api.StepType.FIRST, 0.0, 1.0,
                                  self._observation(state))

  def _transition(self, state: MetaFetchState,
                  action: Array) -> Tuple[MetaFetchState, api.TimeStep]:
    key, respawn_key = jax.random.split(state.key)
    target = state.agent_position + jnp.asarray(MOVES)[action]
    moved = jnp.all((target >= 0) & (target < self.size))
    position = jnp.where(moved, target, state.agent_position)

    # touched[k]: the agent entered the cell of object k, still present.
    touched = (moved & ~state.collected &
               jnp.all(state.object_positions == position, axis=-1))
    next_object = state.order[jnp.minimum(state.progress, self.num_objects - 1)]
    is_next = jnp.arange(self.num_objects) == next_object
    fetched = jnp.any(touched & is_next)
    wrong = jnp.any(touched & ~is_next)

    collected = jnp.where(wrong, False, state.collected | (touched & is_next))
    progress = jnp.where(wrong, 0, state.progress + fetched)
    round_done = progress == self.num_objects
    new_positions = self._place_objects(respawn_key, position)
    reward = (fetched.astype(jnp.float32) -
              wrong.astype(jnp.float32) * self.wrong_object_penalty)
    step_count = state.step_count + 1
    is_last = step_count >= self.time_limit
    state = state._replace(
        key=key,
        step_count=step_count,
        agent_position=position,
        object_positions=jnp.where(round_done, new_positions,
                                   state.object_positions),
        collected=collected & ~round_done,
        progress=jnp.where(round_done, 0, progress).astype(jnp.int32),
        rounds_completed=state.rounds_completed + round_done,
        last_action=action,
        last_reward=reward,
        is_last=is_last)
    step_type = jnp.where(is_last, api.StepType.LAST, api.StepType.MID)
    return state, _util.time_step(step_type, reward, 1.0,
                                  self._observation(state))

  def step(self, state: MetaFetchState,
           action: Array) -> Tuple[MetaFetchState, api.TimeStep]:
    return _util.auto_reset_step(self.reset, self._transition, state, action)

  def success(self, state: MetaFetchState) -> Array:
    return state.rounds_completed >= 1

  def render(self, state: MetaFetchState) -> str:
    grid = np.asarray(self.cell_grid(state))
    symbols = "0123456789abcdefghijklmnopqrstuvwxyz"
    rows = [[
        "." if c == FLOOR else
        (symbols[c - 2] if c - 2 < len(symbols) else "*") for c in row
    ] for row in grid]
    row, column = (int(x) for x in state.agent_position)
    rows[row][column] = "@"
    order = " ".join(str(int(k)) for k in state.order)
    header = (f"Meta-Fetch t={int(state.step_count)}/{self.time_limit} "
              f"order=[{order}] progress={int(state.progress)} "
              f"rounds={int(state.rounds_completed)} "
              f"last reward {float(state.last_reward):+.2f}")
    border = "+" + "-" * self.size + "+"
    return "\n".join([header, border] + ["|" + "".join(r) + "|" for r in rows] +
                     [border])
