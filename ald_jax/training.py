"""The synchronous runtime: act -> learn -> distill in one jitted (pmapped) call.

One iteration, top to bottom (`make_trainer`'s `iteration_device`):

  1. Acting (`ald_jax.acting`): a `lax.scan` over `unroll_length` steps of
     the vmapped envs with the acting model (the LSTM for lstm/asym/ald, the
     GTrXL for gtrxl), recording time steps, actions and behaviour logits.
  2. Learner (`ald_jax.learner`): the RL step(s) on that segment: V-MPO (or
     PPO) on the RL-trained model(s), plus, for ald, `alpha_reg *
     KL(sg[pi_actor] || pi_learner)`.
  3. Distillation (`ald_jax.distillation`, ald only): the segment enters the
     on-device replay of the last `replay_segments` segments, then
     `distill_steps_per_rl_step` actor minibatch steps with learner targets
     recomputed by the just-updated learner (or stored from its RL step).
  4. A finite check of what the iteration saw and produced (`nonfinite`).

Which model does what, per agent: `ald_jax.agents` (the one list of agents).

The state is the three roles' own pytrees (`TrainState.acting`, `.learner`,
`.distill`) plus the iteration's RNG and counters; `TrainState.params` shows
the agent's params as one `{'actor'?, 'learner'?}` dict.

Multi-device: everything runs under `jax.pmap` over `num_devices` local
devices. Each device steps `num_envs / num_devices` envs; gradients are
averaged and every masked mean / V-MPO statistic is taken over the whole
global batch (`axis_name`), so 1 and 2 devices give the same update. Each env
carries its own sampling key, so the actions do not depend on the device split
either. All state leaves carry a leading device axis.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ald_jax import acting as acting_lib
from ald_jax import agents
from ald_jax import distillation
from ald_jax import learner as learner_lib
from ald_jax import losses
from ald_jax import networks
from ald_jax.config import Config
from envs.api import Environment

AXIS = learner_lib.AXIS
Params = Dict[str, Any]

# Kept for the modules that read the agents' roles from here.
_ROLES = agents.ROLES
build_models = agents.build_models
# The roles' types, under their former names.
Segment = acting_lib.Segment
EpisodeStats = acting_lib.EpisodeStats
Replay = distillation.Replay


class TrainState(NamedTuple):
  """Everything a run needs to continue: checkpoint this one object."""
  acting: acting_lib.ActingState          # envs, acting model state, keys
  learner: learner_lib.LearnerState       # RL params, target, duals, memory
  distill: Optional[distillation.DistillState]  # ald: actor params, replay
  rng: jax.Array                 # uint32 [2], replicated
  iteration: jax.Array           # int32 []
  env_steps: jax.Array           # int32 [] (global)

  @property
  def params(self) -> Params:
    """{'actor': ..., 'learner': ...} as the agent has (a view: the values
    are the roles' own params objects)."""
    params = dict(self.learner.params)
    if self.distill is not None:
      params["actor"] = self.distill.params
    return params

  @property
  def env_state(self) -> Any:
    return self.acting.env_state


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
  `roles` holds the role objects the iteration is built from ('acting',
  'learner' and, for ald, 'distiller'). States and segments carry a leading
  device axis.
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
  roles: Dict[str, Any] = dataclasses.field(default_factory=dict)

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


_all_finite = learner_lib.all_finite


def _nonfinite_mask(finite: Dict[str, jax.Array]) -> jax.Array:
  """int32 [] bitmask over NONFINITE_QUANTITIES, reduced over devices."""
  bad = jnp.stack([~finite.get(name, jnp.bool_(True))
                   for name in NONFINITE_QUANTITIES]).astype(jnp.int32)
  bad = jnp.minimum(jax.lax.psum(bad, AXIS), 1)
  return jnp.sum(bad << jnp.arange(len(NONFINITE_QUANTITIES), dtype=jnp.int32))


def make_trainer(config: Config, env: Environment) -> Trainer:
  """Builds the jitted training iteration, state initialiser and evaluator."""
  config.validate()
  roles = agents.ROLES[config.agent]
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
  models = agents.build_models(config, env)
  acting = acting_lib.Acting(env, models[roles.acting], config.unroll_length)
  learner = learner_lib.Learner(config, models, env.num_actions)
  distiller = (distillation.Distiller(
      config, models, env.num_actions, env.observation_size,
      num_devices=num_devices) if roles.distill else None)

  def acting_params(state: TrainState) -> Params:
    if roles.distill:
      return state.distill.params
    return state.learner.params[roles.acting]

  # ---------------------------------------------------------------- init
  def init_device(params: Params, env_keys: jax.Array, action_keys: jax.Array,
                  rng: jax.Array) -> TrainState:
    """State of one device, given replicated params and its envs' keys."""
    return TrainState(
        acting=acting.init(env_keys, action_keys),
        learner=learner.init(params, local_envs),
        distill=distiller.init(params["actor"]) if roles.distill else None,
        rng=rng,
        iteration=jnp.zeros((), jnp.int32),
        env_steps=jnp.zeros((), jnp.int32))

  def init() -> TrainState:
    key = jax.random.PRNGKey(config.seed)
    param_key, env_key, action_key, rng = jax.random.split(key, 4)
    params = agents.init_params(models, param_key)
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

  # ------------------------------------------------------------- phases
  def rollout(state: TrainState) -> Tuple[TrainState, Segment]:
    acting_state, segment = acting.rollout(acting_params(state), state.acting)
    return state._replace(acting=acting_state), segment

  def rl_update(state: TrainState, segment: Segment):
    learner_state, metrics, extras = learner.update(state.learner, segment)
    return state._replace(learner=learner_state), metrics, extras

  def distill(state: TrainState, rng: jax.Array):
    distill_state, metrics = distiller.distill(
        state.distill, state.learner.params["learner"], rng)
    return state._replace(distill=distill_state), metrics

  # ---------------------------------------------------------- iteration
  def iteration_device(state: TrainState):
    rng, distill_key = jax.random.split(state.rng)
    state = state._replace(rng=rng)
    # 1. Act.
    state, segment = rollout(state)
    # 2. Learn.
    state, metrics, extras = rl_update(state, segment)
    nan = jnp.full((), jnp.nan)
    metrics.setdefault("kl_actor_learner", nan)
    eta, alpha = losses.vmpo_duals_values(state.learner.duals)
    metrics["eta"] = eta if config.rl_loss == "vmpo" else nan
    metrics["alpha"] = alpha if config.rl_loss == "vmpo" else nan
    metrics["actor_loss"] = nan
    # 3. Distill.
    if roles.distill:
      replay = distiller.add(state.distill.replay, segment, extras.mask,
                             extras.memory_at_start, extras.outputs)
      state = state._replace(distill=state.distill._replace(replay=replay))
      state, distill_metrics = distill(state, distill_key)
      metrics.update({f"distill/{k}": v for k, v in distill_metrics.items()})
      metrics["actor_loss"] = distill_metrics["loss"]
    # 4. One cheap finite check of what this iteration saw and produced; the
    # host stops the run (and writes no checkpoint) on the first flagged one.
    ts = segment.timesteps
    params = state.params
    finite = {
        "env rewards/observations": _all_finite((ts.reward, ts.observation)),
        "RL loss": jnp.isfinite(metrics["learner_loss"]),
        "RL gradients": metrics.pop("finite_grads"),
        "RL-trained params": _all_finite(
            (params[roles.policy], params[roles.value], state.learner.duals)),
    }
    if roles.distill:
      finite["distillation loss"] = jnp.isfinite(metrics["actor_loss"])
      finite["distillation gradients"] = metrics.pop("distill/finite_grads")
      finite["distilled actor params"] = _all_finite(params["actor"])
    stats = state.acting.episode_stats
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

  def evaluate(state: TrainState, seed: int, num_episodes: int
               ) -> Dict[str, float]:
    """Greedy (argmax) episodes of the acting model on fresh env seeds."""
    return acting.evaluate(jax.tree.map(lambda x: x[0], acting_params(state)),
                           seed, num_episodes)

  collect = jax.pmap(rollout, axis_name=AXIS)
  phases = {
      "rollout": collect,
      "learner_update": jax.pmap(lambda state, segment: rl_update(
          state, segment)[0], axis_name=AXIS),
  }
  if roles.distill:
    phases["distillation"] = jax.pmap(
        lambda state: distill(state, state.rng)[0], axis_name=AXIS)
  role_objects = {"acting": acting, "learner": learner}
  if distiller is not None:
    role_objects["distiller"] = distiller
  return Trainer(config=config, env=env, num_devices=num_devices,
                 env_steps_per_iteration=config.env_steps_per_iteration,
                 models=models, init=init, train_iteration=train_iteration,
                 collect=collect, evaluate=evaluate, phases=phases,
                 roles=role_objects)
