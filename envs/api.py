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


# ------------------------------------------------- checking a user's env ---

_REQUIRED = ("num_actions", "observation_size", "reset", "step", "success")


def _first_line(err: BaseException) -> str:
  lines = str(err).strip().splitlines()
  return f"{type(err).__name__}: {lines[0] if lines else ''}"[:200]


def _weak_leaves(tree: Any) -> list:
  return [jax.tree_util.keystr(path) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]
          if getattr(leaf, "weak_type", False)]


def check_environment(env: Any) -> bool:
  """Checks that `env` follows this API, by tracing one `reset` and `step`.

  Nothing is compiled or run: `jax.eval_shape` traces the functions. Checked:
  the methods and sizes exist (sizes are positive ints); `reset(key)` and
  `step(state, action)` return (state, TimeStep) with step_type int32 [],
  reward and discount float32 [], observation float32 [observation_size];
  `step` returns a state of the same structure, shapes and dtypes as `reset`;
  `success(state)` is a bool-like [].

  Returns:
    Whether the env's state has weak-typed leaves (e.g. `jnp.array(0)` in
    `reset`): harmless once wrapped in `StrongTypes`, but without it the
    state's types change after the first step and a jitted loop compiles
    twice.
  Raises:
    ValueError: one line naming what is wrong.
  """
  missing = [name for name in _REQUIRED if not hasattr(env, name)]
  if missing:
    raise ValueError(f"{type(env).__name__} object is not an environment "
                     f"(missing {', '.join(missing)}; see envs/api.py)")
  for name in ("num_actions", "observation_size"):
    value = getattr(env, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
        or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  try:
    state, first = jax.eval_shape(env.reset, key)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"reset(key) fails: {_first_line(err)}") from err
  _check_timestep("reset", first, env.observation_size)
  action = jax.ShapeDtypeStruct((), jnp.int32)
  try:
    next_state, mid = jax.eval_shape(env.step, state, action)
    success = jax.eval_shape(env.success, next_state)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"step(state, action) or success(state) fails: "
                     f"{_first_line(err)}") from err
  _check_timestep("step", mid, env.observation_size)
  strip = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: (x.shape, jnp.dtype(x.dtype)), tree)
  try:
    same = strip(state) == strip(next_state)
  except Exception:  # pylint: disable=broad-except
    same = False
  if not same:
    raise ValueError("step returns a state of another structure, shape or "
                     "dtype than reset's (the state must keep its layout)")
  if np.shape(success) != () or not (
      jnp.issubdtype(success.dtype, jnp.bool_)
      or jnp.issubdtype(success.dtype, jnp.integer)):
    raise ValueError(f"success(state) must be a bool [], got "
                     f"{success.dtype}{list(np.shape(success))}")
  return bool(_weak_leaves(state) or _weak_leaves(next_state))


def _check_timestep(where: str, ts: Any, observation_size: int) -> None:
  if not isinstance(ts, TimeStep):
    raise ValueError(f"{where} must return (state, envs.api.TimeStep), got "
                     f"a {type(ts).__name__} time step")
  want = {"step_type": ((), jnp.int32), "reward": ((), jnp.float32),
          "discount": ((), jnp.float32),
          "observation": ((observation_size,), jnp.float32)}
  for name, (shape, dtype) in want.items():
    leaf = getattr(ts, name)
    if tuple(leaf.shape) != shape or jnp.dtype(leaf.dtype) != dtype:
      raise ValueError(
          f"{where}: TimeStep.{name} must be {jnp.dtype(dtype).name}"
          f"{list(shape)}, got {jnp.dtype(leaf.dtype).name}{list(leaf.shape)}")


def strong_types(tree: Any) -> Any:
  """`tree` with weak-typed leaves cast to strong ones of the same dtype."""
  return jax.tree.map(
      lambda x: jax.lax.convert_element_type(x, x.dtype)
      if getattr(x, "weak_type", False) else x, tree)


class StrongTypes:
  """Wraps an env so that its states and time steps have no weak types.

  A leaf such as `jnp.array(0)` in `reset` is weakly typed; after one `step`
  it may not be, so a jitted training iteration sees new input types on its
  second call and compiles again. Casting once at the env boundary (a no-op
  in the compiled program) removes that. Other attributes pass through.
  """

  def __init__(self, env: Any):
    self.env = env

  def reset(self, key):
    return strong_types(self.env.reset(key))

  def step(self, state, action):
    return strong_types(self.env.step(state, action))

  def __getattr__(self, name):
    if name == "env":  # not set yet (e.g. while unpickling)
      raise AttributeError(name)
    return getattr(self.env, name)

  def __hash__(self):
    return hash((StrongTypes, self.env))

  def __eq__(self, other):
    return isinstance(other, StrongTypes) and other.env == self.env
