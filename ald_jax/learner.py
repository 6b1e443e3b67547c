"""The learner: the RL step (V-MPO or PPO) of the RL-trained model(s).

The learner role's state (`LearnerState`) is its own pytree: the RL-trained
params, the V-MPO target params, the optimiser state, the V-MPO duals and
their optimiser state, the GTrXL memory of each env stream of the batch at the
next segment start (when the GTrXL does not act), and its update counter.

`Learner.update(state, segment) -> (state, metrics, extras)` is a pure
function meant to run under `jax.pmap(..., axis_name=Learner.axis_name)`
over the learner's devices: gradients are averaged and every loss statistic
(V-MPO top-k included) is reduced over the global batch. The synchronous
runtime pmaps it inside its one iteration; the distributed learner pmaps it
alone on batches of actors' segments, after gathering the memory of each
batch row's env stream from its `StreamMemory` table (a host-side table that
carries each stream's GTrXL memory across that stream's consecutive segments
and resets a stream on a missing or out-of-order segment).

Per agent (see `ald_jax.agents`): lstm trains the LSTM, gtrxl the GTrXL, asym
the LSTM policy and a GTrXL critic, ald the GTrXL with `alpha_reg *
KL(sg[pi_actor] || pi_learner)` toward the recorded behaviour logits.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ald_jax import agents
from ald_jax import losses
from ald_jax.acting import Segment, first

AXIS = "devices"
Params = Dict[str, Any]


def optimiser(learning_rate: float, max_grad_norm: float
              ) -> optax.GradientTransformation:
  """Adam, after a global-norm clip when `max_grad_norm > 0`."""
  adam = optax.adam(learning_rate)
  if max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adam)
  return adam


def all_finite(tree: Any) -> jax.Array:
  """bool []: every float leaf of `tree` is finite (True for no leaves)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class LearnerState(NamedTuple):
  """The learner role's state (one device's copy under pmap)."""
  params: Params                 # the RL-trained models, {'actor'?, 'learner'?}
  target_params: Params          # V-MPO target policy (same keys)
  opt_state: Any
  duals: losses.VmpoDuals
  dual_opt_state: Any
  memory: Any                    # [B, ...] GTrXL state at the next segment
                                 # start of each row's stream; () if not carried
  update_count: jax.Array        # int32 [], RL updates taken


class UpdateExtras(NamedTuple):
  """What an update hands to distillation (and to the replay)."""
  mask: jax.Array                # f32 [T, B], 0 on LAST steps
  outputs: Tuple[jax.Array, jax.Array]  # policy model's (logits [T, B, A],
                                 # values [T, B]) on the segment, pre-update
  memory_at_start: Any           # [B, ...] the GTrXL state the segment was
                                 # unrolled from (() when not carried)


