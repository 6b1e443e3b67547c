"""Tests of ald_jax.losses against hand-computed cases and float64 NumPy
references written here (losses, analytic or finite-difference gradients,
return recursions), plus masking invariance and V-MPO dual dynamics."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ald_jax import losses

FIRST, MID, LAST = 0, 1, 2
T, B, A = 6, 5, 4


# -------------------------------------------------------------- references
def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p_logits, q_logits):
  log_p, log_q = np_log_softmax(p_logits), np_log_softmax(q_logits)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def np_masked_mean(x, mask):
  return (x * mask).sum() / max(mask.sum(), 1e-30)


def np_log_prob(logits, actions):
  return np.take_along_axis(np_log_softmax(logits), actions[..., None],
                            -1)[..., 0]


def np_softplus(x):
  return np.log1p(np.exp(x))


def np_sigmoid(x):
  return 1. / (1. + np.exp(-x))


def finite_difference_grad(f, x, h=1e-6):
  """Central differences of a float64 scalar function f at array x."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[index] += h
    minus[index] -= h
    grad[index] = (f(plus) - f(minus)) / (2 * h)
  return grad


def np_vmpo(logits, target_logits, actions, advantages, eta_param,
            alpha_param, mask, eps_eta, eps_alpha, frac, weights=None):
  """V-MPO loss, its parts and analytic gradients, in float64."""
  eta, alpha = np_softplus(eta_param), np_softplus(alpha_param)
  valid = mask > 0
  n_valid = int(valid.sum())
  k = max(1, int(np.floor(frac * n_valid)))
  threshold = np.sort(advantages[valid])[::-1][k - 1]
  selected = valid & (advantages >= threshold)
  weights = np.ones_like(advantages) if weights is None else weights
  unnormalised = np.where(selected, weights * np.exp(advantages / eta), 0.)
  psi = unnormalised / unnormalised.sum()
  log_pi = np_log_softmax(logits)
  log_prob = np.take_along_axis(log_pi, actions[..., None], -1)[..., 0]
  policy = -(psi * log_prob).sum()
  log_mean = np.log(unnormalised.sum() / selected.sum())
  temperature = eta * eps_eta + eta * log_mean
  kl = np_masked_mean(np_kl(target_logits, logits), mask)
  loss = policy + temperature + alpha * eps_alpha  # sg[a] KL + a(eps - KL)
  # Gradients.
  pi = np.exp(log_pi)
  one_hot = np.eye(logits.shape[-1])[actions]
  target_pi = np.exp(np_log_softmax(target_logits))
  d_logits = (-psi[..., None] * (one_hot - pi) +
              alpha * mask[..., None] * (pi - target_pi) / mask.sum())
  d_eta = eps_eta + log_mean - (psi * advantages).sum() / eta
  d_eta_param = d_eta * np_sigmoid(eta_param)
  d_alpha_param = (eps_alpha - kl) * np_sigmoid(alpha_param)
  parts = dict(policy_loss=policy, temperature_loss=temperature,
               kl_target=kl, top_k_threshold=threshold,
               num_selected=selected.sum(), kl_penalty=alpha * kl,
               alpha_loss=alpha * (eps_alpha - kl),
               entropy=np_masked_mean(-(pi * log_pi).sum(-1), mask))
  return loss, parts, (d_logits, d_eta_param, d_alpha_param)


def np_ppo(logits, behaviour_logits, actions, advantages, mask, eps, c_ent):
  ratio = np.exp(np_log_prob(logits, actions) -
                 np_log_prob(behaviour_logits, actions))
  surrogate = -np.minimum(ratio * advantages,
                          np.clip(ratio, 1 - eps, 1 + eps) * advantages)
  log_pi = np_log_softmax(logits)
  entropy = -(np.exp(log_pi) * log_pi).sum(-1)
  return np_masked_mean(surrogate, mask) - c_ent * np_masked_mean(entropy,
                                                                  mask)


def np_ppo_value(values, old_values, returns, mask, eps):
  error = (values - returns) ** 2
  if eps is not None:
    clipped = old_values + np.clip(values - old_values, -eps, eps)
    error = np.maximum(error, (clipped - returns) ** 2)
  return 0.5 * np_masked_mean(error, mask)


