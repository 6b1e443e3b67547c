"""Composing the ALD losses by hand: one learner step and one actor step.

Paste into a notebook, or run `python docs/examples/compose_losses.py`.
Toy linear "networks" map random features to logits and values; a fake
segment of dm_env time steps (with a termination and a truncation) gives the
returns. The learner takes V-MPO + value loss + alpha_reg * KL(sg[pi_A] ||
pi_L); the actor takes the distillation loss toward the learner.
"""
import jax
import jax.numpy as jnp
import optax

from ald_jax import losses

T, B, A, F = 8, 4, 3, 6            # steps, batch, actions, feature size
GAMMA, LAMBDA, ALPHA_REG = 0.99, 0.95, 0.01

keys = jax.random.split(jax.random.key(0), 8)
features = jax.random.normal(keys[0], (T + 1, B, F))       # s_0..s_T
actions = jax.random.randint(keys[1], (T, B), 0, A)
# dm_env step types: FIRST 0, MID 1, LAST 2. Column 0 terminates at step 3
# (discount 0), column 1 is truncated at step 5 (discount 1).
step_type = jnp.ones((T + 1, B), jnp.int32).at[0].set(0)
step_type = step_type.at[3, 0].set(2).at[4, 0].set(0)
step_type = step_type.at[5, 1].set(2).at[6, 1].set(0)
reward = jax.random.normal(keys[2], (T + 1, B)).at[0].set(0.)
reward = reward.at[4, 0].set(0.).at[6, 1].set(0.)
discount = jnp.ones((T + 1, B)).at[3, 0].set(0.)


def linear_init(key):
  k_pi, k_v = jax.random.split(key)
  return {"pi": 0.1 * jax.random.normal(k_pi, (F, A)),
          "v": 0.1 * jax.random.normal(k_v, (F,))}


def apply(params, x):
  """Logits [..., A] and values [...] of a linear toy model."""
  return x @ params["pi"], x @ params["v"]


learner, actor = linear_init(keys[3]), linear_init(keys[4])
target_learner = learner                          # the V-MPO target policy
duals = losses.init_vmpo_duals(init_eta=1.0, init_alpha=5.0)
behaviour_logits, _ = apply(actor, features[:-1])           # the actor acted

trans = losses.transitions_from_timesteps(step_type, reward, discount, GAMMA)


def learner_loss(learner, duals):
  logits, values = apply(learner, features)          # [T+1, B, A], [T+1, B]
  logits = logits[:-1]
  returns = losses.lambda_returns(trans.reward, trans.discount,
                                  jax.lax.stop_gradient(values), LAMBDA,
                                  mask=trans.mask)
  advantages = returns - values[:-1]                         # sg-ed inside vmpo
  target_logits, _ = apply(target_learner, features[:-1])
  rl, rl_metrics = losses.vmpo_loss(
      logits, target_logits, actions, advantages, duals, trans.mask,
      eps_eta=0.1, eps_alpha=0.01, top_k_fraction=0.5)
  v_loss, v_metrics = losses.value_loss(values[:-1], returns, trans.mask)
  reg, reg_metrics = losses.learner_regulariser(logits, behaviour_logits,
                                                trans.mask)
  loss = rl + 0.5 * v_loss + ALPHA_REG * reg
  return loss, {**rl_metrics, **v_metrics, **reg_metrics, "loss": loss}


def actor_loss(actor, learner):
  actor_logits, actor_values = apply(actor, features[:-1])
  learner_logits, learner_values = apply(learner, features[:-1])
  loss, metrics = losses.distillation_loss(
      actor_logits, actor_values, learner_logits, learner_values, trans.mask,
      alpha_pi=1.0, alpha_v=0.5)
  return loss, {**metrics, "loss": loss}


# One learner step (network and duals share an Adam step).
learner_opt = optax.adam(1e-3)
learner_opt_state = learner_opt.init((learner, duals))
(_, learner_metrics), grads = jax.jit(jax.value_and_grad(
    learner_loss, argnums=(0, 1), has_aux=True))(learner, duals)
updates, learner_opt_state = learner_opt.update(grads, learner_opt_state)
learner, duals = optax.apply_updates((learner, duals), updates)

# One actor (distillation) step toward the updated learner.
actor_opt = optax.adam(1e-3)
actor_opt_state = actor_opt.init(actor)
(_, actor_metrics), grads = jax.jit(jax.value_and_grad(
    actor_loss, has_aux=True))(actor, learner)
updates, actor_opt_state = actor_opt.update(grads, actor_opt_state)
actor = optax.apply_updates(actor, updates)

eta, alpha = losses.vmpo_duals_values(duals)
print("learner: " + " ".join(f"{k}={float(v):.4f}"
                             for k, v in sorted(learner_metrics.items())))
print("actor: " + " ".join(f"{k}={float(v):.4f}"
                           for k, v in sorted(actor_metrics.items())))
print(f"after one step: eta={float(eta):.4f} alpha={float(alpha):.4f}")