class Learner:
  """Pure RL-step functions for one Config and its models.

  Attributes:
    config, models, roles: as given / of `config.agent`.
    rl_keys: names of the RL-trained models.
    carried: whether the learner carries the GTrXL memory (`LearnerState.
      memory`) instead of taking it from the segment's acting state.
  """
  axis_name = AXIS

  def __init__(self, config: Any, models: Dict[str, Any], num_actions: int):
    self.config = config
    self.models = models
    self.roles = agents.ROLES[config.agent]
    self.rl_keys = self.roles.rl_models
    self.carried = self.roles.learner_carried
    self.num_actions = num_actions
    self.rl_optimiser = optimiser(config.learner_learning_rate,
                                  config.max_grad_norm)
    self.dual_optimiser = optax.adam(config.vmpo_dual_learning_rate)

  # ---------------------------------------------------------------- init
  def initial_memory(self, batch: int) -> Any:
    """The GTrXL state of `batch` fresh streams (() when not carried)."""
    return self.models["learner"].initial_state(batch) if self.carried else ()

  def init(self, params: Params, batch: int) -> LearnerState:
    """State for `batch` env rows (per device) from the agent's params."""
    config = self.config
    rl_params = {k: params[k] for k in self.rl_keys}
    return LearnerState(
        params=rl_params,
        target_params=rl_params,
        opt_state=self.rl_optimiser.init(rl_params),
        duals=losses.init_vmpo_duals(config.vmpo_init_eta,
                                     config.vmpo_init_alpha),
        dual_opt_state=self.dual_optimiser.init(
            losses.init_vmpo_duals(config.vmpo_init_eta,
                                   config.vmpo_init_alpha)),
        memory=self.initial_memory(batch),
        update_count=jnp.zeros((), jnp.int32))

  # ------------------------------------------------------------- RL loss
  def _unroll_with_bootstrap(self, model, params, initial_state,
                             segment: Segment):
    """Outputs [T] (+ value [T+1] incl. the bootstrap) and state after T."""
    obs = segment.timesteps.observation
    start = first(segment.timesteps)
    out, state_t = model.unroll(params, initial_state, obs[:-1], start[:-1])
    boot, _ = model.step(params, state_t, obs[-1], start[-1])
    values = jnp.concatenate(
        [out.value, jax.lax.stop_gradient(boot.value)[None]], axis=0)
    return out.logits, values, state_t

  def _initial_train_state(self, name: str, memory: Any, segment: Segment):
    return segment.acting_state if name == self.roles.acting else memory

  def loss(self, rl_params: Params, duals: losses.VmpoDuals,
           target_params: Params, memory: Any, segment: Segment):
    """The RL loss (+ ald's regulariser) of one device's share of a batch.

    Returns:
      (loss, (metrics, memory after the segment, mask [T, B],
      stop-gradient (logits [T, B, A], values [T, B]) of the policy model)).
    """
    config, roles, models = self.config, self.roles, self.models
    T = segment.actions.shape[0]  # pylint: disable=invalid-name
    batch = segment.actions.shape[1]
    outputs = {}
    for name in self.rl_keys:
      outputs[name] = self._unroll_with_bootstrap(
          models[name], rl_params[name],
          self._initial_train_state(name, memory, segment), segment)
    logits = outputs[roles.policy][0]                      # [T, B, A]
    values = outputs[roles.value][1]                       # [T + 1, B]
    chex.assert_shape(logits, (T, batch, self.num_actions))
    chex.assert_shape(values, (T + 1, batch))
    next_memory = outputs["learner"][2] if self.carried else memory
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
          target_params[roles.policy],
          self._initial_train_state(roles.policy, memory, segment),
          ts.observation[:-1], first(ts)[:-1])[0].logits)
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
    return loss, (metrics, next_memory, trans.mask, outputs_now)

  # -------------------------------------------------------------- update
  def update(self, state: LearnerState, segment: Segment
             ) -> Tuple[LearnerState, Dict[str, jax.Array], UpdateExtras]:
    """`rl_steps_per_iteration` gradient steps on one batch (under pmap).

    The memory of `state` is that of the batch rows' streams at the segment
    start; the returned state's memory is theirs after the segment. Metrics
    (and the extras) are those of the first pass, with pre-update params like
    the segment's data; `metrics['finite_grads']` covers every pass.
    """
    config = self.config
    grad_fn = jax.grad(self.loss, argnums=(0, 1), has_aux=True)

    def one_rl_step(carry, _):
      rl_params, duals, rl_opt_state, dual_opt_state = carry
      (grads, dual_grads), aux = grad_fn(rl_params, duals, state.target_params,
                                         state.memory, segment)
      grads, dual_grads = jax.lax.pmean((grads, dual_grads), AXIS)
      aux[0]["finite_grads"] = all_finite((grads, dual_grads))
      updates, rl_opt_state = self.rl_optimiser.update(grads, rl_opt_state,
                                                       rl_params)
      rl_params = optax.apply_updates(rl_params, updates)
      if config.rl_loss == "vmpo":
        dual_updates, dual_opt_state = self.dual_optimiser.update(
            dual_grads, dual_opt_state, duals)
        duals = optax.apply_updates(duals, dual_updates)
      return (rl_params, duals, rl_opt_state, dual_opt_state), aux

    carry = (state.params, state.duals, state.opt_state, state.dual_opt_state)
    carry, aux = jax.lax.scan(one_rl_step, carry, None,
                              length=config.rl_steps_per_iteration)
    rl_params, duals, rl_opt_state, dual_opt_state = carry
    grads_finite = jnp.all(aux[0].pop("finite_grads"))
    metrics, next_memory, mask, outputs_now = jax.tree.map(
        lambda x: x[0], aux)
    metrics["finite_grads"] = grads_finite
    update_count = state.update_count + 1
    refresh = update_count % config.target_update_period == 0
    target_params = jax.tree.map(lambda new, old: jnp.where(refresh, new, old),
                                 rl_params, state.target_params)
    extras = UpdateExtras(mask=mask, outputs=outputs_now,
                          memory_at_start=state.memory)
    state = LearnerState(
        params=rl_params, target_params=target_params, opt_state=rl_opt_state,
        duals=duals, dual_opt_state=dual_opt_state, memory=next_memory,
        update_count=update_count)
    return state, metrics, extras


# ------------------------------------------------- per-stream GTrXL memory ---


class StreamMemory:
  """Host table of each env stream's GTrXL state at its next segment start.

  A stream is any hashable id (the distributed runtime uses
  `(actor_id, env_index)`). Each segment of a stream carries its sequence
  number `seq` (0, 1, 2, ... per actor incarnation) and an `epoch` (the
  actor's incarnation). `gather` hands out the memory rows for a batch; when
  a stream's segment is not the one expected next (a gap: a dropped or
  missing segment, an out-of-order one, a restarted actor), that stream's
  memory is reset to the initial state first and `resets` counts it.
  `scatter` stores the memory after the batch.

  With `initial` = () (the GTrXL is not carried) the table stores nothing
  and only checks the sequence.
  """

  def __init__(self, initial_row: Any):
    """`initial_row`: the state of one fresh stream (leaves [1, ...])."""
    self._initial = jax.device_get(initial_row)
    self._rows: Dict[Hashable, Any] = {}
    self._expected: Dict[Hashable, Tuple[int, int]] = {}
    self.resets = 0

  def gather(self, streams: List[Hashable], seqs: List[Tuple[int, int]]
             ) -> Any:
    """Memory rows [B, ...] of `streams` for segments `seqs` ((epoch, seq))."""
    rows = []
    for stream, seq in zip(streams, seqs):
      expected = self._expected.get(stream)
      if expected is not None and expected != tuple(seq):
        self.resets += 1
        self._rows.pop(stream, None)
      elif expected is None and tuple(seq)[1] != 0:
        # First sight of a stream mid-way (e.g. after a learner restart).
        self.resets += 1
      rows.append(self._rows.get(stream, self._initial))
    if not jax.tree.leaves(self._initial):
      return self._initial
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *rows)

  def scatter(self, streams: List[Hashable], seqs: List[Tuple[int, int]],
              memory: Any) -> None:
    """Stores `memory` [B, ...] as each stream's state after its segment."""
    memory = jax.device_get(memory)
    for i, (stream, (epoch, seq)) in enumerate(zip(streams, seqs)):
      self._expected[stream] = (epoch, seq + 1)
      if jax.tree.leaves(self._initial):
        self._rows[stream] = jax.tree.map(lambda x: x[i:i + 1], memory)

  def __len__(self) -> int:
    return len(self._expected)