def np_distillation(actor_logits, actor_values, learner_logits,
                    learner_values, mask, alpha_pi, alpha_v):
  kl = np_masked_mean(np_kl(learner_logits, actor_logits), mask)
  value = np_masked_mean(0.5 * (learner_values - actor_values) ** 2, mask)
  return alpha_pi * kl + alpha_v * value


# Return references: loops over dm_env time steps, where a LAST step's "own"
# return is its value and the next episode is never looked at.
def np_transitions(step_type, reward, discount, gamma):
  mask = (step_type[:-1] != LAST).astype(np.float64)
  return reward[1:], gamma * discount[1:] * mask, mask


def np_lambda_returns(r, d, v, lam, mask):
  n = r.shape[0]
  g = np.zeros_like(r)
  for b in range(r.shape[1]):
    g_next = v[n, b]
    for t in reversed(range(n)):
      if mask[t, b] == 0:
        g[t, b] = v[t, b]
      else:
        g[t, b] = r[t, b] + d[t, b] * ((1 - lam) * v[t + 1, b] + lam * g_next)
      g_next = g[t, b]
  return g


def np_n_step(r, d, v, n_steps, mask):
  n = r.shape[0]
  g = np.array(v[:-1], copy=True)
  for b in range(r.shape[1]):
    for t in range(n):
      if mask[t, b] == 0:
        continue
      total, scale, s = 0., 1., t
      for _ in range(n_steps):
        total += scale * r[s, b]
        scale *= d[s, b]
        s += 1
        if s == n or mask[s, b] == 0:
          break
      g[t, b] = total + scale * v[s, b]
  return g


def np_gae(r, d, v, lam, mask):
  n = r.shape[0]
  adv = np.zeros_like(r)
  for b in range(r.shape[1]):
    a_next = 0.
    for t in reversed(range(n)):
      if mask[t, b] == 0:
        adv[t, b] = 0.
      else:
        delta = r[t, b] + d[t, b] * v[t + 1, b] - v[t, b]
        adv[t, b] = delta + d[t, b] * lam * a_next
      a_next = adv[t, b]
  return adv, adv + v[:-1]


def np_vtrace(r, d, v, log_rho, lam, rho_bar, mask):
  n = r.shape[0]
  rho = np.exp(log_rho)
  vs = np.array(v, copy=True)   # vs[T] = V[T]; masked steps keep vs = V.
  pg = np.zeros_like(r)
  for b in range(r.shape[1]):
    for t in reversed(range(n)):
      if mask[t, b] == 0:
        continue
      delta = r[t, b] + d[t, b] * v[t + 1, b] - v[t, b]
      c = lam * min(1., rho[t, b])
      vs[t, b] = (v[t, b] + min(rho_bar, rho[t, b]) * delta +
                  d[t, b] * c * (vs[t + 1, b] - v[t + 1, b]))
  for b in range(r.shape[1]):
    for t in range(n):
      if mask[t, b] == 0:
        continue
      q = r[t, b] + d[t, b] * (lam * vs[t + 1, b] + (1 - lam) * v[t + 1, b])
      pg[t, b] = min(rho_bar, rho[t, b]) * (q - v[t, b])
  return vs[:-1], pg


# ------------------------------------------------------------------ inputs
def random_inputs(seed, t=T, b=B, a=A):
  rng = np.random.default_rng(seed)
  mask = (rng.uniform(size=(t, b)) > 0.3).astype(np.float32)
  mask[0, 0] = 1.
  return dict(
      logits=rng.normal(size=(t, b, a)).astype(np.float32),
      other_logits=rng.normal(size=(t, b, a)).astype(np.float32),
      actions=rng.integers(0, a, size=(t, b)).astype(np.int32),
      advantages=(2 * rng.normal(size=(t, b))).astype(np.float32),
      values=rng.normal(size=(t, b)).astype(np.float32),
      other_values=rng.normal(size=(t, b)).astype(np.float32),
      returns=rng.normal(size=(t, b)).astype(np.float32),
      weights=rng.uniform(0.2, 1.5, size=(t, b)).astype(np.float32),
      mask=mask)


