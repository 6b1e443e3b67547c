"""Acting: the acting model steps env streams and records `[T, B]` segments.

The acting role's state (`ActingState`) is its own pytree: env states, the
time step each env is at, the acting model's recurrent state, one sampling key
per env and the episode counters. Its params are not part of it: they belong to
whoever trains the acting model (the learner for lstm/gtrxl/asym, the
distiller for ald) and are passed in.

Two ways to act, over the same `RecurrentModel.step`:

* `Acting.rollout(params, state) -> (state, Segment)`: a `lax.scan` over
  `unroll_length` steps of vmapped pure-JAX envs; jittable, pmappable (each
  env carries its own key, so actions do not depend on a device split). The
  synchronous runtime pmaps it; a distributed actor jits it (batched
  inference), or runs it once per env stream at batch 1 (per-env inference).
* `HostActing`: the un-jitted host loop over a `envs.dm_env_adapters.
  BatchedHostEnv` (any Python `dm_env.Environment`), stepping the model at
  batch B or once per env at batch 1, for slow Python simulators.

Both record the same `Segment`. `Acting.evaluate` / `host_evaluate` play
greedy episodes on fresh seeds.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from envs.api import Environment, StepType, TimeStep

Params = Any


def first(timestep: TimeStep) -> jax.Array:
  """bool [...]: the time step starts an episode."""
  return timestep.step_type == StepType.FIRST


class EpisodeStats(NamedTuple):
  running_return: jax.Array    # f32 [B], return so far of each env's episode
  return_sum: jax.Array        # f32 [], over episodes ended this segment
  count: jax.Array             # f32 []
  success_count: jax.Array     # f32 []


class ActingState(NamedTuple):
  """The acting role's state over B env streams (every leaf [B, ...] or [])."""
  env_state: Any                 # [B, ...]
  timestep: TimeStep             # [B], the time step the next action is taken on
  model_state: Any               # [B, ...] acting model's recurrent state
  action_keys: jax.Array         # uint32 [B, 2], one sampling key per env
  episode_stats: EpisodeStats


class Segment(NamedTuple):
  """One collected segment, time-major. T steps, B envs."""
  timesteps: TimeStep            # [T + 1, B]: the T acted-on steps + the next
  actions: jax.Array             # int32 [T, B]
  behaviour_logits: jax.Array    # f32 [T, B, A]
  acting_state: Any              # [B, ...] acting state before timesteps[0]


def zero_episode_stats(batch: int) -> EpisodeStats:
  return EpisodeStats(running_return=jnp.zeros((batch,), jnp.float32),
                      return_sum=jnp.zeros((), jnp.float32),
                      count=jnp.zeros((), jnp.float32),
                      success_count=jnp.zeros((), jnp.float32))


