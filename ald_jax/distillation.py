"""Distillation (ald): replay of recent segments and the actor's distill step.

The distillation role's state (`DistillState`) is its own pytree: the actor
(LSTM) params it trains, their optimiser state and the on-device replay of
the last `replay_segments` segments of this device's envs.

One distill step: a minibatch of (segment, env) rows from the replay, the
loss `alpha_pi * KL(sg[pi_learner] || pi_actor) + alpha_v * 0.5 *
(sg[V_learner] - V_actor)^2` over the actor's re-unroll of those rows from the
actor state recorded at their start, with learner targets either recomputed
by the current learner from its recorded state (`distill_targets=
'recompute'`) or stored with the segment (`'stored'`), and an optax step.

`Distiller.distill(state, learner_params, rng)` takes the K =
`distill_steps_per_rl_step` steps of one synchronous iteration (under pmap,
gradients averaged over devices). The distributed runtime uses the same
pieces one step at a time: `grads` (under pmap) on a batch drawn from a
host replay (`HostReplay`, with a sample-to-insert `RateLimiter`), and
`apply` (the optimiser step) where the actor params are held.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ald_jax import losses
from ald_jax.acting import Segment, first
from ald_jax.learner import AXIS, all_finite, optimiser

Params = Any


class Replay(NamedTuple):
  """The last `replay_segments` segments of this device's envs (ring buffer).

  R = replay_segments, T = unroll_length, B = envs on this device, A actions.
  With `distill_targets='recompute'` the learner is re-unrolled from
  `learner_state`; with 'stored' its outputs from the RL step are kept instead
  (the other field is None).
  """
  observation: jax.Array    # f32 [R, T, B, O]
  start: jax.Array          # bool [R, T, B]
  mask: jax.Array           # f32 [R, T, B], 0 on LAST steps and empty slots
  actor_state: Any          # [R, B, ...] actor state at each segment's start
  learner_state: Any        # [R, B, ...] learner state at each segment's start
  learner_logits: Optional[jax.Array]  # f32 [R, T, B, A]
  learner_value: Optional[jax.Array]   # f32 [R, T, B]
  next_slot: jax.Array      # int32 []


class DistillState(NamedTuple):
  """The distillation role's state (one device's copy under pmap)."""
  params: Params            # the actor (LSTM) params
  opt_state: Any
  replay: Replay


class Distiller:
  """Pure distillation functions for one Config and its models.

  `num_devices`, `local_envs`: the device split of the replay's env rows
  (the synchronous runtime's; 1 and B for a replay on one device).
  """
  axis_name = AXIS

  def __init__(self, config: Any, models: Dict[str, Any], num_actions: int,
               observation_size: int, *, num_devices: int = 1,
               num_envs: Optional[int] = None):
    self.config = config
    self.models = models
    self.num_actions = num_actions
    self.observation_size = observation_size
    self.num_devices = num_devices
    self.num_envs = num_envs or config.num_envs
    self.local_envs = self.num_envs // num_devices
    self.distill_rows = config.distill_batch_envs or self.num_envs
    self.local_distill_rows = self.distill_rows // num_devices
    self.stored_targets = config.distill_targets == "stored"
    self.optimiser = optimiser(config.actor_learning_rate,
                               config.max_grad_norm)

  # ---------------------------------------------------------------- init
  def init_replay(self) -> Replay:
    """An empty replay of this device's `local_envs` rows."""
    config, models = self.config, self.models
    r, t, b = config.replay_segments, config.unroll_length, self.local_envs
    stack = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jnp.zeros((r,) + x.shape, x.dtype), tree)
    zeros = lambda *shape: jnp.zeros((r, t, b) + shape,  # noqa: E731
                                     jnp.float32)
    return Replay(
        observation=zeros(self.observation_size),
        start=jnp.zeros((r, t, b), bool),
        mask=zeros(),
        actor_state=stack(models["actor"].initial_state(b)),
        learner_state=(None if self.stored_targets else
                       stack(models["learner"].initial_state(b))),
        learner_logits=zeros(self.num_actions) if self.stored_targets else None,
        learner_value=zeros() if self.stored_targets else None,
        next_slot=jnp.zeros((), jnp.int32))

  def init(self, actor_params: Params) -> DistillState:
    return DistillState(params=actor_params,
                        opt_state=self.optimiser.init(actor_params),
                        replay=self.init_replay())

  # -------------------------------------------------------------- replay
  def add(self, replay: Replay, segment: Segment, mask: jax.Array,
          learner_state: Any, learner_outputs: Any) -> Replay:
    """Writes one segment (with the learner's state or outputs) to the ring."""
    slot = replay.next_slot
    put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
        buf, x, slot, axis=0)
    ts = segment.timesteps
    if self.stored_targets:
      learner_logits, learner_value = learner_outputs
      replay = replay._replace(
          learner_logits=put(replay.learner_logits, learner_logits),
          learner_value=put(replay.learner_value, learner_value))
    else:
      replay = replay._replace(learner_state=jax.tree.map(
          put, replay.learner_state, learner_state))
    return replay._replace(
        observation=put(replay.observation, ts.observation[:-1]),
        start=put(replay.start, first(ts)[:-1]),
        mask=put(replay.mask, mask),
        actor_state=jax.tree.map(put, replay.actor_state, segment.acting_state),
        next_slot=(slot + 1) % self.config.replay_segments)

  def sample_distill_batch(self, replay: Replay, key: jax.Array) -> Replay:
    """This device's share of one distillation minibatch from the replay.

    The rows (segment, env) are drawn without replacement from the GLOBAL
    replay (every device draws the same permutation), so that the minibatch
    does not depend on how the envs are split over devices. With several
    devices each chosen row lives on one device: a masked psum hands every
    device the whole minibatch, of which it keeps its slice. Empty replay
    slots have mask 0.
    """
    config, num_devices = self.config, self.num_devices
    local_envs, local_distill_rows = self.local_envs, self.local_distill_rows
    rows = jax.random.permutation(
        key, config.replay_segments * self.num_envs)[:self.distill_rows]
    seg_idx, env_idx = rows // self.num_envs, rows % self.num_envs
    device = jax.lax.axis_index(AXIS) if num_devices > 1 else 0
    local_env_idx = env_idx - device * local_envs
    on_this_device = (local_env_idx >= 0) & (local_env_idx < local_envs)
    local_env_idx = jnp.clip(local_env_idx, 0, local_envs - 1)

    def gather(x, time_major):
      # [R, T, B, ...] -> [T, n, ...] or [R, B, ...] -> [n, ...].
      if time_major:
        rows_x = x[seg_idx, :, local_env_idx].swapaxes(0, 1)
        row_axis = 1
      else:
        rows_x = x[seg_idx, local_env_idx]
        row_axis = 0
      if num_devices == 1:
        return rows_x
      keep = on_this_device.reshape(
          (1,) * row_axis + (-1,) + (1,) * (rows_x.ndim - row_axis - 1))
      summable = rows_x.astype(jnp.int32) if rows_x.dtype == bool else rows_x
      full = jax.lax.psum(jnp.where(keep, summable, 0), AXIS)
      mine = jax.lax.dynamic_slice_in_dim(
          full, device * local_distill_rows, local_distill_rows,
          axis=row_axis)
      return mine.astype(rows_x.dtype)

    time_major = ("observation", "start", "mask", "learner_logits",
                  "learner_value")
    return replay._replace(
        **{name: jax.tree.map(lambda x: gather(x, True), getattr(replay, name))
           for name in time_major},
        actor_state=jax.tree.map(lambda x: gather(x, False),
                                 replay.actor_state),
        learner_state=jax.tree.map(lambda x: gather(x, False),
                                   replay.learner_state))

  # ---------------------------------------------------------------- step
  def loss(self, actor_params: Params, learner_params: Params, batch: Replay):
    """Distillation loss of one device's minibatch rows (a `Replay` of rows:
    observation [T, n, O], start/mask [T, n], states [n, ...])."""
    config, models = self.config, self.models
    actor_out, _ = models["actor"].unroll(actor_params, batch.actor_state,
                                          batch.observation, batch.start)
    if self.stored_targets:
      learner_logits, learner_value = batch.learner_logits, batch.learner_value
    else:
      learner_out, _ = models["learner"].unroll(
          learner_params, batch.learner_state, batch.observation, batch.start)
      learner_logits, learner_value = learner_out.logits, learner_out.value
    return losses.distillation_loss(
        actor_out.logits, actor_out.value,
        jax.lax.stop_gradient(learner_logits),
        jax.lax.stop_gradient(learner_value), batch.mask,
        alpha_pi=config.alpha_pi, alpha_v=config.alpha_v, axis_name=AXIS)

  def grads(self, actor_params: Params, learner_params: Params, batch: Replay
            ) -> Tuple[Params, Dict[str, jax.Array]]:
    """Device-averaged gradients of the loss on one minibatch (under pmap)."""
    (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        actor_params, learner_params, batch)
    grads = jax.lax.pmean(grads, AXIS)
    metrics = {**metrics, "loss": loss, "finite_grads": all_finite(grads)}
    return grads, metrics

  def apply(self, actor_params: Params, opt_state: Any, grads: Params
            ) -> Tuple[Params, Any]:
    """The optimiser step (no collective: runs anywhere)."""
    updates, opt_state = self.optimiser.update(grads, opt_state, actor_params)
    return optax.apply_updates(actor_params, updates), opt_state

  def distill(self, state: DistillState, learner_params: Params,
              rng: jax.Array) -> Tuple[DistillState, Dict[str, jax.Array]]:
    """K = distill_steps_per_rl_step minibatch steps from the replay."""
    def one_distill_step(carry, key):
      actor_params, opt_state = carry
      batch = self.sample_distill_batch(state.replay, key)
      grads, metrics = self.grads(actor_params, learner_params, batch)
      actor_params, opt_state = self.apply(actor_params, opt_state, grads)
      return (actor_params, opt_state), metrics

    keys = jax.random.split(rng, self.config.distill_steps_per_rl_step)
    (actor_params, opt_state), metrics = jax.lax.scan(
        one_distill_step, (state.params, state.opt_state), keys)
    finite_grads = jnp.all(metrics.pop("finite_grads"))
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["finite_grads"] = finite_grads
    return state._replace(params=actor_params, opt_state=opt_state), metrics
