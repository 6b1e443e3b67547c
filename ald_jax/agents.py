"""The agents: which model acts, which is trained by RL, which is distilled.

The one list of agents of the project (`AGENTS`, the keys of `ROLES`):
`config.AGENTS`, the runtimes and the experiment scripts all read it here.

  agent  acts with  RL policy  RL value   distilled
  lstm   LSTM       LSTM       LSTM       -
  gtrxl  GTrXL      GTrXL      GTrXL      -
  asym   LSTM       LSTM       GTrXL(v)   -
  ald    LSTM       GTrXL      GTrXL      LSTM <- GTrXL

Models are named 'actor' (the LSTM) and 'learner' (the GTrXL). This module
imports no JAX at import time (`config.py` reads it while parsing flags).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple


@dataclasses.dataclass(frozen=True)
class AgentRoles:
  """What each model does in one agent."""
  acting: str         # 'actor' (LSTM) or 'learner' (GTrXL)
  policy: str         # which model's logits the RL policy loss trains
  value: str          # which model's value the RL value loss trains
  distill: bool       # whether the actor is distilled from the learner

  @property
  def rl_models(self) -> Tuple[str, ...]:
    """Names of the RL-trained models, sorted."""
    return tuple(sorted({self.policy, self.value}))

  @property
  def models(self) -> Tuple[str, ...]:
    """Names of every model the agent has, sorted."""
    used = {self.acting, self.policy, self.value}
    if self.distill:
      used |= {"actor", "learner"}
    return tuple(sorted(used))

  @property
  def learner_carried(self) -> bool:
    """Whether the GTrXL's memory is carried by the learner (not by acting).

    True when the agent has a GTrXL that does not act: its state at each
    segment start is the learner's own, carried across consecutive segments.
    """
    return "learner" in self.models and self.acting != "learner"


ROLES: Dict[str, AgentRoles] = {
    "lstm": AgentRoles(acting="actor", policy="actor", value="actor",
                       distill=False),
    "gtrxl": AgentRoles(acting="learner", policy="learner", value="learner",
                        distill=False),
    "asym": AgentRoles(acting="actor", policy="actor", value="learner",
                       distill=False),
    "ald": AgentRoles(acting="actor", policy="learner", value="learner",
                      distill=True),
}

AGENTS: Tuple[str, ...] = tuple(ROLES)


def build_models(config: Any, env: Any) -> Dict[str, Any]:
  """The agent's models: 'actor' (LSTM) and/or 'learner' (GTrXL).

  Args:
    config: an `ald_jax.config.Config`.
    env: anything with `observation_size` and `num_actions`.
  Returns:
    name -> `networks.RecurrentModel`.
  """
  from ald_jax import networks  # pylint: disable=g-import-not-at-top
  roles = ROLES[config.agent]
  models = {}
  if "actor" in roles.models:
    models["actor"] = networks.make_lstm_model(
        observation_size=env.observation_size, num_actions=env.num_actions,
        encoder_hidden=config.encoder_hidden, lstm_hidden=config.lstm_hidden)
  if "learner" in roles.models:
    models["learner"] = networks.make_gtrxl_model(
        observation_size=env.observation_size, num_actions=env.num_actions,
        encoder_hidden=config.encoder_hidden, num_layers=config.gtrxl_layers,
        num_heads=config.gtrxl_heads, d_model=config.gtrxl_d_model,
        mlp_width=config.gtrxl_mlp_width, memory_len=config.gtrxl_memory_len,
        # asym's GTrXL is a critic only.
        policy_head=roles.policy == "learner")
  return models


def init_params(models: Dict[str, Any], key: Any) -> Dict[str, Any]:
  """Fresh params of every model: one key per model, in sorted name order."""
  import jax  # pylint: disable=g-import-not-at-top
  return {name: model.init(k) for (name, model), k in zip(
      sorted(models.items()), jax.random.split(key, len(models)))}
