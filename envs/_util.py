"""Helpers shared by the pure-JAX environments (private to `envs`)."""
from __future__ import annotations

from typing import Any, Callable, Tuple

import chex
import jax
import jax.numpy as jnp

from envs import api

Array = jax.Array


def as_raw_key(key: Array) -> Array:
  """Returns `key` as a raw uint32 [2] key (typed `jax.random.key`s are unwrapped).

  States store raw keys so that they serialise like any other array.
  """
  if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  chex.assert_shape(key, (2,))
  return jnp.asarray(key, jnp.uint32)


def select_tree(pred: Array, on_true: Any, on_false: Any) -> Any:
  """Leaf-wise `jnp.where(pred, on_true, on_false)` for a bool [] `pred`."""
  return jax.tree.map(lambda t, f: jnp.where(pred, t, f), on_true, on_false)


def auto_reset_step(
    reset_fn: Callable[[Array], Tuple[Any, api.TimeStep]],
    transition_fn: Callable[[Any, Array], Tuple[Any, api.TimeStep]],
    state: Any,
    action: Array,
) -> Tuple[Any, api.TimeStep]:
  """One `step` with the dm_env automatic reset.

  Both branches are computed and one is selected (a `lax.cond` would be turned
  into the same select under `vmap`, and both branches are cheap).

  Args:
    reset_fn: key -> (state, FIRST time step).
    transition_fn: (state, int32 [] action) -> (state, time step); only called
      on states whose last time step was not LAST.
    state: the env state; must have fields `key` (uint32 [2]) and `is_last`
      (bool []).
    action: int32 [] (ignored when `state.is_last`).
  Returns:
    (next state, time step).
  """
  chex.assert_rank(action, 0)
  key, reset_key = jax.random.split(state.key)
  reset_out = reset_fn(reset_key)
  step_out = transition_fn(state._replace(key=key), jnp.asarray(action, jnp.int32))
  return select_tree(state.is_last, reset_out, step_out)


def time_step(step_type: Array, reward: Array, discount: Array,
              observation: Array) -> api.TimeStep:
  """Builds an `api.TimeStep` with the contract's dtypes."""
  return api.TimeStep(
      step_type=jnp.asarray(step_type, jnp.int32),
      reward=jnp.asarray(reward, jnp.float32),
      discount=jnp.asarray(discount, jnp.float32),
      observation=jnp.asarray(observation, jnp.float32))


def egocentric_one_hot_view(grid: Array, position: Array, view_size: int,
                            num_cell_types: int, outside_cell: int) -> Array:
  """One-hot cell types of the `view_size x view_size` window around `position`.

  Args:
    grid: int32 [H, W] cell types in [0, num_cell_types).
    position: int32 [2] (row, column) of the window centre.
    view_size: odd window side V.
    num_cell_types: C.
    outside_cell: the cell type shown for cells outside the grid.
  Returns:
    float32 [V * V * C], row-major over (view row, view column, cell type).
  """
  radius = view_size // 2
  padded = jnp.pad(grid, radius, constant_values=outside_cell)
  window = jax.lax.dynamic_slice(padded, (position[0], position[1]),
                                 (view_size, view_size))
  return jax.nn.one_hot(window, num_cell_types, dtype=jnp.float32).reshape(-1)
