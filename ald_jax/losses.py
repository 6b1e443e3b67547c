"""Returns and losses of Actor-Learner Distillation, as pure array functions.

Everything here is a pure function of `jax.Array`s, usable in a notebook
without the training loop. Arrays are time-major: `[T, B]` for per-step
quantities, `[T + 1, B]` for values that include the bootstrap step, and
`[T, B, A]` for logits over `A` discrete actions. Each loss returns
`(scalar loss, dict[str, scalar] metrics)`.

This is the only module of the project that imports `rlax` (which pulls in
tfp-nightly through distrax): if a JAX upgrade breaks that chain, only this file
changes. What comes from rlax and what is ours is stated per function.

Episode boundaries. Segments are built from dm_env-convention time steps by
`transitions_from_timesteps`, which also returns a `mask` that is 0 on the
"transition" out of a LAST step into the next episode's FIRST step (the action
taken there is ignored by the environment). The return functions take that
mask (`mask=`): a return never mixes in anything after a LAST step, so a
truncated episode (LAST with discount 1) bootstraps from the value of its LAST
observation and a terminated one (discount 0) does not bootstrap. Without a
mask, a truncation followed by a new episode inside the segment is handled as
a termination whenever `lambda_ > 0` or `n > 1`.

Multi-device. Every masked reduction takes `axis_name`. When it is given (the
function runs under `pmap`/`shard_map` with that axis), sums and counts are
`psum`-ed over the axis, so each device returns the loss of the concatenated
global batch. Differentiate that loss on each device and `pmean` the gradients
of replicated parameters: JAX transposes `psum` into `psum`, so the per-device
gradient carries each device's contribution times the device count, and the
`pmean` turns it into the exact gradient of the global loss.

Masks are float arrays of 0s and 1s (1 = the step counts). Masked steps change
nothing: neither the loss nor any gradient depends on values at masked steps.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, NamedTuple, Optional, Tuple

import chex
import dm_env
import jax
import jax.numpy as jnp
import numpy as np
import rlax

Array = jax.Array
Metrics = Dict[str, Array]

_LAST = int(dm_env.StepType.LAST)


# ------------------------------------------------------------------ helpers
def _check_range(name: str, value: Any, low: float, high: float,
                 low_open: bool = False) -> None:
  """Raises ValueError unless a number is in [low, high] (or (low, high])."""
  if not isinstance(value, numbers.Real):
    return  # Arrays (possibly traced) cannot be checked without a sync.
  too_low = value <= low if low_open else value < low
  if too_low or value > high:
    bracket = "(" if low_open else "["
    raise ValueError(
        f"`{name}` must be in {bracket}{low}, {high}], got {value}.")


def _psum(x: Array, axis_name: Optional[str]) -> Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def masked_mean(x: Array, mask: Array,
                axis_name: Optional[str] = None) -> Array:
  """Mean of `x` over the entries where `mask` is 1 (ours).

  Args:
    x: float [...], any shape.
    mask: float [...], same shape, 0 or 1 (other non-negative weights give a
      weighted mean).
    axis_name: when given, sum and count are psum-ed over this mapped axis:
      the result is global sum / global count, identical on every device.

  Returns:
    float32 [] (0 when every entry is masked). Values of `x` at masked entries
    (even inf or nan) do not reach the result or its gradient.
  """
  chex.assert_equal_shape([x, mask])
  mask = mask.astype(x.dtype)
  total = _psum(jnp.sum(jnp.where(mask > 0, x * mask, 0.)), axis_name)
  count = _psum(jnp.sum(mask), axis_name)
  return total / jnp.maximum(count, jnp.finfo(x.dtype).tiny)


def _global_mean(x: Array, axis_name: Optional[str]) -> Array:
  """Unmasked mean over all entries of the (possibly split) global batch."""
  return _psum(jnp.sum(x), axis_name) / _psum(
      jnp.asarray(x.size, x.dtype), axis_name)


def categorical_kl(p_logits: Array, q_logits: Array) -> Array:
  """KL(p || q) between categorical distributions given by logits (ours).

  rlax's `categorical_kl_divergence` is marked for deprecation, so this is
  written with `jax.nn`; actions with p = 0 (logit -inf) contribute 0.

  Args:
    p_logits: float [..., A].
    q_logits: float [..., A].

  Returns:
    float [...], in nats. Gradients flow to both arguments.
  """
  chex.assert_equal_shape([p_logits, q_logits])
  log_p = jax.nn.log_softmax(p_logits, axis=-1)
  log_q = jax.nn.log_softmax(q_logits, axis=-1)
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.), axis=-1)


def _log_prob(logits: Array, actions: Array) -> Array:
  """log pi(a|s): logits float [..., A], actions int [...] -> float [...]."""
  log_pi = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_pi, actions[..., None], axis=-1)[..., 0]


def _entropy(logits: Array) -> Array:
  log_pi = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_pi)
  return -jnp.sum(jnp.where(p > 0, p * log_pi, 0.), axis=-1)


# ---------------------------------------------------------------- returns
class Transitions(NamedTuple):
  """The `T` transitions of a segment of `T + 1` time steps, all [T, B].

  reward:   float32, reward of the transition t -> t+1.
  discount: float32, gamma * (env discount of step t+1); 0 when step t is LAST.
  mask:     float32, 1 where step t is not LAST (its action mattered).
  """
  reward: Array
  discount: Array
  mask: Array


def transitions_from_timesteps(step_type: Array, reward: Array,
                               discount: Array, gamma: float) -> Transitions:
  """Per-transition reward, discount and mask from dm_env time steps (ours).

  Args:
    step_type: int32 [T + 1, B], dm_env StepType codes (FIRST 0, MID 1, LAST 2).
    reward: float32 [T + 1, B], reward of the transition INTO each step.
    discount: float32 [T + 1, B], env discount of the transition into each
      step (0 on termination, 1 otherwise, including time-limit truncation).
    gamma: the agent's discount factor, in [0, 1].

  Returns:
    `Transitions` of shape [T, B]: reward = reward[1:]; discount =
    gamma * discount[1:], set to 0 where step_type[:-1] is LAST (nothing flows
    from one episode into the next); mask = (step_type[:-1] != LAST).
  """
  chex.assert_rank([step_type, reward, discount], 2)
  chex.assert_equal_shape([step_type, reward, discount])
  _check_range("gamma", gamma, 0., 1.)
  if step_type.shape[0] < 2:
    raise ValueError("`step_type` needs at least 2 time steps (T + 1 >= 2), "
                     f"got shape {step_type.shape}.")
  mask = (step_type[:-1] != _LAST).astype(jnp.float32)
  return Transitions(
      reward=reward[1:].astype(jnp.float32),
      discount=gamma * discount[1:].astype(jnp.float32) * mask,
      mask=mask)


def _check_returns_inputs(rewards: Array, discounts: Array, values: Array,
                          mask: Optional[Array]) -> Array:
  """Checks [T, B] / [T + 1, B] shapes; returns the mask (ones if None)."""
  chex.assert_rank([rewards, discounts, values], 2)
  chex.assert_equal_shape([rewards, discounts])
  if values.shape != (rewards.shape[0] + 1, rewards.shape[1]):
    raise ValueError(
        f"`values` must have shape [T + 1, B] = "
        f"{(rewards.shape[0] + 1, rewards.shape[1])} (bootstrap included), "
        f"got {values.shape}.")
  if mask is None:
    return jnp.ones_like(rewards)
  chex.assert_equal_shape([rewards, mask])
  return mask.astype(rewards.dtype)


def _cut_lambda(lambda_: Any, mask: Array) -> Array:
  """Per-step lambda [T, B]: 0 where the next transition is masked.

  A transition t whose successor t+1 leaves a LAST step must bootstrap fully
  from V(s_{t+1}) (the LAST observation) instead of mixing in the return of
  the next episode: that is lambda_t = 0.
  """
  next_valid = jnp.concatenate([mask[1:], jnp.ones_like(mask[:1])], axis=0)
  return lambda_ * next_valid


def _time_vmap(fn, *args):
  """Maps an rlax function over one trajectory [T] across the batch axis 1."""
  return jax.vmap(fn, in_axes=1, out_axes=1)(*args)


def lambda_returns(rewards: Array, discounts: Array, values: Array,
                   lambda_: float, mask: Optional[Array] = None) -> Array:
  """TD(lambda) returns G_t = r_t + d_t [(1 - lambda) V_{t+1} + lambda G_{t+1}].

  The recursion is `rlax.lambda_returns` (vmapped over B); the per-step lambda
  cut at episode boundaries and G = V at masked steps are ours.

  Args:
    rewards: float32 [T, B] (`Transitions.reward`).
    discounts: float32 [T, B] (`Transitions.discount`, gamma included).
    values: float32 [T + 1, B], V(s_0..s_T); values[T] bootstraps the end.
    lambda_: in [0, 1]; 1 gives Monte-Carlo returns bootstrapped at T.
    mask: optional float32 [T, B] (`Transitions.mask`); see the module
      docstring. Needed for truncations inside the segment.

  Returns:
    float32 [T, B]; equal to values[:-1] at masked steps. No stop-gradient is
    applied: pass stop-gradiented values to use the result as a target.
  """
  _check_range("lambda_", lambda_, 0., 1.)
  mask = _check_returns_inputs(rewards, discounts, values, mask)
  returns = _time_vmap(
      lambda r, d, v, lam: rlax.lambda_returns(r, d, v, lam),
      rewards, discounts, values[1:], _cut_lambda(lambda_, mask))
  return jnp.where(mask > 0, returns, values[:-1])


def n_step_returns(rewards: Array, discounts: Array, values: Array, n: int,
                   mask: Optional[Array] = None) -> Array:
  """n-step bootstrapped returns, truncated at the segment end and at LAST.

  G_t = r_t + d_t r_{t+1} + ... + d_t..d_{t+n-2} r_{t+n-1} +
  d_t..d_{t+n-1} V_{t+n}, where the sum stops early (bootstrapping from V) at
  the segment end T or at a LAST step. The recursion is
  `rlax.n_step_bootstrapped_returns` (vmapped over B); the boundary cut is ours.

  Args:
    rewards: float32 [T, B].
    discounts: float32 [T, B].
    values: float32 [T + 1, B].
    n: number of steps, an int >= 1 (static).
    mask: optional float32 [T, B] (`Transitions.mask`).

  Returns:
    float32 [T, B]; values[:-1] at masked steps; no stop-gradient applied.
  """
  if not isinstance(n, numbers.Integral) or n < 1:
    raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
  mask = _check_returns_inputs(rewards, discounts, values, mask)
  returns = _time_vmap(
      lambda r, d, v, lam: rlax.n_step_bootstrapped_returns(
          r, d, v, int(n), lambda_t=lam),
      rewards, discounts, values[1:], _cut_lambda(1., mask))
  return jnp.where(mask > 0, returns, values[:-1])


def gae(rewards: Array, discounts: Array, values: Array, lambda_: float,
        mask: Optional[Array] = None) -> Tuple[Array, Array]:
  """Generalised advantage estimation.

  A_t = delta_t + d_t lambda A_{t+1}, delta_t = r_t + d_t V_{t+1} - V_t, via
  `rlax.truncated_generalized_advantage_estimation` (vmapped over B); the
  boundary cut is ours.

  Args:
    rewards: float32 [T, B].
    discounts: float32 [T, B].
    values: float32 [T + 1, B].
    lambda_: in [0, 1].
    mask: optional float32 [T, B] (`Transitions.mask`).

  Returns:
    (advantages, returns), float32 [T, B] each, returns = advantages +
    values[:-1] (equal to `lambda_returns`). Advantages are 0 at masked steps.
    No stop-gradient is applied.
  """
  _check_range("lambda_", lambda_, 0., 1.)
  mask = _check_returns_inputs(rewards, discounts, values, mask)
  advantages = _time_vmap(
      lambda r, d, lam, v: rlax.truncated_generalized_advantage_estimation(
          r, d, lam, v),
      rewards, discounts, _cut_lambda(lambda_, mask), values)
  advantages = jnp.where(mask > 0, advantages, 0.)
  return advantages, advantages + values[:-1]


def vtrace(rewards: Array, discounts: Array, values: Array, log_rhos: Array,
           lambda_: float = 1., clip_rho_threshold: float = 1.,
           mask: Optional[Array] = None) -> Tuple[Array, Array]:
  """V-trace targets and policy-gradient advantages (IMPALA).

  vs_t = V_t + rho'_t delta_t + d_t c_t (vs_{t+1} - V_{t+1}), with
  delta_t = r_t + d_t V_{t+1} - V_t, rho'_t = min(clip_rho_threshold, rho_t),
  c_t = lambda min(1, rho_t), vs_T = V_T; pg advantage
  min(clip_rho_threshold, rho_t) (r_t + d_t [lambda vs_{t+1} +
  (1 - lambda) V_{t+1}] - V_t). Computed by `rlax.vtrace_td_error_and_advantage`
  (vmapped over B); the boundary cut is ours.

  Args:
    rewards: float32 [T, B].
    discounts: float32 [T, B].
    values: float32 [T + 1, B], under the learner policy.
    log_rhos: float32 [T, B], log pi(a_t|s_t) - log mu(a_t|s_t).
    lambda_: in [0, 1].
    clip_rho_threshold: > 0, clips rho for both the target and the advantage.
    mask: optional float32 [T, B] (`Transitions.mask`).

  Returns:
    (vs, pg_advantages), float32 [T, B] each; vs = values[:-1] and advantage 0
    at masked steps. No stop-gradient is applied.
  """
  _check_range("lambda_", lambda_, 0., 1.)
  _check_range("clip_rho_threshold", clip_rho_threshold, 0., np.inf,
               low_open=True)
  mask = _check_returns_inputs(rewards, discounts, values, mask)
  chex.assert_equal_shape([rewards, log_rhos])

  def one_trajectory(v_tm1, v_t, r, d, rho, lam):
    return rlax.vtrace_td_error_and_advantage(
        v_tm1, v_t, r, d, rho, lambda_=lam,
        clip_rho_threshold=clip_rho_threshold,
        clip_pg_rho_threshold=clip_rho_threshold,
        stop_target_gradients=False)

  out = _time_vmap(one_trajectory, values[:-1], values[1:], rewards,
                   discounts, jnp.exp(log_rhos), _cut_lambda(lambda_, mask))
  vs = jnp.where(mask > 0, out.errors + values[:-1], values[:-1])
  pg_advantages = jnp.where(mask > 0, out.pg_advantage, 0.)
  return vs, pg_advantages


# ------------------------------------------------------------------ V-MPO
class VmpoDuals(NamedTuple):
  """Unconstrained V-MPO Lagrange multiplier parameters (float32 [] each).

  The multipliers are eta = softplus(temperature_param) and
  alpha = softplus(alpha_param) (see `vmpo_duals_values`), so any real value
  of a parameter is valid and a gradient step can never make them negative.
  """
  temperature_param: Array
  alpha_param: Array


def _dual_value(param: Array) -> Array:
  return jax.nn.softplus(param)


def _inverse_softplus(x: float) -> float:
  return float(x + np.log(-np.expm1(-x)))  # log(exp(x) - 1), stable.


def init_vmpo_duals(init_eta: float, init_alpha: float) -> VmpoDuals:
  """Dual parameters whose multipliers start at `init_eta` and `init_alpha`.

  Args:
    init_eta: initial temperature eta > 0.
    init_alpha: initial trust-region multiplier alpha > 0.
  """
  _check_range("init_eta", init_eta, 0., np.inf, low_open=True)
  _check_range("init_alpha", init_alpha, 0., np.inf, low_open=True)
  return VmpoDuals(
      temperature_param=jnp.asarray(_inverse_softplus(init_eta), jnp.float32),
      alpha_param=jnp.asarray(_inverse_softplus(init_alpha), jnp.float32))


def vmpo_duals_values(duals: VmpoDuals) -> Tuple[Array, Array]:
  """(eta, alpha) = softplus of the dual parameters, float32 [] each."""
  return (_dual_value(duals.temperature_param), _dual_value(duals.alpha_param))


def _top_k_selection(advantages: Array, mask: Array, top_k_fraction: float,
                     axis_name: Optional[str]) -> Tuple[Array, Array]:
  """The top `top_k_fraction` of the valid (mask 1) global batch by advantage.

  k = max(1, floor(top_k_fraction * number of valid steps)), counted over the
  global batch (rlax counts masked steps too, which keeps every valid step of
  a mostly-masked batch; hence ours). Ties at the threshold are all kept.

  Returns:
    (selected float32 [T, B] of 0/1, threshold float32 []: the k-th largest
    valid advantage; -inf when no step is valid).
  """
  valid = mask > 0
  valid_advantages = jnp.where(valid, advantages, -jnp.inf)
  if axis_name is not None:
    valid_advantages_all = jax.lax.all_gather(valid_advantages, axis_name)
  else:
    valid_advantages_all = valid_advantages
  flat = jnp.sort(valid_advantages_all.reshape(-1))
  num_valid = _psum(jnp.sum(valid.astype(jnp.int32)), axis_name)
  k = jnp.maximum(
      jnp.floor(top_k_fraction * num_valid.astype(jnp.float32)).astype(
          jnp.int32), 1)
  threshold = flat[flat.shape[0] - k]
  selected = valid & (advantages >= threshold)
  return selected.astype(jnp.float32), threshold


def vmpo_loss(logits: Array,
              target_logits: Array,
              actions: Array,
              advantages: Array,
              duals: VmpoDuals,
              mask: Array,
              eps_eta: float,
              eps_alpha: float,
              top_k_fraction: float = 0.5,
              axis_name: Optional[str] = None,
              importance_weights: Optional[Array] = None,
              ) -> Tuple[Array, Metrics]:
  """V-MPO policy loss for discrete actions (Song et al., 2019), masked.

  With S the top `top_k_fraction` of valid steps by advantage A,
  psi = softmax_S(A / eta) (times optional importance weights, renormalised),
  KL = masked mean over states of KL(pi_target || pi):

    policy loss        -sum_S psi log pi(a|s)
    temperature loss   eta eps_eta + eta log mean_S exp(A / eta)
    KL penalty         sg[alpha] KL
    alpha loss         alpha (eps_alpha - sg[KL])
    loss = sum of the four.

  Gradients reach `logits` (policy loss and KL penalty), eta (temperature
  loss) and alpha (alpha loss). Advantages, psi, importance weights and the
  target logits are stop-gradiented. Descending the loss raises eta when psi
  is more peaked than eps_eta allows (KL(psi || uniform on S) > eps_eta), and
  raises alpha when KL > eps_alpha.

  From rlax (`rlax.vmpo_loss`): psi, the temperature loss and the KL/alpha
  penalty terms, including their `axis_name` sums and stop-gradients. Ours:
  the masked top-k selection (passed to rlax as `restarting_weights`), the
  softplus duals (rlax's `projection_operator`), the masked-mean KL, the
  reduction to a scalar and a constant shift of the advantages by their
  selected maximum (keeps exp(A / eta) from underflowing in float32; it moves
  the temperature loss by a constant that is added back, so neither value nor
  gradient changes).

  Args:
    logits: float32 [T, B, A], the policy being trained.
    target_logits: float32 [T, B, A], the target (old) policy.
    actions: int32 [T, B], actions taken.
    advantages: float32 [T, B].
    duals: `VmpoDuals`.
    mask: float32 [T, B] of 0/1.
    eps_eta: temperature constraint epsilon_eta > 0 (nats).
    eps_alpha: trust-region bound epsilon_alpha > 0 (nats).
    top_k_fraction: in (0, 1], fraction of valid steps kept.
    axis_name: mapped axis of a split batch (see module docstring).
    importance_weights: optional float32 [T, B] >= 0 (e.g. clipped pi / mu),
      multiplied into psi before normalisation.

  Returns:
    (loss float32 [], metrics): eta, alpha, policy_loss, temperature_loss,
    kl_penalty, alpha_loss, kl_target, top_k_threshold (the smallest selected
    advantage), num_selected, psi_max, advantage_mean and entropy (nats, of
    pi; masked).
  """
  chex.assert_rank([logits, target_logits, actions, advantages, mask],
                   [3, 3, 2, 2, 2])
  chex.assert_equal_shape([logits, target_logits])
  chex.assert_equal_shape([actions, advantages, mask])
  chex.assert_equal_shape_prefix([logits, actions], 2)
  chex.assert_type(actions, int)
  _check_range("eps_eta", eps_eta, 0., np.inf, low_open=True)
  _check_range("eps_alpha", eps_alpha, 0., np.inf, low_open=True)
  _check_range("top_k_fraction", top_k_fraction, 0., 1., low_open=True)
  if importance_weights is not None:
    chex.assert_equal_shape([importance_weights, advantages])

  mask = mask.astype(jnp.float32)
  advantages = jax.lax.stop_gradient(
      jnp.where(mask > 0, advantages, 0.).astype(jnp.float32))
  selected, threshold = _top_k_selection(advantages, mask, top_k_fraction,
                                         axis_name)
  num_selected = _psum(jnp.sum(selected), axis_name)
  shift = jnp.max(jnp.where(selected > 0, advantages, -jnp.inf))
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  shift = jnp.where(num_selected > 0, shift, 0.)
  shifted_advantages = jnp.where(selected > 0, advantages - shift, 0.)

  kl_per_state = categorical_kl(jax.lax.stop_gradient(target_logits), logits)
  kl = masked_mean(kl_per_state, mask, axis_name)
  log_probs = _log_prob(logits, actions)
  if importance_weights is not None:
    importance_weights = jnp.where(mask > 0, importance_weights, 0.)

  _, out = rlax.vmpo_loss(
      sample_log_probs=log_probs,
      advantages=shifted_advantages,
      temperature_constraint=rlax.LagrangePenalty(
          alpha=duals.temperature_param,
          epsilon=jnp.asarray(eps_eta, jnp.float32)),
      kl_constraints=[(jnp.broadcast_to(kl, log_probs.shape),
                       rlax.LagrangePenalty(
                           alpha=duals.alpha_param,
                           epsilon=jnp.asarray(eps_alpha, jnp.float32)))],
      projection_operator=_dual_value,
      restarting_weights=selected,
      importance_weights=importance_weights,
      top_k_fraction=1.0,  # The selection is already in restarting_weights.
      axis_name=axis_name,
      use_stop_gradient=True)

  # rlax's per-example policy loss is -log pi * psi * (global batch size).
  policy_loss = _global_mean(out.policy_loss, axis_name)
  temperature_loss = out.temperature_loss + shift
  kl_penalty = _global_mean(out.kl_loss, axis_name)
  alpha_loss = _global_mean(out.alpha_loss, axis_name)
  loss = policy_loss + temperature_loss + kl_penalty + alpha_loss

  eta, alpha = vmpo_duals_values(duals)
  # rlax's select-based stop-gradient leaves a (zero) tangent: stop it here.
  psi_max = jnp.max(jax.lax.stop_gradient(out.normalized_weights))
  if axis_name is not None:
    psi_max = jax.lax.pmax(psi_max, axis_name)
  metrics = {
      "eta": eta,
      "alpha": alpha,
      "policy_loss": policy_loss,
      "temperature_loss": temperature_loss,
      "kl_penalty": kl_penalty,
      "alpha_loss": alpha_loss,
      "kl_target": kl,
      "top_k_threshold": threshold,
      "num_selected": num_selected,
      "psi_max": psi_max,
      "advantage_mean": masked_mean(advantages, mask, axis_name),
      # Not in the loss: V-MPO has no entropy bonus; a collapse shows here.
      "entropy": masked_mean(_entropy(jax.lax.stop_gradient(logits)), mask,
                             axis_name),
  }
  return loss, metrics


# -------------------------------------------------------------- value losses
def value_loss(values: Array, returns: Array, mask: Array,
               axis_name: Optional[str] = None) -> Tuple[Array, Metrics]:
  """Masked mean of 0.5 (sg[G] - V)^2 (`rlax.l2_loss`; masking is ours).

  Args:
    values: float32 [T, B] (no bootstrap step).
    returns: float32 [T, B], targets G (stop-gradiented here).
    mask: float32 [T, B].
    axis_name: see module docstring.

  Returns:
    (loss [], {"value_mse": masked mean of (G - V)^2}).
  """
  chex.assert_rank([values, returns, mask], 2)
  chex.assert_equal_shape([values, returns, mask])
  per_step = rlax.l2_loss(values - jax.lax.stop_gradient(returns))
  loss = masked_mean(per_step, mask, axis_name)
  return loss, {"value_mse": 2. * loss}


def ppo_value_loss(values: Array, old_values: Array, returns: Array,
                   mask: Array, clip_epsilon: Optional[float],
                   axis_name: Optional[str] = None) -> Tuple[Array, Metrics]:
  """PPO value loss, optionally clipped around the old values (ours).

  Per step: 0.5 max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2),
  or 0.5 (V - G)^2 when `clip_epsilon` is None; masked mean. G and V_old are
  stop-gradiented.

  Args:
    values: float32 [T, B].
    old_values: float32 [T, B], the values when the data was collected.
    returns: float32 [T, B].
    mask: float32 [T, B].
    clip_epsilon: None (no clipping) or > 0, in value units.
    axis_name: see module docstring.

  Returns:
    (loss [], {"value_mse", "value_clip_fraction"}).
  """
  chex.assert_rank([values, old_values, returns, mask], 2)
  chex.assert_equal_shape([values, old_values, returns, mask])
  returns = jax.lax.stop_gradient(returns)
  old_values = jax.lax.stop_gradient(old_values)
  squared_error = jnp.square(values - returns)
  if clip_epsilon is None:
    per_step = squared_error
    clipped = jnp.zeros_like(values)
  else:
    _check_range("clip_epsilon", clip_epsilon, 0., np.inf, low_open=True)
    clipped_values = old_values + jnp.clip(values - old_values, -clip_epsilon,
                                           clip_epsilon)
    clipped_error = jnp.square(clipped_values - returns)
    per_step = jnp.maximum(squared_error, clipped_error)
    clipped = (clipped_error > squared_error).astype(values.dtype)
  loss = 0.5 * masked_mean(per_step, mask, axis_name)
  return loss, {
      "value_mse": masked_mean(squared_error, mask, axis_name),
      "value_clip_fraction": masked_mean(clipped, mask, axis_name),
  }


# -------------------------------------------------------------------- PPO
def ppo_loss(logits: Array, behaviour_logits: Array, actions: Array,
             advantages: Array, mask: Array, clip_epsilon: float,
             entropy_cost: float,
             axis_name: Optional[str] = None) -> Tuple[Array, Metrics]:
  """PPO clipped surrogate policy loss with an entropy bonus, masked.

  loss = masked mean of -min(r A, clip(r, 1 - eps, 1 + eps) A)
         - entropy_cost * masked mean of H(pi),  r = pi(a|s) / mu(a|s).

  The per-step surrogate is `rlax.clipped_surrogate_pg_loss` (vmapped over
  steps so that the masking, ours, can weight each step). Advantages and
  behaviour logits are stop-gradiented.

  Args:
    logits: float32 [T, B, A], the policy being trained (pi).
    behaviour_logits: float32 [T, B, A], the policy that acted (mu).
    actions: int32 [T, B].
    advantages: float32 [T, B].
    mask: float32 [T, B].
    clip_epsilon: > 0.
    entropy_cost: >= 0.
    axis_name: see module docstring.

  Returns:
    (loss [], metrics): surrogate_loss, entropy, clip_fraction, ratio_mean,
    approx_kl (masked mean KL(mu || pi)).
  """
  chex.assert_rank([logits, behaviour_logits, actions, advantages, mask],
                   [3, 3, 2, 2, 2])
  chex.assert_equal_shape([logits, behaviour_logits])
  chex.assert_equal_shape([actions, advantages, mask])
  chex.assert_type(actions, int)
  _check_range("clip_epsilon", clip_epsilon, 0., np.inf, low_open=True)
  _check_range("entropy_cost", entropy_cost, 0., np.inf)
  behaviour_logits = jax.lax.stop_gradient(behaviour_logits)
  log_ratio = _log_prob(logits, actions) - _log_prob(behaviour_logits, actions)
  ratio = jnp.exp(jnp.where(mask > 0, log_ratio, 0.))
  advantages = jnp.where(mask > 0, advantages, 0.)

  per_step = jax.vmap(
      lambda r, a: rlax.clipped_surrogate_pg_loss(r[None], a[None],
                                                  clip_epsilon))(
                                                      ratio.reshape(-1),
                                                      advantages.reshape(-1))
  surrogate_loss = masked_mean(per_step.reshape(ratio.shape), mask, axis_name)
  entropy = masked_mean(_entropy(logits), mask, axis_name)
  loss = surrogate_loss - entropy_cost * entropy
  clipped = (jnp.abs(ratio - 1.) > clip_epsilon).astype(jnp.float32)
  return loss, {
      "surrogate_loss": surrogate_loss,
      "entropy": entropy,
      "clip_fraction": masked_mean(clipped, mask, axis_name),
      "ratio_mean": masked_mean(ratio, mask, axis_name),
      "approx_kl": masked_mean(categorical_kl(behaviour_logits, logits), mask,
                               axis_name),
  }


# ------------------------------------------------------ distillation (ALD)
def distillation_loss(actor_logits: Array, actor_values: Array,
                      learner_logits: Array, learner_values: Array,
                      mask: Array, alpha_pi: float, alpha_v: float,
                      axis_name: Optional[str] = None
                      ) -> Tuple[Array, Metrics]:
  """ALD actor (distillation) loss, masked over the states the actor visited.

  loss = alpha_pi * mean KL(sg[pi_L] || pi_A)
         + alpha_v * mean 0.5 (sg[V_L] - V_A)^2   (masked means; ours).
  Gradients reach only the actor's logits and values.

  Args:
    actor_logits: float32 [T, B, A].
    actor_values: float32 [T, B].
    learner_logits: float32 [T, B, A] (stop-gradiented here).
    learner_values: float32 [T, B] (stop-gradiented here).
    mask: float32 [T, B].
    alpha_pi: policy distillation weight >= 0.
    alpha_v: value distillation weight >= 0.
    axis_name: see module docstring.

  Returns:
    (loss [], {"kl_learner_actor", "value_distill_mse", "policy_distill_loss",
    "value_distill_loss"}).
  """
  chex.assert_rank([actor_logits, actor_values, learner_logits,
                    learner_values, mask], [3, 2, 3, 2, 2])
  chex.assert_equal_shape([actor_logits, learner_logits])
  chex.assert_equal_shape([actor_values, learner_values, mask])
  chex.assert_equal_shape_prefix([actor_logits, mask], 2)
  _check_range("alpha_pi", alpha_pi, 0., np.inf)
  _check_range("alpha_v", alpha_v, 0., np.inf)
  kl = masked_mean(
      categorical_kl(jax.lax.stop_gradient(learner_logits), actor_logits),
      mask, axis_name)
  value_half_mse = masked_mean(
      rlax.l2_loss(actor_values - jax.lax.stop_gradient(learner_values)), mask,
      axis_name)
  policy_term = alpha_pi * kl
  value_term = alpha_v * value_half_mse
  return policy_term + value_term, {
      "kl_learner_actor": kl,
      "value_distill_mse": 2. * value_half_mse,
      "policy_distill_loss": policy_term,
      "value_distill_loss": value_term,
  }


def learner_regulariser(learner_logits: Array, actor_logits: Array,
                        mask: Array, axis_name: Optional[str] = None
                        ) -> Tuple[Array, Metrics]:
  """ALD learner regulariser KL(sg[pi_A] || pi_L), masked mean (ours).

  The caller multiplies it by `alpha_reg`. Gradients reach only the learner.

  Args:
    learner_logits: float32 [T, B, A].
    actor_logits: float32 [T, B, A] (stop-gradiented here).
    mask: float32 [T, B].
    axis_name: see module docstring.

  Returns:
    (kl [], {"kl_actor_learner": kl}).
  """
  chex.assert_rank([learner_logits, actor_logits, mask], [3, 3, 2])
  chex.assert_equal_shape([learner_logits, actor_logits])
  chex.assert_equal_shape_prefix([learner_logits, mask], 2)
  kl = masked_mean(
      categorical_kl(jax.lax.stop_gradient(actor_logits), learner_logits),
      mask, axis_name)
  return kl, {"kl_actor_learner": kl}