def random_timesteps(seed, t=12, b=6):
  """Plausible dm_env step types with terminations and truncations."""
  rng = np.random.default_rng(seed)
  step_type = np.zeros((t + 1, b), np.int32)
  reward = np.zeros((t + 1, b), np.float32)
  discount = np.ones((t + 1, b), np.float32)
  for j in range(b):
    step_type[0, j] = rng.choice([FIRST, MID])
    for i in range(1, t + 1):
      if step_type[i - 1, j] == LAST:
        step_type[i, j] = FIRST
        continue
      step_type[i, j] = LAST if rng.uniform() < 0.25 else MID
      reward[i, j] = rng.normal()
      if step_type[i, j] == LAST:
        discount[i, j] = rng.choice([0., 1.])
  values = rng.normal(size=(t + 1, b)).astype(np.float32)
  log_rhos = (0.7 * rng.normal(size=(t, b))).astype(np.float32)
  return step_type, reward, discount, values, log_rhos


def f64(x):
  return np.asarray(x, np.float64)


def perturb_masked(x, mask, seed):
  """x with entries at masked steps replaced by large random values."""
  rng = np.random.default_rng(seed)
  noise = (50 * rng.normal(size=x.shape)).astype(x.dtype)
  m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
  return np.where(m > 0, x, noise)


# --------------------------------------------------- transitions & returns
def hand_segment():
  """Three columns of 5 time steps (T = 4), gamma = 0.9, V = 10..50.

  col 0: termination  F M M L(d=0) F, rewards into steps 0 1 2 3 0.
  col 1: truncation   F M M L(d=1) F, same rewards.
  col 2: boundary     M L(d=0) F M M, rewards 0 5 0 1 2.
  """
  step_type = np.array([[FIRST, FIRST, MID], [MID, MID, LAST],
                        [MID, MID, FIRST], [LAST, LAST, MID],
                        [FIRST, FIRST, MID]], np.int32)
  reward = np.array([[0, 0, 0], [1, 1, 5], [2, 2, 0], [3, 3, 1], [0, 0, 2]],
                    np.float32)
  discount = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1]],
                      np.float32)
  values = np.tile(np.array([[10.], [20.], [30.], [40.], [50.]], np.float32),
                   (1, 3))
  return step_type, reward, discount, values


def test_transitions_hand():
  step_type, reward, discount, _ = hand_segment()
  tr = losses.transitions_from_timesteps(jnp.asarray(step_type),
                                         jnp.asarray(reward),
                                         jnp.asarray(discount), 0.9)
  np.testing.assert_allclose(tr.reward, [[1, 1, 5], [2, 2, 0], [3, 3, 1],
                                         [0, 0, 2]])
  # col 0: into LAST(d=0) gives 0; out of LAST gives 0. col 1: into LAST(d=1)
  # keeps 0.9. col 2: into LAST(d=0) 0, out of LAST 0, then 0.9 0.9.
  np.testing.assert_allclose(tr.discount, [[.9, .9, 0], [.9, .9, 0],
                                           [0, .9, .9], [0, 0, .9]],
                             rtol=1e-6)
  np.testing.assert_array_equal(tr.mask, [[1, 1, 1], [1, 1, 0], [1, 1, 1],
                                          [0, 0, 1]])
  assert tr.mask.dtype == jnp.float32


def hand_returns(fn, *args):
  step_type, reward, discount, values = hand_segment()
  tr = losses.transitions_from_timesteps(step_type, reward, discount, 0.9)
  return np.asarray(fn(tr.reward, tr.discount, jnp.asarray(values), *args,
                       mask=tr.mask))


def test_lambda_returns_hand_lambda_1():
  g = hand_returns(losses.lambda_returns, 1.)
  expected = np.array([
      # col 0 (termination at step 3): G2 = 3, G1 = 2 + .9*3 = 4.7,
      # G0 = 1 + .9*4.7 = 5.23; G3 (out of LAST) = V3 = 40.
      # col 1 (truncation at step 3): G2 = 3 + .9*V3 = 39, G1 = 2 + .9*39 =
      # 37.1, G0 = 1 + .9*37.1 = 34.39; G3 = V3 = 40.
      # col 2: G0 = 5 (terminates), G1 = V1 = 20 (out of LAST),
      # G3 = 2 + .9*V4 = 47, G2 = 1 + .9*47 = 43.3.
      [5.23, 34.39, 5.], [4.7, 37.1, 20.], [3., 39., 43.3], [40., 40., 47.]])
  np.testing.assert_allclose(g, expected, rtol=1e-5)


