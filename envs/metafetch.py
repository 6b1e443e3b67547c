"""Meta-Fetch: discover a hidden fetch order by trial and error, then repeat it."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Tuple

import chex
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


# `_view` looks the empty room's view up in a table of this many entries at
# most (a 16 x 16 room with a 9 x 9 view and 10 objects), else computes it.
_MAX_EMPTY_VIEW_TABLE = 1 << 18


# Random draws. Each reset and each step makes two jax.random calls: a
# `split` for the next key and one `uniform` that supplies every draw it needs
# (on CPU each jax.random call is a small loop that XLA cannot fuse with the
# rest, and its cost grows with the numbers drawn, so few calls of few
# numbers). Each draw is an integer uniform in some [0, m); the distinct
# cells and the fetch order are decoded from such integers (a Lehmer code):
# 2K numbers a step, where ranking a random score per cell would take
# N * N + K.


def _below(u: Array, m: np.ndarray) -> Array:
  """int32, floor(u * m): uniform in [0, m) for `u` uniform in [0, 1).

  `jax.random.uniform` float32s are the 2^23 multiples of 2^-23 in [0, 1),
  equally likely, so each value's probability is 1 / m up to a relative bias
  below m / 2^22 (checked exhaustively for every m up to 300): under 1e-5
  for the 25 cells of a 5 x 5 room.
  """
  m = np.asarray(m)
  return jnp.minimum((u * m.astype(np.float32)).astype(jnp.int32),
                     (m - 1).astype(np.int32))


def _distinct(ranks: Array) -> Array:
  """int32 [k]: x[i] is the ranks[i]-th smallest value of range(M) not in x[:i].

  Decodes a Lehmer code: with independent ranks[i] uniform in [0, M - i), x
  is a uniform random sequence of k distinct values of range(M) (M = k: a
  uniform random permutation). In k - 1 vectorised steps, from the last
  value back: x[i + 1:] are ranks among the values other than x[:i + 1];
  putting x[i] back among them moves those at or above it up by one.
  """
  k = ranks.shape[0]
  later = jnp.arange(k)
  x = ranks
  for i in reversed(range(k - 1)):
    x = x + ((later > i) & (x >= x[i])).astype(jnp.int32)
  return x


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

  At reset the agent is put in a uniform random cell, the K objects in
  uniformly random distinct cells other than the agent's, and a fetch order
  is drawn, a uniform random permutation of the objects; it stays fixed for
  the whole episode. An object is touched when the agent moves onto its cell
  (bumping into the room's wall while standing on one touches nothing).
  Touching the next object of the order gives +1 and removes it; touching any
  other present object gives -wrong_object_penalty and resets the round (all
  of the round's objects reappear where they were, progress back to 0). When
  all K are fetched, a new round starts: the objects are placed at new
  uniformly random distinct cells other than the agent's, and the same order
  must be fetched again. The episode is only ever truncated, after
  time_limit steps (LAST, discount 1).

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

  Random draws: jax.random with the state's raw key, two calls per reset or
  step (a `split` and one `uniform` for all the draws; see `_draws`). Each
  draw is floor(u * m) of a float32 u of [0, 1): uniform on [0, m) up to a
  relative bias below m / 2^22 (under 1e-5 for the 25 cells of a 5 x 5
  room; see `_below`).

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

  def _view_layout(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (view row offset, view column offset, cell type) of each entry.

    int32 [V * V * (K + 2)] each, in the observation's row-major order.
    """
    entry = np.arange(self.view_size**2 * self.num_cell_types)
    cell, cell_type = np.divmod(entry, self.num_cell_types)
    row, column = np.divmod(cell, self.view_size)
    radius = self.view_size // 2
    return ((row - radius).astype(np.int32), (column - radius).astype(np.int32),
            cell_type.astype(np.int32))

  def _empty_views(self) -> np.ndarray:
    """bool [N * N, V * V * (K + 2)]: the one-hot view of the empty room
    (walls and floor only) from each agent cell (row-major)."""
    row_offset, column_offset, cell_type = self._view_layout()
    agent = np.arange(self.size * self.size)[:, None]
    rows = agent // self.size + row_offset
    columns = agent % self.size + column_offset
    in_room = ((rows >= 0) & (rows < self.size) & (columns >= 0) &
               (columns < self.size))
    return np.where(cell_type == WALL, ~in_room,
                    (cell_type == FLOOR) & in_room)

  def _view(self, agent_position: Array, object_positions: Array,
            collected: Array) -> Array:
    """bool [V * V * (K + 2)], the one-hot egocentric view (row-major).

    Computed flat, entry by entry, with few elementwise operations (a scatter
    into a grid, a gather of a window or a one-hot of an int view each turn
    into a slow per-element loop under vmap on CPU): the empty room's view
    from the agent's cell, then for each object present in the view, its
    entry set and the floor entry of its cell cleared.
    """
    num_entries = self.view_size**2 * self.num_cell_types
    if self.size**2 * num_entries <= _MAX_EMPTY_VIEW_TABLE:
      view = jnp.asarray(self._empty_views())[
          agent_position[0] * self.size + agent_position[1]]
    else:  # The same, computed rather than looked up.
      row_offset, column_offset, cell_type = self._view_layout()
      rows = agent_position[0] + row_offset
      columns = agent_position[1] + column_offset
      in_room = ((rows >= 0) & (rows < self.size) & (columns >= 0) &
                 (columns < self.size))
      view = jnp.where(cell_type == WALL, ~in_room,
                       (cell_type == FLOOR) & in_room)
    radius = self.view_size // 2
    relative = object_positions - agent_position + radius  # [K, 2]
    visible = ~collected & jnp.all((relative >= 0) &
                                   (relative < self.view_size), axis=-1)
    floor_entry = ((relative[:, 0] * self.view_size + relative[:, 1]) *
                   self.num_cell_types + FLOOR)
    # Out of view: an entry below 0, its object's too.
    floor_entry = jnp.where(visible, floor_entry, -self.num_cell_types)
    entry = jnp.arange(num_entries, dtype=jnp.int32)
    for k in range(self.num_objects):
      # Objects lie at distinct cells: at most one per view cell.
      view = ((view & (entry != floor_entry[k])) |
              (entry == floor_entry[k] + (2 + k - FLOOR)))
    return view

  def _observation(self, state: MetaFetchState) -> Array:
    return jnp.concatenate([
        self._view(state.agent_position, state.object_positions,
                   state.collected).astype(jnp.float32),
        api.previous_action_and_reward(self.num_actions, state.last_action,
                                       state.last_reward)
    ])

  def _draws(self, key: Array) -> Tuple[Array, Array, Array, Array]:
    """All the random draws of one reset or step (two jax.random calls).

    Returns:
      The next key (uint32 [2]); an agent cell (int32 [], row-major, uniform
      in [0, N * N)); the objects' ranks (int32 [K], ranks[k] uniform in
      [0, N * N - 1 - k), for `_place_objects`); an order (int32 [K], a
      uniform random permutation of range(K)). All independent.
    """
    key, draw_key = jax.random.split(key)
    num_cells, k = self.size * self.size, self.num_objects
    # The m of each draw: agent cell, object ranks, order ranks but the last
    # (always 0).
    maxvals = np.concatenate([[num_cells], num_cells - 1 - np.arange(k),
                              k - np.arange(k - 1)])
    draws = _below(jax.random.uniform(draw_key, maxvals.shape), maxvals)
    order = _distinct(jnp.concatenate([draws[1 + k:],
                                       jnp.zeros((1,), jnp.int32)]))
    return key, draws[0], draws[1:1 + k], order

  def _agent_position(self, agent_cell: Array) -> Array:
    """int32 [2], the (row, column) of a row-major cell index."""
    return jnp.stack([agent_cell // self.size,
                      agent_cell % self.size]).astype(jnp.int32)

  def _place_objects(self, object_ranks: Array,
                     agent_position: Array) -> Array:
    """int32 [K, 2] distinct random cells, none of them the agent's.

    Uniform over such placements for `object_ranks` as `_draws` draws them:
    K distinct uniform cells of the N * N - 1 others than the agent's.
    """
    cells = _distinct(object_ranks)  # Indices among the cells but the agent's.
    agent_cell = agent_position[0] * self.size + agent_position[1]
    cells = cells + (cells >= agent_cell).astype(jnp.int32)
    return jnp.stack([cells // self.size, cells % self.size], axis=-1)

  def reset(self, key: Array) -> Tuple[MetaFetchState, api.TimeStep]:
    key, agent_cell, object_ranks, order = self._draws(_util.as_raw_key(key))
    agent_position = self._agent_position(agent_cell)
    state = MetaFetchState(
        key=key,
        step_count=jnp.int32(0),
        agent_position=agent_position,
        object_positions=self._place_objects(object_ranks, agent_position),
        order=order,
        collected=jnp.zeros((self.num_objects,), jnp.bool_),
        progress=jnp.int32(0),
        rounds_completed=jnp.int32(0),
        last_action=jnp.int32(-1),
        last_reward=jnp.float32(0.0),
        is_last=jnp.bool_(False))
    return state, _util.time_step(api.StepType.FIRST, 0.0, 1.0,
                                  self._observation(state))

  def step(self, state: MetaFetchState,
           action: Array) -> Tuple[MetaFetchState, api.TimeStep]:
    """One step, with the dm_env automatic reset after a LAST.

    Distributed as `_util.auto_reset_step(self.reset, transition)` with the
    plain transition below, computed with less work: one set of random draws
    (`_draws`) serves the reset or the end-of-round respawn, whichever
    applies (never both in one step); the two share one object placement
    (from the agent cell of whichever applies); and the observation is
    rendered once, from the selected state. After a LAST the new episode is
    drawn as `reset` draws one, but from this step's draws, not those of
    `reset(key)` for some key.
    """
    chex.assert_rank(action, 0)
    action = jnp.asarray(action, jnp.int32)
    key, agent_cell, object_ranks, order = self._draws(state.key)

    # The transition.
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
    reward = (fetched.astype(jnp.float32) -
              wrong.astype(jnp.float32) * self.wrong_object_penalty)
    step_count = state.step_count + 1

    # Or the reset, after a LAST.
    first = state.is_last
    agent_position = jnp.where(first, self._agent_position(agent_cell),
                               position)
    new_positions = self._place_objects(object_ranks, agent_position)
    state = MetaFetchState(
        key=key,
        step_count=jnp.where(first, 0, step_count).astype(jnp.int32),
        agent_position=agent_position,
        object_positions=jnp.where(first | round_done, new_positions,
                                   state.object_positions),
        order=jnp.where(first, order, state.order),
        collected=collected & ~round_done & ~first,
        progress=jnp.where(first | round_done, 0, progress).astype(jnp.int32),
        rounds_completed=jnp.where(first, 0, state.rounds_completed +
                                   round_done).astype(jnp.int32),
        last_action=jnp.where(first, -1, action).astype(jnp.int32),
        last_reward=jnp.where(first, 0.0, reward).astype(jnp.float32),
        is_last=~first & (step_count >= self.time_limit))
    step_type = jnp.where(
        first, api.StepType.FIRST,
        jnp.where(state.is_last, api.StepType.LAST, api.StepType.MID))
    return state, _util.time_step(step_type, state.last_reward, 1.0,
                                  self._observation(state))

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