class Acting:
  """Pure acting functions of one env type and one acting model.

  Attributes:
    env: the pure-JAX environment (`envs.api`).
    model: the acting `networks.RecurrentModel`.
    unroll_length: T.
  """

  def __init__(self, env: Environment, model: Any, unroll_length: int):
    self.env = env
    self.model = model
    self.unroll_length = unroll_length

  def init(self, env_keys: jax.Array, action_keys: jax.Array) -> ActingState:
    """State of B env streams from their reset keys and sampling keys [B, 2]."""
    env_state, timestep = jax.vmap(self.env.reset)(env_keys)
    batch = env_keys.shape[0]
    return ActingState(env_state=env_state, timestep=timestep,
                       model_state=self.model.initial_state(batch),
                       action_keys=action_keys,
                       episode_stats=zero_episode_stats(batch))

  def rollout(self, params: Params, state: ActingState
              ) -> Tuple[ActingState, Segment]:
    """T steps of every env; the episode counters count this segment only."""
    env, model = self.env, self.model

    def one_step(carry, _):
      env_state, timestep, acting_state, action_keys, stats = carry
      out, next_acting_state = model.step(
          params, acting_state, timestep.observation, first(timestep))
      split = jax.vmap(jax.random.split)(action_keys)
      action_keys, sample_keys = split[:, 0], split[:, 1]
      actions = jax.vmap(jax.random.categorical)(sample_keys, out.logits)
      next_env_state, next_timestep = jax.vmap(env.step)(env_state, actions)
      # Episode bookkeeping: a return is complete when a LAST step arrives.
      running = jnp.where(first(next_timestep), 0.0,
                          stats.running_return + next_timestep.reward)
      ended = next_timestep.last().astype(jnp.float32)
      success = jax.vmap(env.success)(next_env_state).astype(jnp.float32)
      stats = EpisodeStats(
          running_return=running,
          return_sum=stats.return_sum + jnp.sum(ended * running),
          count=stats.count + jnp.sum(ended),
          success_count=stats.success_count + jnp.sum(ended * success))
      carry = (next_env_state, next_timestep, next_acting_state, action_keys,
               stats)
      return carry, (timestep, actions.astype(jnp.int32), out.logits)

    stats = state.episode_stats._replace(
        return_sum=jnp.zeros(()), count=jnp.zeros(()),
        success_count=jnp.zeros(()))
    carry = (state.env_state, state.timestep, state.model_state,
             state.action_keys, stats)
    carry, (timesteps, actions, logits) = jax.lax.scan(
        one_step, carry, None, length=self.unroll_length)
    env_state, last_timestep, model_state, action_keys, stats = carry
    all_timesteps = jax.tree.map(
        lambda xs, x: jnp.concatenate([xs, x[None]], axis=0),
        timesteps, last_timestep)
    segment = Segment(timesteps=all_timesteps, actions=actions,
                      behaviour_logits=logits,
                      acting_state=state.model_state)
    state = ActingState(env_state=env_state, timestep=last_timestep,
                        model_state=model_state, action_keys=action_keys,
                        episode_stats=stats)
    return state, segment

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def _evaluate(self, params, key, num_episodes):
    env, model = self.env, self.model
    env_state, timestep = jax.vmap(env.reset)(
        jax.random.split(key, num_episodes))
    carry = (env_state, timestep, model.initial_state(num_episodes),
             jnp.zeros((num_episodes,)), jnp.zeros((num_episodes,), bool),
             jnp.zeros((num_episodes,), bool), jnp.zeros((), jnp.int32))

    def cond(carry):
      done, steps = carry[5], carry[6]
      return jnp.logical_and(~jnp.all(done), steps < 1_000_000)

    def body(carry):
      env_state, timestep, acting_state, returns, success, done, steps = carry
      out, acting_state = model.step(
          params, acting_state, timestep.observation, first(timestep))
      actions = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
      env_state, timestep = jax.vmap(env.step)(env_state, actions)
      active = ~done
      returns = returns + jnp.where(active, timestep.reward, 0.0)
      ended = active & timestep.last()
      success = success | (ended & jax.vmap(env.success)(env_state))
      done = done | ended
      return env_state, timestep, acting_state, returns, success, done, steps + 1

    carry = jax.lax.while_loop(cond, body, carry)
    return carry[3], carry[4]

  def evaluate(self, params: Params, seed: int, num_episodes: int
               ) -> Dict[str, float]:
    """Greedy (argmax) episodes on fresh env seeds (params: one copy)."""
    if num_episodes < 1:
      raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    returns, success = self._evaluate(params, jax.random.PRNGKey(seed),
                                      num_episodes)
    return {"eval_return": float(np.mean(returns)),
            "eval_success_rate": float(np.mean(success)),
            "eval_episodes": int(num_episodes)}

  # Hashable by identity (used as a static argument of `_evaluate`).
  __hash__ = object.__hash__
  __eq__ = object.__eq__


def concat_segments(segments: List[Any], axis_of_batch: int = 1) -> Segment:
  """Concatenates segments (numpy or jax) of B_i streams into sum(B_i)."""
  stack = lambda *xs, axis: np.concatenate([np.asarray(x) for x in xs],  # noqa: E731
                                           axis=axis)
  return Segment(
      timesteps=jax.tree.map(functools.partial(stack, axis=axis_of_batch),
                             *[s.timesteps for s in segments]),
      actions=stack(*[s.actions for s in segments], axis=axis_of_batch),
      behaviour_logits=stack(*[s.behaviour_logits for s in segments],
                             axis=axis_of_batch),
      acting_state=jax.tree.map(functools.partial(stack, axis=0),
                                *[s.acting_state for s in segments]))


# ------------------------------------------------------------- host acting ---