def test_lambda_returns_hand_lambda_half():
  g = hand_returns(losses.lambda_returns, 0.5)
  # col 1: G2 = 3 + .9*40 = 39 (cut at LAST), G1 = 2 + .9*(.5*30 + .5*39) =
  # 33.05, G0 = 1 + .9*(.5*20 + .5*33.05) = 24.8725.
  # col 2: G3 = 2 + .9*V4 = 47, G2 = 1 + .9*(.5*V3 + .5*47) = 1 + .9*43.5 =
  # 40.15.
  np.testing.assert_allclose(g[:, 1], [24.8725, 33.05, 39., 40.], rtol=1e-5)
  np.testing.assert_allclose(g[2:, 2], [40.15, 47.], rtol=1e-5)


def test_n_step_returns_hand():
  g = hand_returns(losses.n_step_returns, 2)
  # col 0: G0 = 1 + .9*2 + .81*V2 = 27.1; G1 = 2 + .9*3 + .9*0*V3 = 4.7; G2 = 3.
  # col 1: G0 = 27.1; G1 = 2 + .9*3 + .81*40 = 37.1; G2 = 3 + .9*40 = 39.
  # col 2: G0 = 5; G1 = V1 = 20; G2 = 1 + .9*2 + .81*V4 = 43.3; G3 = 47.
  expected = np.array([[27.1, 27.1, 5.], [4.7, 37.1, 20.], [3., 39., 43.3],
                       [40., 40., 47.]])
  np.testing.assert_allclose(g, expected, rtol=1e-5)


def test_gae_hand_equals_lambda_returns_identity():
  adv, ret = hand_returns(lambda *a, **k: jnp.stack(losses.gae(*a, **k)), 1.)
  # GAE(1) returns are the lambda=1 returns of the hand case above.
  np.testing.assert_allclose(ret, [[5.23, 34.39, 5.], [4.7, 37.1, 20.],
                                   [3., 39., 43.3], [40., 40., 47.]],
                             rtol=1e-5)
  # Advantages at the steps out of LAST are 0; col 1 step 2: 39 - 30 = 9.
  assert adv[3, 0] == 0 and adv[3, 1] == 0 and adv[1, 2] == 0
  np.testing.assert_allclose(adv[2, 1], 9., rtol=1e-5)


def test_vtrace_on_policy_equals_lambda_returns_hand():
  step_type, reward, discount, values = hand_segment()
  tr = losses.transitions_from_timesteps(step_type, reward, discount, 0.9)
  vs, pg = losses.vtrace(tr.reward, tr.discount, jnp.asarray(values),
                         jnp.zeros((4, 3)), mask=tr.mask)
  np.testing.assert_allclose(vs, [[5.23, 34.39, 5.], [4.7, 37.1, 20.],
                                  [3., 39., 43.3], [40., 40., 47.]],
                             rtol=1e-5)
  # On-policy, lambda 1: pg advantage = r + d vs' - V; col 1 step 2: 39 - 30.
  np.testing.assert_allclose(pg[2, 1], 9., rtol=1e-5)
  assert pg[3, 1] == 0.


