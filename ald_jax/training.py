"""The ALD training system: one jitted (pmapped) iteration built from a Config.

One iteration, top to bottom (see `make_trainer`):

  1. Rollout: a `lax.scan` over `unroll_length` steps of the vmapped envs,
     acting with the acting model (the LSTM for lstm/asym/ald, the GTrXL for
     gtrxl). It records time steps, actions and the acting policy's logits.
  2. RL step(s) on that segment: V-MPO (or PPO) on the RL-trained model(s),
     plus, for ald, `alpha_reg * KL(sg[pi_actor] || pi_learner)`.
  3. ald only: `distill_steps_per_rl_step` actor distillation minibatch steps
     drawn from the on-device replay of the last `replay_segments` segments,
     with learner targets recomputed by the current (just updated) learner.

Which model does what, per agent (one code path; the table is `_ROLES`):

  agent  acts with  RL policy  RL value   distilled
  lstm   LSTM       LSTM       LSTM       -
  gtrxl  GTrXL      GTrXL      GTrXL      -
  asym   LSTM       LSTM       GTrXL(v)   -
  ald    LSTM       GTrXL      GTrXL      LSTM <- GTrXL

Multi-device: everything runs under `jax.pmap` over `num_devices` local
devices. Each device steps `num_envs / num_devices` envs; gradients are
averaged and every masked mean / V-MPO statistic is taken over the whole
global batch (`axis_name`), so 1 and 2 devices give the same update. Each env
carries its own sampling key, so the actions do not depend on the device split
either. All state leaves carry a leading device axis.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ald_jax import losses
from ald_jax import networks
from ald_jax.config import Config
from envs.api import Environment, StepType, TimeStep

AXIS = "devices"
Params = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Roles:
  acting: str         # 'actor' (LSTM) or 'learner' (GTrXL)
  policy: str         # which model's logits the RL policy loss trains
  value: str          # which model's value the RL value loss trains
  distill: bool       # whether the actor is distilled from the learner


_ROLES = {
    "lstm": _Roles(acting="actor", policy="actor", value="actor", distill=False),
    "gtrxl": _Roles(acting="learner", policy="learner", value="learner",
                    distill=False),
    "asym": _Roles(acting="actor", policy="actor", value="learner",
                   distill=False),
    "ald": _Roles(acting="actor", policy="learner", value="learner",
                  distill=True),
}


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


class EpisodeStats(NamedTuple):
  running_return: jax.Array    # f32 [B], return so far of each env's episode
  return_sum: jax.Array        # f32 [], over episodes ended this iteration
  count: jax.Array             # f32 []
  success_count: jax.Array     # f32 []


class TrainState(NamedTuple):
  """Everything a run needs to continue: checkpoint this one object."""
  params: Params                 # {'actor': ..., 'learner': ...} as the agent has
  target_params: Params          # V-MPO target policy (the RL-trained models)
  rl_opt_state: Any
  distill_opt_state: Any
  duals: losses.VmpoDuals
  dual_opt_state: Any
  env_state: Any                 # [B, ...]
  timestep: TimeStep             # [B], the time step the next action is taken on
  acting_state: Any              # [B, ...] acting model's recurrent state
  learner_state: Any             # [B, ...] GTrXL state at the next segment start
  episode_stats: EpisodeStats
  replay: Optional[Replay]
  action_keys: jax.Array         # uint32 [B, 2], one sampling key per env
  rng: jax.Array                 # uint32 [2], replicated
  iteration: jax.Array           # int32 []
  env_steps: jax.Array           # int32 [] (global)


class Segment(NamedTuple):
  """One collected segment, time-major. T steps, B envs."""
  timesteps: TimeStep            # [T + 1, B]: the T acted-on steps + the next
  actions: jax.Array             # int32 [T, B]
  behaviour_logits: jax.Array    # f32 [T, B, A]
  acting_state: Any              # [B, ...] acting state before timesteps[0]


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What `make_trainer` returns; see the module docstring.

  `train_iteration(state) -> (state, metrics)` runs one iteration (the input
  state's buffers are donated: use only the returned state); `collect(state)
  -> (state, segment)` runs the rollout alone (for inspection and tests);
  `evaluate(state, seed, num_episodes)` plays greedy episodes on fresh seeds.
  `phases` holds the iteration's parts as separate pmapped functions, for
  profiling: 'rollout' (state -> (state, segment)), 'learner_update'
  ((state, segment) -> state) and, for ald, 'distillation' (state -> state).
  States and segments carry a leading device axis.
  """
  config: Config
  env: Environment
  num_devices: int
  env_steps_per_iteration: int
  models: Dict[str, networks.RecurrentModel]
  init: Callable[[], TrainState]
  train_iteration: Callable[[TrainState], Tuple[TrainState, Dict[str, jax.Array]]]
  collect: Callable[[TrainState], Tuple[TrainState, Segment]]
  evaluate: Callable[..., Dict[str, float]]
  phases: Dict[str, Callable[..., Any]]

  def to_host(self, state: TrainState) -> Any:
    """numpy copy of the state (with its leading device axis)."""
    return jax.device_get(state)

  def from_host(self, host_state: Any) -> TrainState:
    """Places a `to_host` copy back on the devices."""
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:self.num_devices]),
                             (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    return jax.device_put(host_state, sharding)

  def unreplicate_params(self, state: TrainState) -> Params:
    return jax.tree.map(lambda x: x[0], state.params)


def build_models(config: Config, env: Environment
                 ) -> Dict[str, networks.RecurrentModel]:
  """The agent's models: 'actor' (LSTM) and/or 'learner' (GTrXL)."""
  roles = _ROLES[config.agent]
  used = {roles.acting, roles.policy, roles.value} | (
      {"actor"} if roles.distill else set())
  models = {}
  if "actor" in used:
    models["actor"] = networks.make_lstm_model(
        observation_size=env.observation_size, num_actions=env.num_actions,
        encoder_hidden=config.encoder_hidden, lstm_hidden=config.lstm_hidden)
  if "learner" in used:
    models["learner"] = networks.make_gtrxl_model(
        observation_size=env.observation_size, num_actions=env.num_actions,
        encoder_hidden=config.encoder_hidden, num_layers=config.gtrxl_layers,
        num_heads=config.gtrxl_heads, d_model=config.gtrxl_d_model,
        mlp_width=config.gtrxl_mlp_width, memory_len=config.gtrxl_memory_len,
        # asym's GTrXL is a critic only.
        policy_head=roles.policy == "learner")
  return models


def _optimiser(learning_rate: float, max_grad_norm: float
               ) -> optax.GradientTransformation:
  adam = optax.adam(learning_rate)
  if max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adam)
  return adam