class HostActing:
  """Acting over a `BatchedHostEnv` (Python dm_env envs) on the host.

  The model step is jitted; the env is stepped in Python. `per_env=True`
  steps the model once per env at batch 1 (the cost of that many one-env
  actor processes), else once at batch B. Sampling uses a NumPy generator.
  Episode success is unknown for dm_env envs: `success_count` stays 0 and
  `has_success` is False.
  """
  has_success = False

  def __init__(self, envs: Any, model: Any, unroll_length: int, *,
               per_env: bool, seed: int):
    self.envs = envs
    self.model = model
    self.unroll_length = unroll_length
    self.per_env = per_env
    self._rng = np.random.default_rng(seed)
    self._step = jax.jit(model.step)
    batch = envs.batch_size
    self._timestep = envs.reset()
    if per_env:
      self._model_state = [jax.device_get(model.initial_state(1))
                           for _ in range(batch)]
    else:
      self._model_state = jax.device_get(model.initial_state(batch))
    self._running = np.zeros((batch,), np.float32)

  @property
  def batch_size(self) -> int:
    return self.envs.batch_size

  def _model_state_batch(self) -> Any:
    if self.per_env:
      return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0),
                          *self._model_state)
    return self._model_state

  def _act(self, params: Params, timestep: TimeStep) -> np.ndarray:
    """Logits [B, A] of the current step; advances the model state."""
    start = timestep.step_type == StepType.FIRST
    if self.per_env:
      logits = []
      for i in range(self.batch_size):
        out, self._model_state[i] = self._step(
            params, self._model_state[i], timestep.observation[i:i + 1],
            start[i:i + 1])
        logits.append(out.logits)
      return np.concatenate(jax.device_get(logits), axis=0)
    out, self._model_state = self._step(params, self._model_state,
                                        timestep.observation, start)
    return np.asarray(out.logits)

  def rollout(self, params: Params) -> Tuple[Segment, Dict[str, float]]:
    """T steps of every env: (numpy Segment, episode counters)."""
    initial_state = jax.device_get(self._model_state_batch())
    timesteps, actions, logits = [], [], []
    return_sum = count = 0.0
    timestep = self._timestep
    for _ in range(self.unroll_length):
      step_logits = self._act(params, timestep)
      gumbel = self._rng.gumbel(size=step_logits.shape)
      step_actions = np.argmax(step_logits + gumbel, axis=-1).astype(np.int32)
      timesteps.append(timestep)
      actions.append(step_actions)
      logits.append(step_logits.astype(np.float32))
      timestep = self.envs.step(step_actions)
      running = np.where(timestep.step_type == StepType.FIRST, 0.0,
                         self._running + timestep.reward)
      ended = timestep.step_type == StepType.LAST
      return_sum += float(np.sum(running[ended]))
      count += float(np.sum(ended))
      self._running = running.astype(np.float32)
    self._timestep = timestep
    all_timesteps = jax.tree.map(lambda *xs: np.stack(xs, axis=0),
                                 *timesteps, timestep)
    segment = Segment(timesteps=TimeStep(*all_timesteps),
                      actions=np.stack(actions), behaviour_logits=np.stack(logits),
                      acting_state=initial_state)
    return segment, {"return_sum": return_sum, "count": count,
                     "success_count": 0.0}


def host_evaluate(model: Any, params: Params, envs: Any, num_episodes: int,
                  max_steps: int = 100_000) -> Dict[str, float]:
  """Greedy episodes on a `BatchedHostEnv`: the first episode of each env.

  `num_episodes` episodes are played in rounds of `envs.batch_size`.
  Success is unknown for dm_env envs (NaN).
  """
  step = jax.jit(model.step)
  returns: List[float] = []
  while len(returns) < num_episodes:
    timestep = envs.reset()
    state = model.initial_state(envs.batch_size)
    total = np.zeros((envs.batch_size,))
    done = np.zeros((envs.batch_size,), bool)
    for _ in range(max_steps):
      out, state = step(params, state, timestep.observation,
                        timestep.step_type == StepType.FIRST)
      actions = np.argmax(np.asarray(out.logits), axis=-1).astype(np.int32)
      timestep = envs.step(actions)
      total += np.where(done, 0.0, timestep.reward)
      done |= timestep.step_type == StepType.LAST
      if done.all():
        break
    returns.extend(total.tolist())
  returns = returns[:num_episodes]
  return {"eval_return": float(np.mean(returns)),
          "eval_success_rate": float("nan"),
          "eval_episodes": int(num_episodes)}