def test_truncation_without_mask_is_treated_as_termination():
  """Documents why the mask matters: without it col 1 step 2 returns 3."""
  step_type, reward, discount, values = hand_segment()
  tr = losses.transitions_from_timesteps(step_type, reward, discount, 0.9)
  g = losses.lambda_returns(tr.reward, tr.discount, jnp.asarray(values), 1.)
  np.testing.assert_allclose(g[2, 1], 3., rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_transitions_random_against_numpy(seed):
  step_type, reward, discount, _, _ = random_timesteps(seed)
  tr = losses.transitions_from_timesteps(step_type, reward, discount, 0.97)
  r, d, m = np_transitions(step_type, f64(reward), f64(discount), 0.97)
  np.testing.assert_allclose(tr.reward, r)
  np.testing.assert_allclose(tr.discount, d, rtol=1e-6)
  np.testing.assert_array_equal(tr.mask, m)


@pytest.mark.parametrize("seed,lam", [(0, 0.), (1, 0.8), (2, 1.)])
def test_returns_random_against_numpy(seed, lam):
  step_type, reward, discount, values, log_rhos = random_timesteps(seed)
  tr = losses.transitions_from_timesteps(step_type, reward, discount, 0.95)
  r, d, m = np_transitions(step_type, f64(reward), f64(discount), 0.95)
  v = f64(values)
  tol = dict(rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      losses.lambda_returns(tr.reward, tr.discount, values, lam, mask=tr.mask),
      np_lambda_returns(r, d, v, lam, m), **tol)
  adv, ret = losses.gae(tr.reward, tr.discount, values, lam, mask=tr.mask)
  np_adv, np_ret = np_gae(r, d, v, lam, m)
  np.testing.assert_allclose(adv, np_adv, **tol)
  np.testing.assert_allclose(ret, np_ret, **tol)
  for n in (1, 3, 20):
    np.testing.assert_allclose(
        losses.n_step_returns(tr.reward, tr.discount, values, n, mask=tr.mask),
        np_n_step(r, d, v, n, m), **tol)
  vs, pg = losses.vtrace(tr.reward, tr.discount, values, log_rhos,
                         lambda_=max(lam, 0.5), clip_rho_threshold=1.2,
                         mask=tr.mask)
  np_vs, np_pg = np_vtrace(r, d, v, f64(log_rhos), max(lam, 0.5), 1.2, m)
  np.testing.assert_allclose(vs, np_vs, **tol)
  np.testing.assert_allclose(pg, np_pg, **tol)


def test_returns_validation():
  z = jnp.zeros((3, 2))
  with pytest.raises(ValueError, match="lambda_"):
    losses.lambda_returns(z, z, jnp.zeros((4, 2)), 1.5)
  with pytest.raises(ValueError, match="values"):
    losses.gae(z, z, jnp.zeros((3, 2)), 0.9)
  with pytest.raises(ValueError, match="`n`"):
    losses.n_step_returns(z, z, jnp.zeros((4, 2)), 0)
  with pytest.raises(ValueError, match="gamma"):
    losses.transitions_from_timesteps(jnp.zeros((4, 2), jnp.int32),
                                      jnp.zeros((4, 2)), jnp.zeros((4, 2)), 1.1)


# -------------------------------------------------------------- categorical
def test_categorical_kl_and_masked_mean():
  x = random_inputs(3)
  np.testing.assert_allclose(
      losses.categorical_kl(x["logits"], x["other_logits"]),
      np_kl(f64(x["logits"]), f64(x["other_logits"])), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      losses.masked_mean(x["values"], x["mask"]),
      np_masked_mean(f64(x["values"]), x["mask"]), rtol=1e-6)
  assert float(losses.masked_mean(jnp.full((2,), jnp.nan),
                                  jnp.zeros((2,)))) == 0.


# --------------------------------------------------------------------- V-MPO
def vmpo_jax(x, duals, eps_eta=0.1, eps_alpha=0.05, frac=0.5,
             importance=False):
  def loss_fn(logits, duals):
    return losses.vmpo_loss(
        logits, x["other_logits"], x["actions"], x["advantages"], duals,
        x["mask"], eps_eta=eps_eta, eps_alpha=eps_alpha, top_k_fraction=frac,
        importance_weights=x["weights"] if importance else None)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True))(x["logits"], duals)
  return loss, metrics, grads


@pytest.mark.parametrize("seed,frac,importance", [(0, 0.5, False),
                                                  (1, 0.3, True),
                                                  (2, 1.0, False)])
