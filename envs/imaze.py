"""I-Maze: carry a colour cue down a corridor (after Oh et al. 2016)."""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from envs import _util
from envs import api

Array = jax.Array

# Cell types (the one-hot channels of the view).
WALL, FLOOR, GOAL_A, GOAL_B = 0, 1, 2, 3
NUM_CELL_TYPES = 4
# Actions: row/column deltas of N, E, S, W.
MOVES = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]], np.int32)
VIEW_SIZE = 3
NUM_CUES = 2


class IMazeState(NamedTuple):
  """State of one I-Maze episode (documented fields may be read by tests).

  key:         uint32 [2], raw PRNG key.
  step_count:  int32 [], actions taken in this episode.
  position:    int32 [2], agent (row, column) in the grid (see the diagram).
  cue:         int32 [], 0: goal A is rewarded, 1: goal B is rewarded.
  last_action: int32 [], previous action (-1 on FIRST).
  last_reward: float32 [], previous reward.
  is_last:     bool [], whether the time step just returned was LAST.
  """
  key: Array
  step_count: Array
  position: Array
  cue: Array
  last_action: Array
  last_reward: Array
  is_last: Array


@dataclasses.dataclass(frozen=True)
class IMaze(api.Environment):
  """I-shaped maze with a cue visible only in the top row.

  Geometry for corridor_length L = 2 (grid of (L + 4) rows x 5 columns, the
  outer ring is wall; (row, column) coordinates):

      #####     row 0
      #.S.#     row 1: top row; the agent starts at S = (1, 2); cue visible here
      ##.##     rows 2 .. L + 1: the corridor (column 2)
      ##.##
      #A.B#     row L + 2: goal A at (L + 2, 1), goal B at (L + 2, 3)
      #####     row L + 3

  Each episode draws a cue in {A, B} uniformly. Entering the goal of the cue's
  colour gives +1, the other goal -1; either terminates (discount 0). Every
  other step gives -step_penalty. The shortest path to a goal is L + 2 steps
  (L + 1 south, then one east or west); after time_limit =
  ceil(time_limit_factor * (L + 2)) steps without reaching a goal the episode is
  truncated (LAST, discount 1). Moving into a wall keeps the agent in place.

  Actions: 0 = N, 1 = E, 2 = S, 3 = W.

  Observation (float32, size 3 * 3 * 4 + 2 + 4 + 1 = 43):
    [egocentric 3x3 view centred on the agent, row-major, one-hot over
    (wall, floor, goal A, goal B) per cell (36); cue one-hot (A, B), all zero
    unless the agent is in the top row (2); previous action one-hot (4);
    previous reward (1)].

  success: the episode ended on the goal matching the cue.

  Attributes:
    corridor_length: L, number of corridor cells, >= 1.
    step_penalty: reward subtracted on every non-goal step, >= 0.
    time_limit_factor: time limit in multiples of the shortest path, >= 1.
  """
  corridor_length: int = 4
  step_penalty: float = 0.01
  time_limit_factor: float = 3.0

  def __post_init__(self):
    if self.corridor_length < 1:
      raise ValueError(
          f"corridor_length must be >= 1, got {self.corridor_length}")
    if not self.step_penalty >= 0:
      raise ValueError(f"step_penalty must be >= 0, got {self.step_penalty}")
    if not self.time_limit_factor >= 1:
      raise ValueError("time_limit_factor must be >= 1 (so that a goal is "
                       f"reachable in time), got {self.time_limit_factor}")

  @property
  def num_actions(self) -> int:
    return len(MOVES)

  @property
  def observation_size(self) -> int:
    return (VIEW_SIZE * VIEW_SIZE * NUM_CELL_TYPES + NUM_CUES +
            self.num_actions + 1)

  @property
  def shortest_path_length(self) -> int:
    return self.corridor_length + 2

  @property
  def time_limit(self) -> int:
    return math.ceil(self.time_limit_factor * self.shortest_path_length)

  @property
  def start_position(self) -> Tuple[int, int]:
    return (1, 2)

  @property
  def goal_positions(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(row, column) of goal A and goal B."""
    bottom = self.corridor_length + 2
    return ((bottom, 1), (bottom, 3))

  def grid(self) -> np.ndarray:
    """int32 [L + 4, 5] cell types of the maze."""
    grid = np.full((self.corridor_length + 4, 5), WALL, np.int32)
    grid[1, 1:4] = FLOOR
    grid[2:self.corridor_length + 2, 2] = FLOOR
    bottom = self.corridor_length + 2
    grid[bottom, 2] = FLOOR
    grid[self.goal_positions[0]] = GOAL_A
    grid[self.goal_positions[1]] = GOAL_B
    return grid

  def _observation(self, state: IMazeState) -> Array:
    view = _util.egocentric_one_hot_view(
        jnp.asarray(self.grid()), state.position, VIEW_SIZE, NUM_CELL_TYPES,
        WALL)
    in_top_row = state.position[0] == 1
    cue = jax.nn.one_hot(state.cue, NUM_CUES, dtype=jnp.float32) * in_top_row
    return jnp.concatenate([
        view, cue,
        api.previous_action_and_reward(self.num_actions, state.last_action,
                                       state.last_reward)
    ])

  def reset(self, key: Array) -> Tuple[IMazeState, api.TimeStep]:
    key, cue_key = jax.random.split(_util.as_raw_key(key))
    state = IMazeState(
        key=key,
        step_count=jnp.int32(0),
        position=jnp.asarray(self.start_position, jnp.int32),
        cue=jax.random.randint(cue_key, (), 0, NUM_CUES, jnp.int32),
        last_action=jnp.int32(-1),
        last_reward=jnp.float32(0.0),
        is_last=jnp.bool_(False))
    return state, _util.time_step(api.StepType.FIRST, 0.0, 1.0,
                                  self._observation(state))

  def _transition(self, state: IMazeState,
                  action: Array) -> Tuple[IMazeState, api.TimeStep]:
    grid = jnp.asarray(self.grid())
    target = state.position + jnp.asarray(MOVES)[action]
    position = jnp.where(grid[target[0], target[1]] == WALL, state.position,
                         target)
    cell = grid[position[0], position[1]]
    at_goal = (cell == GOAL_A) | (cell == GOAL_B)
    at_cued_goal = cell == GOAL_A + state.cue
    reward = jnp.where(at_goal, jnp.where(at_cued_goal, 1.0, -1.0),
                       -self.step_penalty).astype(jnp.float32)
    step_count = state.step_count + 1
    truncated = ~at_goal & (step_count >= self.time_limit)
    is_last = at_goal | truncated
    state = state._replace(
        step_count=step_count,
        position=position,
        last_action=action,
        last_reward=reward,
        is_last=is_last)
    step_type = jnp.where(is_last, api.StepType.LAST, api.StepType.MID)
    discount = jnp.where(at_goal, 0.0, 1.0)
    return state, _util.time_step(step_type, reward, discount,
                                  self._observation(state))

  def step(self, state: IMazeState,
           action: Array) -> Tuple[IMazeState, api.TimeStep]:
    return _util.auto_reset_step(self.reset, self._transition, state, action)

  def success(self, state: IMazeState) -> Array:
    cued_goal = jnp.asarray(self.goal_positions, jnp.int32)[state.cue]
    return state.is_last & jnp.all(state.position == cued_goal)

  def render(self, state: IMazeState) -> str:
    symbols = {WALL: "#", FLOOR: ".", GOAL_A: "A", GOAL_B: "B"}
    rows = [[symbols[int(c)] for c in row] for row in self.grid()]
    row, column = (int(x) for x in state.position)
    rows[row][column] = "@"
    cue = "AB"[int(state.cue)]
    cue_note = "visible" if row == 1 else "hidden"
    header = (f"I-Maze t={int(state.step_count)}/{self.time_limit} "
              f"cue={cue} ({cue_note}) last reward "
              f"{float(state.last_reward):+.2f}")
    return "\n".join([header] + ["".join(r) for r in rows])