def _first(timestep: TimeStep) -> jax.Array:
  return timestep.step_type == StepType.FIRST


# What the per-iteration finite check looks at, in bit order of the
# `nonfinite` metric (int32, 0 when everything is finite).
NONFINITE_QUANTITIES = (
    "env rewards/observations", "RL loss", "RL gradients", "RL-trained params",
    "distillation loss", "distillation gradients", "distilled actor params")


def describe_nonfinite(mask: int) -> str:
  """Names of the quantities flagged in a `nonfinite` metric value."""
  names = [name for bit, name in enumerate(NONFINITE_QUANTITIES)
           if int(mask) >> bit & 1]
  return ", ".join(names) if names else "none"


def _all_finite(tree: Any) -> jax.Array:
  """bool []: every float leaf of `tree` is finite (True for no leaves)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _nonfinite_mask(finite: Dict[str, jax.Array]) -> jax.Array:
  """int32 [] bitmask over NONFINITE_QUANTITIES, reduced over devices."""
  bad = jnp.stack([~finite.get(name, jnp.bool_(True))
                   for name in NONFINITE_QUANTITIES]).astype(jnp.int32)
  bad = jnp.minimum(jax.lax.psum(bad, AXIS), 1)
  return jnp.sum(bad << jnp.arange(len(NONFINITE_QUANTITIES), dtype=jnp.int32))


def make_trainer(config: Config, env: Environment) -> Trainer:
  """Builds the jitted training iteration, state initialiser and evaluator."""
  config.validate()
  roles = _ROLES[config.agent]
  num_devices = config.num_devices or jax.local_device_count()
  if num_devices > jax.local_device_count():
    raise ValueError(f"num_devices: {num_devices} requested, "
                     f"{jax.local_device_count()} available")
  if config.num_envs % num_devices:
    raise ValueError(f"num_envs: must be divisible by the number of devices "
                     f"({num_devices}), got {config.num_envs}")
  local_envs = config.num_envs // num_devices
  distill_rows = config.distill_batch_envs or config.num_envs
  if distill_rows % num_devices:
    raise ValueError(f"distill_batch_envs: must be divisible by the number of "
                     f"devices ({num_devices}), got {distill_rows}")
  local_distill_rows = distill_rows // num_devices
  models = build_models(config, env)
  rl_keys = tuple(sorted({roles.policy, roles.value}))
  acting_model = models[roles.acting]
  has_learner = "learner" in models
  # The GTrXL is unrolled from its own carried state unless it is the acting
  # model, whose state at the segment start the rollout records.
  learner_carried = has_learner and roles.acting != "learner"
  rl_optimiser = _optimiser(config.learner_learning_rate, config.max_grad_norm)
  distill_optimiser = _optimiser(config.actor_learning_rate,
                                 config.max_grad_norm)
  dual_optimiser = optax.adam(config.vmpo_dual_learning_rate)
  num_actions = env.num_actions
  stored_targets = config.distill_targets == "stored"
  T = config.unroll_length  # pylint: disable=invalid-name

  # ---------------------------------------------------------------- init
  def init_device(params: Params, env_keys: jax.Array, action_keys: jax.Array,
                  rng: jax.Array) -> TrainState:
    """State of one device, given replicated params and its envs' keys."""
    env_state, timestep = jax.vmap(env.reset)(env_keys)
    rl_params = {k: params[k] for k in rl_keys}
    learner_state = (models["learner"].initial_state(local_envs)
                     if learner_carried else ())
    replay = None
    if roles.distill:
      r = config.replay_segments
      stack = lambda tree: jax.tree.map(  # noqa: E731
          lambda x: jnp.zeros((r,) + x.shape, x.dtype), tree)
      zeros = lambda *shape: jnp.zeros((r, T, local_envs) + shape,  # noqa: E731
                                       jnp.float32)
      replay = Replay(
          observation=zeros(env.observation_size),
          start=jnp.zeros((r, T, local_envs), bool),
          mask=zeros(),
          actor_state=stack(models["actor"].initial_state(local_envs)),
          learner_state=(None if stored_targets else
                         stack(models["learner"].initial_state(local_envs))),
          learner_logits=zeros(num_actions) if stored_targets else None,
          learner_value=zeros() if stored_targets else None,
          next_slot=jnp.zeros((), jnp.int32))
    return TrainState(
        params=params,
        target_params=rl_params,
        rl_opt_state=rl_optimiser.init(rl_params),
        distill_opt_state=(distill_optimiser.init(params["actor"])
                           if roles.distill else ()),
        duals=losses.init_vmpo_duals(config.vmpo_init_eta,
                                     config.vmpo_init_alpha),
        dual_opt_state=dual_optimiser.init(
            losses.init_vmpo_duals(config.vmpo_init_eta,
                                   config.vmpo_init_alpha)),
        env_state=env_state,
        timestep=timestep,
        acting_state=acting_model.initial_state(local_envs),
        learner_state=learner_state,
        episode_stats=EpisodeStats(
            running_return=jnp.zeros((local_envs,), jnp.float32),
            return_sum=jnp.zeros((), jnp.float32),
            count=jnp.zeros((), jnp.float32),
            success_count=jnp.zeros((), jnp.float32)),
        replay=replay,
        action_keys=action_keys,
        rng=rng,
        iteration=jnp.zeros((), jnp.int32),
        env_steps=jnp.zeros((), jnp.int32))

  def init() -> TrainState:
    key = jax.random.PRNGKey(config.seed)
    param_key, env_key, action_key, rng = jax.random.split(key, 4)
    params = {name: model.init(k) for (name, model), k in zip(
        sorted(models.items()), jax.random.split(param_key, len(models)))}
    # Keys of the global batch, then split by device: the same envs and
    # sampling streams whatever the number of devices.
    env_keys = jax.random.split(env_key, config.num_envs).reshape(
        num_devices, local_envs, -1)
    action_keys = jax.random.split(action_key, config.num_envs).reshape(
        num_devices, local_envs, -1)
    replicate = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jnp.broadcast_to(x, (num_devices,) + x.shape), tree)
    return jax.pmap(init_device, axis_name=AXIS)(
        replicate(params), env_keys, action_keys, replicate(rng))

  # ------------------------------------------------------------- rollout
  def rollout(state: TrainState) -> Tuple[TrainState, Segment]:
    acting_params = state.params[roles.acting]

    def one_step(carry, _):
      env_state, timestep, acting_state, action_keys, stats = carry
      out, next_acting_state = acting_model.step(
          acting_params, acting_state, timestep.observation, _first(timestep))
      split = jax.vmap(jax.random.split)(action_keys)
      action_keys, sample_keys = split[:, 0], split[:, 1]
      actions = jax.vmap(jax.random.categorical)(sample_keys, out.logits)
      next_env_state, next_timestep = jax.vmap(env.step)(env_state, actions)
      # Episode bookkeeping: a return is complete when a LAST step arrives.
      running = jnp.where(_first(next_timestep), 0.0,
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
    carry = (state.env_state, state.timestep, state.acting_state,
             state.action_keys, stats)
    carry, (timesteps, actions, logits) = jax.lax.scan(one_step, carry, None,
                                                       length=T)
    env_state, last_timestep, acting_state, action_keys, stats = carry
    all_timesteps = jax.tree.map(
        lambda xs, x: jnp.concatenate([xs, x[None]], axis=0),
        timesteps, last_timestep)
    segment = Segment(timesteps=all_timesteps, actions=actions,
                      behaviour_logits=logits,
                      acting_state=state.acting_state)
    state = state._replace(env_state=env_state, timestep=last_timestep,
                           acting_state=acting_state, action_keys=action_keys,
                           episode_stats=stats)
    return state, segment

  # ------------------------------------------------------------ RL loss
  def unroll_with_bootstrap(model, params, initial_state, segment):
    """Outputs [T] (+ value [T+1] incl. the bootstrap) and state after T."""
    obs = segment.timesteps.observation
    start = _first(segment.timesteps)
    out, state_t = model.unroll(params, initial_state, obs[:-1], start[:-1])
    boot, _ = model.step(params, state_t, obs[-1], start[-1])
    values = jnp.concatenate(
        [out.value, jax.lax.stop_gradient(boot.value)[None]], axis=0)
    return out.logits, values, state_t

  def initial_train_state(name, state, segment):
    return segment.acting_state if name == roles.acting else state.learner_state

  def rl_loss(rl_params: Params, duals: losses.VmpoDuals, state: TrainState,
              segment: Segment):
    outputs = {}
    for name in rl_keys:
      outputs[name] = unroll_with_bootstrap(
          models[name], rl_params[name],
          initial_train_state(name, state, segment), segment)
    logits = outputs[roles.policy][0]                      # [T, B, A]
    values = outputs[roles.value][1]                       # [T + 1, B]
    chex.assert_shape(logits, (T, local_envs, num_actions))
    chex.assert_shape(values, (T + 1, local_envs))
    next_learner_state = (outputs["learner"][2] if learner_carried
                          else state.learner_state)
    ts = segment.timesteps
    trans = losses.transitions_from_timesteps(
        ts.step_type, ts.reward, ts.discount, config.discount)
    mask = trans.mask
    sg_values = jax.lax.stop_gradient(values)
    log_pi = jax.nn.log_softmax(logits)
    log_mu = jax.nn.log_softmax(segment.behaviour_logits)
    take = lambda lp: jnp.take_along_axis(  # noqa: E731
        lp, segment.actions[..., None], axis=-1)[..., 0]
    log_rho = jax.lax.stop_gradient(take(log_pi) - take(log_mu))
    importance_weights = None
    if config.importance_weight_clip > 0:
      importance_weights = jnp.minimum(jnp.exp(log_rho),
                                       config.importance_weight_clip)
    metrics = {}
    if config.rl_loss == "vmpo":
      returns = losses.lambda_returns(trans.reward, trans.discount, sg_values,
                                      config.td_lambda, mask=mask)
      advantages = returns - sg_values[:-1]
      target_logits = jax.lax.stop_gradient(models[roles.policy].unroll(
          state.target_params[roles.policy],
          initial_train_state(roles.policy, state, segment),
          ts.observation[:-1], _first(ts)[:-1])[0].logits)
      policy_loss, policy_metrics = losses.vmpo_loss(
          logits, target_logits, segment.actions, advantages, duals, mask,
          eps_eta=config.vmpo_eps_eta, eps_alpha=config.vmpo_eps_alpha,
          top_k_fraction=config.vmpo_top_k_fraction, axis_name=AXIS,
          importance_weights=importance_weights)
      v_loss, v_metrics = losses.value_loss(values[:-1], returns, mask,
                                            axis_name=AXIS)
    else:
      advantages, returns = losses.gae(trans.reward, trans.discount, sg_values,
                                       config.td_lambda, mask=mask)
      if importance_weights is not None:
        advantages = advantages * importance_weights
      policy_loss, policy_metrics = losses.ppo_loss(
          logits, segment.behaviour_logits, segment.actions, advantages, mask,
          clip_epsilon=config.ppo_clip_epsilon,
          entropy_cost=config.ppo_entropy_cost, axis_name=AXIS)
      v_loss, v_metrics = losses.value_loss(values[:-1], returns, mask,
                                            axis_name=AXIS)
    loss = policy_loss + config.value_cost * v_loss
    metrics.update(policy_metrics)
    metrics.update(v_metrics)
    metrics["value_loss"] = v_loss
    if roles.distill:
      # KL(sg[pi_actor] || pi_learner), with the actor's logits as recorded.
      reg, reg_metrics = losses.learner_regulariser(
          logits, segment.behaviour_logits, mask, axis_name=AXIS)
      loss = loss + config.alpha_reg * reg
      metrics.update(reg_metrics)
      metrics["kl_actor_learner"] = reg
    metrics["learner_loss"] = loss
    # The policy model's outputs on the segment: ald's stored targets.
    outputs_now = jax.lax.stop_gradient((logits, values[:-1]))
    return loss, (metrics, next_learner_state, trans.mask, outputs_now)

  def rl_update(state: TrainState, segment: Segment):
    rl_params = {k: state.params[k] for k in rl_keys}
    grad_fn = jax.grad(rl_loss, argnums=(0, 1), has_aux=True)

    def one_rl_step(carry, _):
      rl_params, duals, rl_opt_state, dual_opt_state = carry
      (grads, dual_grads), aux = grad_fn(rl_params, duals, state, segment)
      grads, dual_grads = jax.lax.pmean((grads, dual_grads), AXIS)
      aux[0]["finite_grads"] = _all_finite((grads, dual_grads))
      updates, rl_opt_state = rl_optimiser.update(grads, rl_opt_state,
                                                  rl_params)
      rl_params = optax.apply_updates(rl_params, updates)
      if config.rl_loss == "vmpo":
        dual_updates, dual_opt_state = dual_optimiser.update(
            dual_grads, dual_opt_state, duals)
        duals = optax.apply_updates(duals, dual_updates)
      return (rl_params, duals, rl_opt_state, dual_opt_state), aux

    carry = (rl_params, state.duals, state.rl_opt_state, state.dual_opt_state)
    carry, aux = jax.lax.scan(one_rl_step, carry, None,
                              length=config.rl_steps_per_iteration)
    rl_params, duals, rl_opt_state, dual_opt_state = carry
    # Metrics and the carried learner state of the first pass (pre-update
    # params, like the segment's data).
    grads_finite = jnp.all(aux[0].pop("finite_grads"))
    metrics, next_learner_state, mask, outputs_now = jax.tree.map(
        lambda x: x[0], aux)
    metrics["finite_grads"] = grads_finite
    learner_steps = state.iteration + 1
    refresh = learner_steps % config.target_update_period == 0
    target_params = jax.tree.map(lambda new, old: jnp.where(refresh, new, old),
                                 rl_params, state.target_params)
    state = state._replace(
        params={**state.params, **rl_params}, target_params=target_params,
        duals=duals, rl_opt_state=rl_opt_state, dual_opt_state=dual_opt_state,
        learner_state=next_learner_state)
    return state, metrics, mask, outputs_now

  # ------------------------------------------------------- distillation
  def add_to_replay(replay: Replay, segment: Segment, mask: jax.Array,
                    learner_state: Any, learner_outputs: Any) -> Replay:
    slot = replay.next_slot
    put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
        buf, x, slot, axis=0)
    ts = segment.timesteps
    if stored_targets:
      learner_logits, learner_value = learner_outputs
      replay = replay._replace(
          learner_logits=put(replay.learner_logits, learner_logits),
          learner_value=put(replay.learner_value, learner_value))
    else:
      replay = replay._replace(learner_state=jax.tree.map(
          put, replay.learner_state, learner_state))
    return replay._replace(
        observation=put(replay.observation, ts.observation[:-1]),
        start=put(replay.start, _first(ts)[:-1]),
        mask=put(replay.mask, mask),
        actor_state=jax.tree.map(put, replay.actor_state, segment.acting_state),
        next_slot=(slot + 1) % config.replay_segments)

  def distill_loss(actor_params, learner_params, batch: Replay):
    actor_out, _ = models["actor"].unroll(actor_params, batch.actor_state,
                                          batch.observation, batch.start)
    if stored_targets:
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

  def sample_distill_batch(replay: Replay, key: jax.Array) -> Replay:
    """This device's share of one distillation minibatch from the replay.

    The rows (segment, env) are drawn without replacement from the GLOBAL
    replay (every device draws the same permutation), so that the minibatch
    does not depend on how the envs are split over devices. With several
    devices each chosen row lives on one device: a masked psum hands every
    device the whole minibatch, of which it keeps its slice. Empty replay
    slots have mask 0.
    """
    rows = jax.random.permutation(
        key, config.replay_segments * config.num_envs)[:distill_rows]
    seg_idx, env_idx = rows // config.num_envs, rows % config.num_envs
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

  def distill(state: TrainState, rng: jax.Array):
    def one_distill_step(carry, key):
      actor_params, opt_state = carry
      batch = sample_distill_batch(state.replay, key)
      (loss, metrics), grads = jax.value_and_grad(distill_loss, has_aux=True)(
          actor_params, state.params["learner"], batch)
      grads = jax.lax.pmean(grads, AXIS)
      metrics = {**metrics, "loss": loss, "finite_grads": _all_finite(grads)}
      updates, opt_state = distill_optimiser.update(grads, opt_state,
                                                    actor_params)
      actor_params = optax.apply_updates(actor_params, updates)
      return (actor_params, opt_state), metrics

    keys = jax.random.split(rng, config.distill_steps_per_rl_step)
    (actor_params, opt_state), metrics = jax.lax.scan(
        one_distill_step, (state.params["actor"], state.distill_opt_state),
        keys)
    finite_grads = jnp.all(metrics.pop("finite_grads"))
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["finite_grads"] = finite_grads
    state = state._replace(params={**state.params, "actor": actor_params},
                           distill_opt_state=opt_state)
    return state, metrics

  # ---------------------------------------------------------- iteration
  def iteration_device(state: TrainState):
    rng, distill_key = jax.random.split(state.rng)
    state = state._replace(rng=rng)
    state, segment = rollout(state)
    learner_state_at_start = state.learner_state
    state, metrics, mask, learner_outputs = rl_update(state, segment)
    nan = jnp.full((), jnp.nan)
    metrics.setdefault("kl_actor_learner", nan)
    eta, alpha = losses.vmpo_duals_values(state.duals)
    metrics["eta"] = eta if config.rl_loss == "vmpo" else nan
    metrics["alpha"] = alpha if config.rl_loss == "vmpo" else nan
    metrics["actor_loss"] = nan
    if roles.distill:
      state = state._replace(replay=add_to_replay(
          state.replay, segment, mask, learner_state_at_start,
          learner_outputs))
      state, distill_metrics = distill(state, distill_key)
      metrics.update({f"distill/{k}": v for k, v in distill_metrics.items()})
      metrics["actor_loss"] = distill_metrics["loss"]
    # One cheap finite check of what this iteration saw and produced; the host
    # stops the run (and writes no checkpoint) on the first flagged iteration.
    ts = segment.timesteps
    finite = {
        "env rewards/observations": _all_finite((ts.reward, ts.observation)),
        "RL loss": jnp.isfinite(metrics["learner_loss"]),
        "RL gradients": metrics.pop("finite_grads"),
        "RL-trained params": _all_finite(
            (state.params[roles.policy], state.params[roles.value],
             state.duals)),
    }
    if roles.distill:
      finite["distillation loss"] = jnp.isfinite(metrics["actor_loss"])
      finite["distillation gradients"] = metrics.pop("distill/finite_grads")
      finite["distilled actor params"] = _all_finite(state.params["actor"])
    stats = state.episode_stats
    state = state._replace(
        iteration=state.iteration + 1,
        env_steps=state.env_steps + config.env_steps_per_iteration)
    metrics = jax.lax.pmean(metrics, AXIS)
    metrics.update(jax.lax.psum(
        {"episode_count": stats.count, "episode_return_sum": stats.return_sum,
         "success_count": stats.success_count}, AXIS))
    metrics["iteration"] = state.iteration
    metrics["env_steps"] = state.env_steps
    metrics["nonfinite"] = _nonfinite_mask(finite)
    return state, metrics

  pmapped_iteration = jax.pmap(iteration_device, axis_name=AXIS,
                               donate_argnums=0)

  def train_iteration(state: TrainState):
    state, metrics = pmapped_iteration(state)
    return state, jax.tree.map(lambda x: x[0], metrics)

  # --------------------------------------------------------- evaluation
  @functools.partial(jax.jit, static_argnums=2)
  def _evaluate(acting_params, key, num_episodes):
    env_state, timestep = jax.vmap(env.reset)(
        jax.random.split(key, num_episodes))
    carry = (env_state, timestep, acting_model.initial_state(num_episodes),
             jnp.zeros((num_episodes,)), jnp.zeros((num_episodes,), bool),
             jnp.zeros((num_episodes,), bool), jnp.zeros((), jnp.int32))

    def cond(carry):
      done, steps = carry[5], carry[6]
      return jnp.logical_and(~jnp.all(done), steps < 1_000_000)

    def body(carry):
      env_state, timestep, acting_state, returns, success, done, steps = carry
      out, acting_state = acting_model.step(
          acting_params, acting_state, timestep.observation, _first(timestep))
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

  def evaluate(state: TrainState, seed: int, num_episodes: int
               ) -> Dict[str, float]:
    """Greedy (argmax) episodes of the acting model on fresh env seeds."""
    if num_episodes < 1:
      raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    acting_params = jax.tree.map(lambda x: x[0], state.params[roles.acting])
    returns, success = _evaluate(acting_params, jax.random.PRNGKey(seed),
                                 num_episodes)
    return {"eval_return": float(np.mean(returns)),
            "eval_success_rate": float(np.mean(success)),
            "eval_episodes": int(num_episodes)}

  collect = jax.pmap(rollout, axis_name=AXIS)
  phases = {
      "rollout": collect,
      "learner_update": jax.pmap(lambda state, segment: rl_update(
          state, segment)[0], axis_name=AXIS),
  }
  if roles.distill:
    phases["distillation"] = jax.pmap(
        lambda state: distill(state, state.rng)[0], axis_name=AXIS)
  return Trainer(config=config, env=env, num_devices=num_devices,
                 env_steps_per_iteration=config.env_steps_per_iteration,
                 models=models, init=init, train_iteration=train_iteration,
                 collect=collect, evaluate=evaluate, phases=phases)