def test_vmpo_against_numpy(seed, frac, importance):
  x = random_inputs(seed)
  duals = losses.VmpoDuals(jnp.float32(0.3), jnp.float32(-0.4))
  loss, metrics, (g_logits, g_duals) = vmpo_jax(x, duals, frac=frac,
                                                importance=importance)
  ref, parts, (r_logits, r_eta, r_alpha) = np_vmpo(
      f64(x["logits"]), f64(x["other_logits"]), x["actions"],
      f64(x["advantages"]), 0.3, -0.4, f64(x["mask"]), 0.1, 0.05, frac,
      weights=f64(x["weights"]) if importance else None)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  for name, value in parts.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(metrics["eta"], np_softplus(0.3), rtol=1e-6)
  np.testing.assert_allclose(metrics["alpha"], np_softplus(-0.4), rtol=1e-6)
  np.testing.assert_allclose(g_logits, r_logits, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_duals.temperature_param, r_eta, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(g_duals.alpha_param, r_alpha, rtol=1e-4,
                             atol=1e-6)


def test_vmpo_hand_case():
  """T = 4, B = 1, two actions, uniform policy, eta = alpha = 1.

  Advantages 2, -1, 0, 1: the top half is steps 0 and 3, psi = (e^2, e^1) /
  (e^2 + e) = (0.731059, 0.268941). log pi(a) = ln 0.5 everywhere, so the
  policy loss is ln 2 = 0.693147. Temperature loss = 0.1 + ln((e^2 + e) / 2)
  = 0.1 + ln 5.053669 = 1.720115. The target is (0.75, 0.25) at step 1, so
  KL = .75 ln 1.5 + .25 ln .5 = 0.130812 there, mean 0.032703. The trust-
  region terms sum to alpha eps_alpha = 0.01: total 2.423262.
  """
  logits = jnp.zeros((4, 1, 2))
  target = logits.at[1, 0, 0].set(np.log(3.))
  actions = jnp.array([[0], [1], [0], [1]], jnp.int32)
  advantages = jnp.array([[2.], [-1.], [0.], [1.]])
  duals = losses.init_vmpo_duals(1., 1.)
  loss, m = losses.vmpo_loss(logits, target, actions, advantages, duals,
                             jnp.ones((4, 1)), eps_eta=0.1, eps_alpha=0.01)
  np.testing.assert_allclose(m["policy_loss"], 0.693147, rtol=1e-5)
  np.testing.assert_allclose(m["temperature_loss"], 1.720115, rtol=1e-5)
  np.testing.assert_allclose(m["kl_target"], 0.032703, rtol=1e-4)
  np.testing.assert_allclose(m["kl_penalty"], 0.032703, rtol=1e-4)
  np.testing.assert_allclose(m["alpha_loss"], 0.01 - 0.032703, rtol=1e-4)
  np.testing.assert_allclose(m["psi_max"], 0.731059, rtol=1e-5)
  np.testing.assert_allclose(m["top_k_threshold"], 1.)
  np.testing.assert_allclose(loss, 2.423262, rtol=1e-5)
  # Masking step 0 leaves 3 valid steps: k = floor(1.5) = 1, only step 3
  # (A = 1) is kept, psi = 1: temperature loss 0.1 + ln e = 1.1, KL over 3
  # steps 0.130812 / 3 = 0.043604; total ln 2 + 1.1 + 0.01 = 1.803147.
  loss, m = losses.vmpo_loss(logits, target, actions, advantages, duals,
                             jnp.array([[0.], [1.], [1.], [1.]]),
                             eps_eta=0.1, eps_alpha=0.01)
  np.testing.assert_allclose(m["num_selected"], 1.)
  np.testing.assert_allclose(m["temperature_loss"], 1.1, rtol=1e-5)
  np.testing.assert_allclose(m["kl_target"], 0.043604, rtol=1e-4)
  np.testing.assert_allclose(loss, 1.803147, rtol=1e-5)


def test_vmpo_large_advantages_do_not_underflow():
  """Top-half advantages of -300 with eta = 1 would underflow exp(A/eta)."""
  x = random_inputs(4)
  x["advantages"] = x["advantages"] - 300.
  duals = losses.VmpoDuals(jnp.float32(0.3), jnp.float32(-0.4))
  loss, _, (g_logits, g_duals) = vmpo_jax(x, duals)
  ref, _, (r_logits, r_eta, _) = np_vmpo(
      f64(x["logits"]), f64(x["other_logits"]), x["actions"],
      f64(x["advantages"]), 0.3, -0.4, f64(x["mask"]), 0.1, 0.05, 0.5)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(g_logits, r_logits, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_duals.temperature_param, r_eta, rtol=1e-3)


def dual_step(x, eps_eta, eps_alpha, lr=0.1):
  duals = losses.init_vmpo_duals(1., 1.)
  _, _, (_, g_duals) = vmpo_jax(x, duals, eps_eta=eps_eta,
                                eps_alpha=eps_alpha)
  new = jax.tree.map(lambda p, g: p - lr * g, duals, g_duals)
  old_values = losses.vmpo_duals_values(duals)
  new_values = losses.vmpo_duals_values(new)
  return [float(n - o) for n, o in zip(new_values, old_values)]


def psi_kl_to_uniform(advantages, mask, eta=1.):
  """KL(psi || uniform on the selected half), numpy."""
  valid = advantages[mask > 0]
  top = np.sort(valid)[::-1][:max(1, len(valid) // 2)]
  psi = np.exp(top / eta) / np.exp(top / eta).sum()
  return float((psi * np.log(psi * len(top))).sum())


def test_vmpo_duals_move_towards_constraints():
  x = random_inputs(5)
  x["other_logits"] = x["logits"] + 3 * x["other_logits"]  # KL(target||pi) big
  spread = psi_kl_to_uniform(f64(x["advantages"]), x["mask"])
  kl = np_masked_mean(np_kl(f64(x["other_logits"]), f64(x["logits"])),
                      x["mask"])
  assert spread > 0.05 and kl > 0.05
  # Weights more peaked than eps_eta allows -> eta rises; KL > eps -> alpha up.
  d_eta, d_alpha = dual_step(x, eps_eta=spread / 4, eps_alpha=kl / 4)
  assert d_eta > 0 and d_alpha > 0
  # Looser constraints -> both fall.
  d_eta, d_alpha = dual_step(x, eps_eta=spread * 4, eps_alpha=kl * 4)
  assert d_eta < 0 and d_alpha < 0


def test_vmpo_validation():
  x = random_inputs(0)
  duals = losses.init_vmpo_duals(1., 1.)
  args = (x["logits"], x["other_logits"], x["actions"], x["advantages"],
          duals, x["mask"])
  with pytest.raises(ValueError, match="top_k_fraction"):
    losses.vmpo_loss(*args, eps_eta=0.1, eps_alpha=0.1, top_k_fraction=0.)
  with pytest.raises(ValueError, match="eps_eta"):
    losses.vmpo_loss(*args, eps_eta=-1., eps_alpha=0.1)
  with pytest.raises(ValueError, match="init_eta"):
    losses.init_vmpo_duals(0., 1.)
  np.testing.assert_allclose(
      losses.vmpo_duals_values(losses.init_vmpo_duals(0.3, 5.)), (0.3, 5.),
      rtol=1e-6)


# ------------------------------------------------- other losses, FD grads
def check_against_fd(jax_fn, np_fn, args, argnums, rtol=1e-4, atol=1e-6):
  """Value and gradients of jax_fn(*args)[0] vs np_fn on float64 copies."""
  loss, grads = jax.jit(jax.value_and_grad(
      lambda *a: jax_fn(*a)[0], argnums=argnums))(*args)
  args64 = [f64(a) if np.asarray(a).dtype.kind == "f" else np.asarray(a)
            for a in args]
  np.testing.assert_allclose(loss, np_fn(*args64), rtol=1e-5, atol=1e-7)
  for argnum, grad in zip(argnums, grads):
    def f(value, argnum=argnum):
      a = list(args64)
      a[argnum] = value
      return np_fn(*a)
    np.testing.assert_allclose(
        grad, finite_difference_grad(f, args64[argnum]), rtol=rtol, atol=atol,
        err_msg=f"gradient of argument {argnum}")


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_loss_against_numpy(seed):
  x = random_inputs(seed)
  # Spread the ratios so that both clipped and unclipped steps occur.
  behaviour = x["logits"] + 0.6 * x["other_logits"]
  jax_fn = lambda lg, bl, ac, ad, m: losses.ppo_loss(  # noqa: E731
      lg, bl, ac, ad, m, clip_epsilon=0.2, entropy_cost=0.03)
  np_fn = lambda *a: np_ppo(*a, 0.2, 0.03)  # noqa: E731
  args = (x["logits"], behaviour, x["actions"], x["advantages"], x["mask"])
  check_against_fd(jax_fn, np_fn, args, argnums=(0,))
  _, metrics = jax_fn(*args)
  assert 0. < float(metrics["clip_fraction"]) < 1.


@pytest.mark.parametrize("clip", [None, 0.3])
def test_value_losses_against_numpy(clip):
  x = random_inputs(7)
  check_against_fd(
      lambda v, r, m: losses.value_loss(v, r, m),
      lambda v, r, m: np_masked_mean(0.5 * (r - v) ** 2, m),
      (x["values"], x["returns"], x["mask"]), argnums=(0,))
  check_against_fd(
      lambda v, o, r, m: losses.ppo_value_loss(v, o, r, m, clip),
      lambda v, o, r, m: np_ppo_value(v, o, r, m, clip),
      (x["values"], x["other_values"], x["returns"], x["mask"]),
      argnums=(0,))


def test_distillation_and_regulariser_against_numpy():
  x = random_inputs(8)
  args = (x["logits"], x["values"], x["other_logits"], x["other_values"],
          x["mask"])
  check_against_fd(
      lambda *a: losses.distillation_loss(*a, alpha_pi=0.7, alpha_v=0.4),
      lambda *a: np_distillation(*a, 0.7, 0.4), args, argnums=(0, 1))
  # The learner targets get no gradient.
  g = jax.grad(lambda ll, lv: losses.distillation_loss(
      x["logits"], x["values"], ll, lv, x["mask"], 1., 1.)[0],
               argnums=(0, 1))(x["other_logits"], x["other_values"])
  assert not np.any(g[0]) and not np.any(g[1])
  _, m = losses.distillation_loss(*args, alpha_pi=0.7, alpha_v=0.4)
  np.testing.assert_allclose(
      m["kl_learner_actor"],
      np_masked_mean(np_kl(f64(x["other_logits"]), f64(x["logits"])),
                     x["mask"]), rtol=1e-5)
  check_against_fd(
      losses.learner_regulariser,
      lambda ll, al, m: np_masked_mean(np_kl(al, ll), m),
      (x["logits"], x["other_logits"], x["mask"]), argnums=(0,))


# ------------------------------------------------------------------ masking
LOSSES = {
    "vmpo": lambda x: losses.vmpo_loss(
        x["logits"], x["other_logits"], x["actions"], x["advantages"],
        losses.VmpoDuals(x["eta"], x["alpha"]), x["mask"], eps_eta=0.1,
        eps_alpha=0.05, importance_weights=x["weights"]),
    "ppo": lambda x: losses.ppo_loss(
        x["logits"], x["other_logits"], x["actions"], x["advantages"],
        x["mask"], clip_epsilon=0.2, entropy_cost=0.01),
    "value": lambda x: losses.value_loss(x["values"], x["returns"],
                                         x["mask"]),
    "ppo_value": lambda x: losses.ppo_value_loss(
        x["values"], x["other_values"], x["returns"], x["mask"], 0.2),
    "distillation": lambda x: losses.distillation_loss(
        x["logits"], x["values"], x["other_logits"], x["other_values"],
        x["mask"], alpha_pi=1., alpha_v=0.5),
    "regulariser": lambda x: losses.learner_regulariser(
        x["logits"], x["other_logits"], x["mask"]),
}
DIFFERENTIABLE = ("logits", "values", "eta", "alpha")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_steps_change_nothing(name):
  x = random_inputs(9)
  x["eta"], x["alpha"] = np.float32(0.2), np.float32(-0.1)
  y = dict(x)
  for key in ("logits", "other_logits", "advantages", "values",
              "other_values", "returns", "weights"):
    y[key] = perturb_masked(x[key], x["mask"], seed=len(key))
  y["actions"] = np.where(x["mask"] > 0, x["actions"],
                          (x["actions"] + 1) % A).astype(np.int32)

  def value_and_grads(inputs):
    def f(diff):
      return LOSSES[name]({**inputs, **diff})[0]
    diff = {k: inputs[k] for k in DIFFERENTIABLE}
    return jax.value_and_grad(f)(diff)

  loss_x, grads_x = value_and_grads(x)
  loss_y, grads_y = value_and_grads(y)
  np.testing.assert_allclose(loss_y, loss_x, rtol=1e-6)
  for key in DIFFERENTIABLE:
    np.testing.assert_allclose(grads_y[key], grads_x[key], rtol=1e-5,
                               atol=1e-7, err_msg=key)
  masked = x["mask"] == 0
  assert not np.any(np.asarray(grads_x["logits"])[masked])
  assert not np.any(np.asarray(grads_x["values"])[masked])
